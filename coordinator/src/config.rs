//! Coordinator configuration: every setting is a flag and an environment variable (names kept from
//! the Node worker where it had one), with defaults in one place and checks at start-up.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use fondation_proto::{limits, validate::RepoAllowlist};
use fondation_runtime::{
    listener::ConnectionLimits,
    logging::LogFormat,
    serving::HealthArgs,
    settings::{millis, secret_setting, Secret, SecretError},
    tls::{self, TlsFileError},
};

use crate::github_token::{plain_token, CloneCredential, EncryptionKey, InvalidKey};
pub use crate::progress_text::ProgressLanguage;

#[derive(Debug, Parser)]
#[command(
    name = "fondation-coordinator",
    version,
    about = "Claims Fondation jobs and dispatches them to agents over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: CoordinatorConfig,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exit 0 when the coordinator at LISTEN_ADDR reports SERVING (for container health checks):
    /// ready to take work by default, alive with `--service liveness`.
    Health(HealthArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CoordinatorConfig {
    /// gRPC address for agents, admin, health and reflection.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: String,

    /// File to write the bound LISTEN_ADDR to once listening (useful with port 0).
    #[arg(long, env = "ADDRESS_FILE")]
    pub address_file: Option<PathBuf>,

    /// Address of the Prometheus `/metrics` endpoint (plain HTTP); off when empty.
    #[arg(long, env = "METRICS_ADDR", default_value = "")]
    pub metrics_addr: String,

    /// File to write the bound METRICS_ADDR to once listening (useful with port 0).
    #[arg(long, env = "METRICS_ADDRESS_FILE")]
    pub metrics_address_file: Option<PathBuf>,

    /// Folder for the embedded job store and the coordinator's state (worker id).
    #[arg(long, env = "DATA_DIR", default_value = "./fondation-data")]
    pub data_dir: PathBuf,

    /// Convex deployment URL; without it the embedded job store is used.
    #[arg(long, env = "CONVEX_URL")]
    pub convex_url: Option<String>,

    /// Longest wait for one Convex HTTP call (ms).
    #[arg(long, env = "CONVEX_REQUEST_TIMEOUT", default_value = "30000", value_parser = millis)]
    pub convex_request_timeout: Duration,

    /// Total time one Convex operation may spend retrying transient errors (ms).
    #[arg(long, env = "CONVEX_RETRY_BUDGET", default_value = "60000", value_parser = millis)]
    pub convex_retry_budget: Duration,

    /// Convex deploy key, sent as `Authorization: Convex <key>`. Never logged.
    #[arg(long, env = "CONVEX_DEPLOY_KEY", hide_env_values = true)]
    pub convex_deploy_key: Option<Secret>,

    /// File holding CONVEX_DEPLOY_KEY, instead of the variable.
    #[arg(long, env = "CONVEX_DEPLOY_KEY_FILE")]
    pub convex_deploy_key_file: Option<PathBuf>,

    /// Identity towards the job source (`lockedBy` of claimed jobs). Must be stable across
    /// restarts: when unset, one is generated once and kept in DATA_DIR/worker-id.
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,

    /// Wait after a claim that found nothing (ms).
    #[arg(long, env = "POLL_INTERVAL", default_value = "5000", value_parser = millis)]
    pub poll_interval: Duration,

    /// Lease requested for each claimed job and each heartbeat (ms).
    #[arg(long, env = "LEASE_TIME", default_value = "300000", value_parser = millis)]
    pub lease_time: Duration,

    /// How often the lease of a running job is extended (ms).
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "60000", value_parser = millis)]
    pub heartbeat_interval: Duration,

    /// At most one progress write per job per this interval (ms).
    #[arg(long, env = "PROGRESS_INTERVAL", default_value = "2000", value_parser = millis)]
    pub progress_interval: Duration,

    /// How often a running job is checked for cancellation (ms).
    #[arg(long, env = "CANCEL_CHECK_INTERVAL", default_value = "5000", value_parser = millis)]
    pub cancel_check_interval: Duration,

    /// An agent silent for this long is considered gone (ms).
    #[arg(long, env = "AGENT_TIMEOUT", default_value = "10000", value_parser = millis)]
    pub agent_timeout: Duration,

    /// How often agents send an application heartbeat when idle, and the HTTP/2 keepalive period
    /// of their streams (ms); a third of AGENT_TIMEOUT when unset.
    #[arg(long, env = "AGENT_HEARTBEAT_INTERVAL", value_parser = millis)]
    pub agent_heartbeat_interval: Option<Duration>,

    /// How long a gone agent's jobs wait for it to reconnect before they are handed back (ms).
    #[arg(long, env = "REATTACH_GRACE", default_value = "15000", value_parser = millis)]
    pub reattach_grace: Duration,

    /// Convex with CONVEX_DEPLOY_KEY: how often `queue:reclaimExpired` takes back jobs whose lease
    /// expired (a lost claim reply, a crash before the journal); 0 turns it off (ms).
    #[arg(long, env = "RECLAIM_INTERVAL", default_value = "60000", value_parser = millis)]
    pub reclaim_interval: Duration,

    /// The coordinator reports NOT_SERVING (health `""`) once calls to its job source have failed
    /// for this long without a success in between (ms).
    #[arg(long, env = "SOURCE_UNHEALTHY_AFTER", default_value = "60000", value_parser = millis)]
    pub source_unhealthy_after: Duration,

    /// Clone URL built from a Convex repository document.
    #[arg(
        long,
        env = "CLONE_URL_TEMPLATE",
        default_value = "https://github.com/{fullName}.git"
    )]
    pub clone_url_template: String,

    /// Comma-separated URL prefixes that may be cloned.
    #[arg(long, env = "REPO_ALLOWLIST", default_value = RepoAllowlist::DEFAULT)]
    pub repo_allowlist: String,

    /// Shared token agents must present (`authorization: Bearer <token>`); none when unset.
    #[arg(long, env = "AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<Secret>,

    /// File holding AGENT_TOKEN, instead of the variable.
    #[arg(long, env = "AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,

    /// Token every Admin call must present (`authorization: Bearer <token>`); Admin is open when
    /// unset. Health and reflection stay open.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// File holding ADMIN_TOKEN, instead of the variable.
    #[arg(long, env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Token that allows the read-only Admin calls alone (GetJob, ListJobs, ListAgents, GetJobLogs,
    /// GetStats), for dashboards; needs ADMIN_TOKEN.
    #[arg(long, env = "ADMIN_READ_TOKEN", hide_env_values = true)]
    pub admin_read_token: Option<Secret>,

    /// File holding ADMIN_READ_TOKEN, instead of the variable.
    #[arg(long, env = "ADMIN_READ_TOKEN_FILE")]
    pub admin_read_token_file: Option<PathBuf>,

    /// Most slots one agent may announce (its MAX_CONCURRENT_JOBS); an agent announcing more is
    /// refused, so one agent (or a stolen token) cannot draw the whole queue.
    #[arg(long, env = "MAX_AGENT_SLOTS", default_value_t = limits::MAX_SLOTS)]
    pub max_agent_slots: u32,

    /// Connections open at once on LISTEN_ADDR; at the bound new ones wait (a WARN line says so).
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = ConnectionLimits::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// A connection that starts no call within this time is closed (ms).
    #[arg(long, env = "IDLE_CONNECTION_TIMEOUT", default_value = "30000", value_parser = millis)]
    pub idle_connection_timeout: Duration,

    /// PEM certificate chain to serve TLS with on LISTEN_ADDR (with TLS_KEY); plaintext when unset.
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of TLS_CERT.
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA that agents' client certificates must chain to: agents without one get no session
    /// (mutual TLS). Admin, health and reflection stay reachable with server TLS only.
    #[arg(long, env = "TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// `health` subcommand over TLS: PEM root that signed TLS_CERT (TLS_CERT itself when unset,
    /// which suits a self-signed certificate).
    #[arg(long, env = "TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// `health` subcommand over TLS: the name TLS_CERT is issued for.
    #[arg(long, env = "TLS_DOMAIN", default_value = "localhost")]
    pub tls_domain: String,

    /// Embedded store: attempts before a job is dead.
    #[arg(long, env = "MAX_ATTEMPTS", default_value = "5")]
    pub max_attempts: u32,

    /// Embedded store: first retry delay, doubled per attempt up to 10 minutes (ms).
    #[arg(long, env = "RETRY_BACKOFF", default_value = "5000", value_parser = millis)]
    pub retry_backoff: Duration,

    /// The web app's `ENCRYPTION_KEY` (64 hex characters): decrypts the GitHub tokens it stores,
    /// to clone its users' private repositories. Never logged, never sent to agents.
    #[arg(long, env = "ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<Secret>,

    /// File holding ENCRYPTION_KEY, instead of the variable.
    #[arg(long, env = "ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,

    /// GitHub token for jobs whose owner has no usable stored token (and for every job of the
    /// embedded store); without one such jobs clone anonymously. Sent only inside assignments.
    #[arg(long, env = "GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<Secret>,

    /// File holding GITHUB_TOKEN, instead of the variable.
    #[arg(long, env = "GITHUB_TOKEN_FILE")]
    pub github_token_file: Option<PathBuf>,

    /// Language of the progress texts written to the job (`fr`, the web app's, or `en`).
    #[arg(long, env = "PROGRESS_LANGUAGE", value_enum, default_value = "fr")]
    pub progress_language: ProgressLanguage,

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

impl CoordinatorConfig {
    /// Reads the secrets given as `<NAME>_FILE` into their settings, so the rest of the
    /// coordinator sees one value per secret whichever way it was given.
    pub fn read_secret_files(mut self) -> Result<Self, ConfigError> {
        self.agent_token = secret_setting(
            "AGENT_TOKEN",
            self.agent_token,
            self.agent_token_file.take().as_deref(),
        )?;
        self.admin_token = secret_setting(
            "ADMIN_TOKEN",
            self.admin_token,
            self.admin_token_file.take().as_deref(),
        )?;
        self.admin_read_token = secret_setting(
            "ADMIN_READ_TOKEN",
            self.admin_read_token,
            self.admin_read_token_file.take().as_deref(),
        )?;
        self.convex_deploy_key = secret_setting(
            "CONVEX_DEPLOY_KEY",
            self.convex_deploy_key,
            self.convex_deploy_key_file.take().as_deref(),
        )?;
        self.encryption_key = secret_setting(
            "ENCRYPTION_KEY",
            self.encryption_key,
            self.encryption_key_file.take().as_deref(),
        )?;
        self.github_token = secret_setting(
            "GITHUB_TOKEN",
            self.github_token,
            self.github_token_file.take().as_deref(),
        )?;
        Ok(self)
    }

    /// Checks what clap cannot, naming the variable at fault.
    pub fn validate(&self) -> Result<RepoAllowlist, ConfigError> {
        let invalid = |name, message: String| Err(ConfigError::Invalid { name, message });
        if self.lease_time < Duration::from_secs(1) {
            return invalid("LEASE_TIME", "must be at least 1000 ms".into());
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.lease_time {
            return invalid(
                "HEARTBEAT_INTERVAL",
                format!(
                    "must be above 0 and below LEASE_TIME ({} ms), or leases expire between heartbeats",
                    self.lease_time.as_millis()
                ),
            );
        }
        for (name, value) in [
            ("POLL_INTERVAL", self.poll_interval),
            ("PROGRESS_INTERVAL", self.progress_interval),
            ("CANCEL_CHECK_INTERVAL", self.cancel_check_interval),
            ("AGENT_TIMEOUT", self.agent_timeout),
            ("AGENT_HEARTBEAT_INTERVAL", self.agent_heartbeat_interval()),
            ("SOURCE_UNHEALTHY_AFTER", self.source_unhealthy_after),
        ] {
            if value.is_zero() {
                return invalid(name, "must be above 0".into());
            }
        }
        if self.agent_heartbeat_interval() >= self.agent_timeout {
            return invalid(
                "AGENT_HEARTBEAT_INTERVAL",
                format!(
                    "must be below AGENT_TIMEOUT ({} ms), or idle agents look gone",
                    self.agent_timeout.as_millis()
                ),
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid(
                "TLS_CERT",
                "TLS_CERT and TLS_KEY go together: set both to serve TLS, or neither".into(),
            );
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return invalid(
                "TLS_CLIENT_CA",
                "client certificates need TLS: set TLS_CERT and TLS_KEY too".into(),
            );
        }
        if self.admin_read_token.is_some() && self.admin_token.is_none() {
            return invalid(
                "ADMIN_READ_TOKEN",
                "needs ADMIN_TOKEN: without it every Admin call is open anyway".into(),
            );
        }
        if self.max_agent_slots == 0 || self.max_agent_slots > limits::MAX_SLOTS {
            return invalid(
                "MAX_AGENT_SLOTS",
                format!("must be 1 to {}", limits::MAX_SLOTS),
            );
        }
        if self.max_connections == 0 {
            return invalid("MAX_CONNECTIONS", "must be at least 1".into());
        }
        if self.idle_connection_timeout.is_zero() {
            return invalid("IDLE_CONNECTION_TIMEOUT", "must be above 0".into());
        }
        if self.max_attempts == 0 {
            return invalid("MAX_ATTEMPTS", "must be at least 1".into());
        }
        if !self.clone_url_template.contains("{fullName}") {
            return invalid(
                "CLONE_URL_TEMPLATE",
                format!(
                    "{:?} has no {{fullName}} placeholder",
                    self.clone_url_template
                ),
            );
        }
        // Checked here so a bad secret stops the start-up, not the first private job.
        self.parsed_encryption_key()?;
        self.fallback_github_token()?;
        if let Some(id) = &self.worker_id {
            if id.trim().is_empty() || id.len() > 128 {
                return invalid("WORKER_ID", "must be 1 to 128 characters".into());
            }
        }
        RepoAllowlist::parse(&self.repo_allowlist).map_err(|e| ConfigError::Invalid {
            name: "REPO_ALLOWLIST",
            message: e.to_string(),
        })
    }

    /// TLS settings for probing this coordinator's own health, when it serves TLS.
    pub fn health_probe_tls(
        &self,
    ) -> Result<Option<tonic::transport::ClientTlsConfig>, TlsFileError> {
        let Some(cert) = &self.tls_cert else {
            return Ok(None);
        };
        let (root, variable) = match &self.tls_ca {
            Some(ca) => (ca, "TLS_CA"),
            None => (cert, "TLS_CERT"),
        };
        let ca = tls::read_pem(root, "the CA certificate", variable)?;
        Ok(Some(tls::client_config(
            Some(ca),
            None,
            Some(&self.tls_domain),
        )))
    }

    /// The bounds on LISTEN_ADDR's connections.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            idle_timeout: self.idle_connection_timeout,
        }
    }

    /// `ENCRYPTION_KEY` as a key; the error never quotes the value.
    pub fn parsed_encryption_key(&self) -> Result<Option<EncryptionKey>, ConfigError> {
        self.encryption_key
            .as_ref()
            .map(|key| {
                key.expose()
                    .parse()
                    .map_err(|e: InvalidKey| ConfigError::Invalid {
                        name: "ENCRYPTION_KEY",
                        message: e.to_string(),
                    })
            })
            .transpose()
    }

    /// `GITHUB_TOKEN` as a clone credential.
    pub fn fallback_github_token(&self) -> Result<Option<CloneCredential>, ConfigError> {
        self.github_token
            .as_ref()
            .map(|token| {
                plain_token(token.expose()).map_err(|_| ConfigError::Invalid {
                    name: "GITHUB_TOKEN",
                    message: "must be a token without spaces or control characters".into(),
                })
            })
            .transpose()
    }

    /// How often agents are asked to send an application heartbeat: by default a third of the
    /// timeout, so two lost heartbeats do not yet count as a lost agent.
    pub fn agent_heartbeat_interval(&self) -> Duration {
        self.agent_heartbeat_interval
            .unwrap_or((self.agent_timeout / 3).max(Duration::from_millis(100)))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> CoordinatorConfig {
        let mut argv = vec!["fondation-coordinator"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("valid flags").config
    }

    fn error(args: &[&str]) -> String {
        parse(args).validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]);
        assert!(config.validate().is_ok());
        assert_eq!(config.lease_time, Duration::from_secs(300));
        assert_eq!(config.source_unhealthy_after, Duration::from_secs(60));
        assert_eq!(config.metrics_addr, "", "metrics are off unless asked for");
        assert_eq!(
            config.agent_heartbeat_interval(),
            Duration::from_secs(10) / 3
        );
    }

    #[test]
    fn errors_name_the_variable() {
        assert!(error(&["--heartbeat-interval", "400000"]).starts_with("HEARTBEAT_INTERVAL"));
        assert!(error(&["--agent-heartbeat-interval", "0"]).starts_with("AGENT_HEARTBEAT_INTERVAL"));
        assert!(
            error(&["--agent-heartbeat-interval", "20000"]).starts_with("AGENT_HEARTBEAT_INTERVAL")
        );
        assert!(
            error(&["--clone-url-template", "https://x/y.git"]).starts_with("CLONE_URL_TEMPLATE")
        );
        assert!(error(&["--repo-allowlist", "ftp://x/"]).starts_with("REPO_ALLOWLIST"));
        assert!(error(&["--max-attempts", "0"]).starts_with("MAX_ATTEMPTS"));
        assert!(error(&["--max-agent-slots", "0"]).starts_with("MAX_AGENT_SLOTS"));
        assert!(error(&["--max-agent-slots", "65"]).starts_with("MAX_AGENT_SLOTS"));
        assert!(error(&["--max-connections", "0"]).starts_with("MAX_CONNECTIONS"));
        assert!(error(&["--source-unhealthy-after", "0"]).starts_with("SOURCE_UNHEALTHY_AFTER"));
        assert!(error(&["--admin-read-token", "r"]).starts_with("ADMIN_READ_TOKEN"));
        let key_error = error(&["--encryption-key", "not-hex-and-secret"]);
        assert!(key_error.starts_with("ENCRYPTION_KEY"), "{key_error}");
        assert!(!key_error.contains("not-hex-and-secret"), "{key_error}");
        assert!(error(&["--github-token", "two words"]).starts_with("GITHUB_TOKEN"));
    }

    #[test]
    fn progress_texts_are_french_unless_asked_otherwise() {
        assert_eq!(parse(&[]).progress_language, ProgressLanguage::Fr);
        assert_eq!(
            parse(&["--progress-language", "en"]).progress_language,
            ProgressLanguage::En
        );
        assert!(Cli::try_parse_from(["c", "--progress-language", "de"]).is_err());
    }

    #[test]
    fn secrets_come_from_files_or_values_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-token");
        std::fs::write(&file, "from-file\n").unwrap();
        let file = file.to_str().unwrap();
        let config = parse(&["--admin-token-file", file, "--agent-token", "direct"])
            .read_secret_files()
            .unwrap();
        assert_eq!(config.admin_token.unwrap().expose(), "from-file");
        assert_eq!(config.agent_token.unwrap().expose(), "direct");

        let error = parse(&["--admin-token-file", file, "--admin-token", "direct"])
            .read_secret_files()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("ADMIN_TOKEN and ADMIN_TOKEN_FILE"),
            "{error}"
        );
    }

    #[test]
    fn durations_are_milliseconds() {
        assert!(Cli::try_parse_from(["c", "--poll-interval", "5s"]).is_err());
        assert_eq!(
            parse(&["--poll-interval", "250"]).poll_interval,
            Duration::from_millis(250)
        );
    }
}
