//! Every size limit of the project, each defined once, with the reason for its value.
//!
//! Most of them protect a limit of the Convex deployment (DESIGN.md section 2): the `CONVEX_*`
//! constants are those facts, and the `MAX_*` caps below are chosen so that anything within them
//! fits (the `const` assertions at the end prove it). Both binaries and both job sources enforce
//! the same caps: the agent fails a run whose output is over them, the coordinator refuses such a
//! result from an agent, and the embedded store refuses what the Convex source refuses, so tests
//! without a deployment see what production would.
//!
//! Text over a cap is cut by [`truncate_utf8`] (the one truncation on a character boundary), or by
//! [`cap_error_text`] for error texts, which keeps both ends.

use std::borrow::Cow;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

// ---- Facts of the Convex deployment (not ours to choose) ----

/// Convex's limit on the arguments (and the return value) of one function call. A mutation also
/// reads and writes at most this much: all documents of a job go in one `docs:upsertFromJob`.
pub const CONVEX_ARGUMENT_BYTES: usize = 16 * MIB;
/// Convex's limit on one stored document (a `docs` row holds one of our documents).
pub const CONVEX_DOCUMENT_BYTES: usize = MIB;
/// Convex's limit on the elements of one array (the `files` of one upsert).
pub const CONVEX_ARRAY_ELEMENTS: usize = 8192;
/// Convex's limit on the nesting depth of a value.
pub const CONVEX_NESTING_DEPTH: usize = 16;
/// Convex's limit on the fields of one object.
pub const CONVEX_OBJECT_FIELDS: usize = 1024;

// ---- What one result may hold ----

/// Room in a stored `docs` document for its fields besides content, slug and title: ids, kind,
/// chapter index, timestamps and their field names.
pub const DOCUMENT_FIELDS_BYTES: usize = KIB;

/// Length of a document slug or title. The stored document repeats both in its source key, so
/// they count twice against [`CONVEX_DOCUMENT_BYTES`]; real ones are under 100 bytes.
pub const MAX_NAME_BYTES: usize = 512;

/// Content of one document: Convex's 1 MiB per stored document less 16 KiB of headroom. The slug
/// and title (twice each, 2 KiB at most) and the other fields (1 KiB) need 3 KiB; the rest absorbs
/// the deployment's Markdown normalization, which adds a blank line before headings.
pub const MAX_DOCUMENT_BYTES: u64 = (CONVEX_DOCUMENT_BYTES - 16 * KIB) as u64;

/// All contents of one result: they travel in one call limited to 16 MiB of arguments (and one
/// mutation writing at most 16 MiB), less 1 MiB of headroom for JSON escaping, slugs, titles and
/// the call's other arguments.
pub const MAX_RESULT_BYTES: u64 = (CONVEX_ARGUMENT_BYTES - MIB) as u64;

/// Documents in one result: well under Convex's 8192 array elements (each document is one
/// element of the upsert's `files`). The CLI writes 3 YAML files and three Markdown files per
/// chapter, so this is hundreds of chapters.
pub const MAX_DOCUMENTS: usize = 2000;

/// Bytes one document takes once stored in Convex: the content, slug and title twice (the source
/// key repeats them) and the other fields. Must stay within [`CONVEX_DOCUMENT_BYTES`].
pub fn stored_document_bytes(slug: &str, title: &str, content: &str) -> usize {
    content.len() + 2 * (slug.len() + title.len()) + DOCUMENT_FIELDS_BYTES
}

/// Why a result cannot be stored: it breaks one of the caps above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{count} documents, more than the limit of {MAX_DOCUMENTS} per result")]
    TooManyDocuments { count: usize },
    #[error("document {slug:?} has a slug or title outside 1 to {MAX_NAME_BYTES} bytes")]
    BadName { slug: String },
    #[error(
        "document {slug:?} is {size} bytes, more than the limit of {MAX_DOCUMENT_BYTES} bytes for \
         one document"
    )]
    DocumentTooLarge { slug: String, size: usize },
    #[error(
        "the documents add up to {total} bytes, more than the limit of {MAX_RESULT_BYTES} bytes \
         for one result"
    )]
    ResultTooLarge { total: u64 },
}

/// Checks a whole result, given as `(slug, title, content)` of each document, against
/// [`MAX_DOCUMENTS`], [`MAX_NAME_BYTES`], [`MAX_DOCUMENT_BYTES`] and [`MAX_RESULT_BYTES`]: what
/// a job source refuses to store, whichever it is.
pub fn check_result<'a, I>(documents: I) -> Result<(), SizeError>
where
    I: IntoIterator<Item = (&'a str, &'a str, &'a str)>,
{
    // A slug in an error is shown shortened: it may be the over-long one.
    let shown = |slug: &str| truncate_utf8(slug, 120).to_owned();
    let (mut count, mut total) = (0usize, 0u64);
    for (slug, title, content) in documents {
        count += 1;
        if count > MAX_DOCUMENTS {
            // Count them all, so the error says how many there were.
            continue;
        }
        if slug.is_empty() || slug.len() > MAX_NAME_BYTES || title.len() > MAX_NAME_BYTES {
            return Err(SizeError::BadName { slug: shown(slug) });
        }
        if content.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(SizeError::DocumentTooLarge {
                slug: shown(slug),
                size: content.len(),
            });
        }
        total += content.len() as u64;
    }
    if count > MAX_DOCUMENTS {
        return Err(SizeError::TooManyDocuments { count });
    }
    if total > MAX_RESULT_BYTES {
        return Err(SizeError::ResultTooLarge { total });
    }
    Ok(())
}

// ---- Texts ----

/// A progress message: it travels in every heartbeat and the web app shows it as a one-line
/// status, so a runaway CLI line must not travel further than this.
pub const MAX_PROGRESS_BYTES: usize = 500;

/// Jobs whose agent failures a coordinator remembers at once (to send them to other agents first
/// and to count attempts after `AGENT_FAULTS_PER_JOB`); entries leave when their job ends.
pub const MAX_TRACKED_JOB_FAULTS: usize = 10_000;

/// A run's final message: the error text of a failed attempt (`queue:retryOrFail`'s `error`,
/// stored twice in the job as `error` and `lastError`) or the completion message. Enough for the
/// CLI's last error lines, small beside the job's 1 MiB.
pub const MAX_MESSAGE_BYTES: usize = 8 * KIB;

/// Of an error text cut by [`cap_error_text`], the bytes kept from its start (what failed); the
/// rest of the budget keeps its end (the CLI's last error lines).
const ERROR_HEAD_BYTES: usize = KIB;

/// A prompt. It reaches the CLI as one argv string, and Linux caps one argv string at 128 KiB
/// (`MAX_ARG_STRLEN`): this leaves room while allowing any sensible prompt.
pub const MAX_PROMPT_BYTES: usize = 64 * KIB;

/// A repository URL: real ones are far shorter, and this bounds what a log line repeats.
pub const MAX_URL_BYTES: usize = 2048;

/// A branch name: git's limit on a ref component is the file name limit, 255 bytes.
pub const MAX_BRANCH_BYTES: usize = 255;

/// A job or agent id (Convex ids are 31 to 37 characters): they become folder names and log
/// fields.
pub const MAX_JOB_ID_BYTES: usize = 64;

/// One line of CLI output kept by the agent: progress and error lines are read from it, and a
/// line without a newline must not grow without bound.
pub const MAX_OUTPUT_LINE_BYTES: usize = 4 * KIB;

/// Output lines in one `OutputLines` message: with [`MAX_OUTPUT_LINE_BYTES`] each, a message stays
/// under 1 MiB, far below [`MAX_AGENT_INBOUND_MESSAGE_BYTES`].
pub const MAX_OUTPUT_LINES_PER_MESSAGE: usize = 200;

// ---- Job logs (the analyzer's output, kept for GetJobLogs) ----

/// Lines of a run's output the agent keeps: while nobody follows the run, and for the tail it
/// sends before the run's end. Enough for the last minutes of a chatty analyzer, the part an
/// operator reads when a job fails, while a flooding analyzer costs each slot a fixed amount.
pub const OUTPUT_TAIL_LINES: usize = 1000;

/// Bytes of text in that tail: long lines fill it before the line count does (1000 lines of
/// [`MAX_OUTPUT_LINE_BYTES`] would be 4 MiB per slot, and as much in the coordinator per job).
pub const OUTPUT_TAIL_BYTES: usize = 256 * KIB;

/// Lines of one job's output the coordinator keeps, while it runs and after it ended (all its
/// attempts together): the agent's whole tail fits.
pub const JOB_LOG_LINES: usize = OUTPUT_TAIL_LINES;

/// Bytes of text of one job's kept lines.
pub const JOB_LOG_BYTES: usize = OUTPUT_TAIL_BYTES;

/// Bytes of the kept lines of all finished jobs together, as stored in the coordinator's
/// database in `DATA_DIR`; past it the lines of the jobs that ended first go. 256 jobs' full
/// tails: the logs never crowd out the journal and the job store on the volume.
pub const JOB_LOGS_TOTAL_BYTES: usize = 64 * MIB;

/// Finished jobs whose lines are kept, however small: bounds the rows the eviction looks at
/// after every job's end.
pub const JOB_LOGS_MAX_JOBS: usize = 5000;

/// `GetJobLogs` lines returned first when the request leaves `tail` at 0.
pub const DEFAULT_LOG_TAIL: u32 = 100;

/// The largest `tail` honoured: everything kept of a job.
pub const MAX_LOG_TAIL: u32 = JOB_LOG_LINES as u32;

// ---- Agents and the Admin API ----

/// Slots one agent may announce (`MAX_CONCURRENT_JOBS`): each slot is a CLI process of tens of
/// minutes and hundreds of MiB; more on one host is a configuration mistake.
pub const MAX_SLOTS: u32 = 64;

/// Labels one agent may announce. What an agent describes of itself (labels, version) is kept in
/// memory for every agent and shown by the Admin API, so each part of it is bounded.
pub const MAX_LABELS: usize = 32;
/// Length of a label key (a short name such as `zone`).
pub const MAX_LABEL_KEY_BYTES: usize = 64;
/// Length of a label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Length of an agent's version text (a semver and a commit at most).
pub const MAX_VERSION_BYTES: usize = 64;

/// Jobs in one `ListJobs` reply: keeps the reply far below gRPC's 4 MiB default message size.
pub const MAX_LIST_JOBS: usize = 1000;

/// One gRPC message the agent accepts from the coordinator: an assignment carries at most a
/// prompt ([`MAX_PROMPT_BYTES`]), a URL and a branch, so twice gRPC's 4 MiB default leaves room
/// for any later field while still bounding what a misbehaving peer can make the agent buffer.
pub const MAX_AGENT_INBOUND_MESSAGE_BYTES: usize = 8 * MIB;

// ---- Operator-facing texts and settings ----

/// A secret setting read from a file (`<NAME>_FILE`): a token or a key is far smaller, so a larger
/// file is the wrong file, refused before it is read into memory.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * KIB as u64;

/// Characters of a Convex error body quoted in an error message: enough for the `{code, message}`
/// of a request error, while a proxy's HTML page does not flood the log.
pub const MAX_QUOTED_BODY_CHARS: usize = 300;

// Our caps fit Convex's limits.
const _: () = assert!(
    MAX_DOCUMENT_BYTES as usize + 4 * MAX_NAME_BYTES + DOCUMENT_FIELDS_BYTES
        <= CONVEX_DOCUMENT_BYTES
);
const _: () = assert!(MAX_DOCUMENTS <= CONVEX_ARRAY_ELEMENTS);
const _: () = assert!((MAX_RESULT_BYTES as usize) < CONVEX_ARGUMENT_BYTES);
const _: () = assert!(MAX_PROMPT_BYTES < 128 * KIB);
const _: () = assert!(ERROR_HEAD_BYTES * 2 < MAX_MESSAGE_BYTES);

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

/// Caps an error text at [`MAX_MESSAGE_BYTES`], keeping its start (what failed) and its end
/// (where the CLI's last error lines are), with a marker saying how much was cut between them.
pub fn cap_error_text(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_MESSAGE_BYTES {
        return Cow::Borrowed(text);
    }
    let marker = format!("\n[... {} bytes cut ...]\n", text.len());
    let head = truncate_utf8(text, ERROR_HEAD_BYTES);
    let tail_budget = MAX_MESSAGE_BYTES - head.len() - marker.len();
    let mut start = text.len() - tail_budget;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    Cow::Owned(format!("{head}{marker}{}", &text[start..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }

    #[test]
    fn error_text_is_capped_keeping_both_ends() {
        let text = format!("START{}END", "é".repeat(10_000));
        let capped = cap_error_text(&text);
        assert!(capped.len() <= MAX_MESSAGE_BYTES, "{}", capped.len());
        assert!(capped.starts_with("START"));
        assert!(capped.ends_with("END"));
        assert!(capped.contains(&format!("[... {} bytes cut ...]", text.len())));

        let short = "a short error";
        assert!(matches!(cap_error_text(short), Cow::Borrowed(s) if s == short));
        let exact = "x".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(cap_error_text(&exact), exact.as_str());
    }

    #[test]
    fn a_document_at_every_cap_fits_convex() {
        let name = "n".repeat(MAX_NAME_BYTES);
        let content = "c".repeat(MAX_DOCUMENT_BYTES as usize);
        assert!(stored_document_bytes(&name, &name, &content) <= CONVEX_DOCUMENT_BYTES);
    }

    #[test]
    fn results_are_checked_against_every_cap() {
        let max = MAX_DOCUMENT_BYTES as usize;
        let big = "c".repeat(max);
        assert_eq!(check_result([("a.md", "A", big.as_str())]), Ok(()));
        let over = "c".repeat(max + 1);
        assert_eq!(
            check_result([("a.md", "A", over.as_str())]),
            Err(SizeError::DocumentTooLarge {
                slug: "a.md".into(),
                size: max + 1
            })
        );
        let long_name = "n".repeat(MAX_NAME_BYTES + 1);
        assert!(matches!(
            check_result([("a.md", long_name.as_str(), "x")]),
            Err(SizeError::BadName { .. })
        ));
        assert!(matches!(
            check_result([("", "A", "x")]),
            Err(SizeError::BadName { .. })
        ));
        let many = vec![("a.md", "A", "x"); MAX_DOCUMENTS + 1];
        assert_eq!(
            check_result(many),
            Err(SizeError::TooManyDocuments {
                count: MAX_DOCUMENTS + 1
            })
        );
        // 16 documents at the per-document cap add up to more than one result may hold.
        let count = (MAX_RESULT_BYTES / MAX_DOCUMENT_BYTES) as usize + 1;
        let docs = vec![("a.md", "A", big.as_str()); count];
        assert!(matches!(
            check_result(docs),
            Err(SizeError::ResultTooLarge { .. })
        ));
    }
}
