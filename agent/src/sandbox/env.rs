//! The environment of the processes the agent starts: an allow-list, never inheritance.
//!
//! The analyzer runs code steered by a repository from the internet, so it gets only the
//! variables `ANALYZER_ENV` names (exact names, or prefixes written `PREFIX*`), and never one of
//! the agent's own settings (`AGENT_TOKEN`, `TLS_KEY`, `COORDINATOR_URL`... and their `_FILE`
//! forms), even when a prefix would match one: those are read from the agent's own clap
//! definition, so a setting added later is covered without anyone remembering this list. Naming
//! such a setting outright in `ANALYZER_ENV` is refused at start-up. git gets a fixed allow-list
//! of what it needs (locale, proxies, CA bundles), with the same exclusion.

use std::collections::BTreeSet;

use clap::CommandFactory;

/// The analyzer's default allow-list, and why each entry is there:
/// - `PATH`, `HOME`, `TMPDIR`: finding programs, `~/.claude`, scratch files (`HOME` and `TMPDIR`
///   are replaced by the slot's own folders when the analyzer runs under a slot user);
/// - `LANG`, `LANGUAGE`, `LC_*`, `TZ`, `TERM`: locale, time zone, terminal type;
/// - `NODE_*`: `NODE_PATH` (where the bundled CLI finds the Claude SDK), `NODE_OPTIONS`;
/// - `ANTHROPIC_*`, `CLAUDE_*`: the Claude credential (`CLAUDE_CODE_OAUTH_TOKEN`) and settings;
/// - proxies and CA bundles: reaching the Claude API from behind a corporate proxy.
pub const DEFAULT_ANALYZER_ENV: &str = "PATH,HOME,TMPDIR,LANG,LANGUAGE,LC_*,TZ,TERM,NODE_*,\
ANTHROPIC_*,CLAUDE_*,HTTP_PROXY,HTTPS_PROXY,NO_PROXY,http_proxy,https_proxy,no_proxy,\
SSL_CERT_FILE,SSL_CERT_DIR,NODE_EXTRA_CA_CERTS";

/// What git needs from the agent's environment: programs, locale, proxies, CA bundles.
/// `GIT_*` is not passed: the agent sets the git variables it wants itself.
const GIT_ENV: &str = "PATH,HOME,TMPDIR,LANG,LANGUAGE,LC_*,TZ,HTTP_PROXY,HTTPS_PROXY,NO_PROXY,\
http_proxy,https_proxy,no_proxy,SSL_CERT_FILE,SSL_CERT_DIR";

/// Why an allow-list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvListError {
    #[error("{entry:?} is not a variable name or a prefix written NAME* (letters, digits, _)")]
    Malformed { entry: String },
    #[error(
        "{entry:?} is a setting of the agent itself; the analyzer never gets those (remove it)"
    )]
    AgentSetting { entry: String },
}

/// One entry of an allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Name(String),
    Prefix(String),
}

/// A parsed allow-list of variable names and prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvAllowlist {
    entries: Vec<Entry>,
    /// The agent's own setting names, stripped whatever the entries say.
    denied: BTreeSet<String>,
}

impl EnvAllowlist {
    /// Parses a comma-separated list such as [`DEFAULT_ANALYZER_ENV`].
    pub fn parse(list: &str) -> Result<Self, EnvListError> {
        let denied = agent_setting_names();
        let mut entries = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, prefix) = match raw.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (raw, false),
            };
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(EnvListError::Malformed {
                    entry: raw.to_owned(),
                });
            }
            if !prefix && denied.contains(name) {
                return Err(EnvListError::AgentSetting {
                    entry: raw.to_owned(),
                });
            }
            entries.push(if prefix {
                Entry::Prefix(name.to_owned())
            } else {
                Entry::Name(name.to_owned())
            });
        }
        Ok(Self { entries, denied })
    }

    /// The allow-list git runs with.
    pub fn for_git() -> Self {
        match Self::parse(GIT_ENV) {
            Ok(list) => list,
            // GIT_ENV is a constant that parses (checked by a test); stay total anyway.
            Err(_) => Self {
                entries: Vec::new(),
                denied: agent_setting_names(),
            },
        }
    }

    /// Whether a variable of this name may be passed on.
    pub fn allows(&self, name: &str) -> bool {
        if self.denied.contains(name) {
            return false;
        }
        self.entries.iter().any(|entry| match entry {
            Entry::Name(allowed) => allowed == name,
            Entry::Prefix(prefix) => name.starts_with(prefix.as_str()),
        })
    }

    /// The allowed subset of `vars` (typically `std::env::vars_os()`); names or values that are
    /// not UTF-8 are dropped.
    pub fn filter(
        &self,
        vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Vec<(String, String)> {
        vars.into_iter()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .filter(|(name, _)| self.allows(name))
            .collect()
    }

    /// The allowed subset of this process's environment.
    pub fn from_current(&self) -> Vec<(String, String)> {
        self.filter(std::env::vars_os())
    }
}

/// Every environment variable the agent reads as a setting, and its `_FILE` form.
fn agent_setting_names() -> BTreeSet<String> {
    let command = crate::config::Cli::command();
    let mut names = BTreeSet::new();
    let mut stack = vec![&command];
    while let Some(command) = stack.pop() {
        for argument in command.get_arguments() {
            if let Some(name) = argument.get_env().and_then(|n| n.to_str()) {
                names.insert(name.to_owned());
                names.insert(format!("{name}_FILE"));
            }
        }
        stack.extend(command.get_subcommands());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn default_list_passes_what_the_cli_needs_and_no_agent_setting() {
        let list = EnvAllowlist::parse(DEFAULT_ANALYZER_ENV).expect("the default parses");
        let kept = list.filter(vars(&[
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("NODE_PATH", "/app/node_modules"),
            ("CLAUDE_CODE_OAUTH_TOKEN", "claude"),
            ("AGENT_TOKEN", "secret"),
            ("AGENT_TOKEN_FILE", "/run/secrets/token"),
            ("TLS_KEY", "/etc/key.pem"),
            ("COORDINATOR_URL", "http://c"),
            ("TEMP_DIR", "/tmp/fondation"),
            ("RANDOM_OTHER", "x"),
        ]));
        let names: Vec<&str> = kept.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["PATH", "LC_ALL", "NODE_PATH", "CLAUDE_CODE_OAUTH_TOKEN"]
        );
    }

    #[test]
    fn a_prefix_never_reaches_the_agent_settings() {
        let list = EnvAllowlist::parse("AGENT_*,TLS*,FIXTURE_*").expect("prefixes parse");
        assert!(!list.allows("AGENT_TOKEN"));
        assert!(!list.allows("AGENT_ID"));
        assert!(!list.allows("TLS_KEY"));
        assert!(list.allows("AGENT_SOMETHING_ELSE"));
        assert!(list.allows("FIXTURE_RUN_LOG"));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(
            EnvAllowlist::parse("PATH,AGENT_TOKEN"),
            Err(EnvListError::AgentSetting {
                entry: "AGENT_TOKEN".into()
            })
        );
        for bad in ["*", "PA TH", "1X", "A*B", "X-Y"] {
            assert!(
                matches!(
                    EnvAllowlist::parse(bad),
                    Err(EnvListError::Malformed { .. })
                ),
                "{bad}"
            );
        }
        assert!(EnvAllowlist::parse(GIT_ENV).is_ok());
    }
}
