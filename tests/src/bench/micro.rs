//! In-process measurements of the agent's hot functions: progress parsing over a large pino log,
//! and collecting the documents of a real output tree.

use std::{
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use fondation_agent::{collector, progress};

use crate::{fixture_cli, support::cluster::read_tree};

use super::median;

/// One in this many generated lines starts a step; the others are ordinary log lines.
const STEP_EVERY: usize = 50;

/// A generated analyzer log.
pub struct PinoText {
    pub text: String,
    pub lines: usize,
    /// Lines that start a step, which `parse_line` must report.
    pub step_lines: usize,
}

/// `lines` pino JSON lines as the analyzer prints them: step starts among info and debug lines
/// about files, tool calls and token use, with numeric and named levels and extra fields.
pub fn pino_text(lines: usize) -> PinoText {
    let mut text = String::with_capacity(lines * 140);
    let mut step_lines = 0;
    let mut time: u64 = 1_700_000_000_000;
    for n in 0..lines {
        time += 7;
        let head = if n % 3 == 0 {
            format!(r#"{{"level":30,"time":{time},"pid":4242,"hostname":"agent-7f9c""#)
        } else {
            format!(r#"{{"level":"info","time":{time},"pid":4242,"hostname":"agent-7f9c""#)
        };
        text.push_str(&head);
        if n % STEP_EVERY == 0 {
            let step =
                fixture_cli::STEP_MESSAGES[(n / STEP_EVERY) % fixture_cli::STEP_MESSAGES.len()];
            text.push_str(&format!(r#","msg":"{step}..."}}"#));
            step_lines += 1;
        } else {
            let line = match n % 5 {
                0 => format!(r#","file":"src/module_{}.ts","msg":"Reading file""#, n % 97),
                1 => format!(
                    r#","tool":"Read","input":{{"path":"src/lib/part_{}.ts"}},"msg":"Tool call""#,
                    n % 31
                ),
                2 => format!(
                    r#","usage":{{"input_tokens":{},"output_tokens":{}}},"msg":"Token usage""#,
                    n % 9000,
                    n % 700
                ),
                3 => format!(r#","msg":"Processed {} of 214 files""#, n % 214),
                _ => format!(r#","chapter":{},"msg":"Writing chapter section""#, n % 11),
            };
            text.push_str(&line);
            text.push('}');
        }
        text.push('\n');
    }
    PinoText {
        text,
        lines,
        step_lines,
    }
}

/// Times `parse_line` and the baseline (a `"msg"` substring test) over every line, `reps` times
/// each, interleaved; returns the median of each, system first.
pub fn bench_parse(log: &PinoText, reps: usize) -> anyhow::Result<(Duration, Duration)> {
    let mut parsed = Vec::with_capacity(reps);
    let mut scanned = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        let steps = black_box(&log.text)
            .lines()
            .filter_map(progress::parse_line)
            .filter(|report| black_box(report).step.is_some())
            .count();
        parsed.push(start.elapsed());
        if steps != log.step_lines {
            bail!(
                "parse_line found {steps} step starts in the generated log, which holds {}",
                log.step_lines
            );
        }

        let start = Instant::now();
        let with_msg = black_box(&log.text)
            .lines()
            .filter(|line| line.contains("\"msg\""))
            .count();
        scanned.push(start.elapsed());
        if black_box(with_msg) != log.lines {
            bail!("the baseline found {with_msg} of {} lines", log.lines);
        }
    }
    Ok((median(&parsed), median(&scanned)))
}

/// Writes the fixture CLI's output tree (the embedded copy of `fixtures/claude-tutorial-output`)
/// under `dir`; returns its number of files.
pub fn write_sample_tree(dir: &Path) -> anyhow::Result<usize> {
    let files = fixture_cli::sample_files();
    for file in &files {
        let path = dir.join(file.path());
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, file.contents())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(files.len())
}

/// Times `collect` and the baseline (reading every file of the tree) on the sample tree, `reps`
/// times each, interleaved; returns the number of files and the median of each, system first.
pub fn bench_collect(reps: usize) -> anyhow::Result<(usize, Duration, Duration)> {
    let dir = tempfile::tempdir().context("creating a temp folder for the sample tree")?;
    let files = write_sample_tree(dir.path())?;
    let limits = collector::CollectLimits::default();
    let mut collected = Vec::with_capacity(reps);
    let mut read = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        let documents = collector::collect(black_box(dir.path()), &limits)
            .context("collecting the sample tree")?;
        collected.push(start.elapsed());
        if documents.len() != files {
            bail!(
                "collect returned {} documents for {files} files",
                documents.len()
            );
        }
        black_box(documents);

        let start = Instant::now();
        let tree = read_tree(black_box(dir.path()));
        read.push(start.elapsed());
        black_box(tree);
    }
    Ok((files, median(&collected), median(&read)))
}
