//! A request slot going into service and back out: an idle slot given to a request (`take_idle`,
//! `start`), a slot handed straight to the request offered ahead to it (`resume`), a slot given
//! back with its outcome (`give_back`: the worker's count, the pool's notices), and a worker taken
//! out of routing (`unroute`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::web::worker::WorkerId;
use crate::web::worker::frame::Channel;

use super::state::{Answer, Route, Service, State, Waiter, answer, deliver};
use super::{Dispatcher, Lease, Notice, Outcome, Rejected};

impl Dispatcher {
    /// Starts `waiter` on the best idle slot of a serving worker (returning its lease and the
    /// sender to hand it over with), or gives it back.
    pub(super) fn take_idle(
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
    pub(super) fn start(
        self: &Arc<Self>,
        route: &mut Route,
        lane_index: usize,
        timeout: Duration,
    ) -> Lease {
        let (channel, sequence) = route
            .lanes
            .get_mut(lane_index)
            .map_or((None, 0), |lane| (lane.channel.take(), lane.sequence));
        self.in_service(route, lane_index, channel, sequence, false, timeout)
    }

    /// Stops routing to the route at `index`: closes its idle slots and takes back the offers it
    /// has not claimed, to dispatch them again. With `dead` (the worker died or is being
    /// killed) the offers it claimed fail. Forgets the route when nothing of it is left.
    pub(super) fn unroute(&self, state: &mut State, index: usize, dead: bool) {
        let route = &mut state.routes[index];
        route.routable = false;
        let slot = route.slot;
        let mut again = Vec::new();
        let mut failed = Vec::new();
        for lane in &mut route.lanes {
            lane.channel = None;
            again.extend(self.take_back_from(lane, 0));
            if dead {
                failed.extend(lane.pending.drain(..));
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

    pub(super) fn give_back(
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
                match lane.pending.pop_front() {
                    // The slot goes straight to the next request offered in advance: its frame
                    // is already with the worker.
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

    /// Puts the next pending request of the lane in service; the worker already has its frame.
    fn resume(
        self: &Arc<Self>,
        route: &mut Route,
        lane_index: usize,
        channel: Option<Channel>,
        pending: &Waiter,
    ) -> Lease {
        self.in_service(
            route,
            lane_index,
            channel,
            pending.sequence,
            true,
            pending.timeout,
        )
    }

    /// Marks the lane serving a request from now on, counts it, and makes the lease the request
    /// holds the slot by.
    fn in_service(
        self: &Arc<Self>,
        route: &mut Route,
        lane_index: usize,
        channel: Option<Channel>,
        sequence: u16,
        offered: bool,
        timeout: Duration,
    ) -> Lease {
        if let Some(lane) = route.lanes.get_mut(lane_index) {
            lane.service = Some(Service {
                since: Instant::now(),
                offered,
            });
        }
        route.busy += 1;
        self.metrics.http_in_flight.inc();
        Lease {
            channel,
            worker: route.id,
            slot: route.slot,
            lane: lane_index,
            sequence,
            request: None,
            offered,
            timeout,
            used: false,
            dispatcher: Arc::clone(self),
        }
    }
}
