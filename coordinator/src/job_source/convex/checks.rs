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

/// The documents as `docs:upsertFromJob` files, refusing any that cannot be stored: each stored
/// document (after the deployment's Markdown normalization, which can make it grow) within 1 MiB,
/// and all of them within what one mutation may write (16 MiB, the same as its arguments).
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
    let mut written = 0usize;
    let files = result
        .documents
        .iter()
        .map(|document| {
            let size = match document.kind {
                DocumentKind::Yaml => document.content.len(),
                _ => normalized_markdown(&document.content).len(),
            };
            // The stored document repeats slug and title in its source key.
            let stored =
                size + 2 * (document.slug.len() + document.title.len()) + DOCUMENT_OVERHEAD;
            if stored > MAX_DOCUMENT_BYTES {
                return Err(JobSourceError::TooLarge(format!(
                    "document {:?} of job {job_id} has {size} bytes of content once normalized, \
                     over Convex's {MAX_DOCUMENT_BYTES}-byte (1 MiB) limit per stored document",
                    document.slug
                )));
            }
            written += stored;
            Ok(FileArg {
                slug: &document.slug,
                title: &document.title,
                chapter_index: document.chapter_index.map(f64::from),
                content: &document.content,
                kind: document.kind.as_str(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if written > MAX_ARGS_BYTES {
        return Err(JobSourceError::TooLarge(format!(
            "the documents of job {job_id} would store {written} bytes, over Convex's \
             {MAX_ARGS_BYTES}-byte (16 MiB) limit on what one mutation writes"
        )));
    }
    Ok(files)
}

/// The content `docs:upsertFromJob` stores for a Markdown document: line endings made `\n`, an
/// unclosed code fence closed, a final newline, a blank line before every heading, runs of
/// blank lines cut to one. Mirrors the deployment's `normalizeMarkdown`, to check sizes.
pub(super) fn normalized_markdown(content: &str) -> String {
    if content.is_empty() {
        return String::new();
    }
    let mut text = content.replace("\r\n", "\n").replace('\r', "\n");
    if text.matches("```").count() % 2 == 1 {
        text.push_str("\n```\n");
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    // `\n(#{1,6}\s)` -> `\n\n$1`.
    let mut spaced = String::with_capacity(text.len() + text.len() / 16);
    let mut rest = text.as_str();
    while let Some(at) = rest.find('\n') {
        let after = &rest[at + 1..];
        let hashes = after.bytes().take_while(|&b| b == b'#').count();
        let heading = (1..=6).contains(&hashes)
            && after[hashes..]
                .chars()
                .next()
                .is_some_and(char::is_whitespace);
        spaced.push_str(&rest[..=at]);
        if heading {
            spaced.push('\n');
        }
        rest = after;
    }
    spaced.push_str(rest);
    // `\n{3,}` -> `\n\n`.
    let mut out = String::with_capacity(spaced.len());
    let mut newlines = 0;
    for c in spaced.chars() {
        if c == '\n' {
            newlines += 1;
            if newlines > 2 {
                continue;
            }
        } else {
            newlines = 0;
        }
        out.push(c);
    }
    out
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

    #[test]
    fn markdown_is_normalized_like_the_deployment() {
        assert_eq!(normalized_markdown(""), "");
        assert_eq!(
            normalized_markdown("# A\ntext\n## B"),
            "# A\ntext\n\n## B\n"
        );
        assert_eq!(normalized_markdown("a\r\n\n\n\nb"), "a\n\nb\n");
        assert_eq!(normalized_markdown("```sh\nx"), "```sh\nx\n```\n");
        assert_eq!(normalized_markdown("#tag\n#######x"), "#tag\n#######x\n");
    }

    #[test]
    fn content_that_grows_over_the_limit_is_refused() {
        // Under 1 MiB as sent, over it once a blank line goes before each heading.
        let content = "\n# h".repeat(MAX_DOCUMENT_BYTES / 4 - 100);
        let result = JobResult {
            run_id: String::new(),
            message: String::new(),
            documents: vec![crate::job_source::Document {
                slug: "chapters/a.md".to_owned(),
                title: "A".to_owned(),
                kind: DocumentKind::Chapter,
                chapter_index: Some(0),
                content,
            }],
        };
        assert!(matches!(
            file_args("j", &result),
            Err(JobSourceError::TooLarge(_))
        ));
    }
}
