//! Checks for the job inputs that cross the wire: repository URL, branch, job id and prompt.
//!
//! Job data comes from Convex and then over gRPC, so both the coordinator (before assigning) and
//! the agent (before cloning) treat it as untrusted. Keeping the rules here means both sides refuse
//! exactly the same things, and the agent never hands `git` a URL or branch that could be read as
//! an option (`--upload-pack=...`), a remote helper (`ext::sh -c ...`) or a credential.
//!
//! Every error names the offending input (shortened and quoted with escapes, so a hostile value
//! cannot forge log lines) and says what would be accepted instead.

use std::fmt;

use url::Url;

use crate::limits::{MAX_BRANCH_BYTES, MAX_JOB_ID_BYTES, MAX_PROMPT_BYTES, MAX_URL_BYTES};

/// What can be wrong with a job input or with `REPO_ALLOWLIST`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    /// The repository URL is malformed or uses a forbidden feature (scheme, credentials, ...).
    #[error(
        "repository URL {url:?} is not valid: {reason}; use a plain URL such as \
         https://github.com/owner/repo.git"
    )]
    InvalidUrl { url: String, reason: String },

    /// The URL is well formed but under none of the configured prefixes.
    #[error(
        "repository URL {url:?} is not allowed: it matches none of REPO_ALLOWLIST ({allowlist})"
    )]
    UrlNotAllowed { url: String, allowlist: String },

    /// One `REPO_ALLOWLIST` entry cannot be used as a prefix.
    #[error(
        "REPO_ALLOWLIST entry {entry:?} is not valid: {reason}; give comma-separated URL \
         prefixes such as https://github.com/"
    )]
    InvalidAllowlistEntry { entry: String, reason: String },

    /// `REPO_ALLOWLIST` has no entry at all: nothing could ever be cloned.
    #[error(
        "REPO_ALLOWLIST is empty, so no repository could ever be cloned; set it to \
         comma-separated URL prefixes such as https://github.com/"
    )]
    EmptyAllowlist,

    /// The branch name breaks git's ref rules or contains a shell metacharacter.
    #[error("branch name {name:?} is not valid: {reason}; use a git branch name such as main or feature/x")]
    InvalidBranch { name: String, reason: String },

    /// The job id is not 1 to 64 characters of `[A-Za-z0-9_-]`.
    #[error(
        "job id {id:?} is not valid: {reason}; a job id is 1 to {MAX_JOB_ID_BYTES} characters \
         of A-Z, a-z, 0-9, '_' and '-'"
    )]
    InvalidJobId { id: String, reason: String },

    /// The agent id is not 1 to 64 characters of `[A-Za-z0-9_-]`.
    #[error(
        "agent id {id:?} is not valid: {reason}; an agent id is 1 to {MAX_JOB_ID_BYTES} \
         characters of A-Z, a-z, 0-9, '_' and '-'"
    )]
    InvalidAgentId { id: String, reason: String },

    /// The agent's instance id is not 1 to 64 characters of `[A-Za-z0-9_-]`.
    #[error(
        "instance id {id:?} is not valid: {reason}; the agent draws it at start, 1 to \
         {MAX_JOB_ID_BYTES} characters of A-Z, a-z, 0-9, '_' and '-' (upgrade the agent)"
    )]
    InvalidInstanceId { id: String, reason: String },

    /// The prompt is larger than [`MAX_PROMPT_BYTES`].
    #[error("prompt is {len} bytes, more than the limit of {max} bytes; shorten the prompt")]
    PromptTooLarge { len: usize, max: usize },

    /// The prompt contains a NUL byte, which cannot be passed in an argv.
    #[error("prompt contains a NUL byte at byte offset {offset}; remove it (argv strings cannot hold NUL)")]
    PromptContainsNul { offset: usize },
}

/// URL schemes git may ever be asked to use. Everything else (`ext::`, `fd::`, custom remote
/// helpers, `ftp`...) is refused: remote helpers can run arbitrary commands.
const ALLOWED_SCHEMES: &[&str] = &["https", "http", "ssh", "git", "file"];

/// How much of an offending input an error message repeats.
const SHOWN_CHARS: usize = 120;

/// The URL prefixes that may be cloned (`REPO_ALLOWLIST`), kept in normalized form so they can be
/// compared with normalized candidate URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoAllowlist {
    /// Normalized prefixes (`url::Url` serialization), in configuration order, never empty.
    prefixes: Vec<String>,
}

impl RepoAllowlist {
    /// The default allow-list: public GitHub over https only.
    pub const DEFAULT: &'static str = "https://github.com/";

    /// Parses comma-separated URL prefixes (the `REPO_ALLOWLIST` value).
    ///
    /// Entries are trimmed and empty entries ignored (a trailing comma is harmless), but a list
    /// with no entry at all is refused: an agent configured that way could never clone anything,
    /// and failing at start-up is clearer than failing every job.
    pub fn parse(csv: &str) -> Result<Self, ValidationError> {
        let mut prefixes = Vec::new();
        for entry in csv.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let normalized = normalize_prefix(entry).map_err(|reason| {
                ValidationError::InvalidAllowlistEntry {
                    entry: shown(entry),
                    reason,
                }
            })?;
            if !prefixes.contains(&normalized) {
                prefixes.push(normalized);
            }
        }
        if prefixes.is_empty() {
            return Err(ValidationError::EmptyAllowlist);
        }
        Ok(Self { prefixes })
    }

    /// Ok when `url` is a well-formed URL under one of the prefixes.
    pub fn check(&self, url: &str) -> Result<(), ValidationError> {
        self.normalize(url).map(drop)
    }

    /// Like [`check`](Self::check), and returns the normalized URL that was checked.
    ///
    /// Callers that hand the URL to git should pass this string rather than the raw input: it is
    /// exactly what was compared with the prefixes, so no difference between how the `url` crate
    /// and git or curl read an odd URL (dot segments, percent-encoded dots, letter case) can move
    /// it outside the allow-list.
    pub fn normalize(&self, url: &str) -> Result<String, ValidationError> {
        let normalized = parse_repo_url(url).map_err(|reason| ValidationError::InvalidUrl {
            url: shown(url),
            reason,
        })?;
        if self
            .prefixes
            .iter()
            .any(|prefix| is_under_prefix(&normalized, prefix))
        {
            Ok(normalized)
        } else {
            Err(ValidationError::UrlNotAllowed {
                url: shown(url),
                allowlist: self.to_string(),
            })
        }
    }

    /// Value for git's `GIT_ALLOW_PROTOCOL`: the schemes of the prefixes, colon separated and
    /// deduplicated (e.g. `https` or `https:file`), so git itself refuses any other transport even
    /// if something (a redirect, a submodule, an `insteadOf` rule) would lead it there.
    pub fn git_protocols(&self) -> String {
        let mut schemes: Vec<&str> = Vec::new();
        for prefix in &self.prefixes {
            // Prefixes are normalized URLs, so the scheme is everything before the first ':'.
            let scheme = prefix.split(':').next().unwrap_or_default();
            if !schemes.contains(&scheme) {
                schemes.push(scheme);
            }
        }
        schemes.join(":")
    }

    /// The normalized prefixes, in configuration order.
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }
}

impl Default for RepoAllowlist {
    fn default() -> Self {
        Self {
            prefixes: vec![Self::DEFAULT.to_owned()],
        }
    }
}

impl fmt::Display for RepoAllowlist {
    /// Comma-separated, the same format `parse` reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefixes.join(","))
    }
}

/// Checks the parts of a URL that are the same for job URLs and prefixes, and returns its
/// normalized serialization. The reason is a phrase for the error message.
fn parse_common(raw: &str) -> Result<Url, String> {
    if raw.len() > MAX_URL_BYTES {
        return Err(format!("it is longer than {MAX_URL_BYTES} bytes"));
    }
    // Checked on the raw text because `Url::parse` silently strips surrounding whitespace and
    // removes tabs and newlines inside: what we compare must be what git would get.
    if let Some(c) = raw.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "it contains whitespace or a control character ({c:?})"
        ));
    }
    if raw.starts_with('-') {
        return Err("it starts with '-', which git would read as an option".to_owned());
    }
    // The url crate reads '\' as '/' in http(s) URLs, git and curl do not: refuse the ambiguity.
    if raw.contains('\\') {
        return Err("it contains a backslash".to_owned());
    }
    let url = Url::parse(raw).map_err(|e| format!("it does not parse as a URL ({e})"))?;
    if !ALLOWED_SCHEMES.contains(&url.scheme()) {
        return Err(format!(
            "scheme {:?} is not one of {}",
            url.scheme(),
            ALLOWED_SCHEMES.join(", ")
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "it contains user information (user:password@); credentials must not travel in job \
             data, configure them on the agent instead"
                .to_owned(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("it has a query (?...) or fragment (#...)".to_owned());
    }
    if url.scheme() != "file" {
        match url.host_str() {
            None | Some("") => return Err("it has no host".to_owned()),
            // ssh would read such a host as an option (CVE-2017-1000117).
            Some(host) if host.starts_with('-') => {
                return Err("its host starts with '-'".to_owned())
            }
            Some(_) => {}
        }
    }
    Ok(url)
}

/// Normalizes one `REPO_ALLOWLIST` entry.
fn normalize_prefix(entry: &str) -> Result<String, String> {
    Ok(parse_common(entry)?.into())
}

/// Normalizes a repository URL from a job.
fn parse_repo_url(raw: &str) -> Result<String, String> {
    let url = parse_common(raw)?;
    let path = url.path();
    if path.is_empty() || path == "/" {
        return Err("it names no repository path".to_owned());
    }
    Ok(url.into())
}

/// True when `url` starts with `prefix` and the match ends on a path boundary, so that
/// `https://github.com` does not admit `https://github.com.evil.io/x` and `https://h/org` does not
/// admit `https://h/org-evil/x`. A URL equal to the prefix (a one-repository entry) is admitted.
fn is_under_prefix(url: &str, prefix: &str) -> bool {
    match url.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Checks a branch name the way `git check-ref-format --branch` would, and additionally refuses
/// shell metacharacters: they are never legitimate in the branches we clone, and a clear error
/// beats a confusing git failure. Non-ASCII letters stay allowed, as in git.
pub fn check_branch(name: &str) -> Result<(), ValidationError> {
    branch_problem(name).map_or(Ok(()), |reason| {
        Err(ValidationError::InvalidBranch {
            name: shown(name),
            reason,
        })
    })
}

/// Checks the branch of a job, where an empty name stands for the repository's default branch
/// (what `git clone` without `--branch` checks out); any other name must pass [`check_branch`].
pub fn check_job_branch(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Ok(());
    }
    check_branch(name)
}

/// The first rule `name` breaks, as a phrase for the error message.
fn branch_problem(name: &str) -> Option<String> {
    const GIT_FORBIDDEN: &[char] = &[' ', '~', '^', ':', '?', '*', '[', '\\'];
    const SHELL_FORBIDDEN: &[char] = &[';', '|', '&', '$', '`', '\'', '"', '<', '>'];

    if name.is_empty() {
        return Some("it is empty".to_owned());
    }
    if name.len() > MAX_BRANCH_BYTES {
        return Some(format!("it is longer than {MAX_BRANCH_BYTES} bytes"));
    }
    if name.starts_with('-') {
        return Some("it starts with '-', which git would read as an option".to_owned());
    }
    if let Some(c) = name.chars().find(|c| c.is_ascii_control()) {
        return Some(format!("it contains the control character {c:?}"));
    }
    if let Some(c) = name.chars().find(|c| GIT_FORBIDDEN.contains(c)) {
        return Some(format!("it contains {c:?}, which git forbids in ref names"));
    }
    if let Some(c) = name.chars().find(|c| SHELL_FORBIDDEN.contains(c)) {
        return Some(format!("it contains the shell metacharacter {c:?}"));
    }
    if name.contains("..") {
        return Some("it contains \"..\"".to_owned());
    }
    if name.contains("@{") {
        return Some("it contains \"@{\"".to_owned());
    }
    if name == "@" {
        return Some("\"@\" alone is not a branch name".to_owned());
    }
    // git refuses to create refs/heads/HEAD: it would be ambiguous with the symbolic ref.
    if name == "HEAD" {
        return Some("\"HEAD\" is not a branch name".to_owned());
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Some("it starts or ends with '/'".to_owned());
    }
    if name.contains("//") {
        return Some("it contains \"//\"".to_owned());
    }
    if name.ends_with('.') {
        return Some("it ends with '.'".to_owned());
    }
    for component in name.split('/') {
        if component.starts_with('.') {
            return Some(format!("its component {component:?} starts with '.'"));
        }
        if component.ends_with(".lock") {
            return Some(format!("its component {component:?} ends with \".lock\""));
        }
    }
    None
}

/// Checks a job id: 1 to [`MAX_JOB_ID_BYTES`] characters of `[A-Za-z0-9_-]`. Job ids end up in
/// folder names and log fields, so nothing else is accepted.
pub fn check_job_id(id: &str) -> Result<(), ValidationError> {
    identifier_problem(id, MAX_JOB_ID_BYTES).map_or(Ok(()), |reason| {
        Err(ValidationError::InvalidJobId {
            id: shown(id),
            reason,
        })
    })
}

/// Checks an agent id (`AGENT_ID`, the host name by default): 1 to [`MAX_JOB_ID_BYTES`]
/// characters of `[A-Za-z0-9_-]`. Agent ids name the agent's workspace folder under `TEMP_DIR`
/// and appear in log fields and `Admin/ListAgents`, so nothing else is accepted.
pub fn check_agent_id(id: &str) -> Result<(), ValidationError> {
    identifier_problem(id, MAX_JOB_ID_BYTES).map_or(Ok(()), |reason| {
        Err(ValidationError::InvalidAgentId {
            id: shown(id),
            reason,
        })
    })
}

/// Checks an agent's instance id (`Hello.instance_id`, random per agent process): same shape
/// as an agent id, since it appears in log fields and errors.
pub fn check_instance_id(id: &str) -> Result<(), ValidationError> {
    identifier_problem(id, MAX_JOB_ID_BYTES).map_or(Ok(()), |reason| {
        Err(ValidationError::InvalidInstanceId {
            id: shown(id),
            reason,
        })
    })
}

/// Why `id` is not 1 to `max` characters of `[A-Za-z0-9_-]`, if it is not.
fn identifier_problem(id: &str, max: usize) -> Option<String> {
    if id.is_empty() {
        Some("it is empty".to_owned())
    } else if id.len() > max {
        Some(format!("it is longer than {max} characters"))
    } else {
        id.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
            .map(|c| format!("it contains {c:?}"))
    }
}

/// Checks a prompt: at most [`MAX_PROMPT_BYTES`] bytes and no NUL (it is passed as an argv
/// string, which cannot contain NUL).
pub fn check_prompt(prompt: &str) -> Result<(), ValidationError> {
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(ValidationError::PromptTooLarge {
            len: prompt.len(),
            max: MAX_PROMPT_BYTES,
        });
    }
    if let Some(offset) = prompt.bytes().position(|b| b == 0) {
        return Err(ValidationError::PromptContainsNul { offset });
    }
    Ok(())
}

/// The part of an untrusted input repeated in an error: at most [`SHOWN_CHARS`] characters, so a
/// megabyte of junk does not become a megabyte of log, with any URL credential redacted. Errors
/// print it with `{:?}`, which escapes control characters.
fn shown(input: &str) -> String {
    let input = redact_credentials(input);
    match input.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}...", &input[..cut]),
        None => input.into_owned(),
    }
}

/// `text` with the user information of every URL in it replaced by `***`
/// (`https://user:pass@host/x` becomes `https://***@host/x`). The one redaction for repository
/// URLs: applied wherever one is logged, stored, returned or repeated in an error, so a credential
/// a job source put in a URL never travels further. Works on any text (not only a URL that
/// parses), since what needs redacting is often exactly what failed to validate.
pub fn redact_credentials(text: &str) -> std::borrow::Cow<'_, str> {
    const SEPARATOR: &str = "://";
    if !text.contains(SEPARATOR) || !text.contains('@') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(SEPARATOR) {
        let authority_start = at + SEPARATOR.len();
        out.push_str(&rest[..authority_start]);
        let after = &rest[authority_start..];
        // The authority ends where the path, query or fragment starts, or at a space or quote.
        let end = after
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(user_end) => {
                out.push_str("***");
                out.push_str(&authority[user_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests;
