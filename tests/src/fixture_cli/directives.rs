//! Misbehaviour directives: what a test asks the fixture CLI to do besides a normal run.
//!
//! Directives come from two places, applied in this order (a later value wins):
//! the `FIXTURE_DIRECTIVES` environment variable (comma or whitespace separated, `fixture:` prefix
//! optional) so a test can configure every run of an agent, then `fixture:<directive>` tokens found
//! anywhere in the `--prompt` text (whitespace separated) so a test can configure a single job.
//! Anything unrecognised is an error: a typo in a test must be loud, not silently ignored.

use std::fmt;

/// Prefix that marks a directive inside prompt text.
pub const PROMPT_PREFIX: &str = "fixture:";

/// How progress is printed on stdout, mirroring the builds of the real CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// pino JSON lines (the real CLI when stdout is not a terminal).
    #[default]
    Json,
    /// The newest CLI's pino JSON lines: numeric levels, and each step start marked in its
    /// message as `[FONDATION_STEP_N/6] ...`, with `step` and `phase` fields.
    Marker,
    /// `[N/6] Phase: message` (the real CLI on a terminal).
    Bracket,
    /// `Step N/6: message`.
    Step,
    /// `[PROGRESS] message`.
    Progress,
    /// Nothing at all on stdout; the output files are the only progress evidence.
    Silent,
}

/// Everything a run was asked to do differently from a plain successful analysis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub format: Format,
    /// Fail after step 2 on every run.
    pub fail: bool,
    /// Fail after step 2 while the run number of this job is at most this value.
    pub fail_attempts: Option<u64>,
    /// Print step 1, then never finish.
    pub hang: bool,
    /// After step 1, wait until this file exists: a test holds the run mid-analysis, looks at
    /// it, then lets it finish by creating the file.
    pub hold: Option<String>,
    /// Survive SIGTERM, so the caller has to escalate to SIGKILL.
    pub ignore_term: bool,
    /// Delay before each step; `None` falls back to `FIXTURE_STEP_DELAY_MS`.
    pub slow_ms: Option<u64>,
    /// Extra progress lines spread over the steps.
    pub flood: u64,
    /// Also create `chapters/zz_link.md` pointing at `/etc/passwd`.
    pub symlink: bool,
    /// Also write `chapters/chapter_99_oversize.md` of this many bytes.
    pub oversize: Option<u64>,
    /// Print lines that are not valid UTF-8 on stdout and stderr.
    pub invalid_utf8: bool,
    /// Succeed without writing any output file.
    pub no_output: bool,
    /// Exit with this code after an otherwise normal run.
    pub exit_code: Option<u8>,
    /// Fail like the real CLI when `prompts/` is missing from the working directory.
    pub need_prompts: bool,
    /// Report what the run can see of the agent (`probe`, or `probe=<secret file to try>`).
    pub probe: Option<Option<String>>,
    /// Leave processes carrying this marker behind (`setsid` and double-forked).
    pub escape: Option<String>,
    /// Print error lines that would forge a log line if logged raw, then fail.
    pub forge_log: bool,
    /// Lines printed as given on stdout before step 1 (`say=<text>`, repeatable).
    pub say: Vec<String>,
    /// Numbered lines (`fixture line <step>.<n>`) printed at each step.
    pub numbered: u64,
    /// A file holding a step number: each step waits until the file says at least its number
    /// (missing or unreadable: 0), so a test can hold the run between steps.
    pub gate: Option<String>,
    /// Also copy the analyzed checkout's `README.md` into a chapter, so a test sees what was
    /// cloned (which branch).
    pub show_readme: bool,
}

/// A directive that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectiveError(String);

impl fmt::Display for DirectiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DirectiveError {}

impl Directives {
    /// Collects the directives of one run: environment first, then the prompt.
    pub fn collect(env: Option<&str>, prompt: Option<&str>) -> Result<Self, DirectiveError> {
        let mut directives = Directives::default();
        let env_tokens = env
            .unwrap_or_default()
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|token| !token.is_empty())
            .map(|token| token.strip_prefix(PROMPT_PREFIX).unwrap_or(token));
        let prompt_tokens = prompt
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|token| token.strip_prefix(PROMPT_PREFIX));
        for token in env_tokens.chain(prompt_tokens) {
            directives.apply(token)?;
        }
        Ok(directives)
    }

    fn apply(&mut self, token: &str) -> Result<(), DirectiveError> {
        let (name, value) = match token.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (token, None),
        };
        match (name, value) {
            ("format", Some(value)) => self.format = parse_format(value)?,
            ("fail", None) => self.fail = true,
            ("fail-attempts", Some(value)) => self.fail_attempts = Some(number(token, value)?),
            ("hang", None) => self.hang = true,
            ("hold", Some(path)) if !path.is_empty() => self.hold = Some(path.to_owned()),
            ("ignore-term", None) => self.ignore_term = true,
            ("slow", Some(value)) => self.slow_ms = Some(number(token, value)?),
            ("flood", Some(value)) => self.flood = number(token, value)?,
            ("symlink", None) => self.symlink = true,
            ("oversize", Some(value)) => self.oversize = Some(number(token, value)?),
            ("invalid-utf8", None) => self.invalid_utf8 = true,
            ("no-output", None) => self.no_output = true,
            ("exit", Some(value)) => {
                self.exit_code = Some(value.parse().map_err(|_| {
                    DirectiveError(format!(
                        "invalid fixture directive {token:?}: exit code must be 0 to 255"
                    ))
                })?)
            }
            ("need-prompts", None) => self.need_prompts = true,
            ("probe", secret) => self.probe = Some(secret.map(str::to_owned)),
            ("escape", Some(marker)) if !marker.is_empty() => self.escape = Some(marker.to_owned()),
            ("forge-log", None) => self.forge_log = true,
            ("say", Some(text)) => self.say.push(text.to_owned()),
            ("numbered", Some(value)) => self.numbered = number(token, value)?,
            ("gate", Some(path)) if !path.is_empty() => self.gate = Some(path.to_owned()),
            ("show-readme", None) => self.show_readme = true,
            _ => {
                return Err(DirectiveError(format!(
                    "unknown fixture directive {token:?}"
                )))
            }
        }
        Ok(())
    }
}

fn parse_format(value: &str) -> Result<Format, DirectiveError> {
    Ok(match value {
        "json" => Format::Json,
        "marker" => Format::Marker,
        "bracket" => Format::Bracket,
        "step" => Format::Step,
        "progress" => Format::Progress,
        "silent" => Format::Silent,
        _ => {
            return Err(DirectiveError(format!(
                "unknown fixture output format {value:?} (json, marker, bracket, step, progress, \
                 silent)"
            )))
        }
    })
}

fn number(token: &str, value: &str) -> Result<u64, DirectiveError> {
    value.parse().map_err(|_| {
        DirectiveError(format!(
            "invalid fixture directive {token:?}: expected a non-negative integer"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_prompt_directives_combine() {
        let directives = Directives::collect(
            Some("fixture:slow=5, symlink format=step"),
            Some("analyze this fixture:fail fixture:format=bracket please"),
        )
        .expect("valid directives");
        assert_eq!(directives.format, Format::Bracket);
        assert_eq!(directives.slow_ms, Some(5));
        assert!(directives.symlink && directives.fail);
    }

    #[test]
    fn say_repeats_and_numbered_and_gate_take_values() {
        let directives = Directives::collect(
            Some("numbered=3"),
            Some("fixture:say=one fixture:say=two fixture:gate=/tmp/gate"),
        )
        .expect("valid directives");
        assert_eq!(directives.say, ["one", "two"]);
        assert_eq!(directives.numbered, 3);
        assert_eq!(directives.gate.as_deref(), Some("/tmp/gate"));
        assert!(Directives::collect(None, Some("fixture:gate=")).is_err());
        assert!(Directives::collect(None, Some("fixture:numbered=x")).is_err());
    }

    #[test]
    fn prompt_words_without_prefix_are_not_directives() {
        let directives =
            Directives::collect(None, Some("fail hang slow=5")).expect("no directives");
        assert_eq!(directives, Directives::default());
    }

    #[test]
    fn typos_are_errors() {
        assert!(Directives::collect(Some("fial"), None).is_err());
        assert!(Directives::collect(None, Some("fixture:slow=fast")).is_err());
        assert!(Directives::collect(None, Some("fixture:exit=300")).is_err());
        assert!(Directives::collect(None, Some("fixture:hang=1")).is_err());
        assert!(Directives::collect(None, Some("fixture:format=xml")).is_err());
    }
}
