//! The analyzer's output lines of one run, as the coordinator gets to see them (job logs).
//!
//! Each line of stdout and stderr is cleaned (escape sequences and other control characters
//! out, what a `\r` overwrote out), redacted ([`crate::redact`]), numbered (`seq`, from 0,
//! across both streams) and kept in a tail bounded in lines and bytes
//! ([`limits::OUTPUT_TAIL_LINES`], [`limits::OUTPUT_TAIL_BYTES`]): a flood costs the agent a
//! fixed amount per run, the oldest lines going first.
//!
//! Lines travel to the coordinator only while it follows the run (`FollowOutput`): the session
//! then takes the lines not sent yet, in batches, at the pace of the stream ([`OutputTail::take_unsent`]),
//! and once before the run's end it takes what is left, so the coordinator keeps the last lines
//! of every run. [`OutputTail::push`] never waits: when the stream is slower than the analyzer,
//! lines the tail drops before they were sent leave a gap in `seq`, and the analyzer's pipes are
//! never held up by a follower.

use std::{
    borrow::Cow,
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use fondation_proto::{
    limits,
    model::{OutputLine, OutputStream},
};
use tokio::sync::Notify;

use crate::redact::Redactor;

/// One run's output tail; clones share it (the runner pushes, the session sends).
#[derive(Clone, Debug)]
pub struct OutputTail {
    inner: Arc<Mutex<Tail>>,
    redactor: Arc<Redactor>,
    /// The session's wake-up: new lines of a followed run are waiting to be sent.
    wake: Arc<Notify>,
}

#[derive(Debug)]
struct Tail {
    lines: VecDeque<OutputLine>,
    /// Bytes of text in `lines`.
    bytes: usize,
    max_lines: usize,
    max_bytes: usize,
    /// `seq` of the next line pushed.
    next_seq: u64,
    /// Lines from this `seq` on were not handed out for sending yet.
    unsent: u64,
    /// The coordinator asked for the lines as they come.
    following: bool,
}

impl OutputTail {
    /// A tail with the limits of [`limits`]; `wake` is notified when a followed run has new lines.
    pub fn new(redactor: Redactor, wake: Arc<Notify>) -> Self {
        Self::with_limits(
            redactor,
            wake,
            limits::OUTPUT_TAIL_LINES,
            limits::OUTPUT_TAIL_BYTES,
        )
    }

    fn with_limits(
        redactor: Redactor,
        wake: Arc<Notify>,
        max_lines: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Tail {
                lines: VecDeque::new(),
                bytes: 0,
                max_lines,
                max_bytes,
                next_seq: 0,
                unsent: 0,
                following: false,
            })),
            redactor: Arc::new(redactor),
            wake,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tail> {
        // The tail stays consistent at every step: a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps one line of output (cleaned and redacted); never waits.
    pub fn push(&self, stream: OutputStream, text: &str) {
        let text = self.redactor.redact(&clean(text)).into_owned();
        let text = limits::truncate_utf8(&text, limits::MAX_OUTPUT_LINE_BYTES).to_owned();
        let following = {
            let mut tail = self.lock();
            let seq = tail.next_seq;
            tail.next_seq += 1;
            tail.bytes += text.len();
            tail.lines.push_back(OutputLine { seq, stream, text });
            while tail.lines.len() > tail.max_lines || tail.bytes > tail.max_bytes {
                match tail.lines.pop_front() {
                    Some(old) => tail.bytes -= old.text.len(),
                    None => break,
                }
            }
            tail.following
        };
        if following {
            self.wake.notify_one();
        }
    }

    /// `text` with this run's secrets redacted: for texts quoting the output elsewhere (a failed
    /// run's error).
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        self.redactor.redact(text)
    }

    /// Starts or stops sending lines as they come.
    pub fn follow(&self, following: bool) {
        self.lock().following = following;
        if following {
            self.wake.notify_one();
        }
    }

    /// Whether the run is followed and has lines not sent yet.
    pub fn has_lines_to_forward(&self) -> bool {
        let tail = self.lock();
        tail.following && tail.unsent < tail.next_seq
    }

    /// Up to `max` of the kept lines not handed out yet, oldest first, now counted as sent.
    pub fn take_unsent(&self, max: usize) -> Vec<OutputLine> {
        let mut tail = self.lock();
        let first_kept = tail.lines.front().map_or(tail.next_seq, |line| line.seq);
        // Lines dropped before they were sent are a gap.
        let start = tail.unsent.max(first_kept);
        let skip = (start - first_kept) as usize;
        let taken: Vec<OutputLine> = tail.lines.iter().skip(skip).take(max).cloned().collect();
        tail.unsent = taken.last().map_or(start, |line| line.seq + 1);
        taken
    }

    /// After a reconnect: nobody follows on the new session yet, and every kept line goes out
    /// again (it may have been lost with the old stream; the coordinator drops repeats by `seq`).
    pub fn new_session(&self) {
        let mut tail = self.lock();
        tail.following = false;
        tail.unsent = 0;
    }
}

/// The line as a terminal would show it, without what could drive one: the text after the last
/// `\r` that has any (a progress bar redraws its line), ANSI escape sequences and other control
/// characters removed (tabs stay).
fn clean(text: &str) -> Cow<'_, str> {
    let shown: &str = text
        .rsplit('\r')
        .find(|part| !part.is_empty())
        .unwrap_or_default();
    let stripped: Cow<'_, str> = if shown.contains('\u{1b}') {
        // Piece by piece: the stripper drops tabs too.
        Cow::Owned(
            shown
                .split('\t')
                .map(strip_ansi_escapes::strip_str)
                .collect::<Vec<_>>()
                .join("\t"),
        )
    } else {
        Cow::Borrowed(shown)
    };
    if stripped.chars().any(|c| c.is_control() && c != '\t') {
        Cow::Owned(
            stripped
                .chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect(),
        )
    } else {
        stripped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_tail(max_lines: usize, max_bytes: usize) -> (OutputTail, Arc<Notify>) {
        let wake = Arc::new(Notify::new());
        let tail = OutputTail::with_limits(
            Redactor::new(["s3cr3t-token".to_string()]),
            wake.clone(),
            max_lines,
            max_bytes,
        );
        (tail, wake)
    }

    fn seqs(lines: &[OutputLine]) -> Vec<u64> {
        lines.iter().map(|line| line.seq).collect()
    }

    #[test]
    fn keeps_the_last_lines_within_both_bounds() {
        let (tail, _) = new_tail(3, 1000);
        for n in 0..5 {
            tail.push(OutputStream::Stdout, &format!("line {n}"));
        }
        let kept = tail.take_unsent(10);
        assert_eq!(
            seqs(&kept),
            [2, 3, 4],
            "the oldest went first; seq counts them all"
        );
        assert_eq!(kept[0].text, "line 2");

        let (tail, _) = new_tail(100, 10);
        tail.push(OutputStream::Stdout, "aaaa");
        tail.push(OutputStream::Stderr, "bbbb");
        tail.push(OutputStream::Stdout, "cccc");
        let kept = tail.take_unsent(10);
        assert_eq!(seqs(&kept), [1, 2], "12 bytes do not fit in 10");
        assert_eq!(kept[0].stream, OutputStream::Stderr);
    }

    #[test]
    fn lines_are_sent_once_in_batches_and_a_drop_is_a_gap() {
        let (tail, _) = new_tail(4, 1000);
        for n in 0..3 {
            tail.push(OutputStream::Stdout, &format!("{n}"));
        }
        assert_eq!(seqs(&tail.take_unsent(2)), [0, 1]);
        assert_eq!(seqs(&tail.take_unsent(2)), [2]);
        assert!(tail.take_unsent(2).is_empty(), "nothing is sent twice");
        // Six more while nobody takes them: the tail keeps four, seq 5 to 8; 3 and 4 are a gap.
        for n in 3..9 {
            tail.push(OutputStream::Stdout, &format!("{n}"));
        }
        assert_eq!(seqs(&tail.take_unsent(10)), [5, 6, 7, 8]);
        // A new session sends the kept lines again; the coordinator drops what it has.
        tail.new_session();
        assert_eq!(seqs(&tail.take_unsent(10)), [5, 6, 7, 8]);
    }

    #[tokio::test]
    async fn only_a_followed_run_wakes_the_session() {
        let (tail, wake) = new_tail(10, 1000);
        tail.push(OutputStream::Stdout, "before");
        assert!(!tail.has_lines_to_forward(), "nobody follows");
        let woken = wake.notified();
        tokio::pin!(woken);
        assert!(futures::poll!(woken.as_mut()).is_pending());

        tail.follow(true);
        assert!(tail.has_lines_to_forward(), "the kept tail goes first");
        woken.as_mut().await;
        assert_eq!(tail.take_unsent(10).len(), 1);
        assert!(!tail.has_lines_to_forward());

        tail.push(OutputStream::Stdout, "after");
        wake.notified().await;
        assert!(tail.has_lines_to_forward());
        tail.follow(false);
        assert!(!tail.has_lines_to_forward());
        tail.new_session();
        tail.follow(true);
        assert_eq!(seqs(&tail.take_unsent(10)), [0, 1]);
    }

    #[test]
    fn lines_are_cleaned_and_redacted_before_they_are_kept() {
        let (tail, _) = new_tail(10, 10_000);
        tail.push(
            OutputStream::Stdout,
            "\u{1b}[31mred\u{1b}[0m token=s3cr3t-token\u{7}\tend",
        );
        tail.push(OutputStream::Stdout, "10%\r50%\r100%");
        tail.push(OutputStream::Stdout, "done\r");
        tail.push(OutputStream::Stderr, "s3cr3t-\u{1b}[1mtoken");
        let texts: Vec<String> = tail.take_unsent(10).into_iter().map(|l| l.text).collect();
        assert_eq!(
            texts,
            [
                "red token=<redacted>\tend",
                "100%",
                "done",
                // A colour code inside a secret does not hide it.
                "<redacted>",
            ]
        );
    }

    #[test]
    fn a_redacted_line_stays_within_the_line_cap() {
        // A secret shorter than the text replacing it makes the line longer.
        let tail = OutputTail::with_limits(
            Redactor::new(["abcd".to_string()]),
            Arc::new(Notify::new()),
            10,
            100_000,
        );
        let line = "abcd".repeat(limits::MAX_OUTPUT_LINE_BYTES / 4);
        tail.push(OutputStream::Stdout, &line);
        let kept = tail.take_unsent(1);
        assert_eq!(kept[0].text.len(), limits::MAX_OUTPUT_LINE_BYTES);
        assert!(!kept[0].text.contains("abcd"), "{}", kept[0].text);
    }
}
