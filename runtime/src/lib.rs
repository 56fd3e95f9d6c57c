//! What the coordinator and the agent binaries share around the contract of `fondation-proto`:
//! the process runtime of a Fondation server.
//!
//! Layout:
//! - [`logging`]: the one tracing set-up of both binaries;
//! - [`settings`]: shared setting parsers, secrets, and secrets read from `<NAME>_FILE`;
//! - [`signals`]: termination signals (SIGTERM, SIGINT);
//! - [`tls`]: certificates for the agent <-> coordinator link;
//! - [`listener`]: binding (port 0 reported back) and the accept loop of every gRPC server;
//! - [`metrics`]: the Prometheus `/metrics` endpoint (`METRICS_ADDR`) of both binaries;
//! - [`serving`]: health (readiness and liveness), reflection, and the `health` subcommand's probe.

pub mod listener;
pub mod logging;
pub mod metrics;
pub mod serving;
pub mod settings;
pub mod signals;
pub mod tls;
