//! Helpers shared by the unit tests of several modules (compiled for tests only): a runtime for
//! tests that drive async code step by step, and RFC 3339 instants for the scheduling tests.

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
