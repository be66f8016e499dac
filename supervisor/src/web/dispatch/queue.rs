//! The line of requests waiting for a slot: a request waiting in `acquire` (its queue timeout, and
//! giving up when it times out or its client goes away), requests taken back put in line again by
//! age, and `pump`, which matches waiting requests with slots whenever something changes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::web::worker::offer::Mailbox;

use super::state::{Answer, State, Waiter, answer};
use super::{Dispatcher, Lease, Rejected};

/// A request waiting in `acquire`: if it is given up (queue timeout, or its client went away and
/// the future is dropped) it leaves the queue, or its offer is taken back.
pub(super) struct Waiting {
    pub(super) dispatcher: Arc<Dispatcher>,
    pub(super) receiver: Option<oneshot::Receiver<Answer>>,
    pub(super) ticket: u64,
}

impl Waiting {
    pub(super) async fn wait(&mut self, queue_timeout: Duration) -> Result<Lease, Rejected> {
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
        let mut again = Vec::new();
        for route in &mut state.routes {
            for lane in &mut route.lanes {
                withdrawn |= self.take_back_ticket(lane, ticket, &mut again).is_some();
            }
        }
        if withdrawn || !again.is_empty() {
            Dispatcher::requeue(&mut state, again);
            self.pump(&mut state);
        }
        self.unlock(state);
        withdrawn
    }

    /// Matches waiting requests with slots until nothing more can move: an idle slot takes the
    /// oldest request waiting (queued, or pending elsewhere and taken back), then busy slots
    /// with room for a pending offer get the oldest queued requests that fit a region.
    pub(super) fn pump(self: &Arc<Self>, state: &mut State) {
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

    /// Puts requests taken back from a slot in line again, by age.
    pub(super) fn requeue(state: &mut State, waiters: Vec<Waiter>) {
        for waiter in waiters {
            let at = state
                .waiters
                .iter()
                .position(|queued| queued.ticket > waiter.ticket)
                .unwrap_or(state.waiters.len());
            state.waiters.insert(at, waiter);
        }
    }
}
