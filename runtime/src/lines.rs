//! A bounded line writer: JSON lines queued to a thread of their own that
//! writes them through a buffer (the access log, the query log).
//!
//! A caller never waits: [`LineWriter::send`] drops the line and counts it
//! when the queue is full. The thread flushes whenever the queue runs empty
//! and at least every [`FLUSH_EVERY`] under a steady stream, and on
//! [`LineWriter::flush`] (graceful stop) before it answers.
//!
//! The thread polls its queue (sleeping as [`Backoff`] says when it is
//! empty: 1 ms, doubling to [`POLL_AT_MOST`] while nothing comes, so an idle
//! service wakes it 50 times a second) instead of blocking in `recv`: while a receiver waits, every `try_send` takes the
//! channel's waker lock to wake it, and one sender is a shadow generation's
//! idle-priority thread (see [`crate::generations`]), which may be
//! descheduled holding that lock while serving threads queue behind it.
//! Polling, no sender ever takes a lock (nor makes a wake-up syscall).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// Longest a written line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Longest a thread polling an empty queue sleeps (see [`Backoff`]).
pub const POLL_AT_MOST: Duration = Duration::from_millis(20);

/// The sleeps of a thread polling a queue that may be empty: 1 ms after the
/// first empty look, doubling up to [`POLL_AT_MOST`], and 1 ms again once
/// something came. Busy, it polls every millisecond; idle, it wakes rarely.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            next: Backoff::FIRST,
        }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(1);

    /// The queue was empty: sleep, longer than last time.
    pub fn idle(&mut self) {
        std::thread::sleep(self.next);
        self.next = (self.next * 2).min(POLL_AT_MOST);
    }

    /// Something came: the next empty look sleeps briefly again.
    pub fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }
}

enum Message {
    Line(Vec<u8>),
    /// Flush, then answer.
    Flush(SyncSender<()>),
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct LineWriter {
    queue: SyncSender<Message>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    dropped: AtomicU64,
    queued: AtomicU64,
}

impl LineWriter {
    /// Starts the writer thread `name`, writing to `out`, with room for
    /// `capacity` waiting lines.
    pub fn start(
        name: &str,
        capacity: usize,
        out: impl Write + Send + 'static,
    ) -> std::io::Result<LineWriter> {
        let (queue, lines) = sync_channel(capacity);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_lines(lines, out))?;
        Ok(LineWriter {
            queue,
            counts: Arc::default(),
        })
    }

    /// Queues `line` (one line, its newline included); never blocks. A full
    /// queue drops it and counts it.
    pub fn send(&self, line: Vec<u8>) {
        match self.queue.try_send(Message::Line(line)) {
            Ok(()) => {
                self.counts.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Serializes `value` as one JSON line and queues it.
    pub fn send_json(&self, value: &impl serde::Serialize) {
        if let Ok(mut bytes) = serde_json::to_vec(value) {
            bytes.push(b'\n');
            self.send(bytes);
        }
    }

    /// Lines dropped because the writer fell behind (or is gone).
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Lines queued for writing.
    pub fn queued(&self) -> u64 {
        self.counts.queued.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until every line queued so far is written
    /// and flushed: a graceful stop calls it last.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = sync_channel(1);
        self.queue.send(Message::Flush(done)).is_ok() && wait.recv_timeout(timeout).is_ok()
    }
}

/// The writer thread: writes what is queued, flushes when the queue is
/// empty or the buffer is [`FLUSH_EVERY`] old.
fn write_lines(lines: Receiver<Message>, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut last_flush = Instant::now();
    let mut backoff = Backoff::default();
    loop {
        let message = match lines.try_recv() {
            Ok(m) => {
                backoff.reset();
                m
            }
            Err(TryRecvError::Empty) => {
                backoff.idle();
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let mut answer = Vec::new();
        let mut next = Some(message);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Message::Flush(done) => answer.push(done),
            }
            if last_flush.elapsed() >= FLUSH_EVERY {
                let _ = out.flush();
                last_flush = Instant::now();
            }
            next = lines.try_recv().ok();
        }
        let _ = out.flush();
        last_flush = Instant::now();
        for done in answer {
            let _ = done.send(());
        }
    }
    let _ = out.flush();
}
