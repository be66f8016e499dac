//! The next slot's messages, planned and built before it falls due: which jobs are due at it,
//! their task ids and messages in publish-sized batches, and how the publishing wake-up takes
//! them — only while each job is unchanged since and its slot still on time. Everything else
//! is planned at the slot as if nothing had been prepared.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::Actor;
use super::publish::PUBLISH_BATCH;
use crate::beat::jobs;
use crate::beat::publisher::Outgoing;

/// How long before a slot the jobs due then are planned and their messages built. Thousands
/// of jobs share a minute boundary; planning and building them takes tens of milliseconds of CPU,
/// and on a busy host the beat thread waits for a CPU several times as long again (measured:
/// 38 ms running, 324 ms waiting on the run queue for 5 452 messages at load 8 on 2 cores).
/// Done ahead, the slot itself costs one read of the change stream and the writes.
pub(super) const PREPARE_AHEAD: Duration = Duration::from_secs(1);

/// The messages of every job due at `at` with one on-time slot, built ahead of it. A job's entry
/// stands only while its `prepared` mark equals `mark` — a change to the job (read from the
/// change stream at the slot, a reload, a resync) clears it — and while its slot is still on
/// time; otherwise the job is planned at the slot as if nothing had been prepared.
pub(super) struct Prepared {
    pub(super) at: DateTime<Utc>,
    pub(super) mark: u32,
    /// `Actor::moves` when built: the indices hold while it is unchanged.
    pub(super) moves: u64,
    /// The TOML jobs' batches, then the runtime jobs' (a batch never mixes them).
    pub(super) batches: Vec<Ready>,
}

/// One batch built ahead: (job index, slot) pairs, their task ids and messages.
pub(super) struct Ready {
    pub(super) toml: bool,
    pub(super) slots: Vec<(usize, DateTime<Utc>)>,
    pub(super) ids: Vec<uuid::Uuid>,
    pub(super) outgoing: Vec<Outgoing>,
}

impl Actor {
    /// Plans the next slot and builds its messages when it is less than [`PREPARE_AHEAD`]
    /// away (and not prepared yet).
    pub(super) fn prepare_next(&mut self) {
        let now = Utc::now();
        let Some(at) = self.earliest_next() else {
            return;
        };
        // With some slack: the wake-up was computed from a monotonic instant.
        let ahead = chrono::Duration::from_std(PREPARE_AHEAD + Duration::from_millis(50))
            .unwrap_or(chrono::Duration::MAX);
        if at <= now
            || at - now > ahead
            || !self.synced
            || !self.leader.may_publish(Instant::now())
            || self.prepared.as_ref().is_some_and(|p| p.at == at)
        {
            return;
        }
        self.marks = self.marks.wrapping_add(1).max(1);
        let mark = self.marks;
        let toml = self.jobs.len() - self.runtime.count();
        let mut batches = Vec::new();
        let mut slots: Vec<(usize, DateTime<Utc>)> = Vec::new();
        for index in 0..self.jobs.len() {
            if index == toml && !slots.is_empty() {
                batches.push(self.ready(true, std::mem::take(&mut slots)));
            }
            let state = &mut self.jobs[index];
            if state.next.is_none_or(|next| next > at) {
                continue;
            }
            let plan = jobs::plan_due(
                &state.job.schedule,
                state.job.catch_up,
                state.job.catch_up_window,
                state.cursor,
                at,
            );
            if plan.skipped.is_some() || plan.publish.len() != 1 {
                // Catching up (only a job already late does): planned at the slot, as before.
                continue;
            }
            state.prepared = mark;
            slots.extend(plan.publish.into_iter().map(|slot| (index, slot)));
            // Cut only between jobs, as `publish_due` does.
            if slots.len() >= PUBLISH_BATCH {
                batches.push(self.ready(index < toml, std::mem::take(&mut slots)));
            }
        }
        if !slots.is_empty() {
            let toml_batch = slots.last().is_some_and(|&(index, _)| index < toml);
            batches.push(self.ready(toml_batch, slots));
        }
        self.prepared = Some(Prepared {
            at,
            mark,
            moves: self.moves,
            batches,
        });
    }

    pub(super) fn ready(&self, toml: bool, slots: Vec<(usize, DateTime<Utc>)>) -> Ready {
        let (ids, outgoing) = self.prepare_batch(&slots);
        Ready {
            toml,
            slots,
            ids,
            outgoing,
        }
    }

    /// The prepared batches due by `now` among the first `count` jobs, those of jobs changed
    /// since dropped, indices brought up to date; with the mark and instant they were prepared
    /// for.
    pub(super) fn take_ready(
        &mut self,
        count: usize,
        now: DateTime<Utc>,
    ) -> (Vec<Ready>, u32, DateTime<Utc>) {
        let Some(mut prepared) = self.prepared.take_if(|p| p.at <= now) else {
            return (Vec::new(), 0, now);
        };
        let (mark, at, moved) = (prepared.mark, prepared.at, prepared.moves != self.moves);
        let taken: Vec<Ready> = if count < self.jobs.len() {
            // The TOML jobs' batches now; the runtime jobs' after the change stream is read.
            let (toml, rest) = std::mem::take(&mut prepared.batches)
                .into_iter()
                .partition(|batch| batch.toml);
            prepared.batches = rest;
            self.prepared = Some(prepared);
            toml
        } else {
            prepared.batches
        };
        let toml = self.jobs.len() - self.runtime.count();
        let mut ready = Vec::with_capacity(taken.len());
        for mut batch in taken {
            let mut kept = Ready {
                toml: batch.toml,
                slots: Vec::with_capacity(batch.slots.len()),
                ids: Vec::with_capacity(batch.ids.len()),
                outgoing: Vec::with_capacity(batch.outgoing.len()),
            };
            for ((&(index, slot), id), outgoing) in batch
                .slots
                .iter()
                .zip(batch.ids.drain(..))
                .zip(batch.outgoing.drain(..))
            {
                let index = if moved && index >= toml {
                    match self.runtime.position(&outgoing.job) {
                        Some(position) => position,
                        None => continue,
                    }
                } else {
                    index
                };
                let Some(state) = self.jobs.get_mut(index) else {
                    continue;
                };
                if state.prepared != mark || state.job.name != outgoing.job {
                    continue;
                }
                if now - slot > jobs::on_time_tolerance(&state.job.schedule) {
                    // Too late to count as on time: planned now under its catch-up policy.
                    state.prepared = 0;
                    continue;
                }
                kept.slots.push((index, slot));
                kept.ids.push(id);
                kept.outgoing.push(outgoing);
            }
            if !kept.slots.is_empty() {
                ready.push(kept);
            }
        }
        (ready, mark, at)
    }
}
