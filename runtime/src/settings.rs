//! Parsing shared by both binaries' settings, and secrets read from files.
//!
//! Every secret setting `NAME` can also be given as `NAME_FILE`, the path of a file holding it
//! (the convention of Docker secrets, Kubernetes Secrets mounted as files and the official
//! images), so the secret need not sit in any process's environment. Giving both is an error
//! rather than a silent preference: one of the two would be a stale leftover.

use std::{fmt, io::Read as _, path::Path, str::FromStr, time::Duration};

use fondation_proto::limits::MAX_SECRET_FILE_BYTES;

/// A credential from the environment (deploy key, tokens). Its `Debug` and `Display` print a
/// placeholder, so no log line or error message can carry it by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.is_empty() {
            return Err("must not be empty (unset the variable instead)".into());
        }
        Ok(Secret(value.to_string()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a secret setting could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{name} and {name}_FILE are both set: give the secret one way, not both")]
    BothForms { name: &'static str },
    #[error("cannot read {name}_FILE {path}: {message}")]
    Unreadable {
        name: &'static str,
        path: String,
        message: String,
    },
}

/// The secret `name`, from its value (flag or variable) or from the file `{name}_FILE` points at.
/// The file's trailing line break is not part of the secret (`echo token > file` adds one).
pub fn secret_setting(
    name: &'static str,
    value: Option<Secret>,
    file: Option<&Path>,
) -> Result<Option<Secret>, SecretError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(SecretError::BothForms { name }),
        (value, None) => Ok(value),
        (None, Some(path)) => {
            read_secret_file(path)
                .map(Some)
                .map_err(|message| SecretError::Unreadable {
                    name,
                    path: path.display().to_string(),
                    message,
                })
        }
    }
}

fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "larger than {MAX_SECRET_FILE_BYTES} bytes, which no secret of ours is"
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    text.trim_end_matches(['\n', '\r'])
        .parse()
        .map_err(|e: String| format!("the secret {e}"))
}

/// A duration given in milliseconds, as the Node worker's variables were (`POLL_INTERVAL=5000`).
pub fn millis(value: &str) -> Result<Duration, String> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{value:?} is not a whole number of milliseconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let secret: Secret = "hunter2".parse().unwrap();
        assert_eq!(secret.expose(), "hunter2");
        assert!(!format!("{secret:?} {secret}").contains("hunter2"));
        assert!("".parse::<Secret>().is_err());
    }

    #[test]
    fn secret_files_are_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        let secret = secret_setting("AGENT_TOKEN", None, Some(&path)).unwrap();
        assert_eq!(secret.unwrap().expose(), "s3cret");
        let given: Secret = "direct".parse().unwrap();
        let secret = secret_setting("AGENT_TOKEN", Some(given.clone()), None).unwrap();
        assert_eq!(secret, Some(given));
        assert_eq!(secret_setting("AGENT_TOKEN", None, None).unwrap(), None);
    }

    #[test]
    fn secret_errors_name_the_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret").unwrap();
        let both = secret_setting("ADMIN_TOKEN", Some("x".parse().unwrap()), Some(&path));
        let message = both.unwrap_err().to_string();
        assert!(
            message.contains("ADMIN_TOKEN and ADMIN_TOKEN_FILE"),
            "{message}"
        );

        let missing = dir.path().join("missing");
        let message = secret_setting("ADMIN_TOKEN", None, Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("cannot read ADMIN_TOKEN_FILE"),
            "{message}"
        );
        assert!(message.contains("missing"), "{message}");

        std::fs::write(&path, "\n").unwrap();
        let message = secret_setting("ADMIN_TOKEN", None, Some(&path))
            .unwrap_err()
            .to_string();
        assert!(message.contains("must not be empty"), "{message}");
    }

    #[test]
    fn parses_whole_milliseconds_only() {
        assert_eq!(millis(" 5000 "), Ok(Duration::from_secs(5)));
        assert!(millis("5s").is_err());
        assert!(millis("-1").is_err());
    }
}
