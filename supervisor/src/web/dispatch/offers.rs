//! Requests offered ahead to busy slots: which busy slot gets one (the `AHEAD_WINDOW` rule),
//! taking a pending offer back while its worker has not claimed it, moving offers stuck behind a
//! slow request, and withdrawing an offered request that is in service but was never claimed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::web::worker::WorkerId;
use crate::web::worker::frame::{self, Channel};
use crate::web::worker::offer::Mailbox;

use super::Dispatcher;
use super::state::{Lane, State, Waiter};

/// How long a slot's request may have run and still get the next request offered ahead to it.
/// Pipelining saves a wake-up (microseconds) per request, which only matters for short
/// requests; one still running after this is likely slow, and a request waiting behind it is
/// taken back, to be offered to the next slot that moves on.
pub(super) const AHEAD_WINDOW: Duration = Duration::from_millis(2);

impl Dispatcher {
    /// Makes `waiter` the pending offer of a busy slot without one, or gives it back.
    pub(super) fn offer_ahead(&self, state: &mut State, mut waiter: Waiter) -> Result<(), Waiter> {
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
    pub(super) fn take_back_pending(&self, lane: &mut Lane) -> Option<Waiter> {
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

    /// Moves offers waiting behind a request that has run longer than `AHEAD_WINDOW` (likely a
    /// slow one) to slots whose request is recent, oldest first, as many as such slots are open:
    /// they are taken back here and offered again by `pump`.
    pub(super) fn take_back_stale(&self, state: &mut State) {
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
    pub(super) fn oldest_pending(&self, state: &mut State, than: Option<u64>) -> Option<Waiter> {
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

    /// Takes back the request in service on a lane, which was offered: succeeds only if the
    /// worker has not claimed it, and then the lane is free again. A pending offer behind it is
    /// the latest offer, so it is taken back first (and dispatched again).
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
}
