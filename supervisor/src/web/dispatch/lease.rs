//! `Lease`: a request's exclusive use of one request slot, from dispatch until its response
//! ends — its frame sent or offered, an unclaimed offer withdrawn, the slot given back, and what
//! dropping it unused or half-way means.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use crate::web::worker::WorkerId;
use crate::web::worker::frame::Channel;

use super::state::deliver;
use super::{Dispatcher, Outcome};

/// The exclusive use of one request slot of one worker, from dispatch until the response ends.
/// Give it back with `release`; dropped unused it returns idle (an offered request is taken back
/// or, when the worker already started it, drained), dropped after use it counts as broken (the
/// exchange was abandoned half-way).
pub struct Lease {
    pub(super) channel: Option<Channel>,
    pub(super) worker: WorkerId,
    pub(super) slot: usize,
    pub(super) lane: usize,
    pub(super) sequence: u16,
    /// A frame the exchange must write to the socket (it did not fit an offer region).
    pub(super) request: Option<BytesMut>,
    /// The request was offered; whether the worker claimed it is unknown until it answers.
    pub(super) offered: bool,
    pub(super) timeout: Duration,
    pub(super) used: bool,
    pub(super) dispatcher: Arc<Dispatcher>,
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
