//! A child process of a test: argv and environment, output captured line by line (and echoed to
//! the test's stderr with a prefix), log lines awaitable, killed when dropped.

use std::{
    path::Path,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::watch,
};

#[derive(Default)]
struct LogBook {
    lines: Mutex<Vec<String>>,
}

pub struct Proc {
    pub name: String,
    child: Child,
    logs: Arc<LogBook>,
    /// Bumped for every captured line, so waiters wake on new output instead of sleeping.
    line_count: watch::Receiver<usize>,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], env: &[(String, String)]) -> Self {
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
        let logs = Arc::new(LogBook::default());
        let (count_tx, line_count) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        capture(name.to_string(), stdout, logs.clone(), count_tx.clone());
        capture(name.to_string(), stderr, logs.clone(), count_tx);
        Self {
            name: name.to_string(),
            child,
            logs,
            line_count,
        }
    }

    /// Panics with the process's output if it has already exited (e.g. refused its configuration).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early with {status}; its output:\n{}",
                self.name,
                self.lines().join("\n")
            );
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// All output lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.logs.lines.lock().unwrap().clone()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.logs
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(needle))
    }

    /// Waits until a line containing `needle` has been printed; returns it.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .logs
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|line| line.contains(needle))
            {
                return line.clone();
            }
            match tokio::time::timeout_at(deadline, self.line_count.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("{} ended its output before printing {needle:?}", self.name),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {} to print {needle:?}",
                    self.name
                ),
            }
        }
    }

    pub fn signal(&self, sig: signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = signal::kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGKILL, and reap.
    pub async fn kill9(&mut self) {
        self.signal(signal::Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {timeout:?}", self.name))
            .expect("waiting for a child")
    }
}

fn capture(
    name: String,
    stream: impl AsyncRead + Unpin + Send + 'static,
    logs: Arc<LogBook>,
    count: Arc<watch::Sender<usize>>,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            eprintln!("[{name}] {line}");
            logs.lines.lock().unwrap().push(line);
            count.send_modify(|n| *n += 1);
        }
    });
}

/// A memory field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in KiB; `None` when the
/// process is gone or the field missing.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/status"), field)
}

/// Proportional set size of a live process, in KiB: its private pages, plus each shared page
/// divided by the number of processes mapping it.
pub fn pss_kib(pid: u32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss")
}

/// A `Field:   123 kB` line of a `/proc` file.
fn kib_field(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// Resident memory (`VmRSS`) of a live process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// Peak resident memory (`VmHWM`) of a live process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}
