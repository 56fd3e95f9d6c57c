//! What the fixture CLI prints, in each of the progress formats of the real CLI's builds.
//!
//! Write errors on stdout/stderr (a caller that closed its pipe) are ignored: the run goes on
//! writing its files, like a Node program whose log stream broke.

use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use super::directives::Format;
use super::{STEP_MARKER, STEP_MESSAGES};

/// Number of steps the real CLI announces.
const STEPS: usize = STEP_MESSAGES.len();

/// The `phase` field of the newest CLI's step lines, steps 1 to 6 (DESIGN.md shows step 2's).
const STEP_PHASES: [&str; STEPS] = [
    "Extract",
    "Analyze",
    "Order",
    "Generate",
    "Review",
    "Tutorials",
];

/// pino's `level` of a line: a label (`"info"`) in the older builds, pino's default number
/// (30 info, 50 error) in the newest.
#[derive(Clone, Copy)]
enum Level {
    Info,
    Error,
}

pub(super) struct Console {
    format: Format,
}

impl Console {
    pub(super) fn new(format: Format) -> Self {
        Console { format }
    }

    /// Announces the start of step `step` (1-based).
    pub(super) fn step(&self, step: usize) {
        let msg = STEP_MESSAGES[step - 1];
        match self.format {
            Format::Json => self.stdout(&pino_line(self.level(Level::Info), msg, None, &[])),
            Format::Marker => {
                let counter = format!("{step}/{STEPS}");
                self.stdout(&pino_line(
                    self.level(Level::Info),
                    &format!("{STEP_MARKER}{counter}] {msg}"),
                    None,
                    &[("step", &counter), ("phase", STEP_PHASES[step - 1])],
                ))
            }
            Format::Bracket => self.stdout(format!("[{step}/{STEPS}] Phase: {msg}").as_bytes()),
            Format::Step => self.stdout(format!("Step {step}/{STEPS}: {msg}").as_bytes()),
            Format::Progress => self.stdout(format!("[PROGRESS] {msg}").as_bytes()),
            Format::Silent => {}
        }
    }

    /// Any other informational line.
    pub(super) fn info(&self, msg: &str) {
        match self.format {
            Format::Json | Format::Marker => {
                self.stdout(&pino_line(self.level(Level::Info), msg, None, &[]))
            }
            Format::Bracket | Format::Step => self.stdout(msg.as_bytes()),
            Format::Progress => self.stdout(format!("[PROGRESS] {msg}").as_bytes()),
            Format::Silent => {}
        }
    }

    /// A failure: `msg` on stdout in the current format, `Error: <error>` on stderr.
    ///
    /// stderr is written even in the silent format: it is the error text a caller reports.
    pub(super) fn error(&self, msg: &str, error: &str) {
        match self.format {
            Format::Json | Format::Marker => {
                self.stdout(&pino_line(self.level(Level::Error), msg, Some(error), &[]))
            }
            Format::Silent => {}
            _ => self.stdout(format!("ERROR: {msg}: {error}").as_bytes()),
        }
        self.stderr(format!("Error: {error}").as_bytes());
    }

    /// Lines that are not valid UTF-8, on stdout (a raw line and a pino line) and stderr.
    pub(super) fn invalid_utf8(&self) {
        if self.format != Format::Silent {
            self.stdout(b"\xff\xfe progress \xc3\x28 not utf-8");
            if matches!(self.format, Format::Json | Format::Marker) {
                // A pino line whose msg holds a lone continuation byte and a 0xff byte.
                let mut line = pino_line(self.level(Level::Info), "", None, &[]);
                let closing_quote = line.len() - 2;
                line.splice(
                    closing_quote..closing_quote,
                    *b"processing file \x80\xff invalid",
                );
                self.stdout(&line);
            }
        }
        self.stderr(b"warning: \xff\xfe invalid bytes on stderr");
    }

    /// A line printed as given on stdout, whatever the format.
    pub(super) fn plain(&self, text: &str) {
        self.stdout(text.as_bytes());
    }

    /// A note on stderr, whatever the format.
    pub(super) fn note(&self, text: &str) {
        self.stderr(text.as_bytes());
    }

    /// The `level` value, as JSON, of this format's lines.
    fn level(&self, level: Level) -> &'static str {
        match (self.format, level) {
            (Format::Marker, Level::Info) => "30",
            (Format::Marker, Level::Error) => "50",
            (_, Level::Info) => "\"info\"",
            (_, Level::Error) => "\"error\"",
        }
    }

    fn stdout(&self, line: &[u8]) {
        write_line(&mut io::stdout().lock(), line);
    }

    fn stderr(&self, line: &[u8]) {
        write_line(&mut io::stderr().lock(), line);
    }
}

fn write_line(out: &mut impl Write, line: &[u8]) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line);
    buf.push(b'\n');
    let _ = out.write_all(&buf).and_then(|()| out.flush());
}

/// One pino log line, fields in pino's order, then `fields` (string values). `level` is already
/// JSON: a quoted label or a number.
fn pino_line(level: &str, msg: &str, error: Option<&str>, fields: &[(&str, &str)]) -> Vec<u8> {
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut line = format!(
        "{{\"level\":{level},\"time\":{time},\"pid\":{pid},\"hostname\":\"fixture\",\"msg\":{msg}",
        pid = std::process::id(),
        msg = json_string(msg),
    );
    if let Some(error) = error {
        line.push_str(&format!(
            ",\"err\":{{\"type\":\"Error\",\"message\":{}}}",
            json_string(error)
        ));
    }
    for (name, value) in fields {
        line.push_str(&format!(",{}:{}", json_string(name), json_string(value)));
    }
    line.push('}');
    line.into_bytes()
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pino_lines_are_json_objects() {
        let line = pino_line("\"error\"", "Analysis failed", Some("boom \"quoted\""), &[]);
        let value: serde_json::Value = serde_json::from_slice(&line).expect("valid JSON");
        assert_eq!(value["level"], "error");
        assert_eq!(value["msg"], "Analysis failed");
        assert_eq!(value["hostname"], "fixture");
        assert_eq!(value["err"]["message"], "boom \"quoted\"");
        assert!(value["time"].as_u64().is_some() && value["pid"].as_u64().is_some());

        let line = pino_line("30", "[FONDATION_STEP_2/6] x", None, &[("step", "2/6")]);
        let value: serde_json::Value = serde_json::from_slice(&line).expect("valid JSON");
        assert_eq!(value["level"], 30);
        assert_eq!(value["step"], "2/6");
    }
}
