//! The measurements of `fondation-bench`: each one times the system and a baseline doing the same
//! work without it, in the same run, and reports the ratio. Speed is reported, never asserted.
//!
//! Layout: `jobs` (latency and throughput, system and baseline interleaved), `direct` (their
//! baseline: clone, fixture CLI and reading its output as plain child processes), `system` (the
//! same jobs through a coordinator and agents started as processes), `micro` (progress parsing
//! and collection, in-process), `scale` (a coordinator process with up to 1,000 simulated
//! agents: memory, CPU, assignment latency, zero-work throughput, job-source calls), and here the
//! settings, statistics, peak RSS and the report.

mod direct;
mod jobs;
mod micro;
pub mod scale;
mod system;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

pub use direct::DirectRunner;
pub use jobs::{fixture_rss, latency, throughput, throughput_rounds};
pub use micro::{bench_collect, bench_parse, pino_text, PinoText};
pub use system::Cluster;

/// How much work each measurement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Jobs timed one at a time for the latency (and direct runs for its baseline).
    pub runs: usize,
    /// Jobs of the throughput run.
    pub jobs: usize,
    /// Agents (one slot each) of the throughput run, and parallelism of its baseline.
    pub agents: usize,
    /// Log lines parsed.
    pub lines: usize,
    /// Collections of the sample tree timed.
    pub collects: usize,
}

impl Settings {
    /// The default run: about 20 s on two cores (release build).
    pub const FULL: Settings = Settings {
        runs: 31,
        jobs: 80,
        agents: 4,
        lines: 1_000_000,
        collects: 1000,
    };
    /// A smoke run: about 5 s on two cores (release build).
    pub const QUICK: Settings = Settings {
        runs: 7,
        jobs: 16,
        agents: 4,
        lines: 200_000,
        collects: 100,
    };
}

/// Workspace binaries the job measurements start as processes.
pub const REQUIRED_BINARIES: [&str; 3] = [
    "fondation-coordinator",
    "fondation-agent",
    "fondation-fixture-cli",
];

/// The required binaries missing from `dir` (the folder of the running bench binary).
pub fn missing_binaries(dir: &Path) -> Vec<PathBuf> {
    REQUIRED_BINARIES
        .iter()
        .map(|name| dir.join(name))
        .filter(|path| !path.is_file())
        .collect()
}

/// The median of `samples` (the mean of the middle two for an even count); zero when empty.
pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

/// Peak resident set size (`VmHWM`) of a live process, in KiB; None once it has exited.
pub use crate::support::process::peak_rss_kib;

/// The 1-minute load average, as `/proc/loadavg` shows it (`?` when unreadable): the other work
/// on the machine, which every measurement shares with its baseline.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// How a measured value reads.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// Time per unit of work.
    Time(Duration),
    /// Units of work per second; the label names the unit (`jobs/s`).
    Rate(f64, &'static str),
}

impl Value {
    /// Seconds per unit of work, whatever the form.
    fn seconds_per_unit(self) -> f64 {
        match self {
            Value::Time(time) => time.as_secs_f64(),
            Value::Rate(rate, _) => 1.0 / rate,
        }
    }

    fn show(self) -> String {
        match self {
            Value::Time(time) => show_duration(time),
            Value::Rate(rate, unit) if rate >= 1e6 => format!("{:.2} M {unit}", rate / 1e6),
            Value::Rate(rate, unit) if rate >= 1e4 => format!("{:.1} k {unit}", rate / 1e3),
            Value::Rate(rate, unit) => format!("{rate:.1} {unit}"),
        }
    }
}

fn show_duration(time: Duration) -> String {
    let micros = time.as_secs_f64() * 1e6;
    if micros >= 1e3 {
        format!("{:.1} ms", micros / 1e3)
    } else {
        format!("{micros:.0} µs")
    }
}

/// One line of the report: the system and its baseline on the same work.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub what: String,
    pub system: Value,
    pub baseline: Value,
    /// What the baseline did, printed under the table.
    pub baseline_is: String,
}

impl Comparison {
    /// Time per unit of work, system / baseline: 1.00 is no overhead, 3.00 three times slower.
    pub fn ratio(&self) -> f64 {
        self.system.seconds_per_unit() / self.baseline.seconds_per_unit()
    }
}

/// A process's peak memory, in KiB when it could be read.
#[derive(Debug, Clone)]
pub struct MemoryLine {
    pub what: String,
    pub peak_kib: Option<u64>,
}

/// The report: a title line, the comparison table with its baselines, the memory table.
pub fn render(title: &str, comparisons: &[Comparison], memory: &[MemoryLine]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{title}\n");
    let _ = writeln!(
        out,
        " #  {:<38} {:>17} {:>17} {:>9}",
        "measurement", "system", "baseline", "ratio"
    );
    for (index, row) in comparisons.iter().enumerate() {
        let _ = writeln!(
            out,
            " {}  {:<38} {:>17} {:>17} {:>8.2}x",
            index + 1,
            row.what,
            row.system.show(),
            row.baseline.show(),
            row.ratio()
        );
    }
    let _ = writeln!(
        out,
        "\nratio = time per unit of work, system / baseline (1.00x = no overhead)"
    );
    for (index, row) in comparisons.iter().enumerate() {
        let label = if index == 0 { "baselines:" } else { "" };
        let _ = writeln!(out, "{label:<10} {} {}", index + 1, row.baseline_is);
    }
    if !memory.is_empty() {
        let _ = writeln!(
            out,
            "\n    {:<38} {:>17}",
            "memory: peak RSS (VmHWM)", "MiB"
        );
        for line in memory {
            let shown = line.peak_kib.map_or_else(
                || "n/a".to_owned(),
                |kib| format!("{:.1}", kib as f64 / 1024.0),
            );
            let _ = writeln!(out, "    {:<38} {:>17}", line.what, shown);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[ms(5), ms(1), ms(3)]), ms(3));
        assert_eq!(
            median(&[ms(4), ms(1), ms(2), ms(3)]),
            Duration::from_micros(2500)
        );
        assert_eq!(median(&[]), Duration::ZERO);
    }

    #[test]
    fn ratio_is_time_per_unit_for_times_and_rates() {
        let slower = Comparison {
            what: "t".into(),
            system: Value::Time(Duration::from_millis(30)),
            baseline: Value::Time(Duration::from_millis(10)),
            baseline_is: String::new(),
        };
        assert!((slower.ratio() - 3.0).abs() < 1e-9);
        let fewer = Comparison {
            what: "r".into(),
            system: Value::Rate(5.0, "jobs/s"),
            baseline: Value::Rate(20.0, "jobs/s"),
            baseline_is: String::new(),
        };
        assert!((fewer.ratio() - 4.0).abs() < 1e-9);
    }

    #[test]
    fn own_peak_rss_is_readable() {
        assert!(peak_rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }
}
