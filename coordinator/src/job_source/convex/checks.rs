//! Checks on what goes to and comes from the deployment: id and name shapes, Convex's size limits,
//! and the caps applied to free text.

// The limits are defined once, in `fondation_proto::limits`; the names here are the ones this
// module used before that.
pub(super) use fondation_proto::limits::{cap_error_text, MAX_MESSAGE_BYTES};
pub use fondation_proto::limits::{
    CONVEX_ARGUMENT_BYTES as MAX_ARGS_BYTES, CONVEX_DOCUMENT_BYTES as MAX_DOCUMENT_BYTES,
    MAX_MESSAGE_BYTES as MAX_ERROR_BYTES,
};
use fondation_proto::limits::{
    CONVEX_ARRAY_ELEMENTS as MAX_ARRAY_ELEMENTS, DOCUMENT_FIELDS_BYTES as DOCUMENT_OVERHEAD,
};
use fondation_proto::validate::check_branch;

use super::functions::{FileArg, Summary};
use crate::job_source::{DocumentKind, JobResult, JobSourceError, Result};

pub(super) fn check_id(job_id: &str) -> Result<()> {
    if is_convex_id(job_id) {
        Ok(())
    } else {
        Err(JobSourceError::Invalid(format!(
            "{job_id:?} is not a Convex document id"
        )))
    }
}

/// Convex ids are 31 to 37 characters of lowercase Crockford base32.
pub fn is_convex_id(id: &str) -> bool {
    (31..=37).contains(&id.len())
        && id
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'h' | b'j' | b'k' | b'm' | b'n' | b'p'..=b't' | b'v'..=b'z'))
}

/// `owner/name` as GitHub spells them; anything else could steer the clone URL elsewhere.
pub(super) fn validate_full_name(full_name: &str) -> std::result::Result<(), String> {
    let valid_part = |part: &str| {
        !part.is_empty()
            && part.len() <= 100
            && !part.starts_with('-')
            && !part.contains("..")
            && part != "."
            && part
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    };
    match full_name.split_once('/') {
        Some((owner, name)) if valid_part(owner) && valid_part(name) => Ok(()),
        _ => Err(format!(
            "repository fullName {full_name:?} is not owner/name of letters, digits, '.', '_' \
             and '-'"
        )),
    }
}

/// The branch name rules are `fondation_proto::validate`'s, the ones the agent checks again
/// before cloning.
pub(super) fn validate_branch(branch: &str) -> std::result::Result<(), String> {
    check_branch(branch).map_err(|error| format!("repository defaultBranch: {error}"))
}

/// The documents as `docs:upsertFromJob` files, refusing any that cannot be stored.
pub(super) fn file_args<'a>(job_id: &str, result: &'a JobResult) -> Result<Vec<FileArg<'a>>> {
    // The caps every job source applies (the embedded store too); the checks below are Convex's.
    fondation_proto::limits::check_result(
        result
            .documents
            .iter()
            .map(|doc| (doc.slug.as_str(), doc.title.as_str(), doc.content.as_str())),
    )
    .map_err(|error| JobSourceError::TooLarge(format!("job {job_id}: {error}")))?;
    if result.documents.len() > MAX_ARRAY_ELEMENTS {
        return Err(JobSourceError::TooLarge(format!(
            "job {job_id} has {} documents, over Convex's limit of {MAX_ARRAY_ELEMENTS} per call",
            result.documents.len()
        )));
    }
    result
        .documents
        .iter()
        .map(|document| {
            let size = document.content.len();
            // The stored document repeats slug and title in its source key.
            let stored =
                size + 2 * (document.slug.len() + document.title.len()) + DOCUMENT_OVERHEAD;
            if stored > MAX_DOCUMENT_BYTES {
                return Err(JobSourceError::TooLarge(format!(
                    "document {:?} of job {job_id} has {size} bytes of content, over Convex's \
                     {MAX_DOCUMENT_BYTES}-byte (1 MiB) limit per stored document",
                    document.slug
                )));
            }
            Ok(FileArg {
                slug: &document.slug,
                title: &document.title,
                chapter_index: document.chapter_index.map(f64::from),
                content: &document.content,
                kind: document.kind.as_str(),
            })
        })
        .collect()
}

/// Chapters are counted once: the `chapters/` documents, not their `reviewed-chapters/` versions.
pub(super) fn summary(files: &[FileArg<'_>], generated_at: f64) -> Summary {
    let chapters = files
        .iter()
        .filter(|file| {
            file.kind == DocumentKind::Chapter.as_str() && file.slug.starts_with("chapters/")
        })
        .count();
    let tutorials = files
        .iter()
        .filter(|file| file.kind == DocumentKind::Tutorial.as_str())
        .count();
    Summary {
        chapters_count: chapters as f64,
        tutorials_count: tutorials as f64,
        generated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convex_ids_are_recognized() {
        assert!(is_convex_id("jd7fq0zq4f5m1e9w2x3y4z5a6b7c8d9e"));
        assert!(
            !is_convex_id("jd7fq0zq4f5m1e9w2x3y4z5a6b7c8d9i"),
            "i is not Crockford"
        );
        assert!(!is_convex_id("JD7FQ0ZQ4F5M1E9W2X3Y4Z5A6B7C8D9E"));
        assert!(!is_convex_id("short"));
    }

    #[test]
    fn full_names_are_checked() {
        assert!(validate_full_name("octo-org/hello.world_2").is_ok());
        assert!(validate_full_name("owner/.github").is_ok());
        for bad in [
            "owner", "-owner/x", "a/..", "a/b/c", "a/b c", "a/", "a/x..y", "a/.",
        ] {
            assert!(validate_full_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn branches_are_checked() {
        assert!(validate_branch("main").is_ok());
        assert!(validate_branch("release/1.2").is_ok());
        for bad in ["-x", "a..b", "a b", "x.lock", "a~1", ""] {
            assert!(validate_branch(bad).is_err(), "{bad}");
        }
    }
}
