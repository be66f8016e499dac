//! The central dispatch of the web pool: which request slot serves the next request, which busy
//! slot gets it in advance, and the one bounded queue where requests wait otherwise. It owns the
//! slots' channels and offer mailboxes while they are not in a request's hands, the per-worker
//! request counts, the requests offered in advance and the waiting requests; it does not own
//! processes (the pool does) nor HTTP (the front does).
//!
//! Requests never wait behind a busy worker while another is idle: an idle slot is always taken
//! first, the least-loaded worker is preferred (so 2 workers × 8 threads spread over both GILs),
//! and a slot that becomes idle takes the oldest request still waiting — queued, or offered in
//! advance to a busy slot and not started there yet (taken back, see below).
//!
//! **Offers.** A request whose frame fits an offer region (`worker::offer`) is *offered*: copied
//! into the slot's region and announced on its eventfd, so the worker finds it without a
//! round-trip. To an idle slot that is how every fitting request goes (a bigger one is written to
//! the slot's socket by the exchange). When no slot is idle, the oldest fitting request becomes
//! a **pending offer** of a busy slot with room for one (up to `AHEAD_DEPTH` per slot): the worker
//! claims its pending offers in order as soon as it finishes its current request and runs them
//! back to back without sleeping, and when the current request's exchange gives the slot back,
//! the channel goes straight to the next pending request (its frame is already delivered). Of the
//! busy slots, the least-loaded worker's is chosen and, among its slots, the one with the fewest
//! offers queued, then the one whose request started last; a slot whose request has run longer
//! than `AHEAD_WINDOW` (likely a slow one) is chosen only when no other is open, and offers
//! waiting behind such a request are moved (taken back, offered again) to slots whose request is
//! recent as soon as one is open. A slot serving a request that came over its socket gets no
//! pending offer: the worker must read that request before any offer.
//!
//! A pending offer the worker has not claimed can be **taken back** (a successful read of the
//! same eventfd; the kernel makes exactly one side win): when a slot becomes idle with an older
//! request pending elsewhere, when its worker stops being routable (retired, timed out, broken,
//! died), when its request gives up (queue timeout, client gone), and when the request in
//! service was itself an offer that was never claimed when its deadline passed. A take-back
//! takes the slot's latest offer, so reaching an earlier one takes back those behind it too. A
//! request taken back was never started, so it is dispatched again (in line by age); one the
//! worker claimed completes there, or fails with the worker.
//!
//! Workers of the served generation and older ones still routable take requests: during a rolling
//! reload old and new workers serve side by side, each old one retired as its replacement is
//! admitted, so capacity never drops. A worker of a *later* generation (the reload's canary) gets
//! no request until its generation is served, except the warm-up request sent to it by name
//! (`acquire_from`).
//!
//! This is a lock-protected queue, like `tokio::sync::Semaphore`, not actor state: the hot path
//! takes the lock twice per request (take a slot, give it back) for a few hundred nanoseconds plus
//! an offer's copy and eventfd write, never across an `.await`, where a dispatch actor would add
//! two task wake-ups per request. Only the pool changes the set of workers; everything it needs
//! to act on (a worker reached `max_requests`, timed out, broke its channel) comes back to it as
//! a `Notice` over a channel.
//!
//! The work is split by job:
//! - `state`: what the lock protects — the waiting requests, each worker's route and its lanes
//!   (request slots) — and delivering a frame to a lane;
//! - `lease`: a request's hold on one slot until it is given back;
//! - `slots`: a slot going into service (idle, or straight to its pending offer) and back out,
//!   and a worker taken out of routing;
//! - `queue`: a request waiting in `acquire`, giving up, and `pump`, which matches waiting
//!   requests with slots;
//! - `offers`: offers ahead to busy slots (the `AHEAD_WINDOW` and `AHEAD_DEPTH` rules) and taking
//!   them back.

mod lease;
mod offers;
mod queue;
mod slots;
mod state;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::web::worker::{RequestSlot, WorkerId};

pub use lease::Lease;
use offers::AHEAD_WINDOW;
use queue::Waiting;
use state::{Lane, Route, State, Waiter};

/// What the dispatcher tells the pool.
#[derive(Debug)]
pub enum Notice {
    /// The worker served its `max_requests`; replace it when convenient.
    RecycleWanted(WorkerId),
    /// A request on this worker passed its deadline; `context` says which and for how long.
    TimedOut {
        /// The worker.
        worker: WorkerId,
        /// Method, path and age of the request.
        context: String,
    },
    /// The worker broke its protocol or a slot was lost; it must be replaced.
    Broken {
        /// The worker.
        worker: WorkerId,
        /// What happened.
        reason: String,
    },
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// `queue_size` requests are already waiting.
    #[error("the request queue is full")]
    QueueFull,
    /// It waited `queue_timeout` without a slot.
    #[error("no worker became free within the queue timeout")]
    QueueTimeout,
    /// The pool is stopping.
    #[error("the pool is shutting down")]
    ShuttingDown,
    /// It was offered in advance to a worker (pool slot number given) that claimed it and then
    /// went away before its exchange began.
    #[error("the worker died while serving the request")]
    WorkerGone(usize),
}

impl Rejected {
    /// The `reason` label of `sauna_http_rejected_total`; `None` when the request reached a
    /// worker (it is answered as a failed request, not a refusal).
    pub fn label(self) -> Option<&'static str> {
        match self {
            Rejected::QueueFull => Some("queue_full"),
            Rejected::QueueTimeout => Some("queue_timeout"),
            Rejected::ShuttingDown => Some("shutting_down"),
            Rejected::WorkerGone(_) => None,
        }
    }
}

/// How a request left its slot.
#[derive(Debug)]
pub enum Outcome {
    /// The exchange completed; the slot can serve again.
    Done,
    /// The slot was never used (the request gave up first); it is idle again.
    Unused,
    /// The worker process went away (its channel closed); the pool learns it from the exit.
    Gone,
    /// The request passed its deadline; the worker must be killed.
    TimedOut(String),
    /// The channel is in an unknown state; the worker must be replaced.
    Broken(String),
}

/// Per-worker counters for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLoad {
    /// The worker.
    pub id: WorkerId,
    /// Requests it completed.
    pub served: u64,
    /// Requests it is serving now.
    pub busy: usize,
}

/// The dispatcher shared by the front (take/return slots) and the pool (add/retire workers).
pub struct Dispatcher {
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    notices: mpsc::UnboundedSender<Notice>,
}

impl Dispatcher {
    /// A dispatcher with no workers yet.
    pub fn new(
        queue_size: usize,
        queue_timeout: Duration,
        metrics: Arc<Metrics>,
        notices: mpsc::UnboundedSender<Notice>,
    ) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            state: Mutex::new(State {
                queue_size,
                queue_timeout,
                ahead_window: AHEAD_WINDOW,
                ..State::default()
            }),
            metrics,
            notices,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-updated in a way that
        // matters more than stopping the whole front would, so a poisoned lock is used as is.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Releases the lock, then drops the orphaned leases and sends the notices gathered under it.
    fn unlock(&self, mut state: MutexGuard<'_, State>) {
        let orphans = std::mem::take(&mut state.orphans);
        let notices = std::mem::take(&mut state.notices);
        drop(state);
        drop(orphans);
        for notice in notices {
            let _ = self.notices.send(notice);
        }
    }

    /// Dispatches `frame` (a complete `Request` frame): to an idle slot at once, else offered in
    /// advance to a busy slot or queued until a slot can take it. `timeout` is the request's
    /// deadline once in service (used to drain it if its client goes away meanwhile).
    pub async fn acquire(
        self: &Arc<Self>,
        frame: BytesMut,
        timeout: Duration,
    ) -> Result<Lease, Rejected> {
        let (receiver, ticket, queue_timeout) = {
            let mut state = self.lock();
            if state.closed {
                return Err(Rejected::ShuttingDown);
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let (sender, receiver) = oneshot::channel();
            let waiter = Waiter {
                ticket,
                sender,
                frame,
                timeout,
                sequence: 0,
                claimed: false,
            };
            let waiter = match self.take_idle(&mut state, waiter) {
                Ok((lease, _sender)) => {
                    self.unlock(state);
                    return Ok(lease);
                }
                Err(waiter) => waiter,
            };
            // `queue_size` bounds every request waiting for a worker: queued or offered ahead.
            if state.waiting() >= state.queue_size {
                state.waiters.retain(|waiter| !waiter.sender.is_closed());
                if state.waiting() >= state.queue_size {
                    return Err(Rejected::QueueFull);
                }
            }
            if let Err(waiter) = self.offer_ahead(&mut state, waiter) {
                state.waiters.push_back(waiter);
            }
            (receiver, ticket, state.queue_timeout)
        };
        self.metrics.http_queue_depth.inc();
        let mut waiting = Waiting {
            dispatcher: Arc::clone(self),
            receiver: Some(receiver),
            ticket,
        };
        let result = waiting.wait(queue_timeout).await;
        self.metrics.http_queue_depth.dec();
        result
    }

    /// Adds a ready worker; its slots serve waiting requests at once unless its generation is
    /// later than the served one (a canary).
    pub fn add_worker(
        self: &Arc<Self>,
        worker: WorkerId,
        slot: usize,
        generation: u64,
        slots: Vec<RequestSlot>,
        limit: Option<u64>,
    ) {
        let mut state = self.lock();
        let lanes = slots
            .into_iter()
            .map(|request_slot| Lane {
                mailbox: request_slot.mailbox,
                channel: Some(request_slot.channel),
                service: None,
                pending: VecDeque::new(),
                sequence: 0,
            })
            .collect();
        state.routes.push(Route {
            id: worker,
            slot,
            generation,
            lanes,
            busy: 0,
            served: 0,
            limit,
            routable: true,
            recycle_noted: false,
        });
        self.pump(&mut state);
        self.unlock(state);
    }

    /// Stops routing to `worker`: closes its idle slots, takes back the requests offered to it
    /// that it has not started (they are dispatched again); slots in use close as their requests
    /// end. When the last one closes, the shim sees end-of-file on every slot and exits by itself.
    pub fn retire(self: &Arc<Self>, worker: WorkerId) {
        let mut state = self.lock();
        if let Some(index) = state.routes.iter().position(|route| route.id == worker) {
            self.unroute(&mut state, index, false);
            self.pump(&mut state);
        }
        self.unlock(state);
    }

    /// Forgets `worker` at once (it died or is being killed): the requests offered to it and not
    /// started are dispatched again, the ones it claimed fail.
    pub fn remove(self: &Arc<Self>, worker: WorkerId) {
        let mut state = self.lock();
        if let Some(index) = state.routes.iter().position(|route| route.id == worker) {
            self.unroute(&mut state, index, true);
            state.routes.retain(|route| route.id != worker);
            self.pump(&mut state);
        }
        self.unlock(state);
    }

    /// Makes `generation` the latest one served: its workers and older ones still routable take
    /// requests, later ones do not.
    pub fn set_generation(self: &Arc<Self>, generation: u64) {
        let mut state = self.lock();
        state.generation = generation;
        self.pump(&mut state);
        self.unlock(state);
    }

    /// Changes `queue_size` and `queue_timeout` (a reload); requests already waiting keep the
    /// timeout they started with.
    pub fn set_limits(&self, queue_size: usize, queue_timeout: Duration) {
        let mut state = self.lock();
        state.queue_size = queue_size;
        state.queue_timeout = queue_timeout;
    }

    /// An idle slot of `worker` whatever its generation, for a request that must reach that worker
    /// (the canary's warm-up, sent with [`Lease::send`]); `None` when it has no idle slot.
    pub fn acquire_from(self: &Arc<Self>, worker: WorkerId) -> Option<Lease> {
        let mut state = self.lock();
        let route = state
            .routes
            .iter_mut()
            .find(|route| route.id == worker && route.routable)?;
        let lane = route.lanes.iter().position(|lane| lane.channel.is_some())?;
        Some(self.start(route, lane, Duration::ZERO))
    }

    /// Refuses new requests and wakes every queued one with `ShuttingDown`; requests already
    /// offered to a worker are served.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.waiters.clear();
    }

    /// Requests served and in progress, per worker still known to the dispatcher.
    pub fn loads(&self) -> Vec<WorkerLoad> {
        self.lock()
            .routes
            .iter()
            .map(|route| WorkerLoad {
                id: route.id,
                served: route.served,
                busy: route.busy,
            })
            .collect()
    }

    /// True while `worker` still has requests in progress or offered, or idle slots open.
    pub fn holds(&self, worker: WorkerId) -> bool {
        self.lock().routes.iter().any(|route| route.id == worker)
    }
}
