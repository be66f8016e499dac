//! The writer behind every log line. Access-log lines (target [`ACCESS_TARGET`]) are appended to
//! a bounded in-memory buffer that a dedicated thread writes out, many lines per `write(2)`, so
//! the front's single thread never waits for stderr or the disk once per request. Every other
//! line is written at once by the thread that logs it, after whatever access lines are still
//! buffered, so the order of lines is the order they were logged in.
//!
//! When the buffer is full (the output is slower than the traffic: a stalled pipe, a slow
//! disk) the line is dropped and counted (`sauna_access_log_dropped_total`, and a warning).
//! nginx and uWSGI block the worker that logs instead; here the one thread that logs is the
//! front, which serves every connection, so blocking it would stall the whole service behind a
//! slow log reader, and buffering without a bound would turn that into unbounded memory.
//!
//! Nothing buffered is lost on a clean stop: [`Batched::flush`] writes it out, and the
//! supervisor calls it once the runtime has stopped.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

use super::LogFile;

/// The target of access-log events; the batched path is chosen by it.
pub const ACCESS_TARGET: &str = "sauna::access";

/// Most bytes of access lines waiting for the writer thread. About 10,000 lines: at 25k
/// requests per second the output may stall for ~0.4 s before a line is dropped.
const CAPACITY: usize = 2 << 20;

/// How long the writer thread lets lines gather after the first one arrives. Access lines show
/// up at most this late; in exchange a busy front pays one wake-up per interval, not per line.
const LINGER: Duration = Duration::from_millis(10);

/// Past this many waiting bytes the writer thread is woken before the linger ends, so a burst
/// is written in large pieces without waiting for the buffer to fill.
const EARLY_WRITE: usize = CAPACITY / 8;

/// The first dropped line is reported at once; later ones at most this often, as a sum.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Where the bytes end up.
#[derive(Debug)]
pub(super) enum Output {
    Stderr,
    File(Arc<LogFile>),
}

impl Output {
    fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Output::Stderr => io::stderr().lock().write_all(bytes),
            // `&File` is `Write`; the read side of the lock keeps a reopen from swapping the
            // file in the middle of a batch, and O_APPEND makes each write land at the end even
            // if logrotate's copytruncate was used.
            Output::File(file) => {
                (&*file.file.read().unwrap_or_else(PoisonError::into_inner)).write_all(bytes)
            }
        }
    }
}

/// The shared state of the writer; cheap to clone.
#[derive(Debug, Clone)]
pub struct Batched {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    waiting: Mutex<Vec<u8>>,
    /// Wakes the writer thread: when the first line arrives, and past `EARLY_WRITE`.
    wake: Condvar,
    /// Held while writing, so that batches and immediate lines never interleave; the spare
    /// buffer is swapped with `waiting` under it.
    sink: Mutex<Sink>,
    dropped: &'static AtomicU64,
    /// Whether the writer thread runs. It starts with the first access line, not with the
    /// logger: the supervisor forks its reaper after installing the logger, which is only sound
    /// while the process has a single thread.
    writer_running: OnceLock<bool>,
}

#[derive(Debug)]
struct Sink {
    output: Output,
    spare: Vec<u8>,
}

impl Batched {
    /// A writer to `output`; dropped access lines are added to `dropped`. Starts no thread.
    pub(super) fn new(output: Output, dropped: &'static AtomicU64) -> Batched {
        Batched {
            shared: Arc::new(Shared {
                waiting: Mutex::new(Vec::new()),
                wake: Condvar::new(),
                sink: Mutex::new(Sink {
                    output,
                    spare: Vec::new(),
                }),
                dropped,
                writer_running: OnceLock::new(),
            }),
        }
    }

    /// Starts the writer thread unless it runs; false when it cannot be started.
    fn writer_running(&self) -> bool {
        *self.shared.writer_running.get_or_init(|| {
            let writer = self.clone();
            let spawned = std::thread::Builder::new()
                .name("sauna-log".to_owned())
                .spawn(move || writer.run());
            if let Err(error) = &spawned {
                tracing::warn!(
                    "cannot start the access log writer thread ({error}): access lines are \
                     written one by one by the front"
                );
            }
            spawned.is_ok()
        })
    }

    /// Writes every buffered access line now; returns once they are written.
    pub fn flush(&self) {
        self.write_waiting(&[]);
    }

    /// Access lines dropped because the buffer was full, since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn lock_waiting(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave a `Vec<u8>` half-updated; carry on.
        self.shared
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one access line, or drops it when the buffer is full.
    fn enqueue(&self, line: &[u8]) {
        if !self.writer_running() {
            self.write_waiting(line);
            return;
        }
        let mut waiting = self.lock_waiting();
        let before = waiting.len();
        if before + line.len() > CAPACITY {
            drop(waiting);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        waiting.extend_from_slice(line);
        let after = waiting.len();
        drop(waiting);
        // Only these two crossings wake the thread, so a busy front makes a system call per
        // batch, not per line.
        if before == 0 || (before < EARLY_WRITE && after >= EARLY_WRITE) {
            self.shared.wake.notify_one();
        }
    }

    /// Writes the buffered lines, then `line`, without another write in between.
    fn write_waiting(&self, line: &[u8]) {
        let mut sink = self
            .shared
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sink = &mut *sink;
        std::mem::swap(&mut *self.lock_waiting(), &mut sink.spare);
        sink.spare.extend_from_slice(line);
        if !sink.spare.is_empty() {
            // A log that cannot be written has nowhere to report that either (the tracing
            // formatter ignores write errors the same way).
            let _ = sink.output.write_all(&sink.spare);
            sink.spare.clear();
        }
    }

    /// The writer thread: sleeps until a line arrives, lets more gather for `LINGER`, writes
    /// them all at once.
    fn run(self) {
        let mut reported = 0;
        let mut last_warning: Option<Instant> = None;
        loop {
            let mut waiting = self.lock_waiting();
            while waiting.is_empty() {
                waiting = self
                    .shared
                    .wake
                    .wait(waiting)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let deadline = Instant::now() + LINGER;
            while waiting.len() < EARLY_WRITE {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                waiting = self
                    .shared
                    .wake
                    .wait_timeout(waiting, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            drop(waiting);
            self.write_waiting(&[]);

            let dropped = self.dropped();
            let due = last_warning.is_none_or(|at| at.elapsed() >= DROP_WARNING_INTERVAL);
            if dropped > reported && due {
                tracing::warn!(
                    dropped = dropped - reported,
                    "access log lines dropped: the log output is slower than the requests \
                     (see sauna_access_log_dropped_total)"
                );
                reported = dropped;
                last_warning = Some(Instant::now());
            }
        }
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            batched: self,
            access: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            batched: self,
            access: meta.target() == ACCESS_TARGET,
        }
    }
}

/// Receives one formatted event (the formatter writes each event with one `write_all`).
pub struct LineWriter<'a> {
    batched: &'a Batched,
    access: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.access {
            self.batched.enqueue(buf);
        } else {
            self.batched.write_waiting(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn file_output(path: &Path) -> Output {
        Output::File(Arc::new(LogFile::open(path).expect("open log file")))
    }

    fn leaked_counter() -> &'static AtomicU64 {
        Box::leak(Box::new(AtomicU64::new(0)))
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read log file")
    }

    fn access_line(batched: &Batched, line: &str) {
        batched.enqueue(line.as_bytes());
    }

    #[test]
    fn access_lines_wait_for_the_writer_thread_and_flush_writes_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let batched = Batched::new(file_output(&path), leaked_counter());
        access_line(&batched, "one\n");
        access_line(&batched, "two\n");
        batched.flush();
        assert_eq!(read(&path), "one\ntwo\n");
        // Without a flush the writer thread gets there within the linger.
        access_line(&batched, "three\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !read(&path).ends_with("three\n") {
            assert!(Instant::now() < deadline, "{}", read(&path));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn other_lines_are_written_at_once_after_the_buffered_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let batched = Batched::new(file_output(&path), leaked_counter());
        access_line(&batched, "access\n");
        batched
            .make_writer()
            .write_all(b"warning\n")
            .expect("write");
        // No flush: the immediate line took the buffered one with it, in order.
        assert_eq!(read(&path), "access\nwarning\n");
    }

    #[test]
    fn a_full_buffer_drops_and_counts_lines_instead_of_growing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let batched = Batched::new(file_output(&path), leaked_counter());
        // Hold the sink as a stalled output would: nothing leaves the buffer meanwhile.
        let stalled = batched.shared.sink.lock().expect("sink");
        let line = format!("{}\n", "x".repeat(1023));
        let lines = CAPACITY / line.len() + 100;
        for _ in 0..lines {
            access_line(&batched, &line);
        }
        assert!(batched.lock_waiting().len() <= CAPACITY);
        drop(stalled);
        batched.flush();
        let written = read(&path).lines().count();
        assert_eq!(written, CAPACITY / line.len());
        assert_eq!(batched.dropped(), (lines - written) as u64);
    }
}
