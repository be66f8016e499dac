//! The web pool actor: owns the set of workers and decides their lives — start the pool, replace a
//! worker that crashed (with backoff and per-slot crash-loop protection) or timed out, recycle
//! workers by `max_requests` and `max_rss` one at a time with the replacement ready first, add and
//! remove workers (`TTIN`/`TTOU`), stop gracefully — and reports `status`. The main loop drives it
//! through a `PoolHandle`; requests never pass through it (front → dispatcher → worker slot).
//!
//! Workers are numbered by *slot* (0 … workers-1, the `worker` label of the metrics) and carry the
//! *generation* they were started under. A slot can briefly hold two workers while one is being
//! recycled or rolled.
//!
//! A reload (`PoolHandle::reload`) is a state machine inside the actor, driven by the same worker
//! events as everything else, so the actor keeps answering `status` and handling crashes while it
//! runs. First one *canary* worker of the new generation imports the new release and answers
//! `[web].warmup`; the dispatcher gives it no other request (it routes to the served generation and
//! older ones). Only then does anything change: the new settings apply, and slot by slot a new
//! worker starts, becomes ready, takes requests beside the old ones, and the old worker of its slot
//! drains (`graceful_timeout`) — capacity never drops. A new worker that fails turns the roll
//! around: the same walk refills every slot from the old generation. Recycling waits while a reload
//! runs, and a slot that crashes during the roll is refilled by the roll from its target generation.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_conf::{AppConfig, WebConfig};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::dispatch::{Dispatcher, Notice};
use crate::lifecycle::{Progress, StopMode};
use crate::metrics::Metrics;
use crate::web::environ::{EnvironConfig, Forwarders};
use crate::web::{self, Front, FrontConfig, FrontHandle, WarmUpAnswer};
use crate::worker::{self, Event, Launch, StartError, WorkerId};

/// How often worker RSS is sampled.
const RSS_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive samples over `max_rss` before a worker is recycled (one spike is not a leak).
const RSS_SAMPLES: u32 = 2;
/// Crashes further back than this are forgotten.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// A slot with this many crashes within `CRASH_WINDOW` is in a crash loop.
const CRASH_LOOP: usize = 5;
/// Longest delay before restarting a crashed slot.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// `[app]`/`[web]` cannot run a pool.
    #[error("{0}")]
    Config(String),
    /// A listen address could not be bound.
    #[error(transparent)]
    Bind(#[from] web::BindError),
    /// The app failed to import; the Python traceback.
    #[error("worker {slot}: the app failed to import:\n{traceback}")]
    Import {
        /// The slot whose worker reported it.
        slot: usize,
        /// The Python traceback.
        traceback: String,
    },
    /// A worker failed to start for another reason.
    #[error("worker {slot}: {message}")]
    Start {
        /// The slot.
        slot: usize,
        /// What went wrong.
        message: String,
    },
}

/// The state of one worker or worker slot, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Spawned, importing the app; receives no requests yet.
    Starting,
    /// Serving requests.
    Ready,
    /// Receives no new requests; finishing its in-flight ones before it exits.
    Draining,
    /// Being killed (timeout, broken channel, stop).
    Killing,
    /// No process: waiting to restart after a crash.
    Backoff,
    /// No process: crashed repeatedly; restarts at the longest backoff.
    CrashLoop,
}

/// One worker (or an empty slot waiting to restart) in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    /// Slot number (the `worker` label of the metrics).
    pub slot: usize,
    /// Process id; none while the slot waits to restart.
    pub pid: Option<u32>,
    /// The generation it was started under.
    pub generation: u64,
    /// Its state.
    pub state: WorkerState,
    /// Requests it completed.
    pub requests: u64,
    /// Requests in progress.
    pub in_flight: usize,
    /// Last sampled resident memory.
    pub rss_bytes: u64,
    /// The slot's last error: an import traceback, a crash, a timeout with the Python stack.
    pub last_error: Option<String>,
}

/// What `status` reports about the pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// The addresses being served (with real ports).
    pub listen: Vec<String>,
    /// The generation new workers start under (during a roll, the one being rolled to).
    pub generation: u64,
    /// The step of a reload in progress ("generation 3: canary", "generation 3: 2/4 workers
    /// replaced", "rolling back to generation 2").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reloading: Option<String>,
    /// Configured number of workers (changed by `scale`).
    pub workers_wanted: usize,
    /// Every worker and waiting slot.
    pub workers: Vec<WorkerStatus>,
}

enum Command {
    Status(oneshot::Sender<PoolStatus>),
    Scale(i32),
    Reload(Box<ReloadRequest>),
    Shutdown(StopMode, oneshot::Sender<()>),
    DuplicateListeners(oneshot::Sender<std::io::Result<Vec<(String, std::os::fd::OwnedFd)>>>),
    HandOver(oneshot::Sender<()>),
}

struct ReloadRequest {
    app: AppConfig,
    web: WebConfig,
    base_dir: std::path::PathBuf,
    generation: u64,
    progress: Progress,
    reply: oneshot::Sender<Result<Rolled, PoolReloadError>>,
}

/// A successful roll.
struct Rolled {
    summary: String,
    listen: Vec<String>,
    /// Accept tasks of removed addresses; their sockets are closed once these end.
    closing: Vec<tokio::task::JoinHandle<()>>,
}

/// The pool could not be rolled to a new generation; the old one serves (it was never touched, or
/// it was rolled back). The message is one line; `detail` holds the app's traceback or the
/// warm-up response.
#[derive(Debug, Clone)]
pub struct PoolReloadError {
    message: String,
    detail: Option<String>,
}

impl PoolReloadError {
    fn new(message: impl Into<String>) -> PoolReloadError {
        PoolReloadError {
            message: message.into(),
            detail: None,
        }
    }

    /// The error of a worker of the new generation that never became ready: the traceback goes
    /// into the detail, the message stays one line.
    fn start_failed(what: &str, error: &StartError) -> PoolReloadError {
        match error {
            StartError::Import(traceback) => PoolReloadError {
                message: format!("{what}: the app failed to import"),
                detail: Some(traceback.clone()),
            },
            other => PoolReloadError::new(format!("{what}: {other}")),
        }
    }

    /// The app's traceback or the warm-up response, when there is one.
    pub fn detail(&self) -> Option<String> {
        self.detail.clone()
    }
}

impl std::fmt::Display for PoolReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PoolReloadError {}

/// Everything one generation runs with: kept for the old generation during a roll, so that a
/// rollback refills slots exactly as they were.
#[derive(Debug, Clone)]
struct Release {
    generation: u64,
    launch: Arc<Launch>,
    web: WebConfig,
    front: FrontConfig,
}

/// Where a reload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The canary is importing the new release; nothing else has changed.
    Canary(WorkerId),
    /// The canary is ready and answering the warm-up request.
    WarmUp(WorkerId),
    /// The new release serves; slots are rolled to it one at a time.
    Rolling,
    /// A new worker failed; slots are rolled back to the old release one at a time.
    RollingBack,
}

/// A reload in progress.
struct Rollout {
    phase: Phase,
    old: Release,
    new: Release,
    /// Listeners bound for the addresses the new config adds; they accept once the roll succeeds
    /// and are closed if it fails.
    added: Vec<(String, web::Listener)>,
    /// Addresses the new config drops; they stop accepting once the roll succeeds.
    removed: Vec<String>,
    started: Instant,
    canary_started: Instant,
    canary_took: Duration,
    /// Slots that got a worker of the generation rolled to.
    replaced: usize,
    /// The number of workers before the reload (`[web].workers` changed by `TTIN`/`TTOU`): what
    /// a rollback restores.
    old_slots: usize,
    progress: Progress,
    reply: oneshot::Sender<Result<Rolled, PoolReloadError>>,
    /// Why the roll is being turned around.
    failure: Option<PoolReloadError>,
}

impl Rollout {
    fn say(&self, line: String) {
        tracing::info!("reload: {line}");
        let _ = self.progress.send(line);
    }

    fn describe(&self) -> String {
        match self.phase {
            Phase::Canary(_) => format!("generation {}: canary starting", self.new.generation),
            Phase::WarmUp(_) => format!("generation {}: canary warming up", self.new.generation),
            Phase::Rolling => format!(
                "generation {}: {}/{} workers replaced",
                self.new.generation,
                self.replaced,
                wanted_workers(&self.new.web)
            ),
            Phase::RollingBack => format!("rolling back to generation {}", self.old.generation),
        }
    }
}

fn wanted_workers(web: &WebConfig) -> usize {
    usize::try_from(web.workers).unwrap_or(1).max(1)
}

/// `queue_size` and `queue_timeout` as the dispatcher takes them (a timeout of 0 = none).
fn queue_limits(web: &WebConfig) -> (usize, Duration) {
    let queue_timeout = web.queue_timeout.get();
    (
        usize::try_from(web.queue_size).unwrap_or(usize::MAX),
        if queue_timeout.is_zero() {
            Duration::from_secs(u64::from(u32::MAX))
        } else {
            queue_timeout
        },
    )
}

/// The front's settings from `[web]`, or what is wrong with them.
fn front_config(web: &WebConfig) -> Result<FrontConfig, String> {
    let forwarders = Forwarders::parse(&web.forwarded_allow_ips)?;
    let script_name = web.script_name.trim_end_matches('/').to_owned();
    if !script_name.is_empty() && !script_name.starts_with('/') {
        return Err(format!(
            "[web].script_name \"{}\" must start with \"/\"",
            web.script_name
        ));
    }
    if web.listen.is_empty() {
        return Err("[web].listen is empty: give at least one address".to_owned());
    }
    let timeout = web.timeout.get();
    Ok(FrontConfig {
        max_body: web.max_body.bytes(),
        body_buffer: web.body_buffer.bytes(),
        timeout: if timeout.is_zero() {
            Duration::from_secs(u64::from(u32::MAX))
        } else {
            timeout
        },
        retry_after: web.queue_timeout.get().as_secs().max(1),
        access_log: web.access_log,
        environ: EnvironConfig {
            script_name,
            forwarders,
        },
    })
}

/// The pool's entry point.
#[derive(Debug)]
pub struct Pool;

/// The main loop's handle on a running pool.
#[derive(Debug)]
pub struct PoolHandle {
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
    listen: Vec<String>,
}

/// Why a worker's process is expected to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// It should not end: an exit is a crash.
    Unexpected,
    /// Replaced; `reason` is the `worker_restarts_total` label already counted.
    Replaced,
    /// Killed after a timeout; restart the slot at once.
    TimedOut,
    /// Killed because its channel broke; restart the slot at once.
    Broken,
    /// Removed by scale-down or stop; do not restart.
    Removed,
}

#[derive(Debug)]
struct Worker {
    slot: usize,
    generation: u64,
    pid: Option<u32>,
    state: WorkerState,
    commands: mpsc::UnboundedSender<worker::Command>,
    /// Replaces this worker once ready.
    replaces: Option<(WorkerId, &'static str)>,
    ending: Ending,
    rss: u64,
    rss_over: u32,
    served: u64,
    in_flight: usize,
    ready_at: Option<Instant>,
    drain_deadline: Option<Instant>,
}

#[derive(Debug, Default)]
struct Slot {
    crashes: Vec<Instant>,
    restart_at: Option<Instant>,
    last_error: Option<String>,
}

/// Delay before restarting a slot that crashed `recent` times within the crash window: 0.1 s,
/// doubling, capped at `MAX_BACKOFF`; a crash loop waits the cap.
fn restart_delay(recent: usize) -> Duration {
    if recent >= CRASH_LOOP {
        return MAX_BACKOFF;
    }
    let exponent = u32::try_from(recent.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(16);
    (Duration::from_millis(100) * 2u32.pow(exponent)).min(MAX_BACKOFF)
}

/// `max_requests` plus a per-worker random part of the jitter; `None` when recycling by count is off.
fn request_limit(max_requests: u64, jitter: u64) -> Option<u64> {
    use std::hash::{BuildHasher, Hasher};
    if max_requests == 0 {
        return None;
    }
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Some(
        max_requests
            + if jitter == 0 {
                0
            } else {
                random % (jitter + 1)
            },
    )
}

struct Actor {
    launch: Arc<Launch>,
    web: WebConfig,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    front: Option<FrontHandle>,
    listen: Vec<String>,
    generation: u64,
    next_id: WorkerId,
    workers: BTreeMap<WorkerId, Worker>,
    slots: Vec<Slot>,
    recycle_queue: VecDeque<(WorkerId, &'static str)>,
    recycling: Option<WorkerId>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    notices: mpsc::UnboundedReceiver<Notice>,
    stack_context: BTreeMap<WorkerId, String>,
    rollout: Option<Rollout>,
    warm_ups_tx: mpsc::UnboundedSender<(WorkerId, Result<WarmUpAnswer, String>)>,
    warm_ups: mpsc::UnboundedReceiver<(WorkerId, Result<WarmUpAnswer, String>)>,
}

impl Pool {
    /// Binds every listen address, starts the workers and resolves once each reported ready.
    /// Fails with the address that cannot be bound, or the traceback of a worker whose import
    /// failed (every started worker is stopped again).
    pub async fn start(
        app: &AppConfig,
        web: &WebConfig,
        base_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<PoolHandle, PoolError> {
        Pool::start_on(app, web, base_dir, metrics, None).await
    }

    /// [`Pool::start`] on `listeners` (one per `[web].listen` entry, in order) when given: the
    /// sockets a successor adopted in an upgrade. The front accepts on them only once every
    /// worker is ready, so until then their connections go to the old supervisor.
    pub async fn start_on(
        app: &AppConfig,
        web: &WebConfig,
        base_dir: &Path,
        metrics: Arc<Metrics>,
        listeners: Option<Vec<web::Listener>>,
    ) -> Result<PoolHandle, PoolError> {
        let threads = usize::try_from(web.threads).unwrap_or(1).max(1);
        let launch = Arc::new(
            Launch::new(app, base_dir, threads, web.reload_timeout.get())
                .map_err(PoolError::Config)?,
        );
        let config = front_config(web).map_err(PoolError::Config)?;
        let listeners = match listeners {
            Some(listeners) => listeners,
            None => web::bind(&web.listen, web.backlog)?,
        };
        let listen = listeners.iter().map(web::Listener::address).collect();

        let (notices_tx, notices) = mpsc::unbounded_channel();
        let (queue_size, queue_timeout) = queue_limits(web);
        let dispatcher =
            Dispatcher::new(queue_size, queue_timeout, Arc::clone(&metrics), notices_tx);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (warm_ups_tx, warm_ups) = mpsc::unbounded_channel();
        let mut actor = Actor {
            launch,
            web: web.clone(),
            dispatcher: Arc::clone(&dispatcher),
            metrics: Arc::clone(&metrics),
            front: None,
            listen,
            generation: 1,
            next_id: 1,
            workers: BTreeMap::new(),
            slots: Vec::new(),
            recycle_queue: VecDeque::new(),
            recycling: None,
            events_tx,
            events,
            notices,
            stack_context: BTreeMap::new(),
            rollout: None,
            warm_ups_tx,
            warm_ups,
        };
        dispatcher.set_generation(actor.generation);
        metrics.generation.set(1);
        let wanted = usize::try_from(web.workers).unwrap_or(1).max(1);
        for slot in 0..wanted {
            actor.slots.push(Slot::default());
            actor.spawn_worker(slot, None);
        }
        actor.wait_all_ready().await?;

        let front = Arc::new(Front::new(config, dispatcher, metrics));
        actor.front = Some(web::serve(
            web.listen.iter().cloned().zip(listeners).collect(),
            front,
        ));
        let listen = actor.listen.clone();
        let (commands, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(actor.run(receiver));
        Ok(PoolHandle {
            commands,
            task,
            listen,
        })
    }
}

impl PoolHandle {
    /// The addresses being served, with the real port where 0 was configured.
    pub fn listen_addresses(&self) -> &[String] {
        &self.listen
    }

    /// Every worker's pid, generation, state, requests, RSS and last error.
    pub async fn status(&self) -> PoolStatus {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Status(reply));
        answer.await.unwrap_or_else(|_| PoolStatus {
            listen: self.listen.clone(),
            generation: 0,
            reloading: None,
            workers_wanted: 0,
            workers: Vec::new(),
        })
    }

    /// Adds (`delta > 0`) or removes workers; the pool never goes below one worker.
    pub fn scale(&self, delta: i32) {
        let _ = self.commands.send(Command::Scale(delta));
    }

    /// Rolls the pool to `generation`: a canary of the new `[app]`/`[web]` imports the app and
    /// answers `[web].warmup` within `reload_timeout`, then every slot is replaced one at a time
    /// with the new worker ready before the old one drains, and listen addresses are added and
    /// removed. Nothing changes when the canary fails; a later failure rolls back to the old
    /// generation. Steps go to `progress`; the answer is a one-line summary.
    pub async fn reload(
        &mut self,
        app: &AppConfig,
        web: &WebConfig,
        base_dir: &Path,
        generation: u64,
        progress: &Progress,
    ) -> Result<String, PoolReloadError> {
        let (reply, answer) = oneshot::channel();
        let request = ReloadRequest {
            app: app.clone(),
            web: web.clone(),
            base_dir: base_dir.to_path_buf(),
            generation,
            progress: progress.clone(),
            reply,
        };
        if self
            .commands
            .send(Command::Reload(Box::new(request)))
            .is_err()
        {
            return Err(PoolReloadError::new("the web pool is not running"));
        }
        let rolled = answer
            .await
            .map_err(|_| PoolReloadError::new("the web pool stopped during the reload"))??;
        // `reload` returns only once a removed address refuses connections.
        for task in rolled.closing {
            let _ = task.await;
        }
        self.listen = rolled.listen;
        Ok(rolled.summary)
    }

    /// Stops the pool. Graceful: stop accepting, let in-flight requests finish within
    /// `graceful_timeout`, then stop the workers. Fast: kill everything now.
    pub async fn shutdown(self, mode: StopMode) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Shutdown(mode, reply)).is_ok() {
            let _ = done.await;
        }
        let _ = self.task.await;
    }

    /// Duplicates of the listening sockets with their `[web].listen` entries, for a successor
    /// started by `upgrade` to inherit.
    pub async fn duplicate_listeners(
        &self,
    ) -> std::io::Result<Vec<(String, std::os::fd::OwnedFd)>> {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::DuplicateListeners(reply));
        answer
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the web pool is not running")))
    }

    /// Stops the pool after an upgrade handed its sockets to a successor: stop accepting (the
    /// Unix socket files stay, they are the successor's), close each open connection after its
    /// next response, give clients [`HANDOVER_LINGER`] (at most `graceful_timeout`) to make
    /// that request, then stop gracefully.
    pub async fn hand_over(self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::HandOver(reply)).is_ok() {
            let _ = done.await;
        }
        let _ = self.task.await;
    }
}

/// How long a handed-over front keeps its open connections for clients to make one more request
/// (answered with `Connection: close`) before the idle ones are closed.
const HANDOVER_LINGER: Duration = Duration::from_secs(2);

impl Actor {
    fn spawn_worker(
        &mut self,
        slot: usize,
        replaces: Option<(WorkerId, &'static str)>,
    ) -> WorkerId {
        let launch = Arc::clone(&self.launch);
        self.spawn_worker_as(slot, replaces, self.generation, launch)
    }

    /// Starts a worker of `generation` run as `launch` (the canary is of a later generation than
    /// the pool's).
    fn spawn_worker_as(
        &mut self,
        slot: usize,
        replaces: Option<(WorkerId, &'static str)>,
        generation: u64,
        launch: Arc<Launch>,
    ) -> WorkerId {
        let id = self.next_id;
        self.next_id += 1;
        let label = format!("web worker {slot}");
        let commands = worker::spawn(id, label, launch, self.events_tx.clone());
        self.workers.insert(
            id,
            Worker {
                slot,
                generation,
                pid: None,
                state: WorkerState::Starting,
                commands,
                replaces,
                ending: Ending::Unexpected,
                rss: 0,
                rss_over: 0,
                served: 0,
                in_flight: 0,
                ready_at: None,
                drain_deadline: None,
            },
        );
        self.publish_states();
        id
    }

    /// Start-up: every worker ready, or the first failure (after stopping the others).
    async fn wait_all_ready(&mut self) -> Result<(), PoolError> {
        while self
            .workers
            .values()
            .any(|worker| worker.state == WorkerState::Starting)
        {
            let Some(event) = self.events.recv().await else {
                return Err(PoolError::Config("the worker tasks stopped".to_owned()));
            };
            match event {
                Event::Ready { id, pid, slots } => self.on_ready(id, pid, slots),
                Event::Failed { id, error } => {
                    let slot = self.workers.get(&id).map_or(0, |worker| worker.slot);
                    for worker in self.workers.values() {
                        let _ = worker.commands.send(worker::Command::Kill);
                    }
                    // Wait for the others to be gone so that no process outlives a failed start.
                    let alive = self.workers.len().saturating_sub(1);
                    let mut ended = 0;
                    while ended < alive {
                        match tokio::time::timeout(Duration::from_secs(5), self.events.recv()).await
                        {
                            Ok(Some(Event::Exited { .. } | Event::Failed { .. })) => ended += 1,
                            Ok(Some(Event::Ready { id, .. })) => {
                                if let Some(worker) = self.workers.get(&id) {
                                    let _ = worker.commands.send(worker::Command::Kill);
                                }
                            }
                            Ok(Some(Event::Stack { .. })) => {}
                            Ok(None) | Err(_) => break,
                        }
                    }
                    return Err(match error {
                        StartError::Import(traceback) => PoolError::Import { slot, traceback },
                        other => PoolError::Start {
                            slot,
                            message: other.to_string(),
                        },
                    });
                }
                Event::Stack { .. } | Event::Exited { .. } => {}
            }
        }
        Ok(())
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut rss_tick = tokio::time::interval(RSS_INTERVAL);
        rss_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_restart = self.slots.iter().filter_map(|slot| slot.restart_at).min();
            let restart_timer = async {
                match next_restart {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Status(reply)) => { let _ = reply.send(self.status()); }
                    Some(Command::Scale(delta)) => self.scale(delta),
                    Some(Command::Reload(request)) => self.begin_reload(*request),
                    Some(Command::Shutdown(mode, reply)) => {
                        if let Some(rollout) = self.rollout.take() {
                            let _ = rollout.reply.send(Err(PoolReloadError::new(
                                "the pool is stopping; the reload was abandoned",
                            )));
                        }
                        self.shutdown(mode).await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(Command::DuplicateListeners(reply)) => {
                        let duplicates = match &self.front {
                            Some(front) => front.duplicate_listeners(),
                            None => Ok(Vec::new()),
                        };
                        let _ = reply.send(duplicates);
                    }
                    Some(Command::HandOver(reply)) => {
                        if let Some(rollout) = self.rollout.take() {
                            let _ = rollout.reply.send(Err(PoolReloadError::new(
                                "the pool is handed over; the reload was abandoned",
                            )));
                        }
                        if let Some(front) = &mut self.front {
                            front
                                .hand_over(HANDOVER_LINGER.min(self.web.graceful_timeout.get()))
                                .await;
                        }
                        self.shutdown(StopMode::Graceful).await;
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        self.shutdown(StopMode::Fast).await;
                        return;
                    }
                },
                Some(event) = self.events.recv() => {
                    self.on_event(event);
                    self.advance_rollout();
                }
                Some(notice) = self.notices.recv() => self.on_notice(notice),
                Some((id, answer)) = self.warm_ups.recv() => self.on_warm_up(id, answer),
                _ = rss_tick.tick() => self.sample(),
                () = restart_timer => self.restart_due(),
            }
        }
    }

    fn on_ready(&mut self, id: WorkerId, pid: u32, slots: Vec<worker::frame::Channel>) {
        let Some(generation) = self.workers.get(&id).map(|worker| worker.generation) else {
            return;
        };
        let web = self.web_of(generation);
        let limit = request_limit(web.max_requests, web.max_requests_jitter);
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.pid = Some(pid);
        worker.state = WorkerState::Ready;
        worker.ready_at = Some(Instant::now());
        let (slot, generation, replaces) = (worker.slot, worker.generation, worker.replaces.take());
        tracing::info!(worker = slot, pid, generation, "web worker ready");
        self.dispatcher
            .add_worker(id, slot, generation, slots, limit);
        if let Some((old, reason)) = replaces {
            self.metrics
                .worker_restarts_total
                .with_label_values(&[reason])
                .inc();
            self.retire(old, Ending::Replaced);
        }
        self.publish_states();
        self.rollout_worker_ready(id, pid, slot, generation);
    }

    /// Stops routing to a worker; it exits by itself once its last request ends.
    fn retire(&mut self, id: WorkerId, ending: Ending) {
        let grace = self.web.graceful_timeout.get() + self.web.timeout.get();
        if let Some(worker) = self.workers.get_mut(&id) {
            worker.ending = ending;
            match worker.state {
                WorkerState::Starting => {
                    let _ = worker.commands.send(worker::Command::Kill);
                    worker.state = WorkerState::Killing;
                }
                WorkerState::Ready => {
                    worker.state = WorkerState::Draining;
                    worker.drain_deadline = Some(Instant::now() + grace);
                    self.dispatcher.retire(id);
                }
                _ => {}
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { id, pid, slots } => self.on_ready(id, pid, slots),
            Event::Failed { id, error } => {
                let Some(worker) = self.workers.remove(&id) else {
                    return;
                };
                if self.rollout_worker_failed(id, &worker, &error) {
                    self.publish_states();
                    return;
                }
                let text = error.to_string();
                tracing::error!(worker = worker.slot, "web worker failed to start: {text}");
                if let Some(slot) = self.slots.get_mut(worker.slot) {
                    slot.last_error = Some(text);
                }
                if let Some((old, _)) = worker.replaces {
                    // The old worker keeps serving; a later recycle trigger tries again.
                    if self.recycling == Some(old) {
                        self.recycling = None;
                    }
                    self.pump_recycling();
                } else if worker.ending == Ending::Unexpected {
                    self.metrics
                        .worker_restarts_total
                        .with_label_values(&["crash"])
                        .inc();
                    if !self.roll_refills() {
                        self.schedule_restart(worker.slot);
                    }
                }
                self.publish_states();
            }
            Event::Stack { id, text } => {
                let context = self.stack_context.remove(&id).unwrap_or_default();
                if let Some(slot) = self
                    .workers
                    .get(&id)
                    .and_then(|worker| self.slots.get_mut(worker.slot))
                {
                    slot.last_error = Some(format!("{context}\nPython stack:\n{text}"));
                }
            }
            Event::Exited { id, how } => self.on_exit(id, &how),
        }
    }

    fn on_exit(&mut self, id: WorkerId, how: &str) {
        self.dispatcher.remove(id);
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        if self.recycling == Some(id) {
            self.recycling = None;
        }
        if worker.ending == Ending::Unexpected && self.rollout_worker_exited(id, &worker, how) {
            self.pump_recycling();
            self.publish_states();
            return;
        }
        match worker.ending {
            Ending::Replaced | Ending::Removed => {
                tracing::info!(
                    worker = worker.slot,
                    pid = worker.pid,
                    "web worker stopped ({how})"
                );
            }
            Ending::TimedOut | Ending::Broken => {
                if worker.slot < self.slots.len()
                    && !self.roll_refills()
                    && !self.slot_has_successor(worker.slot, id)
                {
                    self.spawn_worker(worker.slot, None);
                }
            }
            Ending::Unexpected => {
                let message = format!(
                    "web worker {} (pid {}) exited unexpectedly: {how}",
                    worker.slot,
                    worker.pid.unwrap_or_default()
                );
                tracing::error!("{message}");
                self.metrics
                    .worker_restarts_total
                    .with_label_values(&["crash"])
                    .inc();
                if let Some(slot) = self.slots.get_mut(worker.slot) {
                    slot.last_error = Some(message);
                }
                // A replacement already on its way takes over the slot instead of a restart.
                let successor = self
                    .workers
                    .values_mut()
                    .find(|other| other.replaces.is_some_and(|(old, _)| old == id));
                if let Some(successor) = successor {
                    successor.replaces = None;
                } else if worker.slot < self.slots.len() && !self.roll_refills() {
                    self.schedule_restart(worker.slot);
                }
            }
        }
        self.metrics
            .worker_rss_bytes
            .with_label_values(&[&worker.slot.to_string()])
            .set(0);
        self.pump_recycling();
        self.publish_states();
    }

    fn slot_has_successor(&self, slot: usize, except: WorkerId) -> bool {
        self.workers.iter().any(|(id, worker)| {
            *id != except
                && worker.slot == slot
                && matches!(worker.state, WorkerState::Starting | WorkerState::Ready)
        })
    }

    fn schedule_restart(&mut self, slot_index: usize) {
        let Some(slot) = self.slots.get_mut(slot_index) else {
            return;
        };
        let now = Instant::now();
        slot.crashes
            .retain(|at| now.duration_since(*at) < CRASH_WINDOW);
        slot.crashes.push(now);
        let delay = restart_delay(slot.crashes.len());
        if slot.crashes.len() >= CRASH_LOOP {
            tracing::error!(
                worker = slot_index,
                "web worker slot {slot_index} crashed {} times within {:?}; next restart in {delay:?}",
                slot.crashes.len(),
                CRASH_WINDOW
            );
        }
        slot.restart_at = Some(now + delay);
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.restart_at.is_some_and(|at| at <= now))
            .map(|(index, _)| index)
            .collect();
        for index in due {
            self.slots[index].restart_at = None;
            self.spawn_worker(index, None);
        }
    }

    fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::RecycleWanted(id) => {
                self.recycle_queue.push_back((id, "max_requests"));
                self.pump_recycling();
            }
            Notice::TimedOut {
                worker: id,
                context,
            } => {
                let Some(worker) = self.workers.get_mut(&id) else {
                    return;
                };
                self.dispatcher.retire(id);
                worker.state = WorkerState::Killing;
                worker.ending = Ending::TimedOut;
                self.metrics
                    .worker_restarts_total
                    .with_label_values(&["timeout"])
                    .inc();
                if let Some(slot) = self.slots.get_mut(worker.slot) {
                    slot.last_error = Some(context.clone());
                }
                self.stack_context.insert(id, context.clone());
                let _ = worker
                    .commands
                    .send(worker::Command::KillWithStack { context });
                self.publish_states();
            }
            Notice::Broken { worker: id, reason } => {
                let Some(worker) = self.workers.get_mut(&id) else {
                    return;
                };
                tracing::error!(worker = worker.slot, "web worker replaced: {reason}");
                self.dispatcher.remove(id);
                worker.state = WorkerState::Killing;
                worker.ending = Ending::Broken;
                self.metrics
                    .worker_restarts_total
                    .with_label_values(&["crash"])
                    .inc();
                let _ = worker.commands.send(worker::Command::Kill);
                self.publish_states();
            }
        }
    }

    /// Starts the next queued recycle when none is running: the replacement is spawned first and
    /// the old worker retired only once the replacement is ready, so capacity never drops.
    fn pump_recycling(&mut self) {
        // A reload replaces every worker anyway; recycling meanwhile would fight over slots.
        if self.recycling.is_some() || self.rollout.is_some() {
            return;
        }
        while let Some((old, reason)) = self.recycle_queue.pop_front() {
            let Some(worker) = self.workers.get(&old) else {
                continue;
            };
            if worker.state != WorkerState::Ready || worker.slot >= self.slots.len() {
                continue;
            }
            tracing::info!(
                worker = worker.slot,
                pid = worker.pid,
                "recycling web worker ({reason})"
            );
            let slot = worker.slot;
            self.recycling = Some(old);
            self.spawn_worker(slot, Some((old, reason)));
            return;
        }
    }

    fn sample(&mut self) {
        let max_rss = self.web.max_rss.bytes();
        let now = Instant::now();
        let mut over = Vec::new();
        let mut overdue = Vec::new();
        for (id, worker) in &mut self.workers {
            if let Some(deadline) = worker.drain_deadline {
                if now >= deadline && worker.state == WorkerState::Draining {
                    overdue.push(*id);
                }
            }
            let Some(pid) = worker.pid else { continue };
            let Some(rss) = read_rss(pid) else { continue };
            worker.rss = rss;
            if worker.state == WorkerState::Ready {
                self.metrics
                    .worker_rss_bytes
                    .with_label_values(&[&worker.slot.to_string()])
                    .set(i64::try_from(rss).unwrap_or(i64::MAX));
                if max_rss > 0 && rss > max_rss {
                    worker.rss_over += 1;
                    if worker.rss_over == RSS_SAMPLES {
                        over.push(*id);
                    }
                } else {
                    worker.rss_over = 0;
                }
                // A worker that served steadily for the crash window clears its slot's record.
                if worker
                    .ready_at
                    .is_some_and(|at| now.duration_since(at) > CRASH_WINDOW)
                {
                    if let Some(slot) = self.slots.get_mut(worker.slot) {
                        slot.crashes.clear();
                    }
                }
            }
        }
        for id in over {
            if !self.recycle_queue.iter().any(|(queued, _)| *queued == id) {
                self.recycle_queue.push_back((id, "max_rss"));
            }
        }
        for id in overdue {
            if let Some(worker) = self.workers.get_mut(&id) {
                tracing::warn!(
                    worker = worker.slot,
                    pid = worker.pid,
                    "draining web worker did not finish in time; killing it"
                );
                worker.state = WorkerState::Killing;
                let _ = worker.commands.send(worker::Command::Kill);
            }
        }
        self.pump_recycling();
    }

    fn scale(&mut self, delta: i32) {
        if self.rollout.is_some() {
            tracing::warn!(
                "a reload is rolling the web pool; scaling by {delta} ignored (set [web].workers and reload instead)"
            );
            return;
        }
        if delta > 0 {
            for _ in 0..delta {
                let slot = self.slots.len();
                self.slots.push(Slot::default());
                self.metrics
                    .worker_restarts_total
                    .with_label_values(&["scale"])
                    .inc();
                self.spawn_worker(slot, None);
            }
        } else {
            for _ in 0..delta.unsigned_abs() {
                if self.slots.len() <= 1 {
                    tracing::warn!("the web pool keeps at least one worker");
                    break;
                }
                self.slots.pop();
                let slot = self.slots.len();
                let ids: Vec<WorkerId> = self
                    .workers
                    .iter()
                    .filter(|(_, worker)| worker.slot == slot)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.metrics
                        .worker_restarts_total
                        .with_label_values(&["scale"])
                        .inc();
                    self.retire(id, Ending::Removed);
                }
            }
        }
        tracing::info!("web pool scaled to {} workers", self.slots.len());
        self.publish_states();
    }

    fn status(&mut self) -> PoolStatus {
        for load in self.dispatcher.loads() {
            if let Some(worker) = self.workers.get_mut(&load.id) {
                worker.served = load.served;
                worker.in_flight = load.busy;
            }
        }
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .values()
            .map(|worker| WorkerStatus {
                slot: worker.slot,
                pid: worker.pid,
                generation: worker.generation,
                state: worker.state,
                requests: worker.served,
                in_flight: worker.in_flight,
                rss_bytes: worker.rss,
                last_error: self
                    .slots
                    .get(worker.slot)
                    .and_then(|slot| slot.last_error.clone()),
            })
            .collect();
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.restart_at.is_some() {
                workers.push(WorkerStatus {
                    slot: index,
                    pid: None,
                    generation: self.generation,
                    state: if slot.crashes.len() >= CRASH_LOOP {
                        WorkerState::CrashLoop
                    } else {
                        WorkerState::Backoff
                    },
                    requests: 0,
                    in_flight: 0,
                    rss_bytes: 0,
                    last_error: slot.last_error.clone(),
                });
            }
        }
        workers.sort_by_key(|worker| worker.slot);
        PoolStatus {
            listen: self.listen.clone(),
            generation: self.generation,
            reloading: self.rollout.as_ref().map(Rollout::describe),
            workers_wanted: self.slots.len(),
            workers,
        }
    }

    fn publish_states(&self) {
        let mut counts: BTreeMap<&'static str, i64> =
            ["starting", "ready", "draining", "killing", "backoff"]
                .into_iter()
                .map(|state| (state, 0))
                .collect();
        for worker in self.workers.values() {
            let label = match worker.state {
                WorkerState::Starting => "starting",
                WorkerState::Ready => "ready",
                WorkerState::Draining => "draining",
                WorkerState::Killing => "killing",
                WorkerState::Backoff | WorkerState::CrashLoop => "backoff",
            };
            *counts.entry(label).or_default() += 1;
        }
        *counts.entry("backoff").or_default() += self
            .slots
            .iter()
            .filter(|slot| slot.restart_at.is_some())
            .count() as i64;
        for (state, count) in counts {
            self.metrics.workers.with_label_values(&[state]).set(count);
        }
    }

    async fn shutdown(&mut self, mode: StopMode) {
        let grace = self.web.graceful_timeout.get();
        let deadline = Instant::now() + grace;
        for slot in &mut self.slots {
            slot.restart_at = None;
        }
        if let Some(front) = self.front.take() {
            match mode {
                StopMode::Graceful => {
                    if !front.shutdown(grace).await {
                        tracing::warn!(
                            "some requests did not finish within graceful_timeout ({grace:?})"
                        );
                    }
                }
                StopMode::Fast => {
                    let _ = front.shutdown(Duration::ZERO).await;
                }
            }
        }
        self.dispatcher.close();
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            match mode {
                StopMode::Graceful => self.retire(id, Ending::Removed),
                StopMode::Fast => {
                    if let Some(worker) = self.workers.get_mut(&id) {
                        worker.ending = Ending::Removed;
                        worker.state = WorkerState::Killing;
                        let _ = worker.commands.send(worker::Command::Kill);
                    }
                }
            }
        }
        // Idle workers exit as soon as their slots close; give the rest until the deadline.
        let mut killed = mode == StopMode::Fast;
        while !self.workers.is_empty() {
            let wait_until = if killed {
                Instant::now() + Duration::from_secs(5)
            } else {
                deadline
            };
            match tokio::time::timeout_at(wait_until.into(), self.events.recv()).await {
                Ok(Some(Event::Exited { id, .. } | Event::Failed { id, .. })) => {
                    self.dispatcher.remove(id);
                    self.workers.remove(&id);
                }
                Ok(Some(Event::Ready { id, .. })) => {
                    if let Some(worker) = self.workers.get(&id) {
                        let _ = worker.commands.send(worker::Command::Kill);
                    }
                }
                Ok(Some(Event::Stack { .. })) => {}
                Ok(None) => break,
                Err(_) if killed => break,
                Err(_) => {
                    tracing::warn!(
                        "{} web worker(s) still busy after graceful_timeout; killing them",
                        self.workers.len()
                    );
                    for worker in self.workers.values() {
                        let _ = worker.commands.send(worker::Command::Kill);
                    }
                    killed = true;
                }
            }
        }
        self.publish_states();
    }
}

/// The reload state machine (see the module doc).
impl Actor {
    /// True while the roll itself refills slots: crash restarts and timeout replacements leave
    /// the slot to it, so that the two never start two workers for one slot.
    fn roll_refills(&self) -> bool {
        matches!(
            self.rollout.as_ref().map(|rollout| rollout.phase),
            Some(Phase::Rolling | Phase::RollingBack)
        )
    }

    /// The `[web]` settings workers of `generation` run with.
    fn web_of(&self, generation: u64) -> &WebConfig {
        match &self.rollout {
            Some(rollout) if rollout.new.generation == generation => &rollout.new.web,
            Some(rollout) if rollout.old.generation == generation => &rollout.old.web,
            _ => &self.web,
        }
    }

    /// Makes `release` the one new workers, new requests' settings and the queue follow.
    fn apply_release(&mut self, release: &Release) {
        self.generation = release.generation;
        self.launch = Arc::clone(&release.launch);
        self.web = release.web.clone();
        if let Some(front) = &self.front {
            front.front().set_config(release.front.clone());
        }
        let (queue_size, queue_timeout) = queue_limits(&release.web);
        self.dispatcher.set_limits(queue_size, queue_timeout);
    }

    /// Checks the new config, binds the added addresses and starts the canary; nothing else
    /// changes until the canary is ready and warmed up.
    fn begin_reload(&mut self, request: ReloadRequest) {
        let ReloadRequest {
            app,
            web,
            base_dir,
            generation,
            progress,
            reply,
        } = request;
        if self.rollout.is_some() {
            let _ = reply.send(Err(PoolReloadError::new(
                "a reload of the web pool is already running",
            )));
            return;
        }
        if generation <= self.generation {
            let _ = reply.send(Err(PoolReloadError::new(format!(
                "generation {generation} is not newer than the serving generation {}",
                self.generation
            ))));
            return;
        }
        let Some(front) = &self.front else {
            let _ = reply.send(Err(PoolReloadError::new("the web pool is stopping")));
            return;
        };
        let threads = usize::try_from(web.threads).unwrap_or(1).max(1);
        let prepared = Launch::new(&app, &base_dir, threads, web.reload_timeout.get())
            .and_then(|launch| Ok((launch, front_config(&web)?)));
        let (launch, config) = match prepared {
            Ok(prepared) => prepared,
            Err(message) => {
                let _ = reply.send(Err(PoolReloadError::new(format!(
                    "the new config cannot run the web pool: {message}; nothing changed"
                ))));
                return;
            }
        };
        let serving = front.configured();
        let adding: Vec<String> = web
            .listen
            .iter()
            .filter(|address| !serving.contains(address))
            .cloned()
            .collect();
        let removed: Vec<String> = serving
            .iter()
            .filter(|address| !web.listen.contains(address))
            .cloned()
            .collect();
        let added = match web::bind(&adding, web.backlog) {
            Ok(listeners) => adding.into_iter().zip(listeners).collect(),
            Err(error) => {
                let _ = reply.send(Err(PoolReloadError::new(format!(
                    "{error}; nothing changed"
                ))));
                return;
            }
        };
        let old = Release {
            generation: self.generation,
            launch: Arc::clone(&self.launch),
            web: self.web.clone(),
            front: (*front.front().config()).clone(),
        };
        let new = Release {
            generation,
            launch: Arc::new(launch),
            web,
            front: config,
        };
        let canary = self.spawn_worker_as(0, None, generation, Arc::clone(&new.launch));
        let now = Instant::now();
        let rollout = Rollout {
            phase: Phase::Canary(canary),
            old,
            new,
            added,
            removed,
            started: now,
            canary_started: now,
            canary_took: Duration::ZERO,
            replaced: 0,
            old_slots: self.slots.len(),
            progress,
            reply,
            failure: None,
        };
        rollout.say(format!(
            "generation {} → {generation}: starting a canary worker",
            rollout.old.generation
        ));
        self.rollout = Some(rollout);
    }

    /// A worker became ready: the canary moves on to its warm-up, a rolled one is counted.
    fn rollout_worker_ready(&mut self, id: WorkerId, pid: u32, slot: usize, generation: u64) {
        let Some(rollout) = self.rollout.as_mut() else {
            return;
        };
        match rollout.phase {
            Phase::Canary(canary) if canary == id => {
                rollout.canary_took = rollout.canary_started.elapsed();
                rollout.say(format!(
                    "generation {} → {}: canary ready (pid {pid}, {:.1} s)",
                    rollout.old.generation,
                    rollout.new.generation,
                    rollout.canary_took.as_secs_f64()
                ));
                match rollout.new.web.warmup.clone() {
                    Some(path) => {
                        rollout.phase = Phase::WarmUp(id);
                        let budget = rollout
                            .new
                            .web
                            .reload_timeout
                            .get()
                            .saturating_sub(rollout.canary_took)
                            .max(Duration::from_secs(1));
                        self.start_warm_up(id, path, budget);
                    }
                    None => self.promote(),
                }
            }
            Phase::Rolling if generation == rollout.new.generation => {
                rollout.replaced += 1;
                rollout.say(format!(
                    "{}/{} workers replaced",
                    rollout.replaced,
                    wanted_workers(&rollout.new.web)
                ));
            }
            Phase::RollingBack if generation == rollout.old.generation => {
                rollout.say(format!(
                    "worker {slot} is back on generation {}",
                    rollout.old.generation
                ));
            }
            _ => {}
        }
    }

    /// Requests `[web].warmup` through the canary in a task of its own; the answer comes back
    /// through `warm_ups` so the actor keeps serving meanwhile.
    fn start_warm_up(&mut self, canary: WorkerId, path: String, budget: Duration) {
        let (Some(front), Some(lease)) = (
            self.front.as_ref().map(|front| Arc::clone(front.front())),
            self.dispatcher.acquire_from(canary),
        ) else {
            self.fail_rollout(PoolReloadError::new(
                "the canary has no free request slot for the warm-up",
            ));
            return;
        };
        let answers = self.warm_ups_tx.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(
                budget + Duration::from_secs(1),
                web::warm_up(&front, lease, &path, budget),
            )
            .await
            .unwrap_or_else(|_| Err(format!("GET {path} got no answer within {budget:?}")));
            let _ = answers.send((canary, answer));
        });
    }

    fn on_warm_up(&mut self, canary: WorkerId, answer: Result<WarmUpAnswer, String>) {
        let Some(rollout) = self.rollout.as_ref() else {
            return;
        };
        if rollout.phase != Phase::WarmUp(canary) {
            return;
        }
        let generation = rollout.new.generation;
        let path = rollout.new.web.warmup.clone().unwrap_or_default();
        match answer {
            Ok(answer) if (200..400).contains(&answer.status) => {
                rollout.say(format!(
                    "warm-up GET {path} answered {} through the canary",
                    answer.status
                ));
                self.promote();
            }
            Ok(answer) => self.fail_rollout(PoolReloadError {
                message: format!(
                    "the canary of generation {generation} answered the warm-up GET {path} with {} (2xx or 3xx needed)",
                    answer.status
                ),
                detail: Some(format!(
                    "warm-up response {}:\n{}",
                    answer.status, answer.body_head
                )),
            }),
            Err(message) => self.fail_rollout(PoolReloadError::new(format!(
                "the canary of generation {generation} failed its warm-up: {message}"
            ))),
        }
    }

    /// The canary passed: the new release serves from now on. The canary takes its slot (the old
    /// worker there drains) and the roll walks the other slots.
    fn promote(&mut self) {
        let Some(rollout) = self.rollout.as_mut() else {
            return;
        };
        let (Phase::Canary(canary) | Phase::WarmUp(canary)) = rollout.phase else {
            return;
        };
        rollout.phase = Phase::Rolling;
        rollout.replaced = 1;
        rollout.say(format!(
            "1/{} workers replaced",
            wanted_workers(&rollout.new.web)
        ));
        let new = rollout.new.clone();
        self.apply_release(&new);
        self.dispatcher.set_generation(new.generation);
        let canary_slot = self.workers.get(&canary).map_or(0, |worker| worker.slot);
        let replaced: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(id, worker)| {
                **id != canary
                    && worker.slot == canary_slot
                    && worker.generation != new.generation
                    && matches!(worker.state, WorkerState::Ready | WorkerState::Starting)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in replaced {
            self.metrics
                .worker_restarts_total
                .with_label_values(&["reload"])
                .inc();
            self.retire(id, Ending::Replaced);
        }
        // Recycles and crash restarts of the old release in progress give way: the roll
        // replaces those slots with the new release anyway.
        let starting_old: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, worker)| {
                worker.generation != new.generation && worker.state == WorkerState::Starting
            })
            .map(|(id, _)| *id)
            .collect();
        for id in starting_old {
            self.retire(id, Ending::Removed);
        }
        self.recycling = None;
        self.recycle_queue.clear();
        for slot in &mut self.slots {
            slot.restart_at = None;
        }
        self.publish_states();
        self.advance_rollout();
    }

    /// One step of the roll (or the roll back): while no worker of the target generation is
    /// starting, start one for the first slot that has none ready, replacing the slot's old
    /// worker once it is ready. When every slot serves the target generation, the leftovers
    /// (other generations, slots beyond `[web].workers`) drain and the reload ends.
    fn advance_rollout(&mut self) {
        let wanted = match self.rollout.as_ref() {
            Some(rollout) if rollout.phase == Phase::Rolling => wanted_workers(&rollout.new.web),
            Some(rollout) if rollout.phase == Phase::RollingBack => rollout.old_slots.max(1),
            _ => return,
        };
        let target = self.generation;
        if self
            .workers
            .values()
            .any(|worker| worker.generation == target && worker.state == WorkerState::Starting)
        {
            return;
        }
        for slot in 0..wanted {
            let served = self.workers.values().any(|worker| {
                worker.slot == slot
                    && worker.generation == target
                    && worker.state == WorkerState::Ready
            });
            if served {
                continue;
            }
            while self.slots.len() <= slot {
                self.slots.push(Slot::default());
            }
            self.slots[slot].restart_at = None;
            let old = self
                .workers
                .iter()
                .find(|(_, worker)| {
                    worker.slot == slot
                        && worker.generation != target
                        && worker.state == WorkerState::Ready
                })
                .map(|(id, _)| *id);
            self.spawn_worker(slot, old.map(|id| (id, "reload")));
            return;
        }
        let leftovers: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, worker)| {
                matches!(worker.state, WorkerState::Ready | WorkerState::Starting)
                    && (worker.slot >= wanted || worker.generation != target)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in leftovers {
            self.metrics
                .worker_restarts_total
                .with_label_values(&["reload"])
                .inc();
            self.retire(id, Ending::Removed);
        }
        self.slots.truncate(wanted);
        self.finish_rollout();
    }

    /// The roll (or the roll back) is complete: listeners change on success, and the caller
    /// gets its answer.
    fn finish_rollout(&mut self) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        self.dispatcher.set_generation(self.generation);
        let Rollout {
            old,
            new,
            added,
            removed,
            started,
            canary_took,
            progress,
            reply,
            failure,
            ..
        } = rollout;
        let result = match failure {
            None => {
                let mut summary = format!(
                    "web pool on generation {}: {} workers replaced in {:.1} s (canary {:.1} s)",
                    new.generation,
                    wanted_workers(&new.web),
                    started.elapsed().as_secs_f64(),
                    canary_took.as_secs_f64()
                );
                let mut closing = Vec::new();
                if let Some(front) = self.front.as_mut() {
                    for (configured, listener) in added {
                        summary.push_str(&format!("; listening on {}", listener.address()));
                        front.add(configured, listener);
                    }
                    for configured in &removed {
                        closing.extend(front.remove(configured));
                        summary.push_str(&format!("; stopped listening on {configured}"));
                    }
                    self.listen = front.addresses();
                }
                tracing::info!("reload: {summary}");
                Ok(Rolled {
                    summary,
                    listen: self.listen.clone(),
                    closing,
                })
            }
            Some(error) => {
                let line = format!(
                    "rolled back: every worker is on generation {}",
                    old.generation
                );
                tracing::warn!("reload: {line}");
                let _ = progress.send(line);
                Err(error)
            }
        };
        let _ = reply.send(result);
        self.publish_states();
        self.pump_recycling();
    }

    /// Something of the new release failed. Before the switch only the canary goes; after it
    /// the roll turns around and refills slots from the old release.
    fn fail_rollout(&mut self, error: PoolReloadError) {
        let Some(rollout) = self.rollout.as_mut() else {
            return;
        };
        match rollout.phase {
            Phase::Canary(canary) | Phase::WarmUp(canary) => {
                if let Some(worker) = self.workers.get_mut(&canary) {
                    worker.ending = Ending::Removed;
                    worker.state = WorkerState::Killing;
                    let _ = worker.commands.send(worker::Command::Kill);
                }
                self.dispatcher.remove(canary);
                let Some(rollout) = self.rollout.take() else {
                    return;
                };
                rollout.say(format!(
                    "{error}; generation {} keeps serving, nothing changed",
                    rollout.old.generation
                ));
                let _ = rollout.reply.send(Err(error));
                self.publish_states();
                self.pump_recycling();
            }
            Phase::Rolling => {
                let old = rollout.old.clone();
                let new_generation = rollout.new.generation;
                rollout.say(format!(
                    "{error}; rolling back to generation {} ({} of {} workers had been replaced)",
                    old.generation,
                    rollout.replaced,
                    wanted_workers(&rollout.new.web)
                ));
                rollout.failure = Some(PoolReloadError {
                    message: format!(
                        "{}; rolled back to generation {}",
                        error.message, old.generation
                    ),
                    detail: error.detail,
                });
                rollout.phase = Phase::RollingBack;
                self.apply_release(&old);
                let starting_new: Vec<WorkerId> = self
                    .workers
                    .iter()
                    .filter(|(_, worker)| {
                        worker.generation == new_generation && worker.state == WorkerState::Starting
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in starting_new {
                    self.retire(id, Ending::Removed);
                }
                self.advance_rollout();
            }
            Phase::RollingBack => {
                // The old release does not start any more either (its files changed in place):
                // stop rolling and leave the empty slots to the crash restarts.
                let first = rollout.failure.take();
                let Some(rollout) = self.rollout.take() else {
                    return;
                };
                let message = format!(
                    "{}; rolling back failed too: {error}",
                    first
                        .as_ref()
                        .map_or("the reload failed", |first| first.message.as_str())
                );
                rollout.say(message.clone());
                let empty: Vec<usize> = (0..self.slots.len())
                    .filter(|slot| {
                        !self.workers.values().any(|worker| {
                            worker.slot == *slot
                                && matches!(
                                    worker.state,
                                    WorkerState::Ready | WorkerState::Starting
                                )
                        })
                    })
                    .collect();
                for slot in empty {
                    self.schedule_restart(slot);
                }
                let _ = rollout.reply.send(Err(PoolReloadError {
                    message,
                    detail: first.and_then(|first| first.detail).or(error.detail),
                }));
                self.publish_states();
            }
        }
    }

    /// A worker that never became ready: true when it was the reload's to handle.
    fn rollout_worker_failed(&mut self, id: WorkerId, worker: &Worker, error: &StartError) -> bool {
        let Some(rollout) = self.rollout.as_ref() else {
            return false;
        };
        let what = match rollout.phase {
            Phase::Canary(canary) if canary == id => {
                format!("the canary worker of generation {}", worker.generation)
            }
            Phase::Rolling | Phase::RollingBack
                if worker.generation == self.generation && worker.ending == Ending::Unexpected =>
            {
                format!(
                    "web worker {} of generation {}",
                    worker.slot, worker.generation
                )
            }
            _ => return false,
        };
        tracing::error!(worker = worker.slot, "{what} failed to start: {error}");
        if let Some(slot) = self.slots.get_mut(worker.slot) {
            slot.last_error = Some(error.to_string());
        }
        self.fail_rollout(PoolReloadError::start_failed(&what, error));
        true
    }

    /// A ready worker exited unexpectedly: true when it was the reload's to handle (the canary,
    /// or a worker of the generation being rolled to).
    fn rollout_worker_exited(&mut self, id: WorkerId, worker: &Worker, how: &str) -> bool {
        let Some(rollout) = self.rollout.as_ref() else {
            return false;
        };
        let what = match rollout.phase {
            Phase::Canary(canary) | Phase::WarmUp(canary) if canary == id => {
                format!("the canary worker of generation {}", worker.generation)
            }
            Phase::Rolling if worker.generation == rollout.new.generation => format!(
                "web worker {} of generation {}",
                worker.slot, worker.generation
            ),
            _ => return false,
        };
        let message = format!(
            "{what} (pid {}) exited unexpectedly: {how}",
            worker.pid.unwrap_or_default()
        );
        tracing::error!(worker = worker.slot, "{message}");
        self.metrics
            .worker_restarts_total
            .with_label_values(&["crash"])
            .inc();
        if let Some(slot) = self.slots.get_mut(worker.slot) {
            slot.last_error = Some(message.clone());
        }
        self.fail_rollout(PoolReloadError::new(message));
        true
    }
}

/// Resident set size of `pid` from /proc/PID/statm (resident pages × page size).
fn read_rss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).unwrap_or(4096))
}

pub use crate::worker::ImportCheck;

/// Imports the app in a throwaway worker for `sauna-supervisor check`: the traceback when the
/// import fails, `NotRun` when the app cannot be run here at all. Call it outside a tokio runtime.
pub fn check_import(app: &AppConfig, base_dir: &Path) -> Result<(), ImportCheck> {
    worker::check_import(app, base_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delay_doubles_then_caps_and_crash_loops_wait_longest() {
        assert_eq!(restart_delay(1), Duration::from_millis(100));
        assert_eq!(restart_delay(2), Duration::from_millis(200));
        assert_eq!(restart_delay(4), Duration::from_millis(800));
        assert_eq!(restart_delay(CRASH_LOOP), MAX_BACKOFF);
        assert_eq!(restart_delay(100), MAX_BACKOFF);
    }

    #[test]
    fn request_limit_adds_at_most_the_jitter() {
        assert_eq!(request_limit(0, 10), None);
        assert_eq!(request_limit(100, 0), Some(100));
        for _ in 0..50 {
            let limit = request_limit(100, 10).unwrap();
            assert!((100..=110).contains(&limit), "{limit}");
        }
    }
}
