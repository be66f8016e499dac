//! The central dispatch of the web pool: which idle request slot serves the next request, and the
//! one bounded queue where requests wait when none is idle. It owns the idle slot channels, the
//! per-worker request counts and the waiting requests; it does not own processes (the pool does)
//! nor HTTP (the front does).
//!
//! Requests never wait behind a busy worker while another is idle: a slot is taken only when it is
//! idle, the least-loaded worker is preferred (so 2 workers × 8 threads spread over both GILs), and
//! a returning slot goes straight to the oldest waiting request.
//!
//! Workers of the served generation and older ones still routable take requests: during a rolling
//! reload old and new workers serve side by side, each old one retired as its replacement is
//! admitted, so capacity never drops. A worker of a *later* generation (the reload's canary) gets
//! no request until its generation is served, except the warm-up request sent to it by name
//! (`acquire_from`).
//!
//! This is a lock-protected queue, like `tokio::sync::Semaphore`, not actor state: the hot path
//! takes the lock twice per request (take a slot, give it back) for a few hundred nanoseconds and
//! never across an `.await`, where a dispatch actor would add two task wake-ups per request. Only
//! the pool changes the set of workers; everything it needs to act on (a worker reached
//! `max_requests`, timed out, broke its channel) comes back to it as a `Notice` over a channel.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::web::worker::WorkerId;
use crate::web::worker::frame::Channel;

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
}

impl Rejected {
    /// The `reason` label of `sauna_http_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Rejected::QueueFull => "queue_full",
            Rejected::QueueTimeout => "queue_timeout",
            Rejected::ShuttingDown => "shutting_down",
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

/// One worker as the dispatcher sees it.
#[derive(Debug)]
struct Route {
    id: WorkerId,
    slot: usize,
    generation: u64,
    free: Vec<Channel>,
    busy: usize,
    served: u64,
    limit: Option<u64>,
    routable: bool,
    recycle_noted: bool,
}

#[derive(Default)]
struct State {
    routes: Vec<Route>,
    waiters: VecDeque<oneshot::Sender<Lease>>,
    generation: u64,
    closed: bool,
    queue_size: usize,
    queue_timeout: Duration,
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

/// The exclusive use of one request slot of one worker, from dispatch until the response ends.
/// Give it back with `release`; dropped unused it returns idle, dropped after use it counts as
/// broken (the exchange was abandoned half-way).
pub struct Lease {
    channel: Option<Channel>,
    worker: WorkerId,
    slot: usize,
    used: bool,
    dispatcher: Arc<Dispatcher>,
}

impl Lease {
    /// The slot's channel; marks the lease used.
    pub fn channel(&mut self) -> Option<&mut Channel> {
        self.used = true;
        self.channel.as_mut()
    }

    /// The worker serving this request.
    pub fn worker(&self) -> WorkerId {
        self.worker
    }

    /// The worker's slot number (its metrics label).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Gives the slot back.
    pub fn release(mut self, outcome: Outcome) {
        let channel = self.channel.take();
        self.dispatcher.give_back(self.worker, channel, outcome);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            let outcome = if self.used {
                Outcome::Broken("a request was abandoned in the middle of its exchange".to_owned())
            } else {
                Outcome::Unused
            };
            self.dispatcher
                .give_back(self.worker, Some(channel), outcome);
        }
    }
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

    /// Takes an idle slot, waiting in the queue for one if every slot is busy.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, Rejected> {
        let (receiver, queue_timeout) = {
            let mut state = self.lock();
            if state.closed {
                return Err(Rejected::ShuttingDown);
            }
            if let Some(lease) = self.take_idle(&mut state) {
                return Ok(lease);
            }
            if state.waiters.len() >= state.queue_size {
                state.waiters.retain(|waiter| !waiter.is_closed());
                if state.waiters.len() >= state.queue_size {
                    return Err(Rejected::QueueFull);
                }
            }
            let (sender, receiver) = oneshot::channel();
            state.waiters.push_back(sender);
            (receiver, state.queue_timeout)
        };
        self.metrics.http_queue_depth.inc();
        let waited = tokio::time::timeout(queue_timeout, receiver).await;
        self.metrics.http_queue_depth.dec();
        match waited {
            Ok(Ok(lease)) => Ok(lease),
            Ok(Err(_closed)) => Err(Rejected::ShuttingDown),
            Err(_elapsed) => Err(Rejected::QueueTimeout),
        }
    }

    fn take_idle(self: &Arc<Self>, state: &mut State) -> Option<Lease> {
        let generation = state.generation;
        let route = state
            .routes
            .iter_mut()
            .filter(|route| {
                route.routable && route.generation <= generation && !route.free.is_empty()
            })
            .max_by_key(|route| (route.free.len(), std::cmp::Reverse(route.busy)))?;
        let channel = route.free.pop()?;
        route.busy += 1;
        self.metrics.http_in_flight.inc();
        Some(Lease {
            channel: Some(channel),
            worker: route.id,
            slot: route.slot,
            used: false,
            dispatcher: Arc::clone(self),
        })
    }

    /// Hands idle channels of `route_index` to waiting requests, oldest first.
    fn serve_waiters(self: &Arc<Self>, state: &mut State, route_index: usize) {
        while !state.waiters.is_empty() {
            let Some(route) = state.routes.get_mut(route_index) else {
                return;
            };
            let Some(channel) = route.free.pop() else {
                return;
            };
            route.busy += 1;
            self.metrics.http_in_flight.inc();
            let mut lease = Lease {
                channel: Some(channel),
                worker: route.id,
                slot: route.slot,
                used: false,
                dispatcher: Arc::clone(self),
            };
            loop {
                let Some(waiter) = state.waiters.pop_front() else {
                    // Nobody waits any more: put the channel back.
                    if let (Some(route), Some(channel)) =
                        (state.routes.get_mut(route_index), lease.channel.take())
                    {
                        route.busy -= 1;
                        self.metrics.http_in_flight.dec();
                        route.free.push(channel);
                    }
                    return;
                };
                match waiter.send(lease) {
                    Ok(()) => break,
                    Err(returned) => lease = returned,
                }
            }
        }
    }

    fn give_back(self: &Arc<Self>, worker: WorkerId, channel: Option<Channel>, outcome: Outcome) {
        let mut state = self.lock();
        self.metrics.http_in_flight.dec();
        let Some(index) = state.routes.iter().position(|route| route.id == worker) else {
            return; // removed meanwhile: the channel closes here
        };
        let route = &mut state.routes[index];
        route.busy = route.busy.saturating_sub(1);
        let notice = match outcome {
            Outcome::Done | Outcome::Unused => {
                if matches!(outcome, Outcome::Done) {
                    route.served += 1;
                }
                match channel {
                    Some(channel) if route.routable => route.free.push(channel),
                    _ => {}
                }
                match route.limit {
                    Some(limit) if route.served >= limit && !route.recycle_noted => {
                        route.recycle_noted = true;
                        Some(Notice::RecycleWanted(worker))
                    }
                    _ => None,
                }
            }
            Outcome::Gone => {
                route.routable = false;
                None
            }
            Outcome::TimedOut(context) => {
                route.routable = false;
                Some(Notice::TimedOut { worker, context })
            }
            Outcome::Broken(reason) => {
                route.routable = false;
                Some(Notice::Broken { worker, reason })
            }
        };
        if !state.routes[index].routable {
            state.routes[index].free.clear();
            if state.routes[index].busy == 0 {
                state.routes.remove(index);
            }
        } else {
            self.serve_waiters(&mut state, index);
        }
        drop(state);
        if let Some(notice) = notice {
            let _ = self.notices.send(notice);
        }
    }

    /// Adds a ready worker; its slots serve waiting requests at once unless its generation is
    /// later than the served one (a canary).
    pub fn add_worker(
        self: &Arc<Self>,
        worker: WorkerId,
        slot: usize,
        generation: u64,
        channels: Vec<Channel>,
        limit: Option<u64>,
    ) {
        let mut state = self.lock();
        state.routes.push(Route {
            id: worker,
            slot,
            generation,
            free: channels,
            busy: 0,
            served: 0,
            limit,
            routable: true,
            recycle_noted: false,
        });
        let index = state.routes.len() - 1;
        if generation <= state.generation {
            self.serve_waiters(&mut state, index);
        }
    }

    /// Stops routing to `worker` and closes its idle slots; slots in use close as their requests
    /// end. When the last one closes, the shim sees end-of-file on every slot and exits by itself.
    pub fn retire(&self, worker: WorkerId) {
        let mut state = self.lock();
        if let Some(index) = state.routes.iter().position(|route| route.id == worker) {
            let route = &mut state.routes[index];
            route.routable = false;
            route.free.clear();
            if route.busy == 0 {
                state.routes.remove(index);
            }
        }
    }

    /// Forgets `worker` at once (it died or is being killed).
    pub fn remove(&self, worker: WorkerId) {
        let mut state = self.lock();
        state.routes.retain(|route| route.id != worker);
    }

    /// Makes `generation` the latest one served: its workers and older ones still routable take
    /// requests, later ones do not.
    pub fn set_generation(self: &Arc<Self>, generation: u64) {
        let mut state = self.lock();
        state.generation = generation;
        for index in 0..state.routes.len() {
            if state.routes[index].generation <= generation {
                self.serve_waiters(&mut state, index);
            }
        }
    }

    /// Changes `queue_size` and `queue_timeout` (a reload); requests already waiting keep the
    /// timeout they started with.
    pub fn set_limits(&self, queue_size: usize, queue_timeout: Duration) {
        let mut state = self.lock();
        state.queue_size = queue_size;
        state.queue_timeout = queue_timeout;
    }

    /// An idle slot of `worker` whatever its generation, for a request that must reach that worker
    /// (the canary's warm-up); `None` when it has no idle slot.
    pub fn acquire_from(self: &Arc<Self>, worker: WorkerId) -> Option<Lease> {
        let mut state = self.lock();
        let route = state
            .routes
            .iter_mut()
            .find(|route| route.id == worker && route.routable)?;
        let channel = route.free.pop()?;
        route.busy += 1;
        self.metrics.http_in_flight.inc();
        Some(Lease {
            channel: Some(channel),
            worker: route.id,
            slot: route.slot,
            used: false,
            dispatcher: Arc::clone(self),
        })
    }

    /// Refuses new requests and wakes every waiting one with `ShuttingDown`.
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

    /// True while `worker` still has requests in progress or idle slots open.
    pub fn holds(&self, worker: WorkerId) -> bool {
        self.lock().routes.iter().any(|route| route.id == worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::runtime;

    fn channels(count: usize) -> (Vec<Channel>, Vec<tokio::net::UnixStream>) {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..count {
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            ours.push(Channel::new(a));
            theirs.push(b);
        }
        (ours, theirs)
    }

    fn dispatcher(queue_size: usize) -> (Arc<Dispatcher>, mpsc::UnboundedReceiver<Notice>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::new().unwrap());
        (
            Dispatcher::new(queue_size, Duration::from_millis(200), metrics, sender),
            receiver,
        )
    }

    #[test]
    fn requests_go_to_the_least_loaded_worker_of_the_served_generation() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (a, _keep_a) = channels(2);
            let (b, _keep_b) = channels(2);
            let (canary, _keep_canary) = channels(2);
            dispatcher.add_worker(1, 0, 1, a, None);
            dispatcher.add_worker(2, 1, 1, b, None);
            dispatcher.add_worker(3, 2, 2, canary, None);
            let first = dispatcher.acquire().await.unwrap();
            let second = dispatcher.acquire().await.unwrap();
            assert_ne!(
                first.worker(),
                second.worker(),
                "both GILs get work before either gets two"
            );
            assert!([first.worker(), second.worker()].iter().all(|id| *id != 3));
        });
    }

    #[test]
    fn a_returned_slot_goes_to_the_oldest_waiter_and_a_full_queue_refuses() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(1);
            dispatcher.set_generation(1);
            let (slots, _keep) = channels(1);
            dispatcher.add_worker(7, 0, 1, slots, None);
            let mut busy = dispatcher.acquire().await.unwrap();
            let waiting = tokio::spawn({
                let dispatcher = Arc::clone(&dispatcher);
                async move { dispatcher.acquire().await.map(|lease| lease.worker()) }
            });
            tokio::task::yield_now().await;
            assert_eq!(dispatcher.acquire().await.err(), Some(Rejected::QueueFull));
            let _ = busy.channel();
            busy.release(Outcome::Done);
            assert_eq!(waiting.await.unwrap(), Ok(7));
            assert_eq!(dispatcher.loads()[0].served, 1);
        });
    }

    #[test]
    fn waiting_too_long_is_a_queue_timeout() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            assert_eq!(
                dispatcher.acquire().await.err(),
                Some(Rejected::QueueTimeout)
            );
            dispatcher.close();
            assert_eq!(
                dispatcher.acquire().await.err(),
                Some(Rejected::ShuttingDown)
            );
        });
    }

    #[test]
    fn max_requests_asks_for_a_recycle_once_and_timeouts_stop_routing() {
        runtime().block_on(async {
            let (dispatcher, mut notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (slots, _keep) = channels(1);
            dispatcher.add_worker(5, 0, 1, slots, Some(2));
            for _ in 0..3 {
                let mut lease = dispatcher.acquire().await.unwrap();
                let _ = lease.channel();
                lease.release(Outcome::Done);
            }
            assert!(matches!(notices.try_recv(), Ok(Notice::RecycleWanted(5))));
            assert!(notices.try_recv().is_err(), "asked once");
            let mut lease = dispatcher.acquire().await.unwrap();
            let _ = lease.channel();
            lease.release(Outcome::TimedOut("GET /slow".to_owned()));
            assert!(matches!(
                notices.try_recv(),
                Ok(Notice::TimedOut { worker: 5, .. })
            ));
            assert!(!dispatcher.holds(5));
            assert_eq!(
                dispatcher.acquire().await.err(),
                Some(Rejected::QueueTimeout)
            );
        });
    }

    #[test]
    fn a_canary_gets_only_its_warm_up_until_its_generation_is_served_then_both_serve() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (old, _keep_old) = channels(1);
            let (canary, _keep_canary) = channels(1);
            dispatcher.add_worker(1, 0, 1, old, None);
            dispatcher.add_worker(2, 1, 2, canary, None);
            let first = dispatcher.acquire().await.unwrap();
            assert_eq!(first.worker(), 1);
            assert_eq!(
                dispatcher.acquire().await.err(),
                Some(Rejected::QueueTimeout),
                "the canary takes no ordinary request"
            );
            let warm_up = dispatcher.acquire_from(2).unwrap();
            assert_eq!(warm_up.worker(), 2);
            drop(warm_up);
            dispatcher.set_generation(2);
            let second = dispatcher.acquire().await.unwrap();
            assert_eq!(second.worker(), 2, "old and new serve side by side");
            drop(first);
            dispatcher.set_limits(0, Duration::from_millis(10));
            let _third = dispatcher.acquire().await.unwrap();
            assert_eq!(dispatcher.acquire().await.err(), Some(Rejected::QueueFull));
        });
    }

    #[test]
    fn retired_workers_close_idle_slots_and_finish_busy_ones() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (slots, _keep) = channels(2);
            dispatcher.add_worker(9, 0, 1, slots, None);
            let mut lease = dispatcher.acquire().await.unwrap();
            dispatcher.retire(9);
            assert!(dispatcher.holds(9), "its request is still running");
            let _ = lease.channel();
            lease.release(Outcome::Done);
            assert!(!dispatcher.holds(9));
        });
    }
}
