//! The writer behind every log line. Access-log entries are not formatted by the thread that
//! logs them (the front's only thread): it hands their fields ([`AccessRecord`]) to a bounded
//! queue, and a dedicated thread formats them into a reused buffer ([`access_line`]: the bytes
//! a plain `tracing` event would have, in the log's format) and writes many lines per
//! `write(2)`. Every other line is formatted by the thread that logs it and written at
//! once — or, when access entries are queued, queued behind them for the writer thread, woken
//! at once — so lines keep the order they were logged in.
//!
//! When the queue is full (the output is slower than the traffic: a stalled pipe, a slow disk)
//! the entry is dropped and counted (`sauna_access_log_dropped_total`, and a warning). nginx and
//! uWSGI block the worker that logs instead; here the one thread that logs is the front, which
//! serves every connection, so blocking it would stall the whole service behind a slow log
//! reader, and queueing without a bound would turn that into unbounded memory.
//!
//! Nothing queued is lost on a clean stop: [`Batched::flush`] writes it out, and the supervisor
//! calls it once the runtime has stopped.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tracing_subscriber::fmt::MakeWriter;

use super::LogFile;
use super::access_line::{LineFormatter, Style};

/// The target of access-log events.
pub const ACCESS_TARGET: &str = "sauna::access";

/// Most bytes of queued entries (their strings plus [`RECORD_OVERHEAD`] each): about 10,000
/// entries, so at 25k requests per second the output may stall for ~0.4 s before one is dropped.
const CAPACITY: usize = 2 << 20;

/// What an entry costs in the queue besides its strings; a formatted line is about this long.
const RECORD_OVERHEAD: usize = 200;

/// How long the writer thread lets entries gather after the first one arrives. Access lines
/// show up at most this late; in exchange a busy front pays one wake-up per interval, not per
/// request.
const LINGER: Duration = Duration::from_millis(10);

/// Past this many queued bytes the writer thread is woken before the linger ends, so a burst is
/// written in large pieces without waiting for the queue to fill.
const EARLY_WRITE: usize = CAPACITY / 8;

/// The first dropped entry is reported at once; later ones at most this often, as a sum.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// One finished request, as the front hands it over.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When the response ended: the line's timestamp.
    pub at: SystemTime,
    pub method: String,
    /// The request path and query.
    pub path: String,
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// Accepted → response ended.
    pub duration: Duration,
    /// Accepted → a worker started it.
    pub queue_wait: Option<Duration>,
    /// The worker slot.
    pub worker: Option<usize>,
    /// Whether the whole response reached the client.
    pub completed: bool,
}

impl AccessRecord {
    /// Emits the entry as a `tracing` event to the current dispatcher. Its fields and message
    /// are the access log's format.
    pub(super) fn emit(&self) {
        tracing::info!(
            target: ACCESS_TARGET,
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes = self.bytes,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            queue_ms = self.queue_wait.map_or(0.0, |wait| wait.as_secs_f64() * 1000.0),
            worker = self.worker.map_or(-1, |slot| slot as i64),
            completed = self.completed,
            "{} {} {}",
            self.method,
            self.path,
            self.status
        );
    }

    fn queued_size(&self) -> usize {
        self.method.len() + self.path.len() + RECORD_OVERHEAD
    }
}

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
    waiting: Mutex<Queue>,
    /// Wakes the writer thread: when the first entry arrives, and past `EARLY_WRITE`.
    wake: Condvar,
    /// Held while formatting and writing, so that batches and immediate lines never interleave;
    /// the spare queue is swapped with `waiting` under it.
    sink: Mutex<Sink>,
    /// Whether the log filter lets access entries through at all.
    access_enabled: bool,
    dropped: &'static AtomicU64,
    /// Whether the writer thread runs. It starts with the first access entry, not with the
    /// logger: the supervisor forks its reaper after installing the logger, which is only sound
    /// while the process has a single thread.
    writer_running: OnceLock<bool>,
}

#[derive(Debug, Default)]
struct Queue {
    entries: Vec<Entry>,
    /// The queued access entries' methods and paths, one after the other. Copied in, so that
    /// the front frees its own strings while they are still in its cache: freed on the writer
    /// thread, they left the front's allocator handing out cold memory on every request.
    text: String,
    bytes: usize,
    /// A line of another target waits: write without lingering.
    urgent: bool,
}

impl Queue {
    fn push_access(&mut self, mut record: AccessRecord) {
        let method = std::mem::take(&mut record.method);
        let path = std::mem::take(&mut record.path);
        self.text.push_str(&method);
        self.text.push_str(&path);
        self.entries.push(Entry::Access {
            record,
            method: method.len(),
            path: path.len(),
        });
    }
}

/// What waits for the writer thread, in the order it was logged.
#[derive(Debug)]
enum Entry {
    /// An access entry whose method and path (of these lengths) are in `Queue::text`.
    Access {
        record: AccessRecord,
        method: usize,
        path: usize,
    },
    /// A line of another target, formatted by the thread that logged it, which came while
    /// access entries were queued.
    Line(Vec<u8>),
}

#[derive(Debug)]
struct Sink {
    output: Output,
    spare: Queue,
    formatter: LineFormatter,
    /// The batch's bytes; kept between batches for its capacity.
    formatted: Vec<u8>,
}

impl Batched {
    /// A writer to `output` that writes access entries, when `access_enabled`, in `style`;
    /// dropped entries are added to `dropped`. Starts no thread.
    pub(super) fn new(
        output: Output,
        style: Style,
        access_enabled: bool,
        dropped: &'static AtomicU64,
    ) -> Batched {
        Batched {
            shared: Arc::new(Shared {
                waiting: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                sink: Mutex::new(Sink {
                    output,
                    spare: Queue::default(),
                    formatter: LineFormatter::new(style),
                    formatted: Vec::new(),
                }),
                access_enabled,
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

    /// Formats and writes every queued entry now; returns once they are written.
    pub fn flush(&self) {
        let mut sink = self
            .shared
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sink = &mut *sink;
        std::mem::swap(&mut *self.lock_waiting(), &mut sink.spare);
        if sink.spare.entries.is_empty() {
            return;
        }
        let mut text = sink.spare.text.as_str();
        for entry in sink.spare.entries.drain(..) {
            match entry {
                Entry::Access {
                    mut record,
                    method,
                    path,
                } => {
                    let (method, rest) = text.split_at_checked(method).unwrap_or((text, ""));
                    let (path, rest) = rest.split_at_checked(path).unwrap_or((rest, ""));
                    text = rest;
                    record.method.push_str(method);
                    record.path.push_str(path);
                    sink.formatter.write(&record, &mut sink.formatted);
                }
                Entry::Line(line) => sink.formatted.extend_from_slice(&line),
            }
        }
        sink.spare.text.clear();
        sink.spare.bytes = 0;
        sink.spare.urgent = false;
        // A log that cannot be written has nowhere to report that either (the tracing
        // formatter ignores write errors the same way).
        let _ = sink.output.write_all(&sink.formatted);
        sink.formatted.clear();
    }

    /// Writes one line of another target at once, or, when access entries are queued, queues
    /// it behind them and wakes the writer thread.
    fn write_line(&self, line: &[u8]) {
        // Taking the sink first waits for a batch being written, which comes before this line.
        let sink = self
            .shared
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut waiting = self.lock_waiting();
        if waiting.entries.is_empty() {
            drop(waiting);
            // See `flush` about errors.
            let _ = sink.output.write_all(line);
            return;
        }
        waiting.entries.push(Entry::Line(line.to_vec()));
        waiting.bytes += line.len();
        waiting.urgent = true;
        drop(waiting);
        drop(sink);
        self.shared.wake.notify_one();
    }

    /// Access entries dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn lock_waiting(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock cannot leave the queue half-updated; carry on.
        self.shared
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues one access entry, or drops it when the queue is full.
    pub(super) fn enqueue(&self, record: AccessRecord) {
        if !self.shared.access_enabled {
            return;
        }
        let size = record.queued_size();
        if !self.writer_running() {
            let mut waiting = self.lock_waiting();
            waiting.push_access(record);
            waiting.bytes += size;
            drop(waiting);
            self.flush();
            return;
        }
        let mut waiting = self.lock_waiting();
        let before = waiting.bytes;
        if before + size > CAPACITY {
            drop(waiting);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        waiting.push_access(record);
        waiting.bytes += size;
        let after = waiting.bytes;
        drop(waiting);
        // Only these two crossings wake the thread, so a busy front makes a system call per
        // batch, not per request.
        if before == 0 || (before < EARLY_WRITE && after >= EARLY_WRITE) {
            self.shared.wake.notify_one();
        }
    }

    /// The writer thread: sleeps until an entry arrives, lets more gather for `LINGER`, formats
    /// and writes them all at once.
    fn run(self) {
        let mut reported = 0;
        let mut last_warning: Option<Instant> = None;
        loop {
            let mut waiting = self.lock_waiting();
            while waiting.entries.is_empty() {
                waiting = self
                    .shared
                    .wake
                    .wait(waiting)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let deadline = Instant::now() + LINGER;
            while waiting.bytes < EARLY_WRITE && !waiting.urgent {
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
            self.flush();

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
        LineWriter { batched: self }
    }
}

/// Receives one formatted event (the formatter writes each event with one `write_all`) and
/// writes it after the queued access entries.
pub struct LineWriter<'a> {
    batched: &'a Batched,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.batched.write_line(buf);
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

    fn batched(path: &Path, dropped: &'static AtomicU64) -> Batched {
        let output = Output::File(Arc::new(LogFile::open(path).expect("open log file")));
        Batched::new(output, Style::Text { ansi: false }, true, dropped)
    }

    fn record(path: &str) -> AccessRecord {
        AccessRecord {
            at: SystemTime::now(),
            method: "GET".to_owned(),
            path: path.to_owned(),
            status: 200,
            bytes: 0,
            duration: Duration::ZERO,
            queue_wait: None,
            worker: None,
            completed: true,
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read log file")
    }

    fn paths(log: &str) -> Vec<&str> {
        log.lines()
            .map(|line| {
                line.split(" path=")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next())
                    .unwrap_or(line)
            })
            .collect()
    }

    #[test]
    fn entries_wait_for_the_writer_thread_and_flush_writes_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let counter = Box::leak(Box::new(AtomicU64::new(0)));
        let batched = batched(&path, counter);
        batched.enqueue(record("/one"));
        batched.enqueue(record("/two"));
        batched.flush();
        assert_eq!(paths(&read(&path)), ["/one", "/two"]);
        // Without a flush the writer thread gets there within the linger.
        batched.enqueue(record("/three"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while paths(&read(&path)).len() < 3 {
            assert!(Instant::now() < deadline, "{}", read(&path));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(paths(&read(&path)), ["/one", "/two", "/three"]);
    }

    #[test]
    fn other_lines_are_written_at_once_or_right_after_the_queued_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let batched = batched(&path, Box::leak(Box::new(AtomicU64::new(0))));
        batched.make_writer().write_all(b"first\n").expect("write");
        // Nothing queued: written at once.
        assert_eq!(read(&path), "first\n");
        batched.enqueue(record("/access"));
        batched.make_writer().write_all(b"second\n").expect("write");
        // Queued behind the entry, and the writer thread woken for it without a linger.
        let deadline = Instant::now() + Duration::from_secs(10);
        while paths(&read(&path)).len() < 3 {
            assert!(Instant::now() < deadline, "{}", read(&path));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(paths(&read(&path)), ["first", "/access", "second"]);
    }

    #[test]
    fn a_full_queue_drops_and_counts_entries_instead_of_growing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let counter = Box::leak(Box::new(AtomicU64::new(0)));
        let batched = batched(&path, counter);
        // Hold the sink as a stalled output would: nothing leaves the queue meanwhile.
        let stalled = batched.shared.sink.lock().expect("sink");
        let long = format!("/{}", "x".repeat(1023 - RECORD_OVERHEAD - 3));
        let fits = CAPACITY / record(&long).queued_size();
        for _ in 0..fits + 100 {
            batched.enqueue(record(&long));
        }
        assert!(batched.lock_waiting().bytes <= CAPACITY);
        drop(stalled);
        batched.flush();
        assert_eq!(read(&path).lines().count(), fits);
        assert_eq!(batched.dropped(), 100);
    }
}
