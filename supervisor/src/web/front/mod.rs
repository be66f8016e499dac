//! The HTTP/1.1 front of the web pool: serving the listening sockets (TCP and Unix, one socket
//! per `[web].listen` address, bound by `listeners` and owned by the supervisor so that a worker
//! restart never resets a queued connection), one hyper connection task per client, and the
//! handling of one request from accept to response: body buffering (413), environ, dispatch (503
//! with `Retry-After` when the queue is full or too slow), the exchange with the worker (504 on
//! timeout, 502 when the worker dies), the access log and the request metrics. No HTTP is parsed
//! in Python.
//!
//! A reload changes the front in place: the settings are swapped for requests that arrive from
//! then on, and listening sockets are added or closed one by one, the others untouched (their
//! queued connections are never reset). The reload's warm-up request (`warm_up`) is built here too,
//! so it reaches the canary exactly as a client's request would.
//!
//! An upgrade (see `upgrade`) hands the listening sockets to a new supervisor process: the
//! successor adopts them (`listeners::adopt`) instead of binding, both processes accept from the
//! same sockets while the successor starts, and then [`FrontHandle::hand_over`] stops this front
//! accepting, answers each further request on an open connection with `Connection: close` (so
//! clients reconnect to the successor between requests instead of racing an idle close), and
//! keeps the Unix socket files, which the successor owns from then on.
//!
//! It does not start or stop workers (the pool does) nor choose them (the dispatcher does). This
//! module holds the front's settings and shared state ([`Front`]); the work is split by job:
//! - `accept`: the accept loops, one hyper connection task per client, the running front's
//!   handle (add/remove sockets, hand-over, shutdown);
//! - `respond`: one request from its head to the response (refusals, body, frame, dispatch,
//!   the worker's answer);
//! - `warm_up`: the reload's warm-up request through the canary;
//! - `body`, `environ`, `exchange`: the request body, the WSGI environ, the frame exchange with
//!   a worker slot;
//! - `framing`: the read-side check of chunk size lines that hyper is too lenient about.

mod accept;
pub mod body;
pub mod environ;
pub mod exchange;
pub mod framing;
mod respond;
mod warm_up;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::web::dispatch::Dispatcher;
pub use accept::{FrontHandle, serve};
use environ::EnvironConfig;
pub use warm_up::{WarmUpAnswer, warm_up};

/// Settings of the front, from `[web]`.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// 413 beyond this many body bytes; 0 = no limit.
    pub max_body: u64,
    /// Bodies above this are buffered in a temporary file.
    pub body_buffer: u64,
    /// 431 when a request head (request line and header fields) grows past this many bytes.
    pub max_header_size: usize,
    /// Per-request deadline once a worker has it.
    pub timeout: Duration,
    /// `Retry-After` seconds sent with 503.
    pub retry_after: u64,
    /// Write access log lines.
    pub access_log: bool,
    /// Environ settings.
    pub environ: EnvironConfig,
}

/// Everything a request handler needs.
pub struct Front {
    /// Settings; a reload swaps them, a request keeps the ones it started with.
    config: RwLock<Arc<FrontConfig>>,
    /// Where requests get their worker slot.
    pub dispatcher: Arc<Dispatcher>,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Set by [`FrontHandle::hand_over`]: every response from then on closes its connection.
    draining: AtomicBool,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("config", &self.config())
            .finish_non_exhaustive()
    }
}

impl Front {
    /// A front with `config`.
    pub fn new(config: FrontConfig, dispatcher: Arc<Dispatcher>, metrics: Arc<Metrics>) -> Front {
        Front {
            config: RwLock::new(Arc::new(config)),
            dispatcher,
            metrics,
            draining: AtomicBool::new(false),
        }
    }

    /// The settings new requests use.
    pub fn config(&self) -> Arc<FrontConfig> {
        // The lock only guards swapping one Arc for another, which cannot be left half-done.
        Arc::clone(
            &self
                .config
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the settings for requests that arrive from now on (a reload).
    pub fn set_config(&self, config: FrontConfig) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
    }
}
