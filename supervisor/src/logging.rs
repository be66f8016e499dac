//! Where the supervisor's own log lines go and what they look like: `tracing` events written as
//! readable text (colours only when stderr is a terminal) or as one JSON object per line
//! (`--log-format json`, for journald and log collectors), filtered by `RUST_LOG`, else
//! `--log-level`, else `info`, and written to stderr or appended to `--log-file`.
//!
//! A log file is reopened by [`LogHandle::reopen`] (the main loop calls it on `SIGUSR1`): after
//! logrotate has renamed the file, lines go on reaching the renamed file until the reopen, and
//! the new file at the configured path from then on, with nothing lost in between.
//!
//! This module does not decide what is logged. Programs' output is turned into events by the
//! module that captures it; secrets (broker passwords, `[app].env` values) must never be passed
//! to an event in the first place, since no filter here could recognise them.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use anyhow::Context;
use tracing::Subscriber;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
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

/// Permissions of a log file this module creates: the service's user and group may read it.
const LOG_FILE_MODE: u32 = 0o640;

/// Reopens the log file; cheap to clone. Without `--log-file` reopening does nothing.
#[derive(Debug, Clone, Default)]
pub struct LogHandle {
    file: Option<Arc<LogFile>>,
}

impl LogHandle {
    /// Opens `--log-file` again by name and sends every later line there. On failure the old file
    /// keeps receiving lines and the error names the path.
    pub fn reopen(&self) -> io::Result<()> {
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
    Ok(handle)
}

/// The subscriber for `args`, given `$RUST_LOG` and whether stderr is a terminal.
fn build(
    args: &LogOptions,
    rust_log: Option<&str>,
    stderr_is_terminal: bool,
) -> anyhow::Result<(impl Subscriber + Send + Sync + 'static, LogHandle)> {
    let filter = filter(args.log_level.as_deref(), rust_log)?;
    let (writer, handle, ansi) = match &args.log_file {
        Some(path) => {
            let file = Arc::new(LogFile::open(path)?);
            let handle = LogHandle {
                file: Some(Arc::clone(&file)),
            };
            (BoxMakeWriter::new(FileWriter(file)), handle, false)
        }
        None => (
            BoxMakeWriter::new(io::stderr),
            LogHandle::default(),
            stderr_is_terminal,
        ),
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
    /// Writers hold the read side while writing one event; a reopen takes the write side only to
    /// swap the handle, so no event is split between two files.
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

/// Hands the current log file to the formatter, one event at a time.
struct FileWriter(Arc<LogFile>);

impl<'a> MakeWriter<'a> for FileWriter {
    type Writer = FileGuard<'a>;

    fn make_writer(&'a self) -> FileGuard<'a> {
        FileGuard(self.0.file.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The log file, held for the duration of one event.
struct FileGuard<'a>(RwLockReadGuard<'a, File>);

impl Write for FileGuard<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // `&File` is `Write`: appends from several threads need no exclusive access, and
        // O_APPEND makes each write land at the end even if logrotate's copytruncate was used.
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
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

    #[test]
    fn without_a_file_reopen_does_nothing() {
        LogHandle::default().reopen().expect("no-op");
    }
}
