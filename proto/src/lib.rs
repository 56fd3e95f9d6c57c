//! The gRPC contract between coordinator and agents (`fondation.v1`), and the input checks both
//! sides apply to what crosses it. What the binaries share around it (logging, settings, TLS
//! files, serving) is in the `fondation-runtime` crate.
//!
//! Layout:
//! - [`pb`]: the generated protobuf types and tonic services;
//! - [`model`]: the domain model of the agent link and its conversions from and to [`pb`];
//! - [`validate`]: repository URL allow-list and git branch-name rules, shared so the coordinator
//!   (before assigning) and the agent (before cloning) enforce the same thing;
//! - [`limits`]: size limits of what crosses the wire.

pub mod model;
pub mod validate;

/// Generated code for package `fondation.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fondation.v1");
}

/// Encoded `FileDescriptorSet` of our protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fondation_descriptor");

/// Size limits of a result, from Convex's limits (DESIGN.md section 2): one stored document is at
/// most 1 MiB and one call's arguments at most 16 MiB. Both sides enforce them: the agent fails a
/// run whose output is over them, the coordinator refuses such a result from an agent.
pub mod limits {
    /// Content of one document: 1 MiB less 16 KiB of headroom for the document's other fields.
    pub const MAX_DOCUMENT_BYTES: u64 = 1024 * 1024 - 16 * 1024;
    /// All contents of one result: 16 MiB less 1 MiB of headroom for JSON escaping and metadata.
    pub const MAX_RESULT_BYTES: u64 = 15 * 1024 * 1024;
    /// Documents in one result (Convex arrays hold at most 8192 elements).
    pub const MAX_DOCUMENTS: usize = 2000;
    /// Length of a document slug or title.
    pub const MAX_NAME_BYTES: usize = 512;
    /// Length of a progress or error message.
    pub const MAX_MESSAGE_BYTES: usize = 8 * 1024;

    /// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
    pub fn truncate_utf8(text: &str, max: usize) -> &str {
        if text.len() <= max {
            return text;
        }
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn truncation_keeps_whole_characters() {
            assert_eq!(super::truncate_utf8("héllo", 2), "h");
            assert_eq!(super::truncate_utf8("héllo", 3), "hé");
            assert_eq!(super::truncate_utf8("abc", 10), "abc");
        }
    }
}

/// Fully-qualified service names, as health and reflection report them.
pub const AGENT_GATEWAY_SERVICE: &str = "fondation.v1.AgentGateway";
pub const ADMIN_SERVICE: &str = "fondation.v1.Admin";
