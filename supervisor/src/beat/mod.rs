//! Beat: the native replacement for `celery beat`. One actor (a tokio task) owns the job table,
//! the Redis connection and the leader lease; the main loop talks to it through a
//! [`BeatHandle`] (status, reload, shutdown), or a [`BeatView`] (status only, cheap to clone).
//! It sleeps until the earliest of the next due slot, the next lock renewal/attempt, the next
//! Redis retry and, while publishing, the next read of the runtime jobs' change stream (every
//! 0.5 s, one cheap command), and wakes early on a command.
//!
//! What each part owns: this module the handle, the settings a (re)configuration resolves to and
//! the status types; `actor` (the task, its job table and its Redis/lease state), `schedule`
//! (cron/interval fire times and DST), `celery_schedule` (importing a Celery app's
//! `beat_schedule`), `jobs` (the job table, validation, catch-up decisions), `message` (the
//! Celery message), `publisher` (Redis keys, lock commands and the fenced publish), `leader`
//! (lease timing). Beat does not start Celery workers (programs do).
//!
//! Per job the actor keeps a *cursor*: every slot up to it is handled. When it becomes leader it
//! reads each job's last published slot from Redis and continues from there, whenever it started,
//! so a new leader picks up exactly where the old one stopped (a job Redis has no slot for starts
//! from when the supervisor got it; a reload that changes a schedule, from the reload). Slots that
//! fell due while nobody published (a Redis outage, a partition, a leader that died holding the
//! lock until it expired, every supervisor stopped) are *missed*, and
//! the job's `catch_up` policy alone decides about them, whichever supervisor publishes next and
//! whether or not the old leader is still alive: `skip` publishes none, `once` one, `all` each
//! of them exactly once (the publish script refuses a slot not newer than the last one in Redis).
//! Runtime jobs (`runtime`) are stored in Redis by `beat add`, `beat import` or application code
//! and loaded by the leader beside these; they follow the same rules.
//! Redis errors close the connection and are retried with a doubling backoff (100 ms up to 2 s),
//! with one log line when Redis goes away (or refuses the login) and one when it is back;
//! `status` shows the error meanwhile.

mod actor;
pub mod celery_schedule;
pub mod django_import;
pub mod jobs;
pub mod leader;
pub mod message;
pub mod next;
pub mod publisher;
pub mod runtime;
pub mod schedule;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proxy_conf::secrets::Secret;
use proxy_conf::{AppConfig, BeatConfig};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::Metrics;
use actor::Actor;
pub use jobs::{Job, JobsError, Problem};
use leader::Leader;
use publisher::{Broker, BrokerError};
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
    /// Every `sauna.toml` (and `celery_app`) job, in name order.
    pub jobs: Vec<JobStatus>,
    /// Runtime jobs this leader runs (`beat list` shows them; 0 on a standby).
    pub runtime_jobs: usize,
    /// Stored runtime jobs the leader refuses, name → reason.
    pub runtime_invalid: std::collections::BTreeMap<String, String>,
}

/// Everything a (re)configuration of beat resolves to before the actor sees it.
struct Settings {
    broker_url: String,
    /// `[redis]`'s password, used when the broker URL has none.
    password: Option<Secret>,
    key_prefix: String,
    leader_lock: bool,
    lock_ttl: Duration,
    /// `[beat].timezone`: the zone of runtime cron jobs that name none.
    timezone: chrono_tz::Tz,
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
            timezone: config.timezone,
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

/// A cheap clone of the beat actor's command channel that can only ask for the status: the main
/// loop keeps one while a reload run owns the [`BeatHandle`], so `status` stays live.
#[derive(Debug, Clone)]
pub struct BeatView {
    commands: mpsc::Sender<Command>,
}

impl BeatView {
    /// The current state of every job and of the lease.
    pub async fn status(&self) -> Result<BeatStatus, BeatError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Status(reply))
            .await
            .map_err(|_| BeatError::Stopped)?;
        answer.await.map_err(|_| BeatError::Stopped)
    }
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
    tracing::info!(
        broker = broker.url(),
        jobs = settings.jobs.len(),
        "beat: started"
    );
    let mut actor = Actor::new(settings, broker, leader, format!("{pid}@{host}"), metrics);
    actor.update_next_metrics();
    let (commands, inbox) = mpsc::channel(16);
    let task = tokio::spawn(actor.run(inbox));
    Ok(BeatHandle { commands, task })
}

impl BeatHandle {
    /// The current state of every job and of the lease.
    pub async fn status(&self) -> Result<BeatStatus, BeatError> {
        self.view().status().await
    }

    /// A handle that can ask the status from anywhere, for as long as the actor runs.
    pub fn view(&self) -> BeatView {
        BeatView {
            commands: self.commands.clone(),
        }
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
