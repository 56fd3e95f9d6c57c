//! Secrets out of the analyzer's output, before the agent keeps or sends a line of it.
//!
//! The analyzer runs code steered by a repository from the internet and prints whatever it likes
//! (`env`, a configuration dump, a stack trace with a request's headers). Before a line goes into
//! the job's logs, or a failed job's error text, it loses:
//! - the agent's own token (`AGENT_TOKEN`): not in the analyzer's environment, but an analyzer
//!   without a slot user of its own can read the agent's memory and `/proc/<agent>/environ`;
//! - the job's clone credential, as the token and in the HTTP Basic form git sends it;
//! - the value of each variable of the analyzer's environment whose name says it holds a secret
//!   (`CLAUDE_CODE_OAUTH_TOKEN`, `ANTHROPIC_API_KEY`, anything with TOKEN, KEY, SECRET,
//!   PASSWORD, PASSWD, CREDENTIAL or AUTH in its name);
//! - the user information of every URL (`https://user:pass@host`, as everywhere else:
//!   [`redact_credentials`]).
//!
//! A secret cut by the line length cap would leave its first characters at the end of the line:
//! those go too. Text is compared byte for byte: a secret printed with its characters changed
//! (escaped, split by a colour code) is not recognised, which is why escapes are stripped first
//! ([`crate::output_tail`]).

use std::borrow::Cow;

use fondation_proto::{limits::MAX_OUTPUT_LINE_BYTES, model::CloneCredential, validate};

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Parts of a variable name that mark its value as a secret.
const SECRET_NAME_PARTS: [&str; 7] = [
    "TOKEN",
    "KEY",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "AUTH",
];

/// Shortest value of a secret-named variable that is redacted: such a name can also hold a
/// flag (`CLAUDE_CODE_USE_AUTH=1`), which would otherwise be blanked all over the output;
/// credentials are far longer.
const MIN_ENV_SECRET_BYTES: usize = 8;

/// Shortest start of a secret recognised at the end of a line the length cap cut: shorter ones
/// match ordinary text too often to say anything.
const MIN_CUT_SECRET_BYTES: usize = 4;

/// The secrets of one run, and how to take them out of a text.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Redactor {
    /// Redacts exactly these secrets (and URL credentials); empty ones are ignored.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Self { secrets }
    }

    /// The secrets of a run: the agent's token, the job's clone credential, and the secret
    /// values of the analyzer's environment.
    pub fn for_run(
        agent_token: Option<&str>,
        credential: Option<&CloneCredential>,
        analyzer_env: &[(String, String)],
    ) -> Self {
        let mut secrets: Vec<String> = agent_token.map(str::to_owned).into_iter().collect();
        if let Some(credential) = credential {
            secrets.push(credential.expose().to_owned());
            secrets.push(crate::clone::basic_credential(credential));
        }
        secrets.extend(
            analyzer_env
                .iter()
                .filter(|(name, value)| is_secret_name(name) && value.len() >= MIN_ENV_SECRET_BYTES)
                .map(|(_, value)| value.clone()),
        );
        Self::new(secrets)
    }

    /// `text` without the secrets.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
            }
        }
        // A line the cap cut is at most 3 bytes short of it (a character that did not fit).
        if out.len() + 3 >= MAX_OUTPUT_LINE_BYTES {
            if let Some(cut) = self.cut_secret_at_end(&out) {
                let mut kept = out.into_owned();
                kept.truncate(cut);
                kept.push_str(REDACTED);
                out = Cow::Owned(kept);
            }
        }
        match validate::redact_credentials(&out) {
            Cow::Borrowed(_) => out,
            Cow::Owned(redacted) => Cow::Owned(redacted),
        }
    }

    /// Where the start of a secret begins, when `text` ends with one (at least
    /// [`MIN_CUT_SECRET_BYTES`] of it).
    fn cut_secret_at_end(&self, text: &str) -> Option<usize> {
        self.secrets
            .iter()
            .filter_map(|secret| {
                (MIN_CUT_SECRET_BYTES..secret.len())
                    .rev()
                    .filter(|&len| secret.is_char_boundary(len))
                    .find(|&len| text.ends_with(&secret[..len]))
                    .map(|len| text.len() - len)
            })
            .min()
    }
}

/// Whether a variable of this name holds a secret, by the words in its name.
fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    SECRET_NAME_PARTS.iter().any(|part| name.contains(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_kind_of_secret_is_replaced() {
        let credential = CloneCredential::new("ghp_clone_credential_1234".into());
        let basic = crate::clone::basic_credential(&credential);
        let redactor = Redactor::for_run(
            Some("agent-token-xyz"),
            Some(&credential),
            &env(&[
                ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-abcdefgh"),
                ("ANTHROPIC_API_KEY", "sk-ant-api-12345678"),
                ("PATH", "/usr/local/bin:/usr/bin"),
                ("CLAUDE_CODE_USE_AUTH", "1"),
            ]),
        );
        let text = format!(
            "token=agent-token-xyz clone=ghp_clone_credential_1234 \
             header=Authorization: Basic {basic} oauth=sk-ant-oat01-abcdefgh \
             key=sk-ant-api-12345678 url=https://user:pw@github.com/o/r path=/usr/bin flag=1"
        );
        let shown = redactor.redact(&text);
        for secret in [
            "agent-token-xyz",
            "ghp_clone_credential_1234",
            basic.as_str(),
            "sk-ant-oat01-abcdefgh",
            "sk-ant-api-12345678",
            "user:pw",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("token=<redacted> clone=<redacted>"),
            "{shown}"
        );
        assert!(shown.contains("https://***@github.com/o/r"), "{shown}");
        // Values of other variables, and short flag values, stay.
        assert!(shown.contains("path=/usr/bin flag=1"), "{shown}");
    }

    #[test]
    fn clean_text_is_borrowed() {
        let redactor = Redactor::new(["secret-value".to_string()]);
        assert!(matches!(
            redactor.redact("nothing to see"),
            Cow::Borrowed("nothing to see")
        ));
    }

    #[test]
    fn a_secret_containing_another_goes_whole() {
        let redactor = Redactor::new(["abcd".to_string(), "abcdefgh".to_string()]);
        assert_eq!(
            redactor.redact("x abcdefgh y abcd"),
            "x <redacted> y <redacted>"
        );
    }

    #[test]
    fn a_secret_cut_by_the_length_cap_goes_too() {
        let redactor = Redactor::new(["0123456789-secret".to_string()]);
        let mut line = "a".repeat(MAX_OUTPUT_LINE_BYTES - 6);
        line.push_str("012345");
        let shown = redactor.redact(&line);
        assert!(shown.ends_with(&format!("a{REDACTED}")), "{shown}");
        // Only at the cap: a short line may end with anything.
        assert_eq!(redactor.redact("ends with 012345"), "ends with 012345");
    }
}
