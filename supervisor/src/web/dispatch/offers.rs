//! Requests offered ahead to busy slots: which busy slot gets one (the `AHEAD_WINDOW` and
//! `AHEAD_DEPTH` rules), taking pending offers back while their worker has not claimed them,
//! moving offers stuck behind a slow request, and withdrawing an offered request that is in
//! service but was never claimed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::web::worker::WorkerId;
use crate::web::worker::frame::{self, Channel};
use crate::web::worker::offer::{Mailbox, REGIONS};

use super::Dispatcher;
use super::state::{Lane, State, Waiter};

/// How long a slot's request may have run and still get the next request offered ahead to it.
/// Pipelining saves a wake-up (microseconds) per request, which only matters for short
/// requests; one still running after this is likely slow, and a request waiting behind it is
/// taken back, to be offered to the next slot that moves on.
pub(super) const AHEAD_WINDOW: Duration = Duration::from_millis(2);

/// How many requests a busy slot may have offered ahead of the one it serves. With one, a
/// worker that finishes its request while the front is off the CPU (its reply and the next
/// offer not handled yet) runs the one queued behind, then finds nothing and sleeps, to be woken
/// by the next offer: two context switches and a wake-up on the front for each request the pool
/// is short of. With two it still has work for one more request's time. Deeper would park
/// requests behind one worker that another may be free for first (they are taken back then).
pub(super) const AHEAD_DEPTH: usize = 2;
const _: () = assert!(
    AHEAD_DEPTH < REGIONS,
    "a slot has a region per outstanding offer"
);

impl Dispatcher {
    /// Makes `waiter` a pending offer of a busy slot with room for one, or gives it back.
    pub(super) fn offer_ahead(&self, state: &mut State, mut waiter: Waiter) -> Result<(), Waiter> {
        if !Mailbox::fits(waiter.frame.len()) {
            return Err(waiter);
        }
        let generation = state.generation;
        let (now, window) = (Instant::now(), state.ahead_window);
        // A slot whose request is recent (not likely a slow one) first, then the least-loaded
        // worker, then the slot with the fewest offers queued, then the one whose request
        // started last.
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
                    let queued = lane.pending.len();
                    (queued < AHEAD_DEPTH).then_some((
                        (stale, load, queued, std::cmp::Reverse(service.since)),
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
        lane.pending.push_back(waiter);
        Ok(())
    }

    /// Takes back the latest pending offer of `lane` if the worker has not claimed it; `None`
    /// when there is none or it is claimed (then every pending offer of the lane is marked so:
    /// the worker claims in order).
    pub(super) fn take_back_pending(&self, lane: &mut Lane) -> Option<Waiter> {
        if lane.pending.back()?.claimed {
            return None;
        }
        match lane.mailbox.take_back() {
            Ok(true) => {
                self.metrics.http_offers_taken_back_total.inc();
                lane.pending.pop_back()
            }
            Ok(false) => {
                lane.pending
                    .iter_mut()
                    .for_each(|pending| pending.claimed = true);
                None
            }
            Err(error) => {
                tracing::warn!("cannot take back an offered request: {error}");
                lane.pending
                    .iter_mut()
                    .for_each(|pending| pending.claimed = true);
                None
            }
        }
    }

    /// Takes back the pending offers of `lane` from the latest down to the one at `from`, as far
    /// as the worker has not claimed them, and returns them in order. Offers can only be taken
    /// back latest first, so reaching one means taking back those behind it too; one the worker
    /// claimed meanwhile stops it (then the offer at `from` is not among those returned).
    pub(super) fn take_back_from(&self, lane: &mut Lane, from: usize) -> Vec<Waiter> {
        let mut taken = Vec::new();
        while lane.pending.len() > from {
            match self.take_back_pending(lane) {
                Some(waiter) => taken.push(waiter),
                None => break,
            }
        }
        taken.reverse();
        taken
    }

    /// Takes back the pending offer of `lane` with `ticket` if the worker has not claimed it;
    /// those taken back with it (offered after it) go into `again`.
    pub(super) fn take_back_ticket(
        &self,
        lane: &mut Lane,
        ticket: u64,
        again: &mut Vec<Waiter>,
    ) -> Option<Waiter> {
        let from = lane
            .pending
            .iter()
            .position(|pending| pending.ticket == ticket && !pending.claimed)?;
        let mut taken = self.take_back_from(lane, from).into_iter();
        let wanted = taken.next();
        match wanted {
            Some(waiter) if waiter.ticket == ticket => {
                again.extend(taken);
                Some(waiter)
            }
            other => {
                again.extend(other.into_iter().chain(taken));
                None
            }
        }
    }

    /// Moves offers waiting behind a request that has run longer than `AHEAD_WINDOW` (likely a
    /// slow one) to slots whose request is recent, oldest first, about as many as such slots
    /// have room for: they are taken back here and offered again by `pump`.
    pub(super) fn take_back_stale(&self, state: &mut State) {
        let (now, window, generation) = (Instant::now(), state.ahead_window, state.generation);
        let is_stale = |lane: &Lane| {
            lane.service
                .as_ref()
                .is_some_and(|service| now.duration_since(service.since) >= window)
        };
        let open: usize = state
            .routes
            .iter()
            .filter(|route| route.routable && route.generation <= generation)
            .flat_map(|route| route.lanes.iter())
            .filter(|lane| {
                !is_stale(lane) && lane.service.as_ref().is_some_and(|service| service.offered)
            })
            .map(|lane| AHEAD_DEPTH.saturating_sub(lane.pending.len()))
            .sum();
        if open == 0 {
            return;
        }
        let mut stale: Vec<(u64, usize, usize)> = state
            .routes
            .iter()
            .enumerate()
            .flat_map(|(r, route)| {
                route.lanes.iter().enumerate().filter_map(move |(l, lane)| {
                    let oldest = lane.pending.iter().find(|pending| !pending.claimed)?;
                    is_stale(lane).then_some((oldest.ticket, r, l))
                })
            })
            .collect();
        stale.sort_unstable();
        let mut moved = Vec::new();
        for (_, route, lane) in stale {
            if moved.len() >= open {
                break;
            }
            moved.extend(self.take_back_from(&mut state.routes[route].lanes[lane], 0));
        }
        Dispatcher::requeue(state, moved);
    }

    /// The oldest unclaimed pending offer older than the ticket `than`, taken back from its slot
    /// (offers behind it there are taken back too and put in line again).
    pub(super) fn oldest_pending(&self, state: &mut State, than: Option<u64>) -> Option<Waiter> {
        loop {
            let (ticket, route, lane) = state
                .routes
                .iter()
                .enumerate()
                .flat_map(|(r, route)| {
                    route.lanes.iter().enumerate().flat_map(move |(l, lane)| {
                        lane.pending
                            .iter()
                            .filter(|pending| !pending.claimed)
                            .map(move |pending| (pending.ticket, r, l))
                    })
                })
                .filter(|(ticket, _, _)| than.is_none_or(|than| *ticket < than))
                .min()?;
            let mut again = Vec::new();
            let taken =
                self.take_back_ticket(&mut state.routes[route].lanes[lane], ticket, &mut again);
            Dispatcher::requeue(state, again);
            if taken.is_some() {
                return taken;
            }
        }
    }

    /// Takes back the request in service on a lane, which was offered: succeeds only if the
    /// worker has not claimed it, and then the lane is free again. Pending offers behind it are
    /// later offers, so they are taken back first (and dispatched again).
    pub(super) fn withdraw(
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
        let again = self.take_back_from(lane, 0);
        // A later offer the worker claimed means it claimed this one too.
        let taken = lane.pending.is_empty()
            && match lane.mailbox.take_back() {
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
}
