//! Run accounting: every fixture run appends its start and end to the file named by
//! `FIXTURE_RUN_LOG`, so tests can count runs per job and check concurrency per agent.
//!
//! Line format, one event per line, fields separated by one space:
//! `start <job-id> <agent> <unix-nanos> <pid>` and `end <job-id> <agent> <unix-nanos> <pid> <exit-code>`.
//! Each line is one `write` on a file opened with `O_APPEND`, so concurrent runs never interleave.
//! A run ended by SIGTERM logs exit code 143 (128 + 15); a run killed by SIGKILL logs no end.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Whether a record marks the start or the end of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEventKind {
    Start,
    End,
}

/// One line of a run log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub kind: RunEventKind,
    /// `--job-id` of the run, or `-`.
    pub job_id: String,
    /// `FIXTURE_AGENT_ID` of the run, or `-`.
    pub agent: String,
    pub at_nanos: u128,
    pub pid: u32,
    /// Present on `End` records only.
    pub exit_code: Option<i32>,
}

/// Reads and parses a whole run log. A missing file is an error; a malformed line is
/// `InvalidData` naming the line.
pub fn read_run_log(path: &Path) -> io::Result<Vec<RunRecord>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            parse_line(line).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}:{}: malformed run log line {line:?}",
                        path.display(),
                        index + 1
                    ),
                )
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Option<RunRecord> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (kind, exit_code) = match (fields.first().copied(), fields.len()) {
        (Some("start"), 5) => (RunEventKind::Start, None),
        (Some("end"), 6) => (RunEventKind::End, Some(fields[5].parse().ok()?)),
        _ => return None,
    };
    Some(RunRecord {
        kind,
        job_id: fields[1].to_owned(),
        agent: fields[2].to_owned(),
        at_nanos: fields[3].parse().ok()?,
        pid: fields[4].parse().ok()?,
        exit_code,
    })
}

/// The records of the run log at `path`; none while it does not exist (no run has started).
pub fn read_run_log_if_any(path: &Path) -> io::Result<Vec<RunRecord>> {
    match read_run_log(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        other => other,
    }
}

/// How many runs of `job_id` started, and how many of them ended with exit status 0.
pub fn starts_and_successes(records: &[RunRecord], job_id: &str) -> (usize, usize) {
    let of_job = || records.iter().filter(|r| r.job_id == job_id);
    let starts = of_job().filter(|r| r.kind == RunEventKind::Start).count();
    let successes = of_job()
        .filter(|r| r.kind == RunEventKind::End && r.exit_code == Some(0))
        .count();
    (starts, successes)
}

/// Number of runs started per job id.
pub fn runs_per_job(records: &[RunRecord]) -> BTreeMap<String, usize> {
    let mut runs = BTreeMap::new();
    for record in records.iter().filter(|r| r.kind == RunEventKind::Start) {
        *runs.entry(record.job_id.clone()).or_insert(0) += 1;
    }
    runs
}

/// Highest number of runs alive at the same time, per agent.
///
/// A sweep over the events in time order; a start and an end are matched by pid. At equal times
/// ends count first. A start without an end (a run still going, or killed by SIGKILL) stays open
/// until the end of the log, so this never under-reports.
pub fn max_concurrency_per_agent(records: &[RunRecord]) -> BTreeMap<String, usize> {
    let mut events: Vec<&RunRecord> = records.iter().collect();
    events.sort_by_key(|r| (r.at_nanos, r.kind == RunEventKind::Start));
    let mut open: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    let mut max = BTreeMap::new();
    for record in events {
        let running = open.entry(&record.agent).or_default();
        match record.kind {
            RunEventKind::Start => {
                running.insert(record.pid);
            }
            RunEventKind::End => {
                running.remove(&record.pid);
            }
        }
        let peak = max.entry(record.agent.clone()).or_insert(0);
        *peak = (*peak).max(running.len());
    }
    max
}

/// The writing side, held by a fixture run.
pub(super) struct RunLogWriter {
    file: File,
    job_id: String,
    agent: String,
    /// Set once the end line is written: the main flow and the SIGTERM watcher may both try.
    ended: AtomicBool,
}

impl RunLogWriter {
    /// Opens the log for appending and writes the start line.
    pub(super) fn start(path: &Path, job_id: &str, agent: &str) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let writer = RunLogWriter {
            file,
            job_id: field(job_id),
            agent: field(agent),
            ended: AtomicBool::new(false),
        };
        writer.append(&format!(
            "start {} {} {} {}\n",
            writer.job_id,
            writer.agent,
            unix_nanos(),
            std::process::id()
        ))?;
        Ok(writer)
    }

    /// Writes the end line, once; later calls do nothing.
    pub(super) fn end(&self, exit_code: i32) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let line = format!(
            "end {} {} {} {} {exit_code}\n",
            self.job_id,
            self.agent,
            unix_nanos(),
            std::process::id()
        );
        if let Err(err) = self.append(&line) {
            eprintln!("fixture: cannot write the run log: {err}");
        }
    }

    /// Run number of this job: how many starts the log holds for it, this run included.
    pub(super) fn run_number(&self, path: &Path) -> io::Result<usize> {
        let records = read_run_log(path)?;
        Ok(runs_per_job(&records)
            .get(&self.job_id)
            .copied()
            .unwrap_or(0))
    }

    fn append(&self, line: &str) -> io::Result<()> {
        // One write call per line: O_APPEND makes it atomic with respect to other writers.
        let written = (&self.file).write(line.as_bytes())?;
        if written != line.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to the run log",
            ));
        }
        Ok(())
    }
}

/// A log field must be one word: whitespace would break the line format.
fn field(value: &str) -> String {
    if value.is_empty() {
        return "-".to_owned();
    }
    value
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: RunEventKind, agent: &str, at: u128, pid: u32) -> RunRecord {
        RunRecord {
            kind,
            job_id: format!("job-{pid}"),
            agent: agent.to_owned(),
            at_nanos: at,
            pid,
            exit_code: (kind == RunEventKind::End).then_some(0),
        }
    }

    #[test]
    fn parses_both_line_kinds() {
        assert_eq!(
            parse_line("end j1 a1 1700000000000000000 42 -15"),
            Some(RunRecord {
                kind: RunEventKind::End,
                job_id: "j1".into(),
                agent: "a1".into(),
                at_nanos: 1_700_000_000_000_000_000,
                pid: 42,
                exit_code: Some(-15),
            })
        );
        assert!(parse_line("start j1 a1 5 42").is_some());
        assert!(parse_line("start j1 a1 5").is_none());
        assert!(parse_line("end j1 a1 5 42").is_none());
        assert!(parse_line("stop j1 a1 5 42").is_none());
    }

    #[test]
    fn concurrency_sweep_matches_by_pid() {
        use RunEventKind::{End, Start};
        let records = vec![
            record(Start, "a", 10, 1),
            record(Start, "a", 20, 2),
            record(End, "a", 30, 1),
            record(Start, "a", 30, 3), // starts as 1 ends: still 2 at most
            record(End, "a", 40, 2),
            record(End, "a", 50, 3),
            record(Start, "b", 15, 4),
            record(End, "b", 16, 4),
            record(Start, "b", 17, 5), // never ends
        ];
        let max = max_concurrency_per_agent(&records);
        assert_eq!(max.get("a"), Some(&2));
        assert_eq!(max.get("b"), Some(&1));
    }

    #[test]
    fn fields_are_single_words() {
        assert_eq!(field(""), "-");
        assert_eq!(field("job 1\tx"), "job_1_x");
    }
}
