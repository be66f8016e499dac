//! Helpers shared by the unit tests of several modules (compiled for tests only): a runtime for
//! tests that drive async code step by step, RFC 3339 instants for the scheduling tests, and a
//! capture of the log lines a test provokes.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// A single-threaded runtime with timers and I/O, like the one the supervisor runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The instant an RFC 3339 text names.
pub fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

/// Collects the formatted log lines of one test: install [`Captured::subscriber`] with
/// `tracing::subscriber::set_default` and read them with [`Captured::text`].
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// A subscriber writing every event (debug and up) here, without colours.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        let logs = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish()
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
