//! Parsing shared by both binaries' settings.

use std::time::Duration;

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
    fn parses_whole_milliseconds_only() {
        assert_eq!(millis(" 5000 "), Ok(Duration::from_secs(5)));
        assert!(millis("5s").is_err());
        assert!(millis("-1").is_err());
    }
}
