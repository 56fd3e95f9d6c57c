//! The gRPC contract between coordinator and agents (`fondation.v1`), and the input checks both
//! sides apply to what crosses it.
//!
//! Layout:
//! - [`pb`]: the generated protobuf types and tonic services;
//! - [`limits`]: every size limit of the project, each with the Convex limit it protects, and the
//!   truncation of text over a cap;
//! - [`validate`]: repository URL allow-list and git branch-name rules, shared so the coordinator
//!   (before assigning) and the agent (before cloning) enforce the same thing;
//! - [`serving`]: reflection and health-probe helpers every gRPC server and `health` subcommand uses;
//! - [`logging`]: the one tracing set-up of both binaries; [`settings`]: shared setting parsers;
//! - [`tls`]: certificates for the agent <-> coordinator link; [`signals`]: SIGTERM/SIGINT.

pub mod limits;
pub mod logging;
pub mod serving;
pub mod settings;
pub mod signals;
pub mod tls;
pub mod validate;

/// Generated code for package `fondation.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fondation.v1");
}

/// Encoded `FileDescriptorSet` of our protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fondation_descriptor");

/// Fully-qualified service names, as health and reflection report them.
pub const AGENT_GATEWAY_SERVICE: &str = "fondation.v1.AgentGateway";
pub const ADMIN_SERVICE: &str = "fondation.v1.Admin";
