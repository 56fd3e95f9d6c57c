//! One tracing set-up for both binaries: `RUST_LOG` filter (default `info`), plain or JSON lines.

use tracing_subscriber::{filter::Targets, fmt, prelude::*};

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
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, invalid) = log_filter(rust_log.as_deref(), default_filter);
    let layer = fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .init(),
    }
    if let Some(error) = invalid {
        tracing::warn!(%error, rust_log = ?rust_log, default = default_filter, "RUST_LOG is not a valid filter (`level` or `target=level`, comma-separated); using the default");
    }
}

/// The `RUST_LOG` filter: comma-separated `level` and `target=level` directives, e.g.
/// `info,fondation_agent=debug,h2=warn`. Read as tracing-subscriber's `Targets` rather than
/// `EnvFilter`: span and field filters are not supported, and the regular-expression engine
/// `EnvFilter` compiles at start-up stays out of the binaries (its code was a good part of an
/// idle agent's resident memory). An unset, empty or invalid value gives `default_filter`, with
/// the parse error for the log.
fn log_filter(rust_log: Option<&str>, default_filter: &str) -> (Targets, Option<String>) {
    let default = || {
        default_filter
            .parse::<Targets>()
            .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
    };
    match rust_log.map(str::trim).filter(|value| !value.is_empty()) {
        None => (default(), None),
        Some(value) => match value.parse::<Targets>() {
            Ok(filter) => (filter, None),
            Err(error) => (default(), Some(error.to_string())),
        },
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
    use tracing::Level;

    use super::{escaped, log_filter};

    #[test]
    fn rust_log_sets_levels_per_target_and_falls_back_when_invalid() {
        let (filter, invalid) = log_filter(Some("warn,fondation_agent::process=debug"), "info");
        assert!(invalid.is_none());
        assert!(filter.would_enable("fondation_agent::process", &Level::DEBUG));
        assert!(!filter.would_enable("fondation_agent::session", &Level::INFO));
        assert!(filter.would_enable("h2", &Level::WARN));

        let (filter, invalid) = log_filter(Some("loud=yes"), "error");
        assert!(invalid.is_some(), "an unknown level is reported");
        assert!(filter.would_enable("anything", &Level::ERROR));
        assert!(!filter.would_enable("anything", &Level::WARN));

        for unset in [None, Some(""), Some("  ")] {
            let (filter, invalid) = log_filter(unset, "info");
            assert!(invalid.is_none());
            assert!(filter.would_enable("fondation_coordinator", &Level::INFO));
            assert!(!filter.would_enable("fondation_coordinator", &Level::DEBUG));
        }
    }

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
