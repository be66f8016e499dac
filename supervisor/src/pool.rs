//! The web pool actor: owns the set of workers and decides their lives — start the pool, replace a
//! worker that crashed (with backoff and per-slot crash-loop protection) or timed out, recycle
//! workers by `max_requests` and `max_rss` one at a time with the replacement ready first, add and
//! remove workers (`TTIN`/`TTOU`), stop gracefully — and reports `status`. The main loop drives it
//! through a `PoolHandle`; requests never pass through it (front → dispatcher → worker slot).
//!
//! Workers are numbered by *slot* (0 … workers-1, the `worker` label of the metrics) and carry the
//! *generation* they were started under. A slot can briefly hold two workers while one is being
//! recycled. The dispatcher routes only to the current generation, which is what a rolling reload
//! switches; reload itself is not implemented here.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_conf::{AppConfig, WebConfig};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::dispatch::{Dispatcher, Notice};
use crate::lifecycle::StopMode;
use crate::metrics::Metrics;
use crate::web::environ::{EnvironConfig, Forwarders};
use crate::web::{self, Front, FrontConfig, FrontHandle};
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
    /// The generation new requests go to.
    pub generation: u64,
    /// Configured number of workers (changed by `scale`).
    pub workers_wanted: usize,
    /// Every worker and waiting slot.
    pub workers: Vec<WorkerStatus>,
}

enum Command {
    Status(oneshot::Sender<PoolStatus>),
    Scale(i32),
    Shutdown(StopMode, oneshot::Sender<()>),
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
        let threads = usize::try_from(web.threads).unwrap_or(1).max(1);
        let launch = Arc::new(
            Launch::new(app, base_dir, threads, web.reload_timeout.get())
                .map_err(PoolError::Config)?,
        );
        let forwarders = Forwarders::parse(&web.forwarded_allow_ips).map_err(PoolError::Config)?;
        let script_name = web.script_name.trim_end_matches('/').to_owned();
        if !script_name.is_empty() && !script_name.starts_with('/') {
            return Err(PoolError::Config(format!(
                "[web].script_name \"{}\" must start with \"/\"",
                web.script_name
            )));
        }
        if web.listen.is_empty() {
            return Err(PoolError::Config(
                "[web].listen is empty: give at least one address".to_owned(),
            ));
        }
        let listeners = web::bind(&web.listen, web.backlog)?;
        let listen = listeners.iter().map(web::Listener::address).collect();

        let (notices_tx, notices) = mpsc::unbounded_channel();
        let queue_timeout = web.queue_timeout.get();
        let dispatcher = Dispatcher::new(
            usize::try_from(web.queue_size).unwrap_or(usize::MAX),
            if queue_timeout.is_zero() {
                Duration::from_secs(u64::from(u32::MAX))
            } else {
                queue_timeout
            },
            Arc::clone(&metrics),
            notices_tx,
        );
        let (events_tx, events) = mpsc::unbounded_channel();
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
        };
        dispatcher.set_generation(actor.generation);
        metrics.generation.set(1);
        let wanted = usize::try_from(web.workers).unwrap_or(1).max(1);
        for slot in 0..wanted {
            actor.slots.push(Slot::default());
            actor.spawn_worker(slot, None);
        }
        actor.wait_all_ready().await?;

        let timeout = web.timeout.get();
        let front = Arc::new(Front {
            config: FrontConfig {
                max_body: web.max_body.bytes(),
                body_buffer: web.body_buffer.bytes(),
                timeout: if timeout.is_zero() {
                    Duration::from_secs(u64::from(u32::MAX))
                } else {
                    timeout
                },
                retry_after: queue_timeout.as_secs().max(1),
                access_log: web.access_log,
                environ: EnvironConfig {
                    script_name,
                    forwarders,
                },
            },
            dispatcher,
            metrics,
        });
        actor.front = Some(web::serve(listeners, front));
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
            workers_wanted: 0,
            workers: Vec::new(),
        })
    }

    /// Adds (`delta > 0`) or removes workers; the pool never goes below one worker.
    pub fn scale(&self, delta: i32) {
        let _ = self.commands.send(Command::Scale(delta));
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
}

impl Actor {
    fn spawn_worker(
        &mut self,
        slot: usize,
        replaces: Option<(WorkerId, &'static str)>,
    ) -> WorkerId {
        let id = self.next_id;
        self.next_id += 1;
        let label = format!("web worker {slot}");
        let commands = worker::spawn(id, label, Arc::clone(&self.launch), self.events_tx.clone());
        self.workers.insert(
            id,
            Worker {
                slot,
                generation: self.generation,
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
                    Some(Command::Shutdown(mode, reply)) => {
                        self.shutdown(mode).await;
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        self.shutdown(StopMode::Fast).await;
                        return;
                    }
                },
                Some(event) = self.events.recv() => self.on_event(event),
                Some(notice) = self.notices.recv() => self.on_notice(notice),
                _ = rss_tick.tick() => self.sample(),
                () = restart_timer => self.restart_due(),
            }
        }
    }

    fn on_ready(&mut self, id: WorkerId, pid: u32, slots: Vec<worker::frame::Channel>) {
        let limit = request_limit(self.web.max_requests, self.web.max_requests_jitter);
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
                    self.schedule_restart(worker.slot);
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
        match worker.ending {
            Ending::Replaced | Ending::Removed => {
                tracing::info!(
                    worker = worker.slot,
                    pid = worker.pid,
                    "web worker stopped ({how})"
                );
            }
            Ending::TimedOut | Ending::Broken => {
                if worker.slot < self.slots.len() && !self.slot_has_successor(worker.slot, id) {
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
                } else if worker.slot < self.slots.len() {
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
        if self.recycling.is_some() {
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
