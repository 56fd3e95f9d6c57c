//! Issue 14: what no manifest validator can check, checked by running. The agent image under the
//! securityContext of `deploy/kubernetes/agent-deployment.yaml`, translated to `docker run`
//! (`--read-only`, a tmpfs wherever the pod mounts an emptyDir, the same user, capabilities and
//! no privilege escalation, the manifest's settings), joins a compose stack's coordinator and
//! completes a job with per-slot analyzer users required; then the hostile analyzer's probe
//! (tests/tests/hostile_analyzer.rs, here inside the container) finds itself a slot user with no
//! capability that reads neither the mounted token nor the agent's environment.
//!
//! Needs Docker and a compose CLI, like the compose test; runs alone (.config/nextest.toml).

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use fondation_testkit::{
    fixture_cli::{PROBE_PATH, PROBE_READ_OK},
    support::{
        compose::{self, docker, repo_root, ComposeProject},
        grpcurl, wait,
    },
};
use serde_json::json;
use serde_yaml::Value;

const OVERRIDE: &str = "tests/compose/docker-compose.test.yml";
const REPO_URL: &str = "git://gitserver/fondation/demo.git";
/// Documents of one fixture run: 3 YAML files, 11 chapters, 11 reviewed chapters, 11 tutorials.
const SAMPLE_DOCUMENTS: usize = 36;
const TIMEOUT: Duration = Duration::from_secs(120);

/// Where the pod mounts its Secret; the test mounts a stand-in token there for the probe.
const SECRET_FILE: &str = "/run/secrets/fondation/agent-token";

/// Settings of the manifest that point at what the pod has and this run has not (TLS material
/// and the token of mounted Secrets, the pod's name), replaced by the test stack's.
const REPLACED: &[&str] = &[
    "AGENT_ID",
    "COORDINATOR_URL",
    "AGENT_TOKEN_FILE",
    "TLS_CA",
    "TLS_CERT",
    "TLS_KEY",
    "REPO_ALLOWLIST",
];

/// `docker run` arguments equivalent to the agent container's securityContext, emptyDirs and
/// settings in the Deployment.
fn docker_run_args_from_manifest() -> Vec<String> {
    let path = repo_root().join("deploy/kubernetes/agent-deployment.yaml");
    let deployment: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).expect("the manifest");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    let mut args = Vec::new();

    let user = security["runAsUser"].as_u64().expect("runAsUser");
    let group = security["runAsGroup"].as_u64().unwrap_or(user);
    args.push(format!("--user={user}:{group}"));
    if security["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    if security["allowPrivilegeEscalation"] == false {
        args.push("--security-opt=no-new-privileges:true".into());
    }
    for cap in security["capabilities"]["drop"].as_sequence().unwrap() {
        args.push(format!("--cap-drop={}", cap.as_str().unwrap()));
    }
    for cap in security["capabilities"]["add"].as_sequence().unwrap() {
        args.push(format!("--cap-add={}", cap.as_str().unwrap()));
    }

    // emptyDirs become tmpfs mounts (exec, like an emptyDir; sized like its sizeLimit).
    let empty_dirs: BTreeMap<&str, &Value> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|v| v.get("emptyDir").is_some())
        .map(|v| (v["name"].as_str().unwrap(), &v["emptyDir"]))
        .collect();
    let mut tmpfs = 0;
    for mount in container["volumeMounts"].as_sequence().unwrap() {
        let Some(empty_dir) = empty_dirs.get(mount["name"].as_str().unwrap()) else {
            continue;
        };
        let size = empty_dir["sizeLimit"]
            .as_str()
            .map(|s| s.replace("Gi", "g").replace("Mi", "m"))
            .unwrap_or_else(|| "256m".into());
        args.push(format!(
            "--tmpfs={}:rw,exec,nosuid,mode=1777,size={size}",
            mount["mountPath"].as_str().unwrap()
        ));
        tmpfs += 1;
    }
    assert!(tmpfs >= 3, "workspaces, home and /tmp are emptyDirs");

    for env in container["env"].as_sequence().unwrap() {
        let name = env["name"].as_str().unwrap();
        if REPLACED.contains(&name) {
            continue;
        }
        let value = env["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has a plain value"));
        args.push(format!("--env={name}={value}"));
    }
    args
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_image_under_the_pod_security_context_completes_a_job() {
    let compose_command = compose::require_docker();
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let tag = format!("test-{suffix}");
    let scratch = tempfile::tempdir().expect("a temp dir for the test");
    let name = format!("fondation-k8s-{suffix}");
    let run_log_dir: PathBuf = scratch.path().join("run-log");
    let env = vec![
        ("FONDATION_TAG".to_string(), tag.clone()),
        ("COORDINATOR_BIND".into(), "127.0.0.1".into()),
        ("COORDINATOR_PORT".into(), "0".into()),
        (
            "FONDATION_TEST_RUN_LOG_DIR".into(),
            run_log_dir.to_string_lossy().into_owned(),
        ),
        ("FIXTURE_STEP_DELAY_MS".into(), "200".into()),
    ];
    let mut project = ComposeProject::new(
        compose_command,
        name.clone(),
        &["docker-compose.yml", OVERRIDE],
        env,
        scratch.path(),
    );
    project.remove_images_on_drop(
        [
            "fondation-coordinator",
            "fondation-agent",
            "fondation-agent-fixture",
            "fondation-testkit",
        ]
        .iter()
        .map(|image| format!("{image}:{tag}"))
        .collect(),
    );
    // A stand-in for the pod's mounted token, readable by the agent's user only: the hostile
    // analyzer must not read it.
    let secret = scratch.path().join("agent-token");
    std::fs::write(&secret, "k8s-test-agent-token-must-stay-secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
    nix::unistd::chown(
        &secret,
        Some(nix::unistd::Uid::from_raw(10001)),
        Some(nix::unistd::Gid::from_raw(10001)),
    )
    .expect("giving the stand-in token to uid 10001 (the test runs as root, like Docker's CLI)");
    compose::build_images(&tag);

    // The coordinator and the git server of the compose stack; no compose agent.
    project.must(&["up", "--detach", "--no-build", "--scale", "agent=0"]);
    let addr = wait::until("the coordinator's published port", TIMEOUT, || async {
        project.published("coordinator", 50051).map(Some)
    })
    .await;
    wait::until("the coordinator to be healthy", TIMEOUT, || async {
        let states = project.containers()?;
        let ready = states
            .iter()
            .filter(|c| c.health == "healthy")
            .map(|c| c.service.as_str())
            .collect::<Vec<_>>();
        if ready.contains(&"coordinator") && ready.contains(&"gitserver") {
            Ok(Some(()))
        } else {
            Err(wait::state(&states))
        }
    })
    .await;

    // The pod's agent, as `docker run`, on the project's network. The compose labels make it an
    // orphan of the project: the project's guard (`down --remove-orphans`) removes it too.
    let network = format!("{}_default", name.replace('-', "").to_lowercase());
    let network = if docker(&["network", "inspect", &network]).is_ok() {
        network
    } else {
        format!("{name}_default")
    };
    let mut args: Vec<String> = vec![
        "run".into(),
        "--detach".into(),
        format!("--network={network}"),
        format!("--label=com.docker.compose.project={name}"),
        "--label=com.docker.compose.service=k8s-agent".into(),
        "--label=com.docker.compose.oneoff=False".into(),
    ];
    args.extend(docker_run_args_from_manifest());
    args.extend([
        "--env=COORDINATOR_URL=http://coordinator:50051".to_string(),
        "--env=REPO_ALLOWLIST=git://gitserver/".into(),
        "--env=ANALYZER_ENV=PATH,HOME,TMPDIR,LANG,FIXTURE_*".into(),
        "--env=FIXTURE_STEP_DELAY_MS=200".into(),
        format!("--volume={}:{SECRET_FILE}:ro", secret.display()),
        format!("fondation-agent-fixture:{tag}"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eprintln!("$ docker {}", args.join(" "));
    let container = docker(&args)
        .unwrap_or_else(|e| panic!("docker run of the agent: {e}"))
        .trim()
        .to_string();
    let container = container.as_str();

    let agent = wait::until(
        "the agent under the pod's securityContext to register",
        TIMEOUT,
        || async {
            let running = docker(&["inspect", "--format", "{{.State.Status}}", container])?;
            if running.trim() != "running" {
                let logs = docker(&["logs", container]).unwrap_or_default();
                panic!("the agent stopped ({}): {logs}", running.trim());
            }
            let reply = grpcurl::call(&addr, "fondation.v1.Admin/ListAgents", None)?;
            Ok(reply["agents"][0]["agentId"].as_str().map(String::from))
        },
    )
    .await;
    println!("agent {agent} registered from a read-only root");

    let request = json!({ "repo_url": REPO_URL, "branch": "main", "prompt": "explain" });
    let reply =
        grpcurl::call(&addr, "fondation.v1.Admin/SubmitJob", Some(&request)).expect("SubmitJob");
    let job_id = reply["jobId"].as_str().expect("a job id").to_string();
    let job = wait::until("the job to complete", TIMEOUT, || async {
        let job = grpcurl::call(
            &addr,
            "fondation.v1.Admin/GetJob",
            Some(&json!({ "job_id": job_id })),
        )?;
        match job["status"].as_str() {
            Some("completed") => Ok(Some(job)),
            Some("failed" | "dead" | "canceled") => {
                let logs = docker(&["logs", container]).unwrap_or_default();
                panic!("job ended {job}; agent logs:\n{logs}")
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The hardened agent is the only one registered (checked above), so it ran the job; GetJob
    // names no agent once a job has ended.
    assert_eq!(
        job["documents"].as_array().map_or(0, Vec::len),
        SAMPLE_DOCUMENTS,
        "{job}"
    );

    // The hostile analyzer's probe, from inside this container: it runs as a slot user with no
    // capability, and reads neither the token, the agent's environment, nor other workspaces.
    let prompt = format!("explain fixture:probe={SECRET_FILE}");
    let request = json!({ "repo_url": REPO_URL, "branch": "main", "prompt": prompt });
    let reply =
        grpcurl::call(&addr, "fondation.v1.Admin/SubmitJob", Some(&request)).expect("SubmitJob");
    let job_id = reply["jobId"].as_str().expect("a job id").to_string();
    let job = wait::until("the probe job to complete", TIMEOUT, || async {
        let job = grpcurl::call(
            &addr,
            "fondation.v1.Admin/GetJob",
            Some(&json!({ "job_id": job_id, "include_content": true })),
        )?;
        match job["status"].as_str() {
            Some("completed") => Ok(Some(job)),
            Some("failed" | "dead" | "canceled") => panic!("probe job ended {job}"),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let report = job["documents"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["slug"] == PROBE_PATH)
        .and_then(|d| d["content"].as_str())
        .unwrap_or_else(|| panic!("the probe report is among the documents: {job}"))
        .to_string();
    println!("probe report:\n{report}");
    assert!(!report.contains("must-stay-secret"), "{report}");
    assert!(!report.contains(PROBE_READ_OK), "{report}");
    let uid: u32 = report
        .lines()
        .find_map(|l| l.strip_prefix("status Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("the probe reports its uid: {report}"));
    assert!(uid >= 64000, "the analyzer runs as a slot user, not {uid}");
    for caps in ["CapPrm:", "CapEff:", "CapAmb:"] {
        let line = report
            .lines()
            .find(|l| l.contains(caps))
            .unwrap_or_else(|| panic!("{caps} in {report}"));
        assert!(
            line.trim_end().ends_with("0000000000000000"),
            "no capability reaches the analyzer: {line}"
        );
    }
    drop(project);
}
