//! The gRPC contract between coordinator and agents (`fondation.v1`), and the input checks both
//! sides apply to what crosses it. What the binaries share around it (logging, settings, TLS
//! files, serving) is in the `fondation-runtime` crate.
//!
//! Layout:
//! - [`pb`]: the generated protobuf types and tonic services;
//! - [`codec`]: the services' codec (prost with small per-call buffers);
//! - [`limits`]: every size limit of the project, each with the Convex limit it protects, and the
//!   truncation of text over a cap;
//! - [`model`]: the domain model of the agent link and its conversions from and to [`pb`];
//! - [`validate`]: repository URL allow-list and git branch-name rules, shared so the coordinator
//!   (before assigning) and the agent (before cloning) enforce the same thing;

pub mod codec;
pub mod limits;
pub mod model;
pub mod validate;

/// Generated code for package `fondation.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fondation.v1");

    /// Written by hand (see build.rs) so that the clone credential never reaches a log.
    impl std::fmt::Debug for Assignment {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Assignment")
                .field("assignment_id", &self.assignment_id)
                .field("job_id", &self.job_id)
                .field("repo_url", &self.repo_url)
                .field("branch", &self.branch)
                .field("prompt", &self.prompt)
                .field("attempt", &self.attempt)
                .field("epoch", &self.epoch)
                .field(
                    "clone_credential",
                    &if self.clone_credential.is_empty() {
                        ""
                    } else {
                        "<redacted>"
                    },
                )
                .finish()
        }
    }
}

/// Encoded `FileDescriptorSet` of our protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fondation_descriptor");

/// Fully-qualified service names, as health and reflection report them.
pub const AGENT_GATEWAY_SERVICE: &str = "fondation.v1.AgentGateway";
pub const ADMIN_SERVICE: &str = "fondation.v1.Admin";
