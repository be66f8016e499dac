//! Beat's actor: the one task that owns the job table (each job's cursor, next slot and last
//! run), the Redis connection with its backoff and the leader lease. It sleeps until the earliest
//! of the next due slot, the next lock renewal/attempt and the next Redis retry, and wakes early
//! on a command from the [`BeatHandle`](super::BeatHandle). The rules it follows (cursors,
//! take-over, catch-up) are described in the module above.
//! Its parts: `job_state` (one job as the table holds it), `publish` (a publishing pass),
//! `ahead` (the next slot's messages built before it falls due) and `runtime` (the jobs stored
//! in Redis).

mod ahead;
mod job_state;
mod publish;
mod runtime;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::leader::{Leader, Lease};
use super::publisher::{Broker, BrokerError};
use super::{BACKOFF_MAX, BACKOFF_MIN, BeatError, BeatStatus, Command, JobStatus, Settings};
use crate::metrics::Metrics;
use ahead::{PREPARE_AHEAD, Prepared};
use job_state::{JobState, Shared};

pub(super) struct Actor {
    settings: Settings,
    broker: Broker,
    leader: Leader,
    jobs: Vec<JobState>,
    /// The task names, queues and cron texts the jobs share.
    shared: Shared,
    /// `None` until the first Redis command, so the first outcome is logged either way.
    redis_up: Option<bool>,
    /// The last Redis failure and when it happened, for `status`.
    last_error: Option<(String, std::time::SystemTime)>,
    /// The current outage is a refused login.
    refused_login: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Cursors have been merged with Redis's last published slots since we became publisher.
    synced: bool,
    /// Runtime jobs: the change-stream position and the name index.
    runtime: runtime::Follower,
    /// The earliest `next` of any job, once computed (`None`: a job changed since); with
    /// 100 000 jobs, scanning them at every wake-up would be most of the idle cost.
    earliest: Option<Option<DateTime<Utc>>>,
    /// The messages of the next slot, built ahead (see [`PREPARE_AHEAD`]).
    prepared: Option<Prepared>,
    /// The last mark given to a prepared set.
    marks: u32,
    /// Counts moves in the job table (a runtime job removed or added), so prepared batches
    /// know whether their job indices still hold.
    moves: u64,
    origin: String,
    metrics: Arc<Metrics>,
}

/// Jobs whose last published slots are read per round trip when syncing cursors.
const SYNC_BATCH: usize = 5_000;

fn instant_of(time: DateTime<Utc>) -> Instant {
    let wait = (time - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    Instant::now() + wait
}

impl Actor {
    /// The actor for `settings`, every job's cursor at now; nothing is sent to Redis yet.
    pub(super) fn new(
        settings: Settings,
        broker: Broker,
        leader: Leader,
        origin: String,
        metrics: Arc<Metrics>,
    ) -> Actor {
        let wall = Utc::now();
        let mut shared = Shared::default();
        let jobs = settings
            .jobs
            .iter()
            .map(|job| JobState::new(job.clone(), wall, &mut shared))
            .collect();
        Actor {
            settings,
            broker,
            leader,
            jobs,
            shared,
            redis_up: None,
            last_error: None,
            refused_login: false,
            backoff: BACKOFF_MIN,
            retry_at: None,
            synced: false,
            runtime: runtime::Follower::new(),
            earliest: None,
            prepared: None,
            marks: 0,
            moves: 0,
            origin,
            metrics,
        }
    }

    pub(super) async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        loop {
            let earliest = self.earliest_next();
            let wake = self.next_wake(earliest);
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = inbox.recv() => match command {
                    Some(Command::Status(reply)) => {
                        let _ = reply.send(self.status());
                    }
                    Some(Command::Reload(settings, reply)) => {
                        let outcome = self.reload(*settings).await;
                        let _ = reply.send(outcome);
                    }
                    Some(Command::Shutdown(reply)) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                () = sleep => self.tick().await,
            }
        }
    }

    /// The earliest next slot of any job, cached until a job changes.
    fn earliest_next(&mut self) -> Option<DateTime<Utc>> {
        if let Some(earliest) = self.earliest {
            return earliest;
        }
        let earliest = self.jobs.iter().filter_map(|job| job.next).min();
        self.earliest = Some(earliest);
        earliest
    }

    fn next_wake(&self, earliest: Option<DateTime<Utc>>) -> Option<Instant> {
        if let Some(retry_at) = self.retry_at {
            return Some(retry_at);
        }
        let now = Instant::now();
        let lock = self.leader.next_action();
        let publish = if self.leader.may_publish(now) {
            if !self.synced {
                Some(now)
            } else {
                // Wake ahead of the next slot to prepare it, then at the slot to send it.
                let ready = |at| self.prepared.as_ref().is_some_and(|p| p.at == at);
                earliest
                    .map(|at| {
                        if ready(at) {
                            instant_of(at)
                        } else {
                            instant_of(at).checked_sub(PREPARE_AHEAD).unwrap_or(now)
                        }
                    })
                    .into_iter()
                    .chain([self.runtime.next_poll])
                    .min()
            }
        } else {
            None
        };
        [lock, publish].into_iter().flatten().min()
    }

    fn status(&self) -> BeatStatus {
        BeatStatus {
            leader: self.leader.is_leader(),
            lock_holder: self.leader.holder(),
            broker: self.broker.url().to_owned(),
            redis_up: self.redis_up.unwrap_or(false),
            last_error: self.last_error.as_ref().map(|(error, _)| error.clone()),
            last_error_at: self.last_error.as_ref().map(|(_, at)| {
                at.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |since| since.as_secs_f64())
            }),
            runtime_jobs: self.runtime.count(),
            runtime_invalid: self.runtime.invalid.clone(),
            // The TOML jobs are the table's head; the health line asks every second, and
            // walking 100 000 runtime jobs for it was most of an idle leader's CPU.
            jobs: self.jobs[..self.jobs.len() - self.runtime.count()]
                .iter()
                .map(|state| {
                    let shown = state.shown.as_deref();
                    JobStatus {
                        name: state.job.name.to_string(),
                        task: state.job.task.to_string(),
                        schedule: state.job.schedule.to_string(),
                        next_run: state.next.map(|time| state.show(time)),
                        last_run: shown
                            .and_then(|shown| shown.last_run)
                            .map(|time| state.show(time)),
                        last_task_id: shown
                            .and_then(|shown| shown.last_task_id)
                            .map(|id| id.to_string()),
                        published: shown.map_or(0, |shown| shown.published),
                    }
                })
                .collect(),
        }
    }

    /// Sets the next-run gauge of every job whose next run changed since it was last set.
    pub(super) fn update_next_metrics(&mut self) {
        // Runtime jobs come after the TOML ones and have no series of their own.
        let toml = self.jobs.len() - self.runtime.count();
        for state in &mut self.jobs[..toml] {
            let Some(shown) = state.shown.as_deref_mut() else {
                continue;
            };
            if shown.next == Some(state.next) {
                continue;
            }
            if shown.next.is_none() {
                // A new job's counters start at 0, so both families show before its first
                // publish or error and `rate()` sees the first increment.
                let name = [&*state.job.name];
                self.metrics.beat_published_total.with_label_values(&name);
                self.metrics.beat_errors_total.with_label_values(&name);
            }
            shown.next = Some(state.next);
            let gauge = self
                .metrics
                .beat_next_run_timestamp_seconds
                .with_label_values(&[&state.job.name]);
            gauge.set(state.next.map(|time| time.timestamp()).unwrap_or(0));
        }
    }

    fn set_leader_metric(&self) {
        self.metrics.beat_leader.set(i64::from(matches!(
            self.leader.lease(),
            Lease::Leader { .. }
        )));
    }

    fn redis_ok(&mut self) {
        if self.redis_up != Some(true) {
            if self.redis_up == Some(false) {
                tracing::info!(broker = self.broker.url(), "beat: Redis is reachable again");
            } else {
                tracing::info!(broker = self.broker.url(), "beat: connected to Redis");
            }
        }
        self.redis_up = Some(true);
        self.last_error = None;
        self.refused_login = false;
        self.backoff = BACKOFF_MIN;
        self.retry_at = None;
    }

    fn redis_failed(&mut self, error: &BrokerError) {
        // One line per outage, and one more if its cause turns into a refused login (or back):
        // a timeout under load must not hide the wrong password that follows it.
        let refused = error.is_auth_failure();
        if self.redis_up != Some(false) || refused != self.refused_login {
            if refused {
                tracing::warn!(
                    error = %error,
                    "beat: Redis refused the login; publishing paused, retrying with backoff up to {BACKOFF_MAX:?}"
                );
            } else {
                tracing::warn!(
                    error = %error,
                    "beat: cannot reach Redis; publishing paused, retrying with backoff up to {BACKOFF_MAX:?}"
                );
            }
        }
        self.redis_up = Some(false);
        self.refused_login = refused;
        self.last_error = Some((error.to_string(), std::time::SystemTime::now()));
        let now = Instant::now();
        let retry_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.retry_at = Some(retry_at);
        self.synced = false;
        self.prepared = None;
        if self.leader.unreachable(now, retry_at) {
            tracing::warn!(
                "beat: leader lease ran out while Redis was unreachable; no longer publishing"
            );
            self.set_leader_metric();
        }
    }

    /// One wake-up: lock work, then every due job.
    async fn tick(&mut self) {
        let now = Instant::now();
        if self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        self.retry_at = None;
        if self.leader.expire(now) {
            tracing::warn!("beat: could not renew the leader lock in time; no longer publishing");
            self.set_leader_metric();
        }
        if self.leader.due(now) {
            let sent = Instant::now();
            let ttl = self.leader.ttl();
            let token = self.leader.token().to_owned();
            if matches!(self.leader.lease(), Lease::Leader { .. }) {
                match self.broker.renew(&token, ttl).await {
                    Ok(true) => {
                        self.redis_ok();
                        self.leader.held(sent);
                    }
                    Ok(false) => {
                        self.redis_ok();
                        tracing::warn!(
                            "beat: the leader lock was taken over; no longer publishing"
                        );
                        self.leader.resign(Instant::now());
                        self.set_leader_metric();
                    }
                    Err(error) => return self.redis_failed(&error),
                }
            } else {
                match self.broker.acquire(&token, ttl).await {
                    Ok(None) => {
                        self.redis_ok();
                        if self.leader.held(sent) {
                            tracing::info!(
                                holder = self.leader.holder().unwrap_or_default(),
                                "beat: acquired the leader lock; publishing"
                            );
                            self.synced = false;
                            self.set_leader_metric();
                        }
                    }
                    Ok(Some(holder)) => {
                        self.redis_ok();
                        let first = self.leader.holder().is_none();
                        let name = holder.name.clone();
                        self.leader.refused(Instant::now(), holder);
                        if first {
                            tracing::info!(
                                holder = name.unwrap_or_default(),
                                "beat: another supervisor holds the leader lock; standing by"
                            );
                        }
                    }
                    Err(error) => return self.redis_failed(&error),
                }
            }
        }
        if !self.leader.may_publish(Instant::now()) {
            // A standby only shows when jobs would run next; its cursors stay where they were
            // so that, on taking over, sync_cursors and the catch-up policy see every slot.
            let now = Utc::now();
            if self.earliest_next().is_some_and(|earliest| earliest <= now) {
                for state in &mut self.jobs {
                    if state.next.is_some_and(|next| next <= now) {
                        state.next = state.job.schedule.next_after(now);
                    }
                }
                self.earliest = None;
            }
            self.update_next_metrics();
            return;
        }
        if !self.synced {
            self.runtime.reset();
            if let Err(error) = self.load_runtime().await {
                return self.redis_failed(&error);
            }
            if let Err(error) = self.sync_cursors().await {
                return self.redis_failed(&error);
            }
            self.redis_ok();
        }
        // sauna.toml's jobs go out before the change stream is read: no runtime change can alter
        // them, so they do not wait a round trip for it, and a fenced publish of theirs never
        // depends on the stream read succeeding first.
        let toml = self.jobs.len() - self.runtime.count();
        if let Err(error) = self.publish_due(toml).await {
            self.redis_failed(&error);
            self.update_next_metrics();
            return;
        }
        if !self.leader.may_publish(Instant::now()) {
            self.update_next_metrics();
            return;
        }
        if let Err(error) = self.poll_runtime().await {
            return self.redis_failed(&error);
        }
        if let Err(error) = self.publish_due(self.jobs.len()).await {
            self.redis_failed(&error);
        }
        if let Err(error) = self.finish_one_offs().await {
            return self.redis_failed(&error);
        }
        self.prepare_next();
        self.update_next_metrics();
    }

    /// Moves each job's cursor to the last slot any supervisor published for it, when Redis has
    /// one (else the cursor stays: a new job starts from when this supervisor first had it).
    async fn sync_cursors(&mut self) -> Result<(), BrokerError> {
        // In steps: one reply for 100 000 jobs was a transient ten megabytes, the peak of a load.
        for start in (0..self.jobs.len()).step_by(SYNC_BATCH) {
            let end = (start + SYNC_BATCH).min(self.jobs.len());
            let names: Vec<&str> = self.jobs[start..end]
                .iter()
                .map(|state| &*state.job.name)
                .collect();
            let slots = self.broker.last_slots(&names).await?;
            for (state, slot) in self.jobs[start..end].iter_mut().zip(slots) {
                if let Some(mark) = slot.and_then(DateTime::from_timestamp_millis) {
                    state.resume(mark);
                }
            }
        }
        self.earliest = None;
        self.prepared = None;
        self.synced = true;
        Ok(())
    }

    async fn reload(&mut self, settings: Settings) -> Result<(), BeatError> {
        // Publish what is due under the old schedule first, so the switch loses no slot.
        if self.retry_at.is_none() {
            self.tick().await;
        }
        if !self.settings.same_broker(&settings) {
            let broker = Broker::new(
                &settings.broker_url,
                settings.password.as_ref(),
                &settings.key_prefix,
                settings.redis_timeout(),
            )?;
            self.release().await;
            self.broker = broker;
            self.leader = Leader::new(
                settings.leader_lock,
                settings.lock_ttl,
                self.leader.token().to_owned(),
                Instant::now(),
            );
            self.redis_up = None;
            self.last_error = None;
            self.refused_login = false;
            self.retry_at = None;
            self.backoff = BACKOFF_MIN;
            self.synced = false;
            self.set_leader_metric();
        }
        let now = Utc::now();
        // The TOML jobs are the table's head. The runtime ones stay in the table, keeping their
        // cursors, and are re-read at the next publishing wake-up (a new TOML job may now shadow
        // one, or a new default zone apply): moved out and back, 100 000 of them were a second
        // copy of the table.
        let toml = self.jobs.len() - self.runtime.count();
        let mut old: Vec<JobState> = self.jobs.drain(..toml).collect();
        let mut jobs = Vec::with_capacity(settings.jobs.len());
        for job in &settings.jobs {
            let state = match old.iter().position(|state| *state.job.name == *job.name) {
                Some(position) => {
                    let mut state = old.swap_remove(position);
                    let changed = state.job.schedule != job.schedule;
                    state.replace_job(job.clone(), &mut self.shared);
                    if changed {
                        state.advance(now);
                        state.since = Some(now);
                    }
                    state
                }
                None => JobState {
                    since: Some(now),
                    ..JobState::new(job.clone(), now, &mut self.shared)
                },
            };
            jobs.push(state);
        }
        for removed in old {
            let _ = self
                .metrics
                .beat_next_run_timestamp_seconds
                .remove_label_values(&[&removed.job.name]);
        }
        let moved = jobs.len() != toml;
        self.jobs.splice(..0, jobs);
        if moved {
            self.reindex_runtime();
        }
        self.earliest = None;
        self.prepared = None;
        self.settings = settings;
        self.runtime.toml_changed();
        self.synced = false;
        self.update_next_metrics();
        tracing::info!(jobs = self.jobs.len(), "beat: schedule reloaded");
        Ok(())
    }

    async fn release(&mut self) {
        if matches!(self.leader.lease(), Lease::Leader { .. }) {
            let token = self.leader.token().to_owned();
            match self.broker.release(&token).await {
                Ok(()) => tracing::info!("beat: released the leader lock"),
                Err(error) => {
                    tracing::warn!(error = %error, "beat: could not release the leader lock; it expires by itself")
                }
            }
        }
        self.leader.resign(Instant::now());
        self.set_leader_metric();
    }

    async fn shutdown(&mut self) {
        self.release().await;
        self.metrics.beat_leader.set(0);
        tracing::info!("beat: stopped");
    }
}
