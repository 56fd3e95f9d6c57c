//! Docker Compose projects for tests: find Docker and a compose CLI (or fail saying what to
//! install), build the images offline, start a uniquely named project, read its containers'
//! states, and take everything down again, also when the test fails (the guard's `Drop`).
//!
//! Works with `docker compose` (v2 plugin) and `docker-compose` (1.27+); `FONDATION_COMPOSE`
//! (e.g. `docker-compose`) picks one explicitly. Commands are blocking: each takes well under a
//! second, and tests run on a multi-threaded runtime.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

/// Label Compose puts on every container, network and volume of a project.
const PROJECT_LABEL: &str = "com.docker.compose.project";
const SERVICE_LABEL: &str = "com.docker.compose.service";

const INSTALL_HINT: &str = "install Docker Engine and Compose (Debian: `apt-get install docker.io \
     docker-compose`, or Docker's docker-ce + docker-compose-plugin), start the daemon \
     (`systemctl start docker`), and make sure this user may use it (root, or the docker group)";

fn describe(program: &str, args: &[&str], output: &Output) -> String {
    format!(
        "`{program} {}` exited with {}: {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    )
}

/// Runs `docker` with `args`; stdout on success.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker ({e}): {INSTALL_HINT}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(describe("docker", args, &output))
    }
}

/// Panics, saying what to install or start, unless the Docker daemon answers and a compose CLI
/// exists. Returns the compose command (program and leading arguments).
pub fn require_docker() -> Vec<String> {
    match docker(&["version", "--format", "{{.Server.Version}}"]) {
        Ok(version) => eprintln!("docker engine {}", version.trim()),
        Err(e) => panic!("Docker is required by this test and is not usable: {e}\n{INSTALL_HINT}"),
    }
    compose_command()
}

/// `FONDATION_COMPOSE` when set, else `docker compose` when the plugin is there, else
/// `docker-compose`.
fn compose_command() -> Vec<String> {
    if let Ok(explicit) = std::env::var("FONDATION_COMPOSE") {
        return explicit.split_whitespace().map(String::from).collect();
    }
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("docker", &["compose", "version"]) {
        vec!["docker".into(), "compose".into()]
    } else if works("docker-compose", &["version"]) {
        vec!["docker-compose".into()]
    } else {
        panic!("neither `docker compose` nor `docker-compose` works: {INSTALL_HINT}")
    }
}

/// The repository's root folder (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test kit lives one folder below the repository root")
        .to_path_buf()
}

/// Cargo's target folder of the running test (`<target>/<profile>/deps/<test>`), so the image
/// build reuses the binaries this test run was built with.
pub fn cargo_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    exe.ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").exists())
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Runs `scripts/build-images --profile dev --test-images --tag <tag>`, echoing its output, and
/// panics if it fails. Returns how long it took.
pub fn build_images(tag: &str) -> std::time::Duration {
    let started = Instant::now();
    let script = repo_root().join("scripts/build-images");
    let status = Command::new(&script)
        .args(["--profile", "dev", "--test-images", "--tag", tag])
        .env("CARGO_TARGET_DIR", cargo_target_dir())
        .current_dir(repo_root())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        status.success(),
        "{} failed ({status}); its output is above",
        script.display()
    );
    started.elapsed()
}

/// One container of a project, as `docker inspect` sees it.
#[derive(Debug, Clone)]
pub struct ContainerState {
    pub id: String,
    /// The container's host name: the agents' default AGENT_ID.
    pub hostname: String,
    pub service: String,
    /// `running`, `exited`, ...
    pub status: String,
    /// `healthy`, `starting`, `unhealthy`, or `none` without a health check.
    pub health: String,
}

/// A compose project started by a test. Dropping it runs `down -v --remove-orphans` and removes
/// the images tagged for it, whatever happened before.
pub struct ComposeProject {
    pub name: String,
    command: Vec<String>,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    /// Empty file given as `--env-file`, so a developer's `.env` does not leak into the test.
    env_file: PathBuf,
    /// Images removed with the project.
    images: Vec<String>,
}

/// Variables passed to compose besides the test's own: what the docker CLI needs to find its
/// daemon. Everything else is dropped so a developer's CONVEX_URL or RUST_LOG cannot change the
/// test.
pub const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    "XDG_RUNTIME_DIR",
];

impl ComposeProject {
    /// A project named `<prefix>-<random>` over `files` (relative to the repository root), with
    /// `env` for the files' `${...}` variables. Nothing is started yet.
    pub fn new(
        command: Vec<String>,
        name: String,
        files: &[&str],
        env: Vec<(String, String)>,
        scratch: &Path,
    ) -> Self {
        let env_file = scratch.join("compose.env");
        std::fs::write(&env_file, "").expect("writing an empty env file");
        Self {
            name,
            command,
            files: files.iter().map(|f| repo_root().join(f)).collect(),
            env,
            env_file,
            images: Vec::new(),
        }
    }

    /// Images to remove with the project, parents first (they are removed in reverse).
    pub fn remove_images_on_drop(&mut self, images: Vec<String>) {
        self.images = images;
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.command[0]);
        command.args(&self.command[1..]);
        command
            .arg("--project-name")
            .arg(&self.name)
            .arg("--env-file")
            .arg(&self.env_file);
        for file in &self.files {
            command.arg("--file").arg(file);
        }
        command.args(args).current_dir(repo_root()).env_clear();
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs a compose subcommand; stdout on success.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let output = self
            .command(args)
            .output()
            .map_err(|e| format!("cannot run {:?} ({e}): {INSTALL_HINT}", self.command))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(describe(&self.command.join(" "), args, &output))
        }
    }

    /// Runs a compose subcommand and panics if it fails.
    pub fn must(&self, args: &[&str]) -> String {
        eprintln!("$ {} {}", self.command.join(" "), args.join(" "));
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `host:port` published for a service's container port (`compose port`).
    pub fn published(&self, service: &str, port: u16) -> Result<String, String> {
        let out = self.run(&["port", service, &port.to_string()])?;
        let addr = out.trim();
        if addr.is_empty() || addr.ends_with(":0") {
            return Err(format!("{service}:{port} is not published (yet): {out:?}"));
        }
        Ok(addr.to_string())
    }

    /// Every container of the project, running or not.
    pub fn containers(&self) -> Result<Vec<ContainerState>, String> {
        let filter = format!("label={PROJECT_LABEL}={}", self.name);
        let ids = docker(&["ps", "--all", "--quiet", "--no-trunc", "--filter", &filter])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let format = format!(
            "{{{{.Id}}}} {{{{.Config.Hostname}}}} {{{{index .Config.Labels \"{SERVICE_LABEL}\"}}}} \
             {{{{.State.Status}}}} {{{{if .State.Health}}}}{{{{.State.Health.Status}}}}{{{{else}}}}none{{{{end}}}}"
        );
        let mut args = vec!["inspect", "--format", &format];
        args.extend(ids);
        // A container removed between `ps` and `inspect` makes inspect fail: the caller polls.
        let out = docker(&args)?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields[..] {
                    [id, hostname, service, status, health] => Some(ContainerState {
                        id: id.into(),
                        hostname: hostname.into(),
                        service: service.into(),
                        status: status.into(),
                        health: health.into(),
                    }),
                    _ => None,
                }
            })
            .collect())
    }

    /// Containers, networks and volumes carrying the project's label.
    pub fn leftovers(&self) -> Result<Vec<String>, String> {
        let filter = format!("label={PROJECT_LABEL}={}", self.name);
        let mut found = Vec::new();
        for (kind, args) in [
            (
                "container",
                vec!["ps", "--all", "--quiet", "--filter", &filter],
            ),
            (
                "network",
                vec!["network", "ls", "--quiet", "--filter", &filter],
            ),
            (
                "volume",
                vec!["volume", "ls", "--quiet", "--filter", &filter],
            ),
        ] {
            for id in docker(&args)?.split_whitespace() {
                found.push(format!("{kind} {id}"));
            }
        }
        Ok(found)
    }

    /// `down -v --remove-orphans` with a short stop timeout (agents would otherwise drain for
    /// up to their stop_grace_period).
    pub fn down(&self) -> Result<String, String> {
        self.run(&["down", "--volumes", "--remove-orphans", "--timeout", "5"])
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The containers' own account of what went wrong, before they are gone.
            match self.run(&["logs", "--no-color", "--tail", "150"]) {
                Ok(logs) => eprintln!("---- logs of compose project {} ----\n{logs}", self.name),
                Err(e) => eprintln!("could not read the project's logs: {e}"),
            }
        }
        if let Err(e) = self.down() {
            eprintln!(
                "cleaning up compose project {} failed: {e}; remove it with `docker compose -p {} down -v`",
                self.name, self.name
            );
        }
        match self.leftovers() {
            Ok(left) if left.is_empty() => {}
            Ok(left) => eprintln!("compose project {} left behind: {left:?}", self.name),
            Err(e) => eprintln!("could not list what project {} left: {e}", self.name),
        }
        // Children before parents (the fixture agent image is built on the agent image), so each
        // removal also prunes the layers only it used; the base image stays, tagged and cached.
        for image in self.images.iter().rev() {
            if let Err(e) = docker(&["image", "rm", image]) {
                eprintln!("could not remove image {image}: {e}");
            }
        }
    }
}
