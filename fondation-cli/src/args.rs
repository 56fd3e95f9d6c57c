//! The command line: global connection settings (the same variables the other binaries read) and
//! one subcommand per Admin call.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use fondation_runtime::settings::Secret;

#[derive(Debug, Parser)]
#[command(
    name = "fondation",
    version,
    about = "Submit, follow and inspect the jobs and agents of a Fondation coordinator"
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// How results are printed: tables and text for people, or JSON (one object per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the coordinator is and how to talk to it.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// The coordinator's gRPC address (`https://` for TLS).
    #[arg(
        long,
        global = true,
        env = "FONDATION_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// Bearer token for the Admin API (the coordinator's ADMIN_TOKEN, or ADMIN_READ_TOKEN for
    /// the commands that only read).
    #[arg(long, global = true, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// File holding the Admin token (instead of ADMIN_TOKEN).
    #[arg(long, global = true, env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// PEM CA that signed the coordinator's certificate (else the public web roots).
    #[arg(long, global = true, env = "TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, when the coordinator asks for one (with --tls-key).
    #[arg(long, global = true, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name to verify the coordinator's certificate against (else the URL's host).
    #[arg(long, global = true, env = "TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl ConnectionArgs {
    /// A coordinator at `url`, without TLS or token (the demo's, in the same process).
    pub fn plain(url: &str) -> Self {
        ConnectionArgs {
            coordinator: url.to_string(),
            admin_token: None,
            admin_token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_domain: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Queue a job for a repository (embedded store; with Convex the web app queues jobs).
    Submit {
        /// Git URL of the repository.
        repo: String,
        /// Branch to analyze (the repository's default branch when left out).
        #[arg(long, default_value = "")]
        branch: String,
        /// What to ask the analyzer.
        #[arg(long, default_value = "")]
        prompt: String,
        /// Stay and show the job's progress; exit 0 when it completes, non-zero otherwise.
        #[arg(long)]
        follow: bool,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only jobs in this status (pending, running, completed, failed, ...).
        #[arg(long)]
        status: Option<String>,
        /// Only jobs that ran (or run) on this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Order of the list.
        #[arg(long, value_enum, default_value = "newest")]
        order: JobOrderArg,
        /// At most this many jobs.
        #[arg(long, default_value = "50")]
        limit: u32,
    },
    /// One job in full: status, times, attempts, documents.
    Job {
        job_id: String,
        /// Also print each document's content (JSON output only).
        #[arg(long)]
        content: bool,
        /// Show its progress until it ends, as `submit --follow` does.
        #[arg(long, conflicts_with = "content")]
        follow: bool,
    },
    /// The analyzer's output of a job.
    Logs {
        job_id: String,
        /// How many of the last lines to show first.
        #[arg(long, default_value = "100")]
        tail: u32,
        /// Keep printing new lines until the running attempt ends.
        #[arg(long)]
        follow: bool,
    },
    /// The connected agents.
    Agents,
    /// Ask a job to stop.
    Cancel { job_id: String },
    /// Give an agent no new work; its running jobs finish.
    Drain { agent_id: String },
    /// Jobs by status, agents and slots, uptime, job-source health.
    Stats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JobOrderArg {
    Newest,
    Oldest,
    Updated,
    Status,
    Agent,
}
