//! One publishing pass of beat's actor: the due jobs planned (or taken from the batches built
//! ahead), their messages sent in fenced batches on the one connection — a few at a time, each
//! recorded as its reply comes — and their cursors moved once every batch is in.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::Actor;
use crate::beat::jobs;
use crate::beat::message::TaskMessage;
use crate::beat::publisher::{BrokerError, Outgoing, PublishTask, Published};

/// A batch on its way: its (job index, slot) pairs, their task ids, the task sending it.
type Pending = (Vec<(usize, DateTime<Utc>)>, Vec<uuid::Uuid>, PublishTask);

/// Slots published per pipeline.
pub(super) const PUBLISH_BATCH: usize = 250;

/// Batches on their way at once: enough to keep Redis busy while the actor, on a busy host,
/// waits for a CPU to record the oldest. Unbounded, every batch of a boundary was on its way at
/// once, each message held twice more (the queued command, the connection's write buffer).
const IN_FLIGHT: usize = 8;

/// The batches of one publishing pass on their way, and what the finished ones did.
#[derive(Default)]
struct InFlight {
    pending: VecDeque<Pending>,
    /// Runtime jobs' tasks sent.
    runtime_sent: usize,
    /// The script found the lock no longer ours.
    refused: bool,
}

impl Actor {
    /// Publishes what is due among the first `count` jobs (the TOML ones come first).
    pub(super) async fn publish_due(&mut self, count: usize) -> Result<(), BrokerError> {
        let now = Utc::now();
        let (ready, mark, prepared_for) = self.take_ready(count, now);
        if ready.is_empty() && self.earliest_next().is_none_or(|earliest| earliest > now) {
            return Ok(());
        }
        // Publish in batches, each sent as soon as it is full and while the next is planned
        // and prepared: thousands of jobs due at one minute boundary cost a few round trips,
        // and the first batch leaves before the last job is planned. The batches built ahead
        // for this slot go first.
        let mut slots: Vec<(usize, DateTime<Utc>)> = Vec::new();
        let mut planned: Vec<(usize, DateTime<Utc>)> = Vec::new();
        let mut flight = InFlight::default();
        // The lease ran out before every batch went out: the rest stays due.
        let mut lease_ended = false;
        for batch in ready {
            self.settle(&mut flight, IN_FLIGHT - 1).await?;
            if !self.leader.may_publish(Instant::now()) {
                lease_ended = true;
                break;
            }
            let task = self
                .broker
                .start_publish(self.leader.fence(), batch.outgoing)
                .await?;
            // A prepared job counts as planned at the instant it was prepared for.
            planned.extend(batch.slots.iter().map(|&(index, _)| (index, prepared_for)));
            flight.pending.push_back((batch.slots, batch.ids, task));
            tokio::task::yield_now().await;
        }
        for index in 0..count.min(self.jobs.len()) {
            if lease_ended {
                break;
            }
            let state = &self.jobs[index];
            if state.next.is_none_or(|next| next > now) || (mark != 0 && state.prepared == mark) {
                continue;
            }
            let state = &self.jobs[index];
            let plan = jobs::plan_due(
                &state.job.schedule,
                state.job.catch_up,
                state.job.catch_up_window,
                state.cursor,
                now,
            );
            if let Some((first, last)) = plan.skipped {
                tracing::warn!(
                    job = %state.job.name,
                    first = %state.show(first),
                    last = %state.show(last),
                    catch_up = ?state.job.catch_up,
                    "beat: missed slot(s) not published (nobody could publish then; see catch_up and catch_up_window)"
                );
            }
            slots.extend(plan.publish.into_iter().map(|slot| (index, slot)));
            planned.push((index, now));
            // Cut only between jobs: the batches run on tasks of their own, so only within one
            // batch is their order certain, and a job's slots must go out oldest first.
            if slots.len() >= PUBLISH_BATCH {
                let batch = std::mem::take(&mut slots);
                if !self.send_batch(batch, &mut flight).await? {
                    lease_ended = true;
                    break;
                }
            }
        }
        if !lease_ended && !slots.is_empty() && !self.send_batch(slots, &mut flight).await? {
            lease_ended = true;
        }
        self.settle(&mut flight, 0).await?;
        if flight.runtime_sent > 0 {
            tracing::info!(
                count = flight.runtime_sent,
                lag_ms = (Utc::now() - now).num_milliseconds().max(0),
                "beat: published runtime job tasks"
            );
        }
        if flight.refused {
            tracing::warn!(
                "beat: publish refused because the leader lock is no longer ours; standing by"
            );
            self.leader.resign(Instant::now());
            self.set_leader_metric();
            self.synced = false;
            return Ok(());
        }
        if lease_ended {
            return Ok(());
        }
        if planned.is_empty() {
            return Ok(());
        }
        for (index, cursor) in planned {
            self.jobs[index].advance(cursor);
        }
        self.earliest = None;
        Ok(())
    }

    /// Waits for the oldest batches in `flight` until at most `keep` are on their way,
    /// recording what each did.
    async fn settle(&mut self, flight: &mut InFlight, keep: usize) -> Result<(), BrokerError> {
        while flight.pending.len() > keep {
            let Some((batch, ids, handle)) = flight.pending.pop_front() else {
                break;
            };
            let outcomes = match self.broker.finish_publish(handle.await) {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    for &(index, _) in &batch {
                        self.metrics
                            .beat_errors_total
                            .with_label_values(&[self.jobs[index].metric_label()])
                            .inc();
                    }
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let mut names: Vec<&str> = batch
                            .iter()
                            .map(|&(index, _)| &*self.jobs[index].job.name)
                            .collect();
                        names.dedup();
                        tracing::debug!(
                            jobs = %names.join(","),
                            error = %error,
                            "beat: publish failed; the slots stay due"
                        );
                    }
                    return Err(error);
                }
            };
            match self.record_batch(&batch, ids, outcomes) {
                Some(sent) => flight.runtime_sent += sent,
                None => flight.refused = true,
            }
        }
        Ok(())
    }

    /// Prepares `batch` (job index, slot) and starts sending it on a task of its own, so Redis
    /// works through it while the caller goes on; false (nothing sent) when the lease ran out.
    async fn send_batch(
        &mut self,
        batch: Vec<(usize, DateTime<Utc>)>,
        flight: &mut InFlight,
    ) -> Result<bool, BrokerError> {
        self.settle(flight, IN_FLIGHT - 1).await?;
        if !self.leader.may_publish(Instant::now()) {
            return Ok(false);
        }
        let (ids, outgoing) = self.prepare_batch(&batch);
        let task = self
            .broker
            .start_publish(self.leader.fence(), outgoing)
            .await?;
        flight.pending.push_back((batch, ids, task));
        // Lets the connection's task write the batch out now.
        tokio::task::yield_now().await;
        Ok(true)
    }

    /// The task ids and messages of `batch` (job index, slot).
    pub(super) fn prepare_batch(
        &self,
        batch: &[(usize, DateTime<Utc>)],
    ) -> (Vec<uuid::Uuid>, Vec<Outgoing>) {
        let published_at = Utc::now();
        let mut ids = Vec::with_capacity(batch.len());
        let mut outgoing = Vec::with_capacity(batch.len());
        for &(index, slot) in batch {
            let state = &self.jobs[index];
            let job = &state.job;
            let task_id = uuid::Uuid::new_v4();
            let (mut id_text, mut tag_text) = (
                [0; uuid::fmt::Hyphenated::LENGTH],
                [0; uuid::fmt::Hyphenated::LENGTH],
            );
            let message = TaskMessage {
                task: &job.task,
                id: task_id.hyphenated().encode_lower(&mut id_text),
                delivery_tag: uuid::Uuid::new_v4()
                    .hyphenated()
                    .encode_lower(&mut tag_text),
                arguments: &state.arguments,
                queue: &job.queue,
                priority: job.priority,
                // From the publish, or from the slot for a message built ahead of it.
                expires: job
                    .expires
                    .and_then(|expires| chrono::Duration::from_std(expires).ok())
                    .map(|expires| published_at.max(slot) + expires),
                origin: &self.origin,
                slot: Some((&job.name, slot)),
            };
            outgoing.push(Outgoing {
                job: job.name.clone(),
                slot_ms: slot.timestamp_millis(),
                queue_key: message.queue_key(),
                message: message.envelope(),
            });
            ids.push(task_id);
        }
        (ids, outgoing)
    }

    /// Records what happened to `batch`: the number of runtime jobs' tasks sent, or `None` when
    /// the lock turned out not to be ours (the script pushed nothing from then on).
    fn record_batch(
        &mut self,
        batch: &[(usize, DateTime<Utc>)],
        ids: Vec<uuid::Uuid>,
        outcomes: Vec<Published>,
    ) -> Option<usize> {
        let lag_base = Utc::now();
        let mut runtime_sent = 0;
        for ((&(index, slot), task_id), outcome) in batch.iter().zip(ids).zip(outcomes) {
            let state = &self.jobs[index];
            match outcome {
                Published::Sent => {
                    let lag = (lag_base - slot).to_std().unwrap_or(Duration::ZERO);
                    self.metrics
                        .beat_published_total
                        .with_label_values(&[state.metric_label()])
                        .inc();
                    self.metrics.beat_lag_seconds.observe(lag.as_secs_f64());
                    if state.runtime {
                        runtime_sent += 1;
                        tracing::debug!(job = %state.job.name, task = %state.job.task, task_id = %task_id, slot = %state.show(slot), lag_ms = lag.as_millis() as u64, "beat: published");
                    } else {
                        tracing::info!(
                            job = %state.job.name,
                            task = %state.job.task,
                            task_id = %task_id,
                            slot = %state.show(slot),
                            lag_ms = lag.as_millis() as u64,
                            "beat: published"
                        );
                    }
                    if state.one_off {
                        self.runtime.one_offs_done.push(state.job.name.to_string());
                    }
                    if let Some(shown) = self.jobs[index].shown.as_deref_mut() {
                        shown.last_run = Some(slot);
                        shown.last_task_id = Some(task_id);
                        shown.published += 1;
                    }
                }
                Published::AlreadySent => {
                    tracing::debug!(job = %state.job.name, slot = %state.show(slot), "beat: slot already published by another supervisor");
                }
                Published::NotLeader => return None,
            }
        }
        Some(runtime_sent)
    }
}
