//! Agent configuration: every setting is a flag and an environment variable, defaults in one
//! place, checked at start-up with errors that name the variable.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use fondation_proto::validate::RepoAllowlist;
use fondation_runtime::{
    logging::LogFormat,
    serving::HealthArgs,
    settings::{millis, secret_setting, Secret, SecretError},
    tls,
};
use tonic::transport::ClientTlsConfig;

use crate::analyzer::CommandTemplate;
use crate::sandbox::{privileges::AgentUser, EnvAllowlist, IsolationMode, DEFAULT_ANALYZER_ENV};

/// The bundled Fondation CLI inside the agent image.
pub const DEFAULT_ANALYZER_COMMAND: &str =
    "node /app/cli/dist/cli.bundled.mjs analyze {repo} --profile production";

#[derive(Debug, Parser)]
#[command(
    name = "fondation-agent",
    version,
    about = "Runs Fondation analysis jobs handed out by the coordinator"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: AgentConfig,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exit 0 when this agent's health service at HEALTH_ADDR reports SERVING (for container
    /// health checks): connected and taking work by default, alive with `--service liveness`.
    Health(HealthArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// Where the coordinator listens.
    #[arg(
        long,
        env = "COORDINATOR_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator_url: String,

    /// Stable agent name; the host name when unset.
    #[arg(long, env = "AGENT_ID")]
    pub agent_id: Option<String>,

    /// The agent's own gRPC health (and reflection) address.
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:50052")]
    pub health_addr: String,

    /// File to write the bound HEALTH_ADDR to once listening (useful with port 0).
    #[arg(long, env = "ADDRESS_FILE")]
    pub address_file: Option<PathBuf>,

    /// Address of the Prometheus `/metrics` endpoint (plain HTTP); off when empty.
    #[arg(long, env = "METRICS_ADDR", default_value = "")]
    pub metrics_addr: String,

    /// File to write the bound METRICS_ADDR to once listening (useful with port 0).
    #[arg(long, env = "METRICS_ADDRESS_FILE")]
    pub metrics_address_file: Option<PathBuf>,

    /// Jobs this agent runs at once.
    #[arg(long, env = "MAX_CONCURRENT_JOBS", default_value = "1")]
    pub max_concurrent_jobs: u32,

    /// Where job workspaces (clones and outputs) are made; each is removed after its job.
    #[arg(long, env = "TEMP_DIR", default_value = "/tmp/fondation")]
    pub temp_dir: PathBuf,

    /// The analyzer command: split like shell words but never run by a shell; `{repo}`,
    /// `{prompt}` and `{job_id}` are replaced inside each argument.
    #[arg(long, env = "ANALYZER_COMMAND", default_value = DEFAULT_ANALYZER_COMMAND)]
    pub analyzer_command: String,

    /// Working directory of the analyzer (the real CLI reads its prompts from there).
    #[arg(long, env = "ANALYZER_WORKDIR", default_value = "/app/cli")]
    pub analyzer_workdir: PathBuf,

    /// Least free space on TEMP_DIR's file system for the agent to take work: bytes, or a size
    /// with a unit (`500 MB`, `1 GiB`). Below it the agent is NOT_SERVING until space is freed.
    #[arg(long, env = "MIN_FREE_DISK", default_value = "1 GiB")]
    pub min_free_disk: bytesize::ByteSize,

    /// A command that must exit 0 for the agent to take work, e.g. the CLI's `--version`: split
    /// like shell words, never run by a shell, no placeholders; run in ANALYZER_WORKDIR with the
    /// analyzer's environment, as the agent's own user, at start and after agent failures.
    #[arg(long, env = "ANALYZER_CHECK_COMMAND")]
    pub analyzer_check_command: Option<String>,

    /// Longest ANALYZER_CHECK_COMMAND may run before it counts as failed (ms).
    #[arg(long, env = "ANALYZER_CHECK_TIMEOUT", default_value = "30000", value_parser = millis)]
    pub analyzer_check_timeout: Duration,

    /// The analyzer's environment: comma-separated variable names and prefixes (`LC_*`); nothing
    /// else of the agent's environment reaches it, and never one of the agent's own settings.
    #[arg(long, env = "ANALYZER_ENV", default_value = DEFAULT_ANALYZER_ENV)]
    pub analyzer_env: String,

    /// Whether each slot's analyzer runs under a user of its own: `auto` (when the agent has the
    /// rights: root, or CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_DAC_OVERRIDE), `required`, `off`.
    #[arg(long, env = "ANALYZER_ISOLATION", default_value = "auto")]
    pub analyzer_isolation: IsolationMode,

    /// uid (and gid) of slot 0's analyzer; slot N runs as base + N. Agents sharing a process
    /// namespace on one host need ranges that do not overlap.
    #[arg(long, env = "ANALYZER_UID_BASE", default_value = "64000")]
    pub analyzer_uid_base: u32,

    /// The agent's own user (a name, or uid[:gid]): started as root, the agent switches to it at
    /// once, keeping only the capabilities that run analyzers under slot users.
    #[arg(long, env = "AGENT_USER")]
    pub agent_user: Option<AgentUser>,

    /// Comma-separated URL prefixes that may be cloned.
    #[arg(long, env = "REPO_ALLOWLIST", default_value = RepoAllowlist::DEFAULT)]
    pub repo_allowlist: String,

    /// Token presented to the coordinator (its AGENT_TOKEN).
    #[arg(long, env = "AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<Secret>,

    /// File holding AGENT_TOKEN, instead of the variable.
    #[arg(long, env = "AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,

    /// Longest an analyzer run may take (ms).
    #[arg(long, env = "ANALYZER_TIMEOUT", default_value = "7200000", value_parser = millis)]
    pub analyzer_timeout: Duration,

    /// Longest a clone may take (ms).
    #[arg(long, env = "CLONE_TIMEOUT", default_value = "600000", value_parser = millis)]
    pub clone_timeout: Duration,

    /// Largest clone on disk, in bytes.
    #[arg(long, env = "CLONE_MAX_BYTES", default_value = "2147483648")]
    pub clone_max_bytes: u64,

    /// Between SIGTERM and SIGKILL when a run is stopped (ms).
    #[arg(long, env = "KILL_GRACE", default_value = "10000", value_parser = millis)]
    pub kill_grace: Duration,

    /// On SIGTERM, how long running jobs may go on before they are stopped and handed back (ms).
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "600000", value_parser = millis)]
    pub shutdown_grace: Duration,

    /// Longest wait between reconnection attempts (ms); keep it below the coordinator's
    /// REATTACH_GRACE so running jobs are re-attached in time.
    #[arg(long, env = "RECONNECT_MAX_BACKOFF", default_value = "5000", value_parser = millis)]
    pub reconnect_max_backoff: Duration,

    /// Offline for longer than this, the agent stops its runs and drops their results: the
    /// coordinator has handed those jobs to someone else by then (ms). Keep it above the
    /// coordinator's AGENT_TIMEOUT + REATTACH_GRACE minus the time a coordinator restart takes.
    #[arg(long, env = "DETACH_TIMEOUT", default_value = "30000", value_parser = millis)]
    pub detach_timeout: Duration,

    /// HTTP/2 keepalive ping period towards the coordinator (ms); a ping unanswered for twice
    /// this long counts as a lost connection.
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "5000", value_parser = millis)]
    pub keepalive_interval: Duration,

    /// With an https:// COORDINATOR_URL: PEM root that signed the coordinator's certificate
    /// (the public web roots when unset).
    #[arg(long, env = "TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate for mutual TLS (with TLS_KEY), when the coordinator has a
    /// TLS_CLIENT_CA.
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of TLS_CERT.
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// The name the coordinator's certificate is issued for (the host of COORDINATOR_URL when
    /// unset).
    #[arg(long, env = "TLS_DOMAIN")]
    pub tls_domain: Option<String>,

    /// Log lines as `plain` text or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is invalid: {message}")]
    Invalid { name: &'static str, message: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Configuration after its checks.
#[derive(Debug, Clone)]
pub struct CheckedConfig {
    pub agent_id: String,
    pub allowlist: RepoAllowlist,
    pub template: CommandTemplate,
    /// What of the agent's environment the analyzer gets.
    pub analyzer_env: EnvAllowlist,
    /// `ANALYZER_CHECK_COMMAND`, split.
    pub check_command: Option<Vec<String>>,
    /// TLS towards the coordinator, for an https:// COORDINATOR_URL.
    pub tls: Option<ClientTlsConfig>,
}

impl AgentConfig {
    /// Reads the secrets given as `<NAME>_FILE` into their settings, so the rest of the agent
    /// sees one value per secret whichever way it was given.
    pub fn read_secret_files(mut self) -> Result<Self, ConfigError> {
        self.agent_token = secret_setting(
            "AGENT_TOKEN",
            self.agent_token,
            self.agent_token_file.take().as_deref(),
        )?;
        Ok(self)
    }

    pub fn check(&self) -> Result<CheckedConfig, ConfigError> {
        let invalid = |name, message: String| ConfigError::Invalid { name, message };
        if !(1..=fondation_proto::limits::MAX_SLOTS).contains(&self.max_concurrent_jobs) {
            let max = fondation_proto::limits::MAX_SLOTS;
            return Err(invalid(
                "MAX_CONCURRENT_JOBS",
                format!("must be 1 to {max}"),
            ));
        }
        let agent_id = match &self.agent_id {
            Some(id) => id.clone(),
            None => hostname::get()
                .map_err(|e| {
                    invalid(
                        "AGENT_ID",
                        format!("unset, and the host name is unreadable: {e}"),
                    )
                })?
                .to_string_lossy()
                .into_owned(),
        };
        fondation_proto::validate::check_agent_id(&agent_id)
            .map_err(|e| invalid("AGENT_ID", e.to_string()))?;
        let allowlist = RepoAllowlist::parse(&self.repo_allowlist)
            .map_err(|e| invalid("REPO_ALLOWLIST", e.to_string()))?;
        let template = CommandTemplate::parse(&self.analyzer_command)
            .map_err(|e| invalid("ANALYZER_COMMAND", e.to_string()))?;
        if !self.coordinator_url.starts_with("http://")
            && !self.coordinator_url.starts_with("https://")
        {
            return Err(invalid(
                "COORDINATOR_URL",
                format!(
                    "{:?} must start with http:// or https://",
                    self.coordinator_url
                ),
            ));
        }
        let analyzer_env = EnvAllowlist::parse(&self.analyzer_env)
            .map_err(|e| invalid("ANALYZER_ENV", e.to_string()))?;
        let check_command = self
            .analyzer_check_command
            .as_deref()
            .map(parse_check_command)
            .transpose()
            .map_err(|message| invalid("ANALYZER_CHECK_COMMAND", message))?;
        let tls = self.tls()?;
        Ok(CheckedConfig {
            agent_id,
            allowlist,
            template,
            analyzer_env,
            check_command,
            tls,
        })
    }

    fn tls(&self) -> Result<Option<ClientTlsConfig>, ConfigError> {
        let invalid = |name, message: String| ConfigError::Invalid { name, message };
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid(
                "TLS_CERT",
                "TLS_CERT and TLS_KEY go together: set both for mutual TLS, or neither".into(),
            ));
        }
        let https = self.coordinator_url.starts_with("https://");
        if !https {
            if self.tls_ca.is_some() || self.tls_cert.is_some() {
                return Err(invalid(
                    "COORDINATOR_URL",
                    "TLS settings are given but the URL is http://; use https://".into(),
                ));
            }
            return Ok(None);
        }
        let read = |path: &std::path::Path, what, variable| {
            tls::read_pem(path, what, variable).map_err(|e| invalid(variable, e.to_string()))
        };
        let ca = match &self.tls_ca {
            Some(path) => Some(read(path, "the CA certificate", "TLS_CA")?),
            None => None,
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((
                read(cert, "the client certificate", "TLS_CERT")?,
                read(key, "the client key", "TLS_KEY")?,
            )),
            _ => None,
        };
        Ok(Some(tls::client_config(
            ca,
            identity,
            self.tls_domain.as_deref(),
        )))
    }
}

/// `ANALYZER_CHECK_COMMAND` as argv: shell words, at least a program, no placeholders (nothing of
/// a job exists when it runs).
fn parse_check_command(command: &str) -> Result<Vec<String>, String> {
    let argv = shell_words::split(command)
        .map_err(|e| format!("cannot split {command:?} into arguments: {e}"))?;
    if argv.is_empty() {
        return Err("the command is empty".into());
    }
    if let Some(argument) = argv.iter().find(|a| a.contains('{') && a.contains('}')) {
        return Err(format!(
            "argument {argument:?} looks like a placeholder; the check command takes none"
        ));
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn min_free_disk_takes_bytes_or_human_sizes() {
        let parse = |value: &str| {
            Cli::try_parse_from(["fondation-agent", "--min-free-disk", value])
                .map(|cli| cli.config.min_free_disk.as_u64())
        };
        assert_eq!(parse("1048576").ok(), Some(1 << 20));
        assert_eq!(parse("1 GiB").ok(), Some(1 << 30));
        assert_eq!(parse("500MB").ok(), Some(500_000_000));
        assert!(parse("lots").is_err());
    }

    #[test]
    fn check_command_is_argv_without_placeholders() {
        assert_eq!(
            parse_check_command("node '/app/cli/dist/cli.bundled.mjs' --version"),
            Ok(vec![
                "node".to_string(),
                "/app/cli/dist/cli.bundled.mjs".to_string(),
                "--version".to_string()
            ])
        );
        assert!(parse_check_command("  ").is_err());
        assert!(parse_check_command("cli {repo}").is_err());
    }
}
