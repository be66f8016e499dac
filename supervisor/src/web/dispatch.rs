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
//! the **pending offer** of a busy slot that has none (at most one per slot): the worker claims
//! it as soon as it finishes its current request and runs it back to back without sleeping, and
//! when the current request's exchange gives the slot back, the channel goes straight to the
//! pending request (its frame is already delivered). Of the busy slots, the least-loaded worker's
//! is chosen and, among its slots, the one whose request started last; a slot whose request has
//! run longer than `AHEAD_WINDOW` (likely a slow one) is chosen only when no other is open, and
//! an offer waiting behind such a request is moved (taken back, offered again) to a slot whose
//! request is recent as soon as one is open. A slot serving a request that came over its socket
//! gets no pending offer: the worker must read that request before any offer.
//!
//! A pending offer the worker has not claimed can be **taken back** (a successful read of the
//! same eventfd; the kernel makes exactly one side win): when a slot becomes idle with an older
//! request pending elsewhere, when its worker stops being routable (retired, timed out, broken,
//! died), when its request gives up (queue timeout, client gone), and when the request in
//! service was itself an offer that was never claimed when its deadline passed. A request taken
//! back was never started, so it is dispatched again (first in line); one the worker claimed
//! completes there, or fails with the worker.
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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::web::worker::frame::{self, Channel};
use crate::web::worker::offer::Mailbox;
use crate::web::worker::{RequestSlot, WorkerId};

/// How long a slot's request may have run and still get the next request offered ahead to it.
/// Pipelining saves a wake-up (microseconds) per request, which only matters for short
/// requests; one still running after this is likely slow, and a request waiting behind it is
/// taken back, to be offered to the next slot that moves on.
const AHEAD_WINDOW: Duration = Duration::from_millis(2);

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

/// A request waiting for a slot: in the queue, or offered in advance to a busy slot.
#[derive(Debug)]
struct Waiter {
    ticket: u64,
    sender: oneshot::Sender<Result<Lease, Rejected>>,
    /// The complete `Request` frame (kept while offered, to dispatch it again if taken back).
    frame: BytesMut,
    /// The request's deadline once in service, for draining it if it is abandoned.
    timeout: Duration,
    /// Its number on the slot it is offered to.
    sequence: u16,
    /// Offered in advance and claimed by the worker: it can no longer be taken back.
    claimed: bool,
}

/// The request a slot is serving.
#[derive(Debug)]
struct Service {
    since: Instant,
    /// It came as an offer (not over the socket), so a pending offer may follow it.
    offered: bool,
}

/// One request slot (one worker thread) as the dispatcher sees it.
#[derive(Debug)]
struct Lane {
    mailbox: Mailbox,
    /// The channel while the slot is idle; a lease holds it while a request is in service.
    channel: Option<Channel>,
    service: Option<Service>,
    pending: Option<Waiter>,
    /// Number of the last request sent to the slot (wrapping), carried in its frame and in an
    /// `Abort` for it, so that the worker can tell a late `Abort` from one for its request.
    sequence: u16,
}

impl Lane {
    fn next_sequence(&mut self) -> u16 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }
}

/// One worker as the dispatcher sees it.
#[derive(Debug)]
struct Route {
    id: WorkerId,
    slot: usize,
    generation: u64,
    lanes: Vec<Lane>,
    /// Requests in service.
    busy: usize,
    served: u64,
    limit: Option<u64>,
    routable: bool,
    recycle_noted: bool,
}

impl Route {
    fn idle_lanes(&self) -> usize {
        self.lanes
            .iter()
            .filter(|lane| lane.channel.is_some())
            .count()
    }

    fn pending(&self) -> usize {
        self.lanes
            .iter()
            .filter(|lane| lane.pending.is_some())
            .count()
    }

    /// Nothing in service, nothing offered: the route can be forgotten once unroutable.
    fn is_empty(&self) -> bool {
        self.busy == 0 && self.pending() == 0
    }
}

#[derive(Default)]
struct State {
    routes: Vec<Route>,
    waiters: VecDeque<Waiter>,
    generation: u64,
    closed: bool,
    queue_size: usize,
    queue_timeout: Duration,
    /// `AHEAD_WINDOW`, shorter or longer in tests.
    ahead_window: Duration,
    next_ticket: u64,
    /// Leases whose request went away while they were handed over; dropped once the lock is
    /// released (dropping one may take the lock).
    orphans: Vec<Lease>,
    notices: Vec<Notice>,
}

impl State {
    fn serves(&self, route: &Route) -> bool {
        route.routable && route.generation <= self.generation
    }

    /// Requests waiting for a worker: queued, or offered ahead to a busy slot.
    fn waiting(&self) -> usize {
        self.waiters.len() + self.routes.iter().map(Route::pending).sum::<usize>()
    }
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
/// Give it back with `release`; dropped unused it returns idle (an offered request is taken back
/// or, when the worker already started it, drained), dropped after use it counts as broken (the
/// exchange was abandoned half-way).
pub struct Lease {
    channel: Option<Channel>,
    worker: WorkerId,
    slot: usize,
    lane: usize,
    sequence: u16,
    /// A frame the exchange must write to the socket (it did not fit an offer region).
    request: Option<BytesMut>,
    /// The request was offered; whether the worker claimed it is unknown until it answers.
    offered: bool,
    timeout: Duration,
    used: bool,
    dispatcher: Arc<Dispatcher>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("worker", &self.worker)
            .field("lane", &self.lane)
            .field("sequence", &self.sequence)
            .field("offered", &self.offered)
            .finish_non_exhaustive()
    }
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

    /// The request's number on its slot, for an `Abort`.
    pub fn sequence(&self) -> u16 {
        self.sequence
    }

    /// The request frame still to be written to the slot's socket, if it was not offered.
    pub fn take_request(&mut self) -> Option<BytesMut> {
        self.request.take()
    }

    /// Sets the request of a lease taken by name (`acquire_from`): offered when it fits, else
    /// left for the exchange to write to the socket.
    pub fn send(&mut self, frame: BytesMut, timeout: Duration) {
        self.timeout = timeout;
        let dispatcher = Arc::clone(&self.dispatcher);
        let mut state = dispatcher.lock();
        let lane = state
            .routes
            .iter_mut()
            .find(|route| route.id == self.worker)
            .and_then(|route| route.lanes.get_mut(self.lane));
        match lane {
            Some(lane) => {
                let (frame, sequence) = deliver(lane, frame);
                self.request = frame;
                self.offered = self.request.is_none();
                self.sequence = sequence;
                if let Some(service) = &mut lane.service {
                    service.offered = self.offered;
                }
            }
            None => self.request = Some(frame),
        }
    }

    /// True when the request was offered and may still be unclaimed.
    pub fn was_offered(&self) -> bool {
        self.offered
    }

    /// Takes back an offered request the worker has not claimed: the slot is free again, the
    /// request never started and the lease is spent. False (the lease unchanged) when the worker
    /// has it.
    pub fn withdraw(&mut self) -> bool {
        if !self.offered || self.channel.is_none() {
            return false;
        }
        let channel = self.channel.take();
        match self.dispatcher.withdraw(self.worker, self.lane, channel) {
            Ok(()) => true,
            Err(channel) => {
                self.channel = channel;
                false
            }
        }
    }

    /// Gives the slot back.
    pub fn release(mut self, outcome: Outcome) {
        let channel = self.channel.take();
        self.dispatcher
            .give_back(self.worker, self.lane, channel, outcome);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        if self.used {
            let outcome =
                Outcome::Broken("a request was abandoned in the middle of its exchange".to_owned());
            self.dispatcher
                .give_back(self.worker, self.lane, Some(channel), outcome);
            return;
        }
        if !self.offered {
            self.dispatcher
                .give_back(self.worker, self.lane, Some(channel), Outcome::Unused);
            return;
        }
        // Offered and nobody will read the answer: take it back, or let it run and drain it.
        let dispatcher = Arc::clone(&self.dispatcher);
        if let Err(channel) = dispatcher.withdraw(self.worker, self.lane, Some(channel)) {
            let lease = Lease {
                channel,
                worker: self.worker,
                slot: self.slot,
                lane: self.lane,
                sequence: self.sequence,
                request: None,
                offered: false,
                timeout: self.timeout,
                used: false,
                dispatcher,
            };
            crate::web::front::exchange::drain(lease, self.timeout);
        }
    }
}

/// Sends `frame` to an idle or busy lane: offered when it fits (returns `None`), else returned
/// for the socket. Numbers it either way.
fn deliver(lane: &mut Lane, mut frame: BytesMut) -> (Option<BytesMut>, u16) {
    let sequence = lane.next_sequence();
    frame::set_sequence(&mut frame, sequence);
    if Mailbox::fits(frame.len()) {
        match lane.mailbox.offer(&frame) {
            Ok(()) => return (None, sequence),
            Err(error) => tracing::warn!("cannot offer a request, using the socket: {error}"),
        }
    }
    (Some(frame), sequence)
}

type Answer = Result<Lease, Rejected>;

/// Sends `answer` to a waiting request; a lease whose request went away meanwhile is kept to be
/// dropped once the lock is released (dropping it takes the lock).
fn answer(state: &mut State, sender: oneshot::Sender<Answer>, answer: Answer) {
    if let Err(Ok(lease)) = sender.send(answer) {
        state.orphans.push(lease);
    }
}

/// A request waiting in `acquire`: if it is given up (queue timeout, or its client went away and
/// the future is dropped) it leaves the queue, or its offer is taken back.
struct Waiting {
    dispatcher: Arc<Dispatcher>,
    receiver: Option<oneshot::Receiver<Answer>>,
    ticket: u64,
}

impl Waiting {
    async fn wait(&mut self, queue_timeout: Duration) -> Result<Lease, Rejected> {
        let Some(receiver) = self.receiver.as_mut() else {
            return Err(Rejected::ShuttingDown);
        };
        let answer = match tokio::time::timeout(queue_timeout, &mut *receiver).await {
            Ok(answer) => answer,
            Err(_elapsed) => {
                if self.dispatcher.give_up(self.ticket) {
                    self.receiver = None;
                    return Err(Rejected::QueueTimeout);
                }
                // The worker claimed it (or it was just handed a slot): its lease is coming.
                receiver.await
            }
        };
        self.receiver = None;
        answer.unwrap_or(Err(Rejected::ShuttingDown))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut receiver) = self.receiver.take() {
            // Gone from the queue or taken back: done. Otherwise its lease comes to a closed
            // receiver and is dropped as an orphan (taken back or drained then).
            self.dispatcher.give_up(self.ticket);
            receiver.close();
            if let Ok(Ok(lease)) = receiver.try_recv() {
                drop(lease);
            }
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

    /// Removes a request that gives up waiting: from the queue, or its offer taken back. False
    /// when it can no longer be withdrawn (the worker claimed it, or its lease is on the way).
    fn give_up(self: &Arc<Self>, ticket: u64) -> bool {
        let mut state = self.lock();
        if let Some(index) = state.waiters.iter().position(|w| w.ticket == ticket) {
            state.waiters.remove(index);
            self.unlock(state);
            return true;
        }
        let mut withdrawn = false;
        for route in &mut state.routes {
            for lane in &mut route.lanes {
                if lane.pending.as_ref().is_some_and(|w| w.ticket == ticket) {
                    withdrawn = self.take_back_pending(lane).is_some();
                }
            }
        }
        if withdrawn {
            self.pump(&mut state);
        }
        self.unlock(state);
        withdrawn
    }

    /// Starts `waiter` on the best idle slot of a serving worker (returning its lease and the
    /// sender to hand it over with), or gives it back.
    fn take_idle(
        self: &Arc<Self>,
        state: &mut State,
        waiter: Waiter,
    ) -> Result<(Lease, oneshot::Sender<Answer>), Waiter> {
        let generation = state.generation;
        let Some(route) = state
            .routes
            .iter_mut()
            .filter(|route| route.routable && route.generation <= generation)
            .filter(|route| route.idle_lanes() > 0)
            .max_by_key(|route| (route.idle_lanes(), std::cmp::Reverse(route.busy)))
        else {
            return Err(waiter);
        };
        let Some(lane) = route.lanes.iter().position(|lane| lane.channel.is_some()) else {
            return Err(waiter);
        };
        let Waiter {
            sender,
            frame,
            timeout,
            ..
        } = waiter;
        let mut lease = self.start(route, lane, timeout);
        let lane = &mut route.lanes[lane];
        let (request, sequence) = deliver(lane, frame);
        lease.offered = request.is_none();
        lease.request = request;
        lease.sequence = sequence;
        if let Some(service) = &mut lane.service {
            service.offered = lease.offered;
        }
        Ok((lease, sender))
    }

    /// Puts the idle `lane` of `route` in service; the request is sent by the caller.
    fn start(self: &Arc<Self>, route: &mut Route, lane_index: usize, timeout: Duration) -> Lease {
        let lane = &mut route.lanes[lane_index];
        lane.service = Some(Service {
            since: Instant::now(),
            offered: false,
        });
        let channel = lane.channel.take();
        route.busy += 1;
        self.metrics.http_in_flight.inc();
        Lease {
            channel,
            worker: route.id,
            slot: route.slot,
            lane: lane_index,
            sequence: lane.sequence,
            request: None,
            offered: false,
            timeout,
            used: false,
            dispatcher: Arc::clone(self),
        }
    }

    /// Makes `waiter` the pending offer of a busy slot without one, or gives it back.
    fn offer_ahead(&self, state: &mut State, mut waiter: Waiter) -> Result<(), Waiter> {
        if !Mailbox::fits(waiter.frame.len()) {
            return Err(waiter);
        }
        let generation = state.generation;
        let (now, window) = (Instant::now(), state.ahead_window);
        // A slot whose request is recent (not likely a slow one) first, then the least-loaded
        // worker, then the slot whose request started last.
        let Some((_, route, lane)) = state
            .routes
            .iter()
            .enumerate()
            .filter(|(_, route)| route.routable && route.generation <= generation)
            .flat_map(|(r, route)| {
                let load = route.busy + route.pending();
                route.lanes.iter().enumerate().filter_map(move |(l, lane)| {
                    let service = lane.service.as_ref().filter(|service| service.offered)?;
                    let stale = now.duration_since(service.since) >= window;
                    lane.pending.is_none().then_some((
                        (stale, load, std::cmp::Reverse(service.since)),
                        r,
                        l,
                    ))
                })
            })
            .min_by_key(|(key, _, _)| *key)
        else {
            return Err(waiter);
        };
        let lane = &mut state.routes[route].lanes[lane];
        let sequence = lane.next_sequence();
        frame::set_sequence(&mut waiter.frame, sequence);
        if let Err(error) = lane.mailbox.offer(&waiter.frame) {
            tracing::warn!("cannot offer a request in advance, queueing it: {error}");
            return Err(waiter);
        }
        waiter.sequence = sequence;
        lane.pending = Some(waiter);
        Ok(())
    }

    /// Takes back the pending offer of `lane` if the worker has not claimed it; `None` when
    /// there is none or it is claimed (then marked so).
    fn take_back_pending(&self, lane: &mut Lane) -> Option<Waiter> {
        let pending = lane.pending.as_mut()?;
        if pending.claimed {
            return None;
        }
        match lane.mailbox.take_back() {
            Ok(true) => {
                self.metrics.http_offers_taken_back_total.inc();
                lane.pending.take()
            }
            Ok(false) => {
                pending.claimed = true;
                None
            }
            Err(error) => {
                tracing::warn!("cannot take back an offered request: {error}");
                pending.claimed = true;
                None
            }
        }
    }

    /// Matches waiting requests with slots until nothing more can move: an idle slot takes the
    /// oldest request waiting (queued, or pending elsewhere and taken back), then busy slots
    /// without a pending offer get the oldest queued requests that fit a region.
    fn pump(self: &Arc<Self>, state: &mut State) {
        self.take_back_stale(state);
        loop {
            while state
                .waiters
                .front()
                .is_some_and(|waiter| waiter.sender.is_closed())
            {
                state.waiters.pop_front();
            }
            let has_idle = state
                .routes
                .iter()
                .any(|route| state.serves(route) && route.idle_lanes() > 0);
            if has_idle {
                let queued = state.waiters.front().map(|waiter| waiter.ticket);
                let waiter = match self.oldest_pending(state, queued) {
                    Some(waiter) => waiter,
                    None => match state.waiters.pop_front() {
                        Some(waiter) => waiter,
                        None => return,
                    },
                };
                match self.take_idle(state, waiter) {
                    Ok((lease, sender)) => answer(state, sender, Ok(lease)),
                    Err(waiter) => {
                        state.waiters.push_front(waiter);
                        return;
                    }
                }
                continue;
            }
            let Some(index) = state
                .waiters
                .iter()
                .position(|waiter| Mailbox::fits(waiter.frame.len()) && !waiter.sender.is_closed())
            else {
                return;
            };
            let Some(waiter) = state.waiters.remove(index) else {
                return;
            };
            if let Err(waiter) = self.offer_ahead(state, waiter) {
                state.waiters.insert(index, waiter);
                return;
            }
        }
    }

    /// Moves offers waiting behind a request that has run longer than `AHEAD_WINDOW` (likely a
    /// slow one) to slots whose request is recent, oldest first, as many as such slots are open:
    /// they are taken back here and offered again by `pump`.
    fn take_back_stale(&self, state: &mut State) {
        let (now, window, generation) = (Instant::now(), state.ahead_window, state.generation);
        let is_stale = |lane: &Lane| {
            lane.service
                .as_ref()
                .is_some_and(|service| now.duration_since(service.since) >= window)
        };
        let open = state
            .routes
            .iter()
            .filter(|route| route.routable && route.generation <= generation)
            .flat_map(|route| route.lanes.iter())
            .filter(|lane| {
                lane.pending.is_none()
                    && !is_stale(lane)
                    && lane.service.as_ref().is_some_and(|service| service.offered)
            })
            .count();
        if open == 0 {
            return;
        }
        let mut stale: Vec<(u64, usize, usize)> = state
            .routes
            .iter()
            .enumerate()
            .flat_map(|(r, route)| {
                route.lanes.iter().enumerate().filter_map(move |(l, lane)| {
                    let pending = lane.pending.as_ref().filter(|pending| !pending.claimed)?;
                    is_stale(lane).then_some((pending.ticket, r, l))
                })
            })
            .collect();
        stale.sort_unstable();
        let mut moved = Vec::new();
        for (_, route, lane) in stale {
            if moved.len() == open {
                break;
            }
            moved.extend(self.take_back_pending(&mut state.routes[route].lanes[lane]));
        }
        Dispatcher::requeue(state, moved);
    }

    /// The oldest unclaimed pending offer older than the ticket `than`, taken back from its slot.
    fn oldest_pending(&self, state: &mut State, than: Option<u64>) -> Option<Waiter> {
        loop {
            let (_, route, lane) = state
                .routes
                .iter()
                .enumerate()
                .flat_map(|(r, route)| {
                    route.lanes.iter().enumerate().filter_map(move |(l, lane)| {
                        let pending = lane.pending.as_ref()?;
                        (!pending.claimed).then_some((pending.ticket, r, l))
                    })
                })
                .filter(|(ticket, _, _)| than.is_none_or(|than| *ticket < than))
                .min()?;
            let lane = &mut state.routes[route].lanes[lane];
            if let Some(waiter) = self.take_back_pending(lane) {
                return Some(waiter);
            }
        }
    }

    /// Puts requests taken back from a slot in line again, by age.
    fn requeue(state: &mut State, waiters: Vec<Waiter>) {
        for waiter in waiters {
            let at = state
                .waiters
                .iter()
                .position(|queued| queued.ticket > waiter.ticket)
                .unwrap_or(state.waiters.len());
            state.waiters.insert(at, waiter);
        }
    }

    /// Stops routing to the route at `index`: closes its idle slots and takes back the offers it
    /// has not claimed, to dispatch them again. With `dead` (the worker died or is being
    /// killed) the offers it claimed fail. Forgets the route when nothing of it is left.
    fn unroute(&self, state: &mut State, index: usize, dead: bool) {
        let route = &mut state.routes[index];
        route.routable = false;
        let slot = route.slot;
        let mut again = Vec::new();
        let mut failed = Vec::new();
        for lane in &mut route.lanes {
            lane.channel = None;
            if let Some(waiter) = self.take_back_pending(lane) {
                again.push(waiter);
            } else if dead {
                failed.extend(lane.pending.take());
            }
        }
        if route.is_empty() {
            state.routes.remove(index);
        }
        Dispatcher::requeue(state, again);
        for waiter in failed {
            answer(state, waiter.sender, Err(Rejected::WorkerGone(slot)));
        }
    }

    fn give_back(
        self: &Arc<Self>,
        worker: WorkerId,
        lane_index: usize,
        channel: Option<Channel>,
        outcome: Outcome,
    ) {
        let mut state = self.lock();
        self.metrics.http_in_flight.dec();
        let Some(index) = state.routes.iter().position(|route| route.id == worker) else {
            return; // removed meanwhile: the channel closes here
        };
        let route = &mut state.routes[index];
        route.busy = route.busy.saturating_sub(1);
        let mut notice = None;
        let dead = match outcome {
            Outcome::Done | Outcome::Unused => {
                if matches!(outcome, Outcome::Done) {
                    route.served += 1;
                }
                if let Some(limit) = route.limit {
                    if route.served >= limit && !route.recycle_noted {
                        route.recycle_noted = true;
                        notice = Some(Notice::RecycleWanted(worker));
                    }
                }
                false
            }
            Outcome::Gone => true,
            Outcome::TimedOut(context) => {
                notice = Some(Notice::TimedOut { worker, context });
                true
            }
            Outcome::Broken(reason) => {
                notice = Some(Notice::Broken { worker, reason });
                true
            }
        };
        let mut handed = None;
        if let Some(lane) = route.lanes.get_mut(lane_index) {
            lane.service = None;
            if !dead {
                match lane.pending.take() {
                    // The slot goes straight to the request offered in advance: its frame is
                    // already with the worker.
                    Some(pending) => {
                        let lease = self.resume(route, lane_index, channel, &pending);
                        handed = Some((pending.sender, lease));
                    }
                    None if route.routable => lane.channel = channel,
                    None => {}
                }
            }
        }
        state.notices.extend(notice);
        if let Some((sender, lease)) = handed {
            answer(&mut state, sender, Ok(lease));
        }
        if dead {
            self.unroute(&mut state, index, true);
        } else if !state.routes[index].routable && state.routes[index].is_empty() {
            state.routes.remove(index);
        }
        self.pump(&mut state);
        self.unlock(state);
    }

    /// Puts the pending request of the lane in service; the worker already has its frame.
    fn resume(
        self: &Arc<Self>,
        route: &mut Route,
        lane_index: usize,
        channel: Option<Channel>,
        pending: &Waiter,
    ) -> Lease {
        if let Some(lane) = route.lanes.get_mut(lane_index) {
            lane.service = Some(Service {
                since: Instant::now(),
                offered: true,
            });
        }
        route.busy += 1;
        self.metrics.http_in_flight.inc();
        Lease {
            channel,
            worker: route.id,
            slot: route.slot,
            lane: lane_index,
            sequence: pending.sequence,
            request: None,
            offered: true,
            timeout: pending.timeout,
            used: false,
            dispatcher: Arc::clone(self),
        }
    }

    /// Takes back the request in service on a lane, which was offered: succeeds only if the
    /// worker has not claimed it, and then the lane is free again. A pending offer behind it is
    /// the latest offer, so it is taken back first (and dispatched again).
    fn withdraw(
        self: &Arc<Self>,
        worker: WorkerId,
        lane_index: usize,
        mut channel: Option<Channel>,
    ) -> Result<(), Option<Channel>> {
        let mut state = self.lock();
        let Some(index) = state.routes.iter().position(|route| route.id == worker) else {
            return Err(channel);
        };
        let route = &mut state.routes[index];
        let Some(lane) = route.lanes.get_mut(lane_index) else {
            return Err(channel);
        };
        let mut again = Vec::new();
        if lane.pending.is_some() {
            match self.take_back_pending(lane) {
                Some(waiter) => again.push(waiter),
                // The worker claimed the later offer, so it claimed this one too.
                None => return Err(channel),
            }
        }
        let taken = match lane.mailbox.take_back() {
            Ok(taken) => taken,
            Err(error) => {
                tracing::warn!("cannot take back an offered request: {error}");
                false
            }
        };
        if taken {
            self.metrics.http_offers_taken_back_total.inc();
            self.metrics.http_in_flight.dec();
            lane.service = None;
            if route.routable {
                lane.channel = channel.take();
            }
            route.busy = route.busy.saturating_sub(1);
            if !route.routable && route.is_empty() {
                state.routes.remove(index);
            }
        }
        Dispatcher::requeue(&mut state, again);
        self.pump(&mut state);
        self.unlock(state);
        if taken { Ok(()) } else { Err(channel) }
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
                pending: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::runtime;
    use crate::web::worker::frame::RequestFrame;
    use crate::web::worker::offer::worker_side::Claimer;

    const TIMEOUT: Duration = Duration::from_secs(30);

    /// The slots of a worker and its side of them: sockets and the offer claimer.
    struct Theirs {
        sockets: Vec<tokio::net::UnixStream>,
        worker: Claimer,
    }

    fn channels(count: usize) -> (Vec<RequestSlot>, Theirs) {
        let (mailboxes, worker) = Claimer::new(count);
        let mut ours = Vec::new();
        let mut sockets = Vec::new();
        for mailbox in mailboxes {
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            ours.push(RequestSlot {
                channel: Channel::new(a),
                mailbox,
            });
            sockets.push(b);
        }
        (ours, Theirs { sockets, worker })
    }

    /// A dispatcher whose offers ahead never go stale unless a test says so: a test machine
    /// may pause longer than `AHEAD_WINDOW` anywhere.
    fn dispatcher(queue_size: usize) -> (Arc<Dispatcher>, mpsc::UnboundedReceiver<Notice>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::new().unwrap());
        let dispatcher = Dispatcher::new(queue_size, Duration::from_millis(200), metrics, sender);
        set_window(&dispatcher, Duration::from_secs(3600));
        (dispatcher, receiver)
    }

    fn set_window(dispatcher: &Dispatcher, window: Duration) {
        dispatcher.lock().ahead_window = window;
    }

    /// A request frame whose environ names it.
    fn request(name: &str) -> BytesMut {
        let mut frame = RequestFrame::new(64);
        frame.environ().extend_from_slice(name.as_bytes());
        frame.inline_body(b"", false)
    }

    /// The environ of an offered frame the worker claimed.
    fn name(frame: Option<Vec<u8>>) -> Option<String> {
        frame.map(|frame| String::from_utf8_lossy(&frame[frame::HEADER_LEN..]).into_owned())
    }

    async fn acquire(dispatcher: &Arc<Dispatcher>) -> Result<Lease, Rejected> {
        dispatcher.acquire(request("x"), TIMEOUT).await
    }

    fn spawn_acquire(
        dispatcher: &Arc<Dispatcher>,
        what: &str,
    ) -> tokio::task::JoinHandle<Result<Lease, Rejected>> {
        let dispatcher = Arc::clone(dispatcher);
        let frame = request(what);
        tokio::spawn(async move { dispatcher.acquire(frame, TIMEOUT).await })
    }

    fn done(mut lease: Lease) {
        let _ = lease.channel();
        lease.release(Outcome::Done);
    }

    fn taken_back(dispatcher: &Dispatcher) -> u64 {
        dispatcher.metrics.http_offers_taken_back_total.get()
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
            let first = acquire(&dispatcher).await.unwrap();
            let second = acquire(&dispatcher).await.unwrap();
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
            let busy = acquire(&dispatcher).await.unwrap();
            let waiting = spawn_acquire(&dispatcher, "waiting");
            tokio::task::yield_now().await;
            assert_eq!(
                acquire(&dispatcher).await.err(),
                Some(Rejected::QueueFull),
                "a request offered ahead counts as waiting"
            );
            done(busy);
            assert_eq!(waiting.await.unwrap().map(|lease| lease.worker()), Ok(7));
            assert_eq!(dispatcher.loads()[0].served, 1);
        });
    }

    #[test]
    fn waiting_too_long_is_a_queue_timeout() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            assert_eq!(
                acquire(&dispatcher).await.err(),
                Some(Rejected::QueueTimeout)
            );
            dispatcher.close();
            assert_eq!(
                acquire(&dispatcher).await.err(),
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
                done(acquire(&dispatcher).await.unwrap());
            }
            assert!(matches!(notices.try_recv(), Ok(Notice::RecycleWanted(5))));
            assert!(notices.try_recv().is_err(), "asked once");
            let mut lease = acquire(&dispatcher).await.unwrap();
            let _ = lease.channel();
            lease.release(Outcome::TimedOut("GET /slow".to_owned()));
            assert!(matches!(
                notices.try_recv(),
                Ok(Notice::TimedOut { worker: 5, .. })
            ));
            assert!(!dispatcher.holds(5));
            assert_eq!(
                acquire(&dispatcher).await.err(),
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
            let first = acquire(&dispatcher).await.unwrap();
            assert_eq!(first.worker(), 1);
            assert_eq!(
                acquire(&dispatcher).await.err(),
                Some(Rejected::QueueTimeout),
                "the canary takes no ordinary request"
            );
            let warm_up = dispatcher.acquire_from(2).unwrap();
            assert_eq!(warm_up.worker(), 2);
            drop(warm_up);
            dispatcher.set_generation(2);
            let second = acquire(&dispatcher).await.unwrap();
            assert_eq!(second.worker(), 2, "old and new serve side by side");
            drop(first);
            dispatcher.set_limits(0, Duration::from_millis(10));
            let _third = acquire(&dispatcher).await.unwrap();
            assert_eq!(acquire(&dispatcher).await.err(), Some(Rejected::QueueFull));
        });
    }

    #[test]
    fn retired_workers_close_idle_slots_and_finish_busy_ones() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (slots, _keep) = channels(2);
            dispatcher.add_worker(9, 0, 1, slots, None);
            let lease = acquire(&dispatcher).await.unwrap();
            dispatcher.retire(9);
            assert!(dispatcher.holds(9), "its request is still running");
            done(lease);
            assert!(!dispatcher.holds(9));
        });
    }

    #[test]
    fn a_busy_slot_gets_one_offer_ahead_and_hands_the_slot_straight_to_it() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (slots, mut theirs) = channels(1);
            dispatcher.add_worker(1, 0, 1, slots, None);
            let mut first = acquire(&dispatcher).await.unwrap();
            assert!(first.was_offered() && first.take_request().is_none());
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("x"));
            let second = spawn_acquire(&dispatcher, "second");
            let third = spawn_acquire(&dispatcher, "third");
            tokio::task::yield_now().await;
            // The worker finds its next request without waiting for the first one's end to be
            // read; the third waits in the queue (one offer ahead per slot).
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("second"));
            assert_eq!(theirs.worker.claim(0), None);
            done(first);
            let mut second = second.await.unwrap().unwrap();
            assert!(second.was_offered() && second.take_request().is_none());
            assert_eq!(dispatcher.loads()[0].busy, 1);
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("third"));
            done(second);
            done(third.await.unwrap().unwrap());
            assert_eq!(dispatcher.loads()[0].served, 3);
            assert_eq!(taken_back(&dispatcher), 0);
        });
    }

    #[test]
    fn a_slot_that_frees_takes_back_an_unclaimed_offer_from_a_busy_one() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (a, mut theirs_a) = channels(1);
            let (b, mut theirs_b) = channels(1);
            dispatcher.add_worker(1, 0, 1, a, None);
            dispatcher.add_worker(2, 1, 1, b, None);
            let medium = acquire(&dispatcher).await.unwrap();
            let slow = acquire(&dispatcher).await.unwrap();
            assert_ne!(medium.worker(), slow.worker());
            let slow_worker = slow.worker();
            // Offered ahead to the slot whose request started last.
            let fast = spawn_acquire(&dispatcher, "fast");
            tokio::task::yield_now().await;
            done(medium);
            let fast = fast.await.unwrap().unwrap();
            assert_ne!(fast.worker(), slow_worker, "it runs where a slot freed");
            assert_eq!(taken_back(&dispatcher), 1);
            let (freed, busy) = if slow_worker == 1 {
                (&mut theirs_b, &mut theirs_a)
            } else {
                (&mut theirs_a, &mut theirs_b)
            };
            assert_eq!(name(busy.worker.claim(0)).as_deref(), Some("x"));
            assert_eq!(busy.worker.claim(0), None, "taken back from the slow one");
            assert_eq!(name(freed.worker.claim(0)).as_deref(), Some("x"));
            assert_eq!(name(freed.worker.claim(0)).as_deref(), Some("fast"));
            drop((fast, slow));
        });
    }

    #[test]
    fn a_claimed_offer_stays_with_its_worker() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (a, mut theirs) = channels(1);
            let (b, _theirs_b) = channels(1);
            dispatcher.add_worker(1, 0, 1, a, None);
            let first = acquire(&dispatcher).await.unwrap();
            let next = spawn_acquire(&dispatcher, "next");
            tokio::task::yield_now().await;
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("x"));
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("next"));
            // A slot frees elsewhere, but the worker has already started "next".
            dispatcher.add_worker(2, 1, 1, b, None);
            assert_eq!(taken_back(&dispatcher), 0);
            done(first);
            let next = next.await.unwrap().unwrap();
            assert_eq!(next.worker(), 1);
            assert!(next.was_offered());
        });
    }

    #[test]
    fn offers_of_a_dead_worker_are_dispatched_again_unless_it_claimed_them() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (a, _theirs_a) = channels(1);
            dispatcher.add_worker(1, 3, 1, a, None);
            let running = acquire(&dispatcher).await.unwrap();
            let unclaimed = spawn_acquire(&dispatcher, "unclaimed");
            tokio::task::yield_now().await;
            dispatcher.remove(1);
            let (b, mut theirs_b) = channels(1);
            dispatcher.add_worker(2, 4, 1, b, None);
            let unclaimed = unclaimed.await.unwrap().unwrap();
            assert_eq!(unclaimed.worker(), 2, "never started, so run elsewhere");
            assert_eq!(name(theirs_b.worker.claim(0)).as_deref(), Some("unclaimed"));
            drop(running);

            let claimed = spawn_acquire(&dispatcher, "claimed");
            tokio::task::yield_now().await;
            assert_eq!(name(theirs_b.worker.claim(0)).as_deref(), Some("claimed"));
            let mut unclaimed = unclaimed;
            let _ = unclaimed.channel();
            unclaimed.release(Outcome::Gone);
            assert_eq!(claimed.await.unwrap().err(), Some(Rejected::WorkerGone(4)));
        });
    }

    #[test]
    fn retiring_a_worker_moves_its_unclaimed_offer_to_the_queue() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (a, _theirs_a) = channels(1);
            dispatcher.add_worker(1, 0, 1, a, None);
            let running = acquire(&dispatcher).await.unwrap();
            let offered = spawn_acquire(&dispatcher, "offered");
            tokio::task::yield_now().await;
            dispatcher.retire(1);
            assert_eq!(taken_back(&dispatcher), 1);
            let (b, _theirs_b) = channels(1);
            dispatcher.add_worker(2, 1, 1, b, None);
            assert_eq!(offered.await.unwrap().unwrap().worker(), 2);
            done(running);
            assert!(!dispatcher.holds(1));
        });
    }

    #[test]
    fn giving_up_takes_an_offer_back_and_an_unclaimed_request_in_service_can_be_withdrawn() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (a, mut theirs) = channels(1);
            dispatcher.add_worker(1, 0, 1, a, None);
            let running = acquire(&dispatcher).await.unwrap();
            // Offered ahead, then its queue timeout (200 ms) passes: taken back, a 503.
            assert_eq!(
                acquire(&dispatcher).await.err(),
                Some(Rejected::QueueTimeout)
            );
            assert_eq!(taken_back(&dispatcher), 1);
            // The request in service was never claimed: withdrawn, the slot is idle again.
            let mut running = running;
            assert!(running.withdraw());
            assert_eq!(dispatcher.loads()[0].busy, 0);
            let next = dispatcher.acquire(request("next"), TIMEOUT).await.unwrap();
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("next"));
            assert_eq!(theirs.worker.claim(0), None);
            // Claimed: it stays.
            let mut next = next;
            assert!(!next.withdraw());
            done(next);
        });
    }

    #[test]
    fn a_request_given_up_while_offered_ahead_is_taken_back() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (slots, mut theirs) = channels(1);
            dispatcher.add_worker(1, 0, 1, slots, None);
            let running = acquire(&dispatcher).await.unwrap();
            // Its client leaves while it is offered ahead: hyper drops the request's future.
            let gone = spawn_acquire(&dispatcher, "gone");
            tokio::task::yield_now().await;
            gone.abort();
            assert!(gone.await.unwrap_err().is_cancelled());
            assert_eq!(taken_back(&dispatcher), 1);
            let next = spawn_acquire(&dispatcher, "next");
            tokio::task::yield_now().await;
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("x"));
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("next"));
            done(running);
            assert!(next.await.unwrap().unwrap().was_offered());
        });
    }

    #[test]
    fn a_request_given_up_after_its_worker_claimed_it_is_aborted_and_drained() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            dispatcher.set_generation(1);
            let (slots, mut theirs) = channels(1);
            dispatcher.add_worker(1, 0, 1, slots, None);
            let running = acquire(&dispatcher).await.unwrap();
            let gone = spawn_acquire(&dispatcher, "gone");
            tokio::task::yield_now().await;
            assert!(theirs.worker.claim(0).is_some());
            let claimed = theirs.worker.claim(0).unwrap();
            gone.abort();
            assert!(gone.await.unwrap_err().is_cancelled());
            assert_eq!(taken_back(&dispatcher), 0, "the worker has it");
            done(running);
            // Nobody reads its answer: the worker is told, and the slot waits for its end.
            let mut abort = [0u8; frame::HEADER_LEN];
            theirs.sockets[0].read_exact(&mut abort).await.unwrap();
            assert_eq!(abort[8], frame::Kind::Abort as u8);
            assert_eq!(
                &abort[4..6],
                &claimed[10..12],
                "the Abort names that request"
            );
            assert_eq!(dispatcher.loads()[0].busy, 1);
            let mut end = BytesMut::new();
            frame::put_header(&mut end, frame::Kind::End, 0, 0, 0);
            theirs.sockets[0].write_all(&end).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), async {
                while dispatcher.loads()[0].busy != 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the drained slot is idle again");
            assert_eq!(dispatcher.loads()[0].served, 2);
        });
    }

    #[test]
    fn an_offer_behind_a_request_that_runs_long_moves_to_the_next_slot_that_moves_on() {
        runtime().block_on(async {
            let (dispatcher, _notices) = dispatcher(4);
            set_window(&dispatcher, Duration::from_millis(300));
            dispatcher.set_limits(4, Duration::from_secs(30));
            dispatcher.set_generation(1);
            let (slots, mut theirs) = channels(2);
            dispatcher.add_worker(1, 0, 1, slots, None);
            let fast = acquire(&dispatcher).await.unwrap();
            let slow = acquire(&dispatcher).await.unwrap();
            let (fast_lane, slow_lane) = (fast.lane, slow.lane);
            // "behind" goes behind the request that started last (the slow one), "next" behind
            // the other; the worker's fast thread claims its next request at once.
            let behind = spawn_acquire(&dispatcher, "behind");
            tokio::task::yield_now().await;
            let next = spawn_acquire(&dispatcher, "next");
            tokio::task::yield_now().await;
            assert_eq!(name(theirs.worker.claim(fast_lane)).as_deref(), Some("x"));
            assert_eq!(
                name(theirs.worker.claim(fast_lane)).as_deref(),
                Some("next")
            );
            tokio::time::sleep(Duration::from_millis(350)).await;
            done(fast);
            // The fast slot moves on to "next"; "behind" has waited past the window behind the
            // slow request: taken back and offered behind "next" instead.
            assert_eq!(taken_back(&dispatcher), 1);
            assert_eq!(
                name(theirs.worker.claim(fast_lane)).as_deref(),
                Some("behind")
            );
            assert_eq!(name(theirs.worker.claim(slow_lane)).as_deref(), Some("x"));
            assert_eq!(theirs.worker.claim(slow_lane), None);
            done(next.await.unwrap().unwrap());
            assert_eq!(behind.await.unwrap().unwrap().lane, fast_lane);
            drop(slow);
        });
    }
}
