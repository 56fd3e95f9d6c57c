use std::time::Instant;

use nix::sys::signal::kill;

use super::*;

/// A shell as a stand-in child, in tests only.
fn sh(script: &str) -> ProcessSpec {
    ProcessSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        workdir: std::env::temp_dir(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        user: None,
        timeout: Duration::from_secs(30),
        kill_grace: Duration::from_secs(5),
        max_line_bytes: 4096,
        tail_lines: 100,
    }
}

/// Runs to the end and returns the end plus every line the receiver got.
async fn run_collect(spec: ProcessSpec) -> (ProcessEnd, Vec<OutputLine>) {
    let (tx, mut rx) = mpsc::channel(64);
    let collector = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(line) = rx.recv().await {
            got.push(line);
        }
        got
    });
    let end = run(spec, tx, CancellationToken::new())
        .await
        .expect("run should succeed");
    let got = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .expect("receiver should see the channel close")
        .expect("collector task");
    (end, got)
}

fn texts(lines: &[OutputLine], stream: OutputStream) -> Vec<&str> {
    lines
        .iter()
        .filter(|l| l.stream == stream)
        .map(|l| l.text.as_str())
        .collect()
}

/// Waits for the first line from `rx`, with a deadline.
async fn first_line(rx: &mut mpsc::Receiver<OutputLine>) -> OutputLine {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("waiting for the child's first output line")
        .expect("channel closed before the first line")
}

/// True when `pid` no longer runs (gone, or a zombie waiting for a reaper we do not control).
fn is_gone(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            // Format: "pid (comm) S ...": the state follows the last ')'.
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(true)
}

async fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still alive after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn lines_from_both_streams_and_exit_code() {
    let (end, got) = run_collect(sh("echo out1; echo err1 >&2; echo out2; exit 3")).await;
    assert_eq!(texts(&got, OutputStream::Stdout), ["out1", "out2"]);
    assert_eq!(texts(&got, OutputStream::Stderr), ["err1"]);
    match end {
        ProcessEnd::Exited { status, tail } => {
            assert_eq!(status, ExitStatusKind::Exited(3));
            assert!(!status.success());
            assert_eq!(tail.len(), 3);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn success_and_signal_statuses() {
    let (end, _) = run_collect(sh("true")).await;
    assert!(matches!(end, ProcessEnd::Exited { status, .. } if status.success()));
    let (end, _) = run_collect(sh("kill -9 $$")).await;
    assert!(
        matches!(
            end,
            ProcessEnd::Exited {
                status: ExitStatusKind::Signaled(9),
                ..
            }
        ),
        "{end:?}"
    );
}

#[tokio::test]
async fn env_is_inherited_plus_spec_env_and_stdin_is_null() {
    let mut spec =
        sh("echo \"$FONDATION_TEST_VAR\"; test -n \"$PATH\" && echo has-path; cat; echo after-cat");
    spec.env = vec![("FONDATION_TEST_VAR".into(), "hello world".into())];
    let (end, got) = run_collect(spec).await;
    assert!(matches!(
        end,
        ProcessEnd::Exited {
            status: ExitStatusKind::Exited(0),
            ..
        }
    ));
    assert_eq!(
        texts(&got, OutputStream::Stdout),
        ["hello world", "has-path", "after-cat"]
    );
}

#[tokio::test]
async fn workdir_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh("pwd");
    spec.workdir = dir.path().to_path_buf();
    let (_, got) = run_collect(spec).await;
    let expected = dir.path().canonicalize().unwrap();
    assert_eq!(
        texts(&got, OutputStream::Stdout),
        [expected.to_str().unwrap()]
    );
}

#[tokio::test]
async fn invalid_utf8_and_crlf_are_tolerated() {
    let (end, got) = run_collect(sh(
        r"printf 'a\377b\n'; printf 'crlf\r\n'; printf 'no-newline'",
    ))
    .await;
    assert_eq!(
        texts(&got, OutputStream::Stdout),
        ["a\u{fffd}b", "crlf", "no-newline"]
    );
    assert!(matches!(
        end,
        ProcessEnd::Exited {
            status: ExitStatusKind::Exited(0),
            ..
        }
    ));
}

#[tokio::test]
async fn long_line_is_capped() {
    let mut spec = sh("head -c 3000000 /dev/zero | tr '\\0' x; echo; echo after");
    spec.max_line_bytes = 1000;
    let (_, got) = run_collect(spec).await;
    let out = texts(&got, OutputStream::Stdout);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0], "x".repeat(1000));
    assert_eq!(out[1], "after");
}

#[tokio::test]
async fn timeout_stops_the_group_quickly() {
    let mut spec = sh("echo started; sleep 60");
    spec.timeout = Duration::from_millis(300);
    spec.kill_grace = Duration::from_secs(5);
    let started = Instant::now();
    let (end, _) = run_collect(spec).await;
    // sleep dies on SIGTERM: no need to wait for the grace period.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    match end {
        ProcessEnd::TimedOut { tail } => assert_eq!(tail[0].text, "started"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn cancel_escalates_to_sigkill_after_grace() {
    // The shell and its sleep ignore SIGTERM (an ignored signal stays ignored across exec).
    let mut spec = sh("trap '' TERM; echo ready; sleep 60");
    let grace = Duration::from_millis(500);
    spec.kill_grace = grace;
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(run(spec, tx, cancel.clone()));
    assert_eq!(first_line(&mut rx).await.text, "ready");
    let started = Instant::now();
    cancel.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("run should return after cancel")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(matches!(end, ProcessEnd::Canceled { .. }), "{end:?}");
    assert!(took >= grace, "SIGKILL came before the grace: {took:?}");
    assert!(took < grace + Duration::from_secs(4), "took {took:?}");
}

#[tokio::test]
async fn grandchildren_are_killed_on_cancel() {
    let spec = sh("sleep 60 & echo $!; wait");
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(run(spec, tx, cancel.clone()));
    let pid: i32 = first_line(&mut rx).await.text.parse().expect("a pid");
    assert!(!is_gone(pid), "grandchild should be running");
    cancel.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("run should return after cancel")
        .unwrap()
        .unwrap();
    assert!(matches!(end, ProcessEnd::Canceled { .. }));
    wait_gone(pid).await;
}

#[tokio::test]
async fn grandchildren_left_behind_are_killed_and_do_not_hold_the_run() {
    // The grandchild keeps stdout open; the run must not wait for it to close.
    let started = Instant::now();
    let (end, got) = run_collect(sh("sleep 60 & echo $!; exit 0")).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(
        end,
        ProcessEnd::Exited {
            status: ExitStatusKind::Exited(0),
            ..
        }
    ));
    let pid: i32 = texts(&got, OutputStream::Stdout)[0].parse().unwrap();
    wait_gone(pid).await;
}

#[tokio::test]
async fn escaped_process_holding_the_pipe_does_not_hang_the_run() {
    // setsid leaves our group, so the final SIGKILL cannot reach it; the drain bound must.
    let started = Instant::now();
    // The fifo makes the shell exit only once the escaped process exists (setsid done).
    let script = r#"f=$(mktemp -u); mkfifo "$f"
        setsid sh -c 'echo $$; echo up > "$1"; exec sleep 60' sh "$f" &
        read _ < "$f"; rm -f "$f"; exit 0"#;
    let (end, got) = run_collect(sh(script)).await;
    let took = started.elapsed();
    let pid: i32 = texts(&got, OutputStream::Stdout)[0].parse().unwrap();
    // Clean up the process this test started.
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    assert!(matches!(
        end,
        ProcessEnd::Exited {
            status: ExitStatusKind::Exited(0),
            ..
        }
    ));
    // The readers waited for the open pipe, but only as long as the drain bounds allow.
    assert!(
        took >= DRAIN_AFTER_EXIT,
        "took {took:?}: the pipe was not held open"
    );
    assert!(
        took < DRAIN_AFTER_EXIT + FINAL_DRAIN + Duration::from_secs(3),
        "took {took:?}"
    );
}

#[tokio::test]
async fn missing_program_is_a_spawn_error() {
    let spec = ProcessSpec {
        argv: vec!["/nonexistent/fondation-analyzer".into(), "x".into()],
        ..sh("")
    };
    let (tx, _rx) = mpsc::channel(1);
    let err = run(spec, tx, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, ProcessError::Spawn { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("could not start /nonexistent/fondation-analyzer: "),
        "{msg}"
    );
    assert!(msg.contains("ANALYZER_COMMAND"), "{msg}");
}

#[tokio::test]
async fn missing_workdir_and_empty_argv_are_errors() {
    let mut spec = sh("true");
    spec.workdir = PathBuf::from("/nonexistent/fondation-workdir");
    let (tx, _rx) = mpsc::channel(1);
    let err = run(spec, tx.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ProcessError::Workdir { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/fondation-workdir"),
        "{err}"
    );

    let spec = ProcessSpec {
        argv: Vec::new(),
        ..sh("")
    };
    let err = run(spec, tx, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, ProcessError::EmptyArgv));
}

#[tokio::test]
async fn dropped_receiver_does_not_stop_the_process() {
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let mut spec = sh("seq 1 5000; echo done");
    spec.tail_lines = 2;
    let end = run(spec, tx, CancellationToken::new()).await.unwrap();
    match end {
        ProcessEnd::Exited { status, tail } => {
            assert!(status.success());
            let tail: Vec<_> = tail.iter().map(|l| l.text.as_str()).collect();
            assert_eq!(tail, ["5000", "done"]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn flood_with_slow_receiver_keeps_every_line_and_the_tail() {
    let mut spec = sh("seq 1 100000");
    spec.tail_lines = 10;
    let (tx, mut rx) = mpsc::channel::<OutputLine>(16);
    let receiver = tokio::spawn(async move {
        let mut count = 0u64;
        let mut last = String::new();
        while let Some(line) = rx.recv().await {
            count += 1;
            last = line.text;
            if count.is_multiple_of(500) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        (count, last)
    });
    let end = run(spec, tx, CancellationToken::new()).await.unwrap();
    let tail: Vec<String> = end.tail().iter().map(|l| l.text.clone()).collect();
    let expected: Vec<String> = (99_991..=100_000).map(|n| n.to_string()).collect();
    assert_eq!(tail, expected);
    let (count, last) = receiver.await.unwrap();
    assert_eq!(count, 100_000);
    assert_eq!(last, "100000");
}

#[test]
fn splitter_handles_chunk_boundaries() {
    let mut s = LineSplitter::new(100);
    assert!(s.push(b"hel").is_empty());
    assert_eq!(s.push(b"lo\nwor"), ["hello"]);
    assert_eq!(s.push(b"ld\r\n\n"), ["world", ""]);
    assert_eq!(s.finish(), None);
    assert!(s.push(b"tail").is_empty());
    assert_eq!(s.finish().as_deref(), Some("tail"));
}

#[test]
fn splitter_caps_on_char_boundary_and_resyncs() {
    let mut s = LineSplitter::new(5);
    // "abcd" + 'é' (2 bytes) = 6 bytes: the é does not fit and is dropped whole.
    assert_eq!(s.push("abcdé\n".as_bytes()), ["abcd"]);
    // Over-long line across chunks: the rest is skipped until the newline.
    assert!(s.push(b"0123456789").is_empty());
    assert!(s.push(&[b'z'; 10_000]).is_empty());
    assert_eq!(s.current.len(), s.raw_cap(), "memory must stay bounded");
    assert_eq!(s.push(b"zzz\nnext\n"), ["01234", "next"]);
    // A 4-byte character straddling the cap is not turned into U+FFFD.
    assert_eq!(s.push("abc\u{1f600}\n".as_bytes()), ["abc"]);
    // Invalid bytes become U+FFFD, and the cap holds after that expansion.
    assert_eq!(s.push(b"\xff\xff\xff\n"), ["\u{fffd}"]);
}

#[test]
fn splitter_with_zero_cap_yields_empty_lines() {
    let mut s = LineSplitter::new(0);
    assert_eq!(s.push(b"abc\n\n"), ["", ""]);
}

#[test]
fn tail_keeps_last_lines_only() {
    let line = |t: &str| OutputLine {
        stream: OutputStream::Stdout,
        text: t.into(),
    };
    let mut tail = Tail::new(2);
    for t in ["a", "b", "c"] {
        tail.push(&line(t));
    }
    assert_eq!(tail.lines, [line("b"), line("c")]);
    let mut none = Tail::new(0);
    none.push(&line("a"));
    assert!(none.lines.is_empty());
}

/// Run as a slot user, a child's `setsid` and double-forked descendants are gone when `run`
/// returns. Needs root (or the capabilities slot users need), like the agent's own isolation.
#[tokio::test]
async fn a_slot_user_run_leaves_no_process_of_that_user_behind() {
    let missing = crate::sandbox::users::missing_caps();
    if !missing.is_empty() {
        eprintln!("skipped: slot users need {missing:?}");
        return;
    }
    let user = SlotUser {
        uid: 64990,
        gid: 64990,
    };
    let mut spec = sh("id -u; setsid sleep 300 & echo $!; (sleep 301 & echo $!)");
    spec.user = Some(user);
    let (end, lines) = run_collect(spec).await;
    assert!(
        matches!(end, ProcessEnd::Exited { ref status, .. } if status.success()),
        "{end:?}"
    );
    let out = texts(&lines, OutputStream::Stdout);
    assert_eq!(
        out.first(),
        Some(&"64990"),
        "the child ran as the slot user: {out:?}"
    );
    let pids: Vec<i32> = out[1..].iter().map(|p| p.parse().expect("a pid")).collect();
    assert_eq!(pids.len(), 2, "{out:?}");
    for pid in pids {
        assert!(is_gone(pid), "descendant {pid} outlived the run");
    }
    assert!(crate::sandbox::sweep::live_processes(user.uid).is_empty());
}
