//! Recognising the analyzer's progress in its output.
//!
//! The CLI reports progress differently by build and by whether stdout is a terminal (DESIGN.md
//! section 3): pino JSON lines (the newest CLI marks step starts in their message as
//! `[FONDATION_STEP_N/6] ...`), `[N/6] Phase: message`, `Step N: ...`, `[PROGRESS] ...`, or
//! nothing at all. This module turns one output line into a [`StepReport`], tells error lines apart (they
//! become a failed job's error text), and, for a silent CLI, reads progress off the files the CLI
//! has written so far.

use std::{borrow::Cow, path::Path};

use fondation_proto::limits::{truncate_utf8, MAX_PROGRESS_BYTES};

use crate::collector::{OUTPUT_DIRS, STEP_YAML_FILES};

/// Number of analyzer steps; every step number reported is in `1..=TOTAL_STEPS`.
pub const TOTAL_STEPS: u32 = 6;

/// The pino messages that start each step, in step order (step = index + 1).
const STEP_START_MESSAGES: [&str; TOTAL_STEPS as usize] = [
    "Extracting core abstractions from codebase",
    "Analyzing relationships between components",
    "Determining optimal chapter order",
    "Generating chapter content",
    "Reviewing and enhancing chapters",
    "Generating interactive tutorials",
];

/// One progress report read from the CLI's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// The step that started, when the line names one.
    pub step: Option<u32>,
    /// What the CLI said, trimmed and capped at [`MAX_PROGRESS_BYTES`].
    pub message: String,
}

/// One line of CLI output (already lossy-UTF-8 and length-capped by the caller). Some when the
/// line reports progress.
pub fn parse_line(line: &str) -> Option<StepReport> {
    let line = strip_ansi(line);
    let line = line.trim();
    if line.starts_with('{') {
        if let Some(entry) = PinoEntry::parse(line) {
            // A JSON log line is progress only when it marks or is one of the known step starts:
            // pino also logs many other info messages that say nothing about how far along we are.
            if let Some(marked) = parse_step_marker(&entry.msg) {
                return Some(marked);
            }
            let step = step_of_pino_message(&entry.msg)?;
            return Some(report(Some(step), &entry.msg));
        }
    }
    parse_step_marker(line)
        .or_else(|| parse_counter(line))
        .or_else(|| parse_step_prefix(line))
        .or_else(|| parse_progress_tag(line))
}

/// Whether a line reports an error (used to pick the CLI's "last error lines" for a failed job).
pub fn is_error_line(line: &str) -> bool {
    let line = strip_ansi(line);
    let line = line.trim();
    if line.starts_with('{') {
        if let Some(entry) = PinoEntry::parse(line) {
            return entry.is_error;
        }
    }
    const PREFIXES: [&str; 5] = ["Error", "error:", "ERROR", "[ERROR]", "fatal"];
    PREFIXES.iter().any(|p| line.starts_with(p)) || starts_with_ignore_case(line, "fatal")
}

/// The last analyzer step whose output file exists in `output_dir` (progress evidence for a
/// silent CLI), or None.
pub fn last_step_with_output(output_dir: &Path) -> Option<u32> {
    // Symlinks are never evidence: the CLI does not write them, and following one could make us
    // stat files outside the output folder.
    if !is_real_dir(output_dir) {
        return None;
    }
    for (index, folder) in OUTPUT_DIRS.iter().enumerate().rev() {
        if folder_has_markdown(&output_dir.join(folder)) {
            return Some(4 + index as u32);
        }
    }
    for (index, file) in STEP_YAML_FILES.iter().enumerate().rev() {
        if is_regular_file(&output_dir.join(file)) {
            return Some(1 + index as u32);
        }
    }
    None
}

/// The fields of a pino JSON log line that matter here.
struct PinoEntry {
    msg: String,
    is_error: bool,
}

impl PinoEntry {
    /// None when the line is not a JSON object with a message and a level.
    fn parse(line: &str) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let object = value.as_object()?;
        let msg = object
            .get("msg")
            .or_else(|| object.get("message"))
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_owned();
        // pino writes numeric levels by default (50 error, 60 fatal) and names with a formatter.
        let is_error = match object.get("level")? {
            serde_json::Value::String(name) => {
                name.eq_ignore_ascii_case("error") || name.eq_ignore_ascii_case("fatal")
            }
            serde_json::Value::Number(n) => n.as_f64().is_some_and(|n| n >= 50.0),
            _ => return None,
        };
        Some(Self { msg, is_error })
    }
}

/// The step a pino message starts: it must begin with a known step-start message (any case),
/// which also admits a trailing "..." or other suffix.
fn step_of_pino_message(msg: &str) -> Option<u32> {
    let msg = msg.trim();
    STEP_START_MESSAGES
        .iter()
        .position(|start| starts_with_ignore_case(msg, start))
        .map(|index| index as u32 + 1)
}

/// `[FONDATION_STEP_N/6] message`, the newest CLI's step start, in a JSON line's `msg` or raw.
fn parse_step_marker(text: &str) -> Option<StepReport> {
    const MARKER: &str = "[FONDATION_STEP_";
    let rest = text.trim().strip_prefix(MARKER)?;
    let (step, rest) = split_number(rest)?;
    let rest = rest.strip_prefix('/')?;
    let (total, rest) = split_number(rest)?;
    let rest = rest.strip_prefix(']')?;
    if total != TOTAL_STEPS {
        return None;
    }
    let step = valid_step(step)?;
    // A bare marker still names its step: say which, rather than repeating the marker.
    let message = if rest.trim().is_empty() {
        STEP_START_MESSAGES[step as usize - 1]
    } else {
        rest
    };
    Some(report(Some(step), message))
}

/// `[N/6] Phase: message` (the terminal format).
fn parse_counter(line: &str) -> Option<StepReport> {
    let rest = line.strip_prefix('[')?;
    let (step, rest) = split_number(rest)?;
    let rest = rest.strip_prefix('/')?;
    let (total, rest) = split_number(rest)?;
    let rest = rest.strip_prefix(']')?;
    if total != TOTAL_STEPS {
        return None;
    }
    let step = valid_step(step)?;
    let message = if rest.trim().is_empty() { line } else { rest };
    Some(report(Some(step), message))
}

/// `Step N: ...` and `Step N/6: ...`.
fn parse_step_prefix(line: &str) -> Option<StepReport> {
    if !starts_with_ignore_case(line, "step ") {
        return None;
    }
    let (step, rest) = split_number(line["step ".len()..].trim_start())?;
    let rest = match rest.strip_prefix('/') {
        Some(after_slash) => {
            let (total, after_total) = split_number(after_slash)?;
            if total != TOTAL_STEPS {
                return None;
            }
            after_total
        }
        None => rest,
    };
    // "Step 10x" or "Step 2abc" is not a step counter.
    if rest.chars().next().is_some_and(|c| c.is_alphanumeric()) {
        return None;
    }
    let step = valid_step(step)?;
    let text = rest.trim_start_matches(|c: char| {
        c.is_whitespace() || c == ':' || c == '-' || c == '.' || c == ')'
    });
    let message = if text.trim().is_empty() { line } else { text };
    Some(report(Some(step), message))
}

/// `[PROGRESS] ...`: progress without a step unless the text holds `N/6` or `Step N`.
fn parse_progress_tag(line: &str) -> Option<StepReport> {
    const TAG: &str = "[PROGRESS]";
    if !starts_with_ignore_case(line, TAG) {
        return None;
    }
    let text = line[TAG.len()..].trim();
    let step = step_mentioned_in(text).and_then(valid_step);
    let message = if text.is_empty() { line } else { text };
    Some(report(step, message))
}

/// A step number named in free text as `N/6` or `Step N`.
fn step_mentioned_in(text: &str) -> Option<u32> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            // `i` and `start` sit on ASCII digits or their ends, so both are char boundaries.
            let after = &text[i..];
            if let Some(after_slash) = after.strip_prefix('/') {
                if let Some((total, _)) = split_number(after_slash) {
                    if total == TOTAL_STEPS {
                        return text[start..i].parse().ok();
                    }
                }
            }
            let before = text[..start].trim_end();
            if before.len() >= 4 && before.is_char_boundary(before.len() - 4) {
                let word = &before[before.len() - 4..];
                let word_starts = before.len() == 4
                    || !before.as_bytes()[before.len() - 5].is_ascii_alphanumeric();
                if word.eq_ignore_ascii_case("step") && word_starts && before.len() < start {
                    return text[start..i].parse().ok();
                }
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Splits a leading run of ASCII digits off `text`; None when there is none or it overflows.
fn split_number(text: &str) -> Option<(u32, &str)> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let (number, rest) = text.split_at(digits);
    Some((number.parse().ok()?, rest))
}

fn valid_step(step: u32) -> Option<u32> {
    (1..=TOTAL_STEPS).contains(&step).then_some(step)
}

fn report(step: Option<u32>, message: &str) -> StepReport {
    StepReport {
        step,
        message: truncate_utf8(message.trim(), MAX_PROGRESS_BYTES).to_owned(),
    }
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// Removes ANSI escape sequences: some builds colour their output even when it is piped, and a
/// colour code in front of `[3/6]` must not hide the step.
fn strip_ansi(line: &str) -> Cow<'_, str> {
    if line.contains('\u{1b}') {
        Cow::Owned(strip_ansi_escapes::strip_str(line))
    } else {
        Cow::Borrowed(line)
    }
}

fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir())
}

fn is_regular_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

/// Whether `folder` (not a symlink) directly holds a regular `*.md` file.
fn folder_has_markdown(folder: &Path) -> bool {
    if !is_real_dir(folder) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(folder) else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".md"))
            && is_regular_file(&entry.path())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u32, message: &str) -> Option<StepReport> {
        Some(StepReport {
            step: Some(step),
            message: message.to_owned(),
        })
    }

    #[test]
    fn pino_step_starts_are_steps_one_to_six() {
        for (index, msg) in STEP_START_MESSAGES.iter().enumerate() {
            let line = format!(r#"{{"level":"info","time":1700000000000,"msg":"{msg}"}}"#);
            assert_eq!(parse_line(&line), step(index as u32 + 1, msg), "{line}");
        }
    }

    #[test]
    fn pino_step_starts_tolerate_case_suffix_and_numeric_level() {
        let line = r#"{"level":30,"time":1,"pid":7,"msg":"generating CHAPTER content..."}"#;
        assert_eq!(parse_line(line), step(4, "generating CHAPTER content..."));
        let line =
            r#"{"level":"info","msg":"  Determining optimal chapter order for 11 chapters"}"#;
        assert_eq!(
            parse_line(line),
            step(3, "Determining optimal chapter order for 11 chapters")
        );
    }

    #[test]
    fn other_pino_messages_are_not_progress() {
        for line in [
            r#"{"level":"info","time":1,"msg":"Loaded 42 files"}"#,
            r#"{"level":"error","time":1,"msg":"Analysis failed","err":{"message":"boom"}}"#,
            r#"{"level":"info","time":1}"#,
            r#"{"level":"info","msg":"Step 3: not a pino step start"}"#,
        ] {
            assert_eq!(parse_line(line), None, "{line}");
        }
    }

    #[test]
    fn newest_cli_step_markers_in_json_and_raw() {
        for (index, msg) in STEP_START_MESSAGES.iter().enumerate() {
            let n = index + 1;
            let line = format!(
                r#"{{"level":30,"time":1700000000000,"pid":7,"hostname":"h","msg":"[FONDATION_STEP_{n}/6] {msg}","step":"{n}/6","phase":"Analyze"}}"#
            );
            assert_eq!(parse_line(&line), step(n as u32, msg), "{line}");
            let raw = format!("[FONDATION_STEP_{n}/6] {msg}");
            assert_eq!(parse_line(&raw), step(n as u32, msg), "{raw}");
        }
        // The marker alone is what counts, whatever the message says.
        assert_eq!(
            parse_line(r#"{"level":"info","msg":"[FONDATION_STEP_3/6] Ordering 11 chapters"}"#),
            step(3, "Ordering 11 chapters")
        );
        assert_eq!(
            parse_line("\u{1b}[32m[FONDATION_STEP_5/6]\u{1b}[0m Reviewing"),
            step(5, "Reviewing")
        );
        assert_eq!(
            parse_line("[FONDATION_STEP_6/6]"),
            step(6, "Generating interactive tutorials")
        );
        for line in [
            r#"{"level":30,"msg":"[FONDATION_STEP_0/6] before the start"}"#,
            r#"{"level":30,"msg":"[FONDATION_STEP_7/6] beyond the end"}"#,
            r#"{"level":30,"msg":"[FONDATION_STEP_2/5] other total"}"#,
            r#"{"level":30,"msg":"[FONDATION_STEP_x/6] no number"}"#,
            "[FONDATION_STEP_2/6 unclosed",
            "[FONDATION_STEP_99999999999/6] overflow",
        ] {
            assert_eq!(parse_line(line), None, "{line}");
        }
    }

    #[test]
    fn ansi_sequences_of_every_kind_are_removed() {
        // CSI colours, an OSC hyperlink and a cursor move around a counter.
        let line = "\u{1b}]8;;http://x\u{7}\u{1b}[1;31m[2/6]\u{1b}[0m\u{1b}[2K Relations";
        assert_eq!(parse_line(line), step(2, "Relations"));
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn terminal_counter_format() {
        assert_eq!(
            parse_line("[2/6] Relationships: mapping how components interact"),
            step(2, "Relationships: mapping how components interact")
        );
        assert_eq!(
            parse_line("  [6/6] Tutorials: done  "),
            step(6, "Tutorials: done")
        );
        assert_eq!(
            parse_line("\u{1b}[36m[3/6]\u{1b}[0m Order: sorting"),
            step(3, "Order: sorting")
        );
        assert_eq!(parse_line("[0/6] Nothing"), None);
        assert_eq!(parse_line("[7/6] Too far"), None);
        assert_eq!(parse_line("[2/5] Other total"), None);
        assert_eq!(parse_line("[99999999999/6] overflow"), None);
    }

    #[test]
    fn step_prefix_formats() {
        assert_eq!(
            parse_line("Step 1: Extracting abstractions"),
            step(1, "Extracting abstractions")
        );
        assert_eq!(parse_line("Step 5/6: Reviewing"), step(5, "Reviewing"));
        assert_eq!(
            parse_line("step 4 - writing chapters"),
            step(4, "writing chapters")
        );
        assert_eq!(parse_line("Step 2:"), step(2, "Step 2:"));
        assert_eq!(parse_line("Step 7: beyond the end"), None);
        assert_eq!(parse_line("Step 0: before the start"), None);
        assert_eq!(parse_line("Step 3/7: other total"), None);
        assert_eq!(parse_line("Step 2abc"), None);
        assert_eq!(parse_line("Stepping through files"), None);
    }

    #[test]
    fn progress_tag_with_and_without_step() {
        assert_eq!(
            parse_line("[PROGRESS] Reading files"),
            Some(StepReport {
                step: None,
                message: "Reading files".to_owned()
            })
        );
        assert_eq!(
            parse_line("[PROGRESS] 3/6 ordering chapters"),
            step(3, "3/6 ordering chapters")
        );
        assert_eq!(
            parse_line("[PROGRESS] now at Step 5, reviewing"),
            step(5, "now at Step 5, reviewing")
        );
        // 45/60 is not "N/6", and step 9 is out of range: progress without a step.
        for text in ["45/60 files read", "Step 9 of something", "Footstep 2"] {
            assert_eq!(
                parse_line(&format!("[PROGRESS] {text}")),
                Some(StepReport {
                    step: None,
                    message: text.to_owned()
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn plain_lines_are_not_progress() {
        for line in [
            "",
            "   ",
            "Cloning into 'repo'...",
            "Error: boom",
            "{not json",
        ] {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn messages_are_capped_on_a_char_boundary() {
        let long = format!("[1/6] {}", "é".repeat(400)); // 800 bytes of two-byte chars
        let report = parse_line(&long).expect("a counter line");
        assert_eq!(report.message.len(), MAX_PROGRESS_BYTES);
        assert!(report.message.chars().all(|c| c == 'é'));

        let long = format!("[1/6] a{}", "é".repeat(400)); // the 500th byte splits a char
        let report = parse_line(&long).expect("a counter line");
        assert_eq!(report.message.len(), MAX_PROGRESS_BYTES - 1);
    }

    #[test]
    fn error_lines() {
        for line in [
            r#"{"level":"error","time":1,"msg":"Analysis failed","err":"boom"}"#,
            r#"{"level":"FATAL","msg":"out of memory"}"#,
            r#"{"level":50,"msg":"request failed"}"#,
            r#"{"level":60,"msg":"crash"}"#,
            "Error: ENOENT: no such file",
            "  error: something",
            "ERROR something",
            "[ERROR] failed to write",
            "fatal: not a git repository",
            "Fatal error in V8",
            "\u{1b}[31mError\u{1b}[0m: red",
        ] {
            assert!(is_error_line(line), "{line}");
        }
        for line in [
            r#"{"level":"info","msg":"Error handling is described in chapter 3"}"#,
            r#"{"level":40,"msg":"Error rate rising"}"#,
            r#"{"level":30,"msg":"Analysis failed"}"#,
            "[3/6] Order: errors chapter",
            "no errors found",
            "",
        ] {
            assert!(!is_error_line(line), "{line}");
        }
    }

    #[test]
    fn output_files_show_the_last_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        assert_eq!(last_step_with_output(root), None);
        assert_eq!(last_step_with_output(&root.join("missing")), None);

        std::fs::write(root.join("step1_abstractions.yaml"), "a: 1").expect("write");
        assert_eq!(last_step_with_output(root), Some(1));
        std::fs::write(root.join("step3_order.yaml"), "a: 1").expect("write");
        assert_eq!(last_step_with_output(root), Some(3));

        // An empty folder, or one without markdown, is no evidence of step 4.
        std::fs::create_dir(root.join("chapters")).expect("mkdir");
        std::fs::write(root.join("chapters/notes.txt"), "x").expect("write");
        assert_eq!(last_step_with_output(root), Some(3));
        std::fs::write(root.join("chapters/chapter_0_a.md"), "# A").expect("write");
        assert_eq!(last_step_with_output(root), Some(4));

        std::fs::create_dir(root.join("tutorials")).expect("mkdir");
        std::fs::write(root.join("tutorials/t.md"), "x").expect("write");
        assert_eq!(last_step_with_output(root), Some(6));
    }

    #[test]
    fn symlinks_are_not_evidence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let elsewhere = tempfile::tempdir().expect("tempdir");
        std::fs::write(elsewhere.path().join("x.md"), "x").expect("write");

        std::os::unix::fs::symlink("/etc/hostname", root.join("step1_abstractions.yaml"))
            .expect("symlink");
        std::os::unix::fs::symlink(elsewhere.path(), root.join("tutorials")).expect("symlink");
        std::fs::create_dir(root.join("reviewed-chapters")).expect("mkdir");
        std::os::unix::fs::symlink(
            elsewhere.path().join("x.md"),
            root.join("reviewed-chapters/x.md"),
        )
        .expect("symlink");
        assert_eq!(last_step_with_output(root), None);

        let link = root.join("link-to-output");
        std::fs::write(elsewhere.path().join("step2_relationships.yaml"), "a: 1").expect("write");
        std::os::unix::fs::symlink(elsewhere.path(), &link).expect("symlink");
        assert_eq!(last_step_with_output(&link), None);
    }
}
