//! One tracing set-up for both binaries: `RUST_LOG` filter (default `info`), plain or JSON lines.

use tracing_subscriber::{fmt, EnvFilter};

/// Log line format, from `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "plain" | "text" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use plain or json")),
        }
    }
}

/// Installs the global subscriber; logs go to stderr.
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// Like [`init`], with `default_filter` in place of `info` when `RUST_LOG` is unset (the demo
/// keeps its terminal for the progress bar).
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A value from outside (the analyzer's output, an error text from a peer, a job's fields) made
/// safe to log: control characters and backslashes are escaped (`\n`, `\r`, `\u{1b}`, `\\`), so
/// the value stays on its log line and cannot forge another one or drive a terminal, in plain
/// and JSON logs alike. Log such values as `field = %escaped(&value)`.
pub fn escaped(value: &str) -> std::str::EscapeDebug<'_> {
    value.escape_debug()
}

#[cfg(test)]
mod tests {
    use super::escaped;

    #[test]
    fn control_characters_cannot_forge_a_line() {
        let forged = "ok\r\x1b[2K2026-01-01T00:00:00Z INFO job completed\nnext\\n";
        let shown = escaped(forged).to_string();
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert_eq!(
            shown,
            "ok\\r\\u{1b}[2K2026-01-01T00:00:00Z INFO job completed\\nnext\\\\n"
        );
        assert_eq!(escaped("plain text é").to_string(), "plain text é");
    }
}
