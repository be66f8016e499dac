//! Beat: the native replacement for `celery beat`. One actor (a tokio task) owns the job table,
//! the Redis connection and the leader lease; the main loop talks to it through a
//! [`BeatHandle`] (status, reload, shutdown). It never polls: it sleeps until the earliest of the
//! next due slot, the next lock renewal/attempt and the next Redis retry, and wakes early on a
//! command.
//!
//! What each part owns: `schedule` (cron/interval fire times and DST), `celery_schedule`
//! (importing a Celery app's `beat_schedule`), `jobs` (the job table, validation, catch-up
//! decisions), `message` (the Celery message), `publisher` (Redis keys, lock commands and the
//! fenced publish), `leader` (lease timing). Beat does not start Celery workers (programs do).
//!
//! Per job the actor keeps a *cursor*: every slot up to it is handled. When it becomes leader it
//! reads each job's last published slot from Redis and continues from there, so a new leader picks
//! up exactly where the old one stopped. Slots that fell due while a now-dead leader still held
//! the lock (at most one lock TTL before the takeover) were that leader's to publish, not missed
//! by everyone, so the new leader publishes all of them whatever the policy; the catch-up policy
//! decides only about slots nobody could publish (no leader at all: a restart, a Redis outage). Redis errors close the connection and are retried with a doubling backoff (100 ms
//! up to 2 s), with one log line when Redis goes away (or refuses the login) and one when it is
//! back; `status` shows the error meanwhile.

pub mod celery_schedule;
pub mod jobs;
pub mod leader;
pub mod message;
pub mod next;
pub mod publisher;
pub mod schedule;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use proxy_conf::secrets::Secret;
use proxy_conf::{AppConfig, BeatConfig};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::Metrics;
pub use jobs::{Job, JobsError, Problem, validate_jobs};
use leader::{Leader, Lease};
use message::TaskMessage;
use publisher::{Broker, BrokerError, Published};
pub use schedule::Schedule;

/// First retry delay after a Redis error.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why beat could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum BeatError {
    /// The job table is invalid or the Celery app's schedule could not be imported.
    #[error(transparent)]
    Jobs(#[from] JobsError),
    /// The broker URL is unusable.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The actor has stopped (it only stops on shutdown).
    #[error("beat has stopped")]
    Stopped,
}

/// One job in [`BeatStatus`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobStatus {
    /// Job name.
    pub name: String,
    /// Celery task name.
    pub task: String,
    /// The schedule, e.g. `cron "*/5 * * * *" (UTC)` or `every 30s`.
    pub schedule: String,
    /// Next due instant (RFC 3339 in the job's zone), when there is one.
    pub next_run: Option<String>,
    /// The slot of the last Celery task this supervisor published.
    pub last_run: Option<String>,
    /// The id of that Celery task.
    pub last_task_id: Option<String>,
    /// Celery tasks this supervisor published for the job.
    pub published: u64,
}

/// What `status` shows about beat.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BeatStatus {
    /// True when this supervisor publishes (holds the lock, or the lock is off).
    pub leader: bool,
    /// `host:pid` of the lock holder, when known.
    pub lock_holder: Option<String>,
    /// The broker URL (password hidden).
    pub broker: String,
    /// Whether the last Redis command succeeded.
    pub redis_up: bool,
    /// The last Redis failure, e.g. `Redis at redis://127.0.0.1:6379/3: Connection refused (os error 111)`
    /// (password hidden); kept after Redis is back, with its time in `last_error_at`.
    pub last_error: Option<String>,
    /// Unix time of `last_error`.
    pub last_error_at: Option<f64>,
    /// Every job, in name order.
    pub jobs: Vec<JobStatus>,
}

/// Everything a (re)configuration of beat resolves to before the actor sees it.
struct Settings {
    broker_url: String,
    /// `[redis]`'s password, used when the broker URL has none.
    password: Option<Secret>,
    key_prefix: String,
    leader_lock: bool,
    lock_ttl: Duration,
    jobs: Vec<Job>,
}

impl Settings {
    async fn build(
        config: &BeatConfig,
        password: Option<&Secret>,
        app: &AppConfig,
        base_dir: &Path,
    ) -> Result<Settings, BeatError> {
        let mut jobs = jobs::build_jobs(config, app, base_dir).await?;
        jobs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Settings {
            broker_url: config.broker.clone(),
            password: password.cloned(),
            key_prefix: config.key_prefix.clone(),
            leader_lock: config.leader_lock,
            lock_ttl: config.lock_ttl.get(),
            jobs,
        })
    }

    fn same_broker(&self, other: &Settings) -> bool {
        self.broker_url == other.broker_url
            && self.password == other.password
            && self.key_prefix == other.key_prefix
            && self.leader_lock == other.leader_lock
            && self.lock_ttl == other.lock_ttl
    }

    /// Bounds connecting and each reply: well inside the lease so a hung Redis cannot outlast it.
    fn redis_timeout(&self) -> Duration {
        if self.leader_lock {
            (self.lock_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
        } else {
            Duration::from_secs(2)
        }
    }
}

enum Command {
    Status(oneshot::Sender<BeatStatus>),
    Reload(Box<Settings>, oneshot::Sender<Result<(), BeatError>>),
    Shutdown(oneshot::Sender<()>),
}

/// The main loop's handle on the running beat actor.
pub struct BeatHandle {
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

/// Resolves the jobs (importing the Celery app's schedule if configured) and starts the actor,
/// which logs in with `password` (`[redis]`'s) when the broker URL has none. Redis is not needed
/// to start: an unreachable broker, or one that refuses the login, is retried in the background.
pub async fn start(
    config: &BeatConfig,
    password: Option<&Secret>,
    app: &AppConfig,
    base_dir: &Path,
    metrics: Arc<Metrics>,
) -> Result<BeatHandle, BeatError> {
    let settings = Settings::build(config, password, app, base_dir).await?;
    let broker = Broker::new(
        &settings.broker_url,
        settings.password.as_ref(),
        &settings.key_prefix,
        settings.redis_timeout(),
    )?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    let pid = std::process::id();
    let token = format!("{host}:{pid}:{}", uuid::Uuid::new_v4().simple());
    let now = Instant::now();
    let leader = Leader::new(settings.leader_lock, settings.lock_ttl, token, now);
    metrics.beat_leader.set(0);
    let wall = Utc::now();
    let jobs = settings
        .jobs
        .iter()
        .map(|job| JobState::new(job.clone(), wall))
        .collect();
    let mut actor = Actor {
        settings,
        broker,
        leader,
        jobs,
        redis_up: None,
        last_error: None,
        refused_login: false,
        backoff: BACKOFF_MIN,
        retry_at: None,
        synced: false,
        saw_other_leader: false,
        handover_since: None,
        origin: format!("{pid}@{host}"),
        metrics,
    };
    actor.update_next_metrics();
    tracing::info!(
        broker = actor.broker.url(),
        jobs = actor.jobs.len(),
        "beat: started"
    );
    let (commands, inbox) = mpsc::channel(16);
    let task = tokio::spawn(actor.run(inbox));
    Ok(BeatHandle { commands, task })
}

impl BeatHandle {
    /// The current state of every job and of the lease.
    pub async fn status(&self) -> Result<BeatStatus, BeatError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Status(reply))
            .await
            .map_err(|_| BeatError::Stopped)?;
        answer.await.map_err(|_| BeatError::Stopped)
    }

    /// Applies a new `[beat]` (re-importing the Celery app's schedule): jobs whose schedule did
    /// not change keep their place, changed ones continue from now, so no slot fires twice or
    /// is lost. On error the running schedule is kept.
    pub async fn reload(
        &self,
        config: &BeatConfig,
        password: Option<&Secret>,
        app: &AppConfig,
        base_dir: &Path,
    ) -> Result<(), BeatError> {
        let settings = Settings::build(config, password, app, base_dir).await?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Reload(Box::new(settings), reply))
            .await
            .map_err(|_| BeatError::Stopped)?;
        answer.await.map_err(|_| BeatError::Stopped)?
    }

    /// Stops the actor and releases the lock so another supervisor takes over at once.
    pub async fn shutdown(self) {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Shutdown(reply)).await.is_ok() {
            let _ = answer.await;
        }
        let _ = self.task.await;
    }
}

struct JobState {
    job: Job,
    cursor: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
    last_run: Option<DateTime<Utc>>,
    last_task_id: Option<String>,
    published: u64,
    /// The value last written to the next-run gauge (`None`: never written).
    shown_next: Option<Option<DateTime<Utc>>>,
}

impl JobState {
    fn new(job: Job, cursor: DateTime<Utc>) -> JobState {
        let next = job.schedule.next_after(cursor);
        JobState {
            job,
            cursor,
            next,
            last_run: None,
            last_task_id: None,
            published: 0,
            shown_next: None,
        }
    }

    /// Marks every slot up to `cursor` handled and recomputes the next one from the cursor.
    fn advance(&mut self, cursor: DateTime<Utc>) {
        self.cursor = self.cursor.max(cursor);
        self.next = self.job.schedule.next_after(self.cursor);
    }

    fn show(&self, time: DateTime<Utc>) -> String {
        match &self.job.schedule {
            Schedule::Cron { tz, .. } => time
                .with_timezone(tz)
                .to_rfc3339_opts(SecondsFormat::AutoSi, false),
            Schedule::Every { .. } => time.to_rfc3339_opts(SecondsFormat::AutoSi, false),
        }
    }
}

struct Actor {
    settings: Settings,
    broker: Broker,
    leader: Leader,
    jobs: Vec<JobState>,
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
    /// Another supervisor held the lock while we stood by: our next acquisition is a takeover.
    saw_other_leader: bool,
    /// After a takeover: slots due since this instant were the previous leader's (see the module
    /// doc) and are published whatever the catch-up policy; cleared after one publishing pass.
    handover_since: Option<DateTime<Utc>>,
    origin: String,
    metrics: Arc<Metrics>,
}

fn instant_of(time: DateTime<Utc>) -> Instant {
    let wait = (time - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    Instant::now() + wait
}

impl Actor {
    async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        loop {
            let wake = self.next_wake();
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

    fn next_wake(&self) -> Option<Instant> {
        if let Some(retry_at) = self.retry_at {
            return Some(retry_at);
        }
        let now = Instant::now();
        let lock = self.leader.next_action();
        let publish = if self.leader.may_publish(now) {
            if !self.synced {
                Some(now)
            } else {
                self.jobs
                    .iter()
                    .filter_map(|job| job.next)
                    .min()
                    .map(instant_of)
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
            jobs: self
                .jobs
                .iter()
                .map(|state| JobStatus {
                    name: state.job.name.clone(),
                    task: state.job.task.clone(),
                    schedule: state.job.schedule.to_string(),
                    next_run: state.next.map(|time| state.show(time)),
                    last_run: state.last_run.map(|time| state.show(time)),
                    last_task_id: state.last_task_id.clone(),
                    published: state.published,
                })
                .collect(),
        }
    }

    /// Sets the next-run gauge of every job whose next run changed since it was last set.
    fn update_next_metrics(&mut self) {
        for state in &mut self.jobs {
            if state.shown_next == Some(state.next) {
                continue;
            }
            if state.shown_next.is_none() {
                // A new job's counters start at 0, so both families show before its first
                // publish or error and `rate()` sees the first increment.
                let name = [state.job.name.as_str()];
                self.metrics.beat_published_total.with_label_values(&name);
                self.metrics.beat_errors_total.with_label_values(&name);
            }
            state.shown_next = Some(state.next);
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
                            if std::mem::take(&mut self.saw_other_leader) {
                                let ttl = chrono::Duration::from_std(ttl)
                                    .unwrap_or(chrono::Duration::MAX);
                                self.handover_since = Utc::now().checked_sub_signed(ttl);
                            }
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
                        self.saw_other_leader = true;
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
            for state in &mut self.jobs {
                if state.next.is_some_and(|next| next <= now) {
                    state.next = state.job.schedule.next_after(now);
                }
            }
            self.update_next_metrics();
            return;
        }
        if !self.synced {
            if let Err(error) = self.sync_cursors().await {
                return self.redis_failed(&error);
            }
            self.redis_ok();
        }
        if let Err(error) = self.publish_due().await {
            self.redis_failed(&error);
        }
        self.update_next_metrics();
    }

    /// Merges each job's cursor with the last slot any supervisor published for it.
    async fn sync_cursors(&mut self) -> Result<(), BrokerError> {
        let names: Vec<&str> = self
            .jobs
            .iter()
            .map(|state| state.job.name.as_str())
            .collect();
        let slots = self.broker.last_slots(&names).await?;
        for (state, slot) in self.jobs.iter_mut().zip(slots) {
            let slot = slot.and_then(DateTime::from_timestamp_millis);
            state.advance(slot.unwrap_or(state.cursor));
        }
        self.synced = true;
        Ok(())
    }

    async fn publish_due(&mut self) -> Result<(), BrokerError> {
        let now = Utc::now();
        for index in 0..self.jobs.len() {
            if self.jobs[index].next.is_none_or(|next| next > now) {
                continue;
            }
            let state = &self.jobs[index];
            let plan = jobs::plan_due(
                &state.job.schedule,
                state.job.catch_up,
                state.job.catch_up_window,
                state.cursor,
                self.handover_since,
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
            for slot in plan.publish {
                if !self.leader.may_publish(Instant::now()) {
                    return Ok(());
                }
                match self.publish_one(index, slot).await? {
                    Published::Sent | Published::AlreadySent => {}
                    Published::NotLeader => {
                        tracing::warn!(
                            "beat: publish refused because the leader lock is no longer ours; standing by"
                        );
                        self.leader.resign(Instant::now());
                        self.set_leader_metric();
                        self.synced = false;
                        return Ok(());
                    }
                }
            }
            self.jobs[index].advance(now);
        }
        self.handover_since = None;
        Ok(())
    }

    async fn publish_one(
        &mut self,
        index: usize,
        slot: DateTime<Utc>,
    ) -> Result<Published, BrokerError> {
        let state = &self.jobs[index];
        let job = &state.job;
        let task_id = uuid::Uuid::new_v4().to_string();
        let delivery_tag = uuid::Uuid::new_v4().to_string();
        let published_at = Utc::now();
        let message = TaskMessage {
            task: &job.task,
            id: &task_id,
            delivery_tag: &delivery_tag,
            args: &job.args,
            kwargs: &job.kwargs,
            queue: &job.queue,
            priority: job.priority,
            expires: job
                .expires
                .and_then(|expires| chrono::Duration::from_std(expires).ok())
                .map(|expires| published_at + expires),
            origin: &self.origin,
            slot: Some((&job.name, slot)),
        };
        let outcome = self
            .broker
            .publish(
                self.leader.fence(),
                &job.name,
                slot.timestamp_millis(),
                &message.queue_key(),
                &message.envelope(),
            )
            .await;
        let lag = (Utc::now() - slot).to_std().unwrap_or(Duration::ZERO);
        match &outcome {
            Ok(Published::Sent) => {
                self.metrics
                    .beat_published_total
                    .with_label_values(&[&job.name])
                    .inc();
                self.metrics.beat_lag_seconds.observe(lag.as_secs_f64());
                tracing::info!(
                    job = %job.name,
                    task = %job.task,
                    task_id = %task_id,
                    slot = %state.show(slot),
                    lag_ms = lag.as_millis() as u64,
                    "beat: published"
                );
                let state = &mut self.jobs[index];
                state.last_run = Some(slot);
                state.last_task_id = Some(task_id);
                state.published += 1;
            }
            Ok(Published::AlreadySent) => {
                tracing::debug!(job = %job.name, slot = %state.show(slot), "beat: slot already published by another supervisor");
            }
            Ok(Published::NotLeader) => {}
            Err(error) => {
                self.metrics
                    .beat_errors_total
                    .with_label_values(&[&job.name])
                    .inc();
                tracing::debug!(job = %job.name, error = %error, "beat: publish failed; the slot stays due");
            }
        }
        outcome
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
        let mut old: Vec<JobState> = std::mem::take(&mut self.jobs);
        let mut jobs = Vec::with_capacity(settings.jobs.len());
        for job in &settings.jobs {
            let state = match old.iter().position(|state| state.job.name == job.name) {
                Some(position) => {
                    let mut state = old.swap_remove(position);
                    let changed = state.job.schedule != job.schedule;
                    state.job = job.clone();
                    if changed {
                        state.advance(now);
                    }
                    state
                }
                None => JobState::new(job.clone(), now),
            };
            jobs.push(state);
        }
        for removed in old {
            let _ = self
                .metrics
                .beat_next_run_timestamp_seconds
                .remove_label_values(&[&removed.job.name]);
        }
        self.jobs = jobs;
        self.settings = settings;
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
