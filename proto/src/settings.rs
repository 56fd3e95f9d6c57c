//! Parsing shared by both binaries' settings.

use std::{fmt, str::FromStr, time::Duration};

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
    fn parses_whole_milliseconds_only() {
        assert_eq!(millis(" 5000 "), Ok(Duration::from_secs(5)));
        assert!(millis("5s").is_err());
        assert!(millis("-1").is_err());
    }
}
