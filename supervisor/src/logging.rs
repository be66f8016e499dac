//! Where the supervisor's own log lines go and what they look like: `tracing` events written as
//! readable text (colours only when stderr is a terminal) or as one JSON object per line
//! (`--log-format json`, for journald and log collectors), filtered by `RUST_LOG`, else
//! `--log-level`, else `info`, and written to stderr or appended to `--log-file`.
//!
//! A log file is reopened by [`LogHandle::reopen`] (the main loop calls it on `SIGUSR1`): after
//! logrotate has renamed the file, lines go on reaching the renamed file until the reopen, and
//! the new file at the configured path from then on, with nothing lost in between.
//!
//! Access-log entries ([`log_access`]) are formatted and written by a thread of their own, in
//! batches, through a bounded queue ([`batch`]); the supervisor calls [`LogHandle::flush`] before
//! it exits so that none is lost on a clean stop.
//!
//! This module does not decide what is logged. Programs' output is turned into events by the
//! module that captures it; secrets (broker passwords, `[app].env` values) must never be passed
//! to an event in the first place, since no filter here could recognise them.

mod access_line;
mod batch;

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use anyhow::Context;
use tracing::Subscriber;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for journald and log collectors.
    Json,
}

/// Where log lines go and what they look like (`--log-format`, `--log-level`, `--log-file`).
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Log line format.
    pub log_format: LogFormat,
    /// Minimum level or a RUST_LOG-style filter; RUST_LOG wins.
    pub log_level: Option<String>,
    /// Append log lines to this file instead of stderr; reopened on SIGUSR1.
    pub log_file: Option<PathBuf>,
}

pub use batch::{ACCESS_TARGET, AccessRecord};

/// The process-wide logger's writer, once [`init`] has installed it.
static WRITER: OnceLock<batch::Batched> = OnceLock::new();

/// Logs one finished request in the access log, unless the log filter leaves `sauna::access`
/// out. The entry is formatted and written by the log's writer thread; without the
/// process-wide logger (a library user's own subscriber) it is an ordinary event.
pub fn log_access(record: AccessRecord) {
    match WRITER.get() {
        Some(writer) => writer.enqueue(record),
        None => record.emit(),
    }
}

/// Access-log lines dropped in this process because the output could not keep up.
static ACCESS_LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Access-log lines dropped so far because the log output could not keep up with the requests
/// (`sauna_access_log_dropped_total`).
pub fn access_lines_dropped() -> u64 {
    ACCESS_LINES_DROPPED.load(Ordering::Relaxed)
}

/// Permissions of a log file this module creates: the service's user and group may read it.
const LOG_FILE_MODE: u32 = 0o640;

/// Reopens the log file and flushes buffered access lines; cheap to clone. Without `--log-file`
/// reopening does nothing.
#[derive(Debug, Clone, Default)]
pub struct LogHandle {
    file: Option<Arc<LogFile>>,
    /// `None` only for a handle made without a logger (tests).
    writer: Option<batch::Batched>,
}

impl LogHandle {
    /// Writes every buffered access line now. Call before the process exits: the writer thread
    /// does not outlive `main`.
    pub fn flush(&self) {
        if let Some(writer) = &self.writer {
            writer.flush();
        }
    }

    /// Opens `--log-file` again by name and sends every later line there. On failure the old file
    /// keeps receiving lines and the error names the path.
    pub fn reopen(&self) -> io::Result<()> {
        // Lines logged before the reopen belong in the file that was current then.
        self.flush();
        match &self.file {
            Some(file) => file.reopen(),
            None => Ok(()),
        }
    }
}

/// Installs the process-wide subscriber described by `args`. Call once, early in `main`.
pub fn init(args: &LogOptions) -> anyhow::Result<LogHandle> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (subscriber, handle) = build(args, rust_log.as_deref(), io::stderr().is_terminal())?;
    tracing::subscriber::set_global_default(subscriber)
        .context("cannot install the logger: one is already installed")?;
    if let Some(writer) = &handle.writer {
        // Cannot be set already: `set_global_default` succeeds once per process.
        let _ = WRITER.set(writer.clone());
    }
    Ok(handle)
}

/// The subscriber for `args`, given `$RUST_LOG` and whether stderr is a terminal.
fn build(
    args: &LogOptions,
    rust_log: Option<&str>,
    stderr_is_terminal: bool,
) -> anyhow::Result<(impl Subscriber + Send + Sync + 'static, LogHandle)> {
    let filter = filter(args.log_level.as_deref(), rust_log)?;
    let (output, file, ansi) = match &args.log_file {
        Some(path) => {
            let file = Arc::new(LogFile::open(path)?);
            (batch::Output::File(Arc::clone(&file)), Some(file), false)
        }
        None => (batch::Output::Stderr, None, stderr_is_terminal),
    };
    // The same shapes as the layer below gives every other line.
    let style = match args.log_format {
        LogFormat::Text => access_line::Style::Text { ansi },
        LogFormat::Json => access_line::Style::Json,
    };
    // Decided once, with the same directives as the filter below, so that the front does not
    // ask the subscriber for every request. (A per-layer filter asked through `enabled!` would
    // be left expecting the event that the front never sends it.)
    let access_enabled = {
        let probe = Registry::default().with(self::filter(args.log_level.as_deref(), rust_log)?);
        tracing::subscriber::with_default(
            probe,
            || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
        )
    };
    let writer = batch::Batched::new(output, style, access_enabled, &ACCESS_LINES_DROPPED);
    let handle = LogHandle {
        file,
        writer: Some(writer.clone()),
    };
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_ansi(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    Ok((Registry::default().with(layer), handle))
}

/// The filter: a non-empty `$RUST_LOG` wins over `--log-level`, which wins over `info`.
fn filter(log_level: Option<&str>, rust_log: Option<&str>) -> anyhow::Result<EnvFilter> {
    let (directives, source) = match (rust_log.filter(|value| !value.trim().is_empty()), log_level)
    {
        (Some(rust_log), _) => (rust_log, "RUST_LOG"),
        (None, Some(level)) => (level, "--log-level"),
        (None, None) => ("info", "the default level"),
    };
    EnvFilter::builder().parse(directives).with_context(|| {
        format!(
            "invalid log filter {directives:?} in {source}: use a level (error, warn, info, \
             debug, trace) or directives such as \"info,sauna_supervisor=debug\""
        )
    })
}

/// The log file and the path it is reopened from.
#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    /// The writer holds the read side while writing one event or batch; a reopen takes the write
    /// side only to swap the handle, so no line is split between two files.
    file: RwLock<File>,
}

impl LogFile {
    fn open(path: &Path) -> anyhow::Result<LogFile> {
        let file = open_append(path).with_context(|| {
            format!(
                "cannot open log file {}: check that its directory exists and is writable",
                path.display()
            )
        })?;
        Ok(LogFile {
            path: path.to_owned(),
            file: RwLock::new(file),
        })
    }

    fn reopen(&self) -> io::Result<()> {
        let file = open_append(&self.path).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("cannot reopen log file {}: {error}", self.path.display()),
            )
        })?;
        // A panic while holding the lock cannot leave a `File` half-updated; carry on.
        *self.file.write().unwrap_or_else(PoisonError::into_inner) = file;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_FILE_MODE)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_args(path: &Path, format: LogFormat, level: Option<&str>) -> LogOptions {
        LogOptions {
            log_format: format,
            log_level: level.map(str::to_owned),
            log_file: Some(path.to_owned()),
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read log file")
    }

    #[test]
    fn reopen_after_rename_sends_new_lines_to_the_new_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let rotated = dir.path().join("sauna.log.1");
        let (subscriber, handle) =
            build(&file_args(&path, LogFormat::Text, None), None, true).expect("build");
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("line one");
            std::fs::rename(&path, &rotated).expect("rotate");
            tracing::info!("line two");
            handle.reopen().expect("reopen");
            tracing::info!("line three");
        });
        let old = read(&rotated);
        let new = read(&path);
        assert!(
            old.contains("line one") && old.contains("line two"),
            "{old}"
        );
        assert!(!old.contains("line three"), "{old}");
        assert!(
            new.contains("line three") && !new.contains("line two"),
            "{new}"
        );
        assert_eq!(new.lines().count(), 1, "{new}");
        // A file is never coloured, even when stderr is a terminal.
        assert!(!old.contains('\u{1b}'), "{old:?}");
    }

    #[test]
    fn an_existing_file_is_appended_to() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        std::fs::write(&path, "earlier\n").expect("write");
        let (subscriber, _handle) =
            build(&file_args(&path, LogFormat::Text, None), None, false).expect("build");
        tracing::subscriber::with_default(subscriber, || tracing::warn!("later"));
        let text = read(&path);
        assert!(
            text.starts_with("earlier\n") && text.contains("later"),
            "{text}"
        );
    }

    #[test]
    fn json_is_one_object_per_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let (subscriber, _handle) =
            build(&file_args(&path, LogFormat::Json, None), None, true).expect("build");
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(program = "celery", pid = 42, "started");
            tracing::error!("it said \"no\"\nand left");
        });
        let text = read(&path);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "started");
        assert_eq!(lines[0]["program"], "celery");
        assert_eq!(lines[0]["pid"], 42);
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[1]["message"], "it said \"no\"\nand left");
    }

    #[test]
    fn rust_log_wins_over_log_level() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let args = file_args(&path, LogFormat::Text, Some("error"));
        let (subscriber, _handle) = build(&args, Some("debug"), false).expect("build");
        tracing::subscriber::with_default(subscriber, || tracing::debug!("detail"));
        assert!(read(&path).contains("detail"));
    }

    #[test]
    fn log_level_filters_and_accepts_directives() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let args = file_args(&path, LogFormat::Text, Some("warn,sauna_supervisor=trace"));
        let (subscriber, _handle) = build(&args, Some(" "), false).expect("build");
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!("ours");
            tracing::info!(target: "hyper", "theirs");
        });
        let text = read(&path);
        assert!(text.contains("ours") && !text.contains("theirs"), "{text}");
    }

    #[test]
    fn bad_filters_and_files_are_explained() {
        let error = filter(Some("info,=bogus=="), None).expect_err("invalid");
        assert!(format!("{error:#}").contains("--log-level"), "{error:#}");
        let error = filter(None, Some("loud!!=x")).expect_err("invalid");
        assert!(format!("{error:#}").contains("RUST_LOG"), "{error:#}");

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing-dir").join("sauna.log");
        let error = build(&file_args(&path, LogFormat::Text, None), None, false)
            .err()
            .expect("no such directory");
        assert!(format!("{error:#}").contains("missing-dir"), "{error:#}");
    }

    fn record(path: &str, status: u16) -> AccessRecord {
        AccessRecord {
            // 2023-11-14T22:13:20.123456Z
            at: std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456),
            method: "GET".to_owned(),
            path: path.to_owned(),
            status,
            bytes: 13,
            duration: std::time::Duration::from_micros(1500),
            queue_wait: None,
            worker: Some(1),
            completed: true,
        }
    }

    /// The same entries through the queue and as plain events; returns both logs.
    fn queued_and_direct(format: LogFormat) -> (String, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let queued = dir.path().join("queued.log");
        let direct = dir.path().join("direct.log");
        let (subscriber, handle) =
            build(&file_args(&queued, format, None), None, false).expect("build");
        let writer = handle.writer.clone().expect("a writer");
        tracing::subscriber::with_default(subscriber, || {
            writer.enqueue(record("/a?x=1", 200));
            tracing::warn!("between");
            writer.enqueue(record("/b", 404));
        });
        handle.flush();
        let (subscriber, _handle) =
            build(&file_args(&direct, format, None), None, false).expect("build");
        tracing::subscriber::with_default(subscriber, || {
            record("/a?x=1", 200).emit();
            tracing::warn!("between");
            record("/b", 404).emit();
        });
        (read(&queued), read(&direct))
    }

    #[test]
    fn queued_text_entries_read_like_plain_events_in_order() {
        let (queued, direct) = queued_and_direct(LogFormat::Text);
        let queued: Vec<&str> = queued.lines().collect();
        let direct: Vec<&str> = direct.lines().collect();
        assert_eq!(queued.len(), 3, "{queued:?}");
        assert_eq!(direct.len(), 3, "{direct:?}");
        for (queued, direct) in queued.iter().zip(&direct) {
            // Everything but the timestamp: the queued entry has the response's.
            let (_, queued_rest) = queued.split_once(' ').expect("a timestamp");
            let (direct_time, direct_rest) = direct.split_once(' ').expect("a timestamp");
            assert_eq!(queued_rest, direct_rest);
            assert_eq!(
                queued.find(' '),
                Some(direct_time.len()),
                "{queued} / {direct}"
            );
        }
        assert!(
            queued[0]
                .starts_with("2023-11-14T22:13:20.123456Z  INFO sauna::access: GET /a?x=1 200"),
            "{}",
            queued[0]
        );
        assert!(queued[1].contains("between"), "{}", queued[1]);
        assert!(queued[2].contains("GET /b 404"), "{}", queued[2]);
    }

    #[test]
    fn queued_json_entries_read_like_plain_events_in_order() {
        let (queued, direct) = queued_and_direct(LogFormat::Json);
        let parse = |text: &str| -> Vec<serde_json::Value> {
            text.lines()
                .map(|line| serde_json::from_str(line).expect("each line is JSON"))
                .collect()
        };
        let (mut queued, mut direct) = (parse(&queued), parse(&direct));
        assert_eq!(queued.len(), 3);
        assert_eq!(queued[0]["timestamp"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(queued[0]["target"], ACCESS_TARGET);
        assert_eq!(queued[0]["path"], "/a?x=1");
        assert_eq!(queued[0]["duration_ms"], 1.5);
        assert_eq!(queued[0]["worker"], 1);
        assert_eq!(queued[2]["message"], "GET /b 404");
        for line in queued.iter_mut().chain(direct.iter_mut()) {
            line.as_object_mut().expect("an object").remove("timestamp");
        }
        assert_eq!(queued, direct);
    }

    #[test]
    fn a_filter_without_the_access_target_drops_entries_before_the_queue() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sauna.log");
        let args = file_args(&path, LogFormat::Text, Some("warn"));
        let (_subscriber, handle) = build(&args, None, false).expect("build");
        handle
            .writer
            .clone()
            .expect("a writer")
            .enqueue(record("/", 200));
        handle.flush();
        assert_eq!(read(&path), "");
    }

    #[test]
    fn without_a_file_reopen_does_nothing() {
        LogHandle::default().reopen().expect("no-op");
    }
}
