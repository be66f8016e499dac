//! What the dispatcher's lock protects: the requests waiting for a slot (`Waiter`), each worker
//! as a `Route` of `Lane`s (its request slots, each with the request in service and those
//! offered ahead to it), and what is handed out or sent once the lock is released. Also the two
//! steps every path shares: delivering a numbered frame to a lane, and answering a waiting
//! request.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::oneshot;

use crate::web::worker::WorkerId;
use crate::web::worker::frame::{self, Channel};
use crate::web::worker::offer::Mailbox;

use super::{Lease, Notice, Rejected};

/// A request waiting for a slot: in the queue, or offered in advance to a busy slot.
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) ticket: u64,
    pub(super) sender: oneshot::Sender<Result<Lease, Rejected>>,
    /// The complete `Request` frame (kept while offered, to dispatch it again if taken back).
    pub(super) frame: BytesMut,
    /// The request's deadline once in service, for draining it if it is abandoned.
    pub(super) timeout: Duration,
    /// Its number on the slot it is offered to.
    pub(super) sequence: u16,
    /// Offered in advance and claimed by the worker: it can no longer be taken back.
    pub(super) claimed: bool,
}

/// The request a slot is serving.
#[derive(Debug)]
pub(super) struct Service {
    pub(super) since: Instant,
    /// It came as an offer (not over the socket), so a pending offer may follow it.
    pub(super) offered: bool,
}

/// One request slot (one worker thread) as the dispatcher sees it.
#[derive(Debug)]
pub(super) struct Lane {
    pub(super) mailbox: Mailbox,
    /// The channel while the slot is idle; a lease holds it while a request is in service.
    pub(super) channel: Option<Channel>,
    pub(super) service: Option<Service>,
    /// Requests offered ahead, in the order the worker claims them; the claimed ones (if any)
    /// come first, since the worker claims in order.
    pub(super) pending: VecDeque<Waiter>,
    /// Number of the last request sent to the slot (wrapping), carried in its frame and in an
    /// `Abort` for it, so that the worker can tell a late `Abort` from one for its request.
    pub(super) sequence: u16,
}

impl Lane {
    pub(super) fn next_sequence(&mut self) -> u16 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }
}

/// One worker as the dispatcher sees it.
#[derive(Debug)]
pub(super) struct Route {
    pub(super) id: WorkerId,
    pub(super) slot: usize,
    pub(super) generation: u64,
    pub(super) lanes: Vec<Lane>,
    /// Requests in service.
    pub(super) busy: usize,
    pub(super) served: u64,
    pub(super) limit: Option<u64>,
    pub(super) routable: bool,
    pub(super) recycle_noted: bool,
}

impl Route {
    pub(super) fn idle_lanes(&self) -> usize {
        self.lanes
            .iter()
            .filter(|lane| lane.channel.is_some())
            .count()
    }

    pub(super) fn pending(&self) -> usize {
        self.lanes.iter().map(|lane| lane.pending.len()).sum()
    }

    /// Nothing in service, nothing offered: the route can be forgotten once unroutable.
    pub(super) fn is_empty(&self) -> bool {
        self.busy == 0 && self.pending() == 0
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) routes: Vec<Route>,
    pub(super) waiters: VecDeque<Waiter>,
    pub(super) generation: u64,
    pub(super) closed: bool,
    pub(super) queue_size: usize,
    pub(super) queue_timeout: Duration,
    /// `AHEAD_WINDOW`, shorter or longer in tests.
    pub(super) ahead_window: Duration,
    pub(super) next_ticket: u64,
    /// Leases whose request went away while they were handed over; dropped once the lock is
    /// released (dropping one may take the lock).
    pub(super) orphans: Vec<Lease>,
    pub(super) notices: Vec<Notice>,
}

impl State {
    pub(super) fn serves(&self, route: &Route) -> bool {
        route.routable && route.generation <= self.generation
    }

    /// Requests waiting for a worker: queued, or offered ahead to a busy slot.
    pub(super) fn waiting(&self) -> usize {
        self.waiters.len() + self.routes.iter().map(Route::pending).sum::<usize>()
    }
}

/// Sends `frame` to an idle or busy lane: offered when it fits (returns `None`), else returned
/// for the socket. Numbers it either way.
pub(super) fn deliver(lane: &mut Lane, mut frame: BytesMut) -> (Option<BytesMut>, u16) {
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

pub(super) type Answer = Result<Lease, Rejected>;

/// Sends `answer` to a waiting request; a lease whose request went away meanwhile is kept to be
/// dropped once the lock is released (dropping it takes the lock).
pub(super) fn answer(state: &mut State, sender: oneshot::Sender<Answer>, answer: Answer) {
    if let Err(Ok(lease)) = sender.send(answer) {
        state.orphans.push(lease);
    }
}
