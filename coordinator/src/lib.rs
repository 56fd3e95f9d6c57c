//! The Fondation coordinator: the only process that talks to the job source (Convex or the
//! embedded store). It claims jobs, keeps their leases, streams assignments to agents over gRPC,
//! turns agent progress into job-source updates and completes or retries jobs.
//!
//! Layout:
//! - [`config`]: flags and environment variables; [`identity`]: the stable `WORKER_ID`;
//! - [`context`]: the state the tasks and services share;
//! - [`job_source`]: the queue contract, with the [`job_source::embedded_store`] and
//!   [`job_source::convex`] implementations, and [`job_source::observed`], which records every
//!   call for the metrics and the source's health;
//! - [`dispatcher`]: the claim loop and the hand-out of jobs to agents;
//! - [`github_token`]: the web app's stored GitHub tokens, decrypted for private repositories;
//! - [`progress_text`]: the progress texts written to jobs, in the web app's language;
//! - [`agents`]: the registry of connected agents and their slots;
//! - [`assignments`]: in-flight assignments, their fencing epochs, and report routing;
//! - [`lease`]: the lease keeper, one task per in-flight job, until its end is recorded;
//! - [`journal`]: what a restart must not forget (assignments, undelivered results);
//! - [`history`]: every attempt of a job this coordinator saw, for operators;
//! - [`job_logs`]: the analyzer's output lines of each job, live and kept after its end;
//! - [`database`]: the one SQLite file the journal and the embedded store share;
//! - [`reclaimer`]: takes back expired leases on Convex (a lost claim), after refreshing ours;
//! - [`gateway`] and [`admin`]: the gRPC services; [`auth`]: their bearer tokens;
//! - [`source_health`]: how the job source's calls fare, and the readiness that follows;
//! - [`metrics`]: the Prometheus registry (`METRICS_ADDR`); [`stats`]: `Admin/GetStats`;
//! - [`failpoint`]: test-only crash points (`FONDATION_FAILPOINT`);
//! - [`server`]: builds all of it and serves until shutdown;
//! - `testing` (tests only): a scripted job source and a context around it, for the in-process
//!   tests of the keeper and the dispatcher.

pub mod admin;
pub mod agents;
pub mod assignments;
pub mod auth;
pub mod config;
pub mod context;
pub mod database;
pub mod dispatcher;
pub mod failpoint;
pub mod gateway;
pub mod github_token;
pub mod history;
pub mod identity;
pub mod job_logs;
pub mod job_source;
pub mod journal;
pub mod lease;
pub mod metrics;
pub mod progress_text;
pub mod reclaimer;
pub mod server;
pub mod source_health;
pub mod stats;
#[cfg(test)]
mod testing;

pub use config::{Cli, Command, CoordinatorConfig};
pub use server::run;
