//! The web pool: the set of workers behind the HTTP front and the one actor that decides their
//! lives. The main loop drives it through a [`PoolHandle`] and asks its status through a
//! [`PoolView`], a cheap clone that stays with the loop while a reload holds the handle;
//! requests never pass through it (front → dispatcher → worker slot). This module holds the public face — starting the pool,
//! the handle's commands, the errors, and what `[web]` becomes for the front and the dispatcher;
//! the work is split by job:
//! - `actor`: the actor's loop — worker events, dispatcher notices, recycling, scaling, stop;
//! - `rollout`: the reload state machine (canary, warm-up, roll, rollback);
//! - `slots`: per-slot crash backoff and crash-loop protection, RSS sampling;
//! - `state`: the worker states and their legal transitions (one table), restart reasons, what
//!   `status` reports, and the labels of the `workers` gauge and of the restart counter.
//!
//! Workers are numbered by *slot* (0 … workers-1, the `worker` label of the metrics) and carry the
//! *generation* they were started under. A slot can briefly hold two workers while one is being
//! recycled or rolled.

mod actor;
mod rollout;
mod slots;
mod state;

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proxy_conf::{AppConfig, WebConfig};
use tokio::sync::{mpsc, oneshot};

use crate::listeners::{self, FdTable, Listener, Role};
use crate::metrics::Metrics;
use crate::supervisor::lifecycle::{Progress, StopMode};
use crate::web::dispatch::Dispatcher;
use crate::web::front::environ::EnvironConfig;
use crate::web::front::{self, Front, FrontConfig};
use crate::web::worker::{self, Launch};
use actor::Actor;
pub use rollout::PoolReloadError;
use slots::Slot;
pub use state::{PoolStatus, TemplateStatus, WorkerState, WorkerStatus};

/// The pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// `[app]`/`[web]` cannot run a pool.
    #[error("{0}")]
    Config(String),
    /// A listen address could not be bound.
    #[error(transparent)]
    Bind(#[from] listeners::BindError),
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

enum Command {
    Status(oneshot::Sender<PoolStatus>),
    Scale(i32),
    Reload(Box<ReloadRequest>),
    Shutdown(StopMode, oneshot::Sender<()>),
    DuplicateListeners(oneshot::Sender<std::io::Result<FdTable>>),
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

/// `queue_size` and `queue_timeout` as the dispatcher takes them (a timeout of 0 = none).
fn queue_limits(web: &WebConfig) -> (usize, Duration) {
    let queue_timeout = web.queue_timeout.get();
    (
        web.queue_size.get(),
        if queue_timeout.is_zero() {
            Duration::from_secs(u64::from(u32::MAX))
        } else {
            queue_timeout
        },
    )
}

/// How one generation runs its workers: `[app]`, and `[web]`'s threads, start timeout and
/// preload (one template per generation, see `worker::template`).
fn launch_for(app: &AppConfig, web: &WebConfig, base_dir: &Path) -> Result<Launch, String> {
    let launch = Launch::new(app, base_dir, web.threads, web.reload_timeout.get())?;
    Ok(if web.preload {
        launch.preloaded(web.post_fork.clone())
    } else {
        launch
    })
}

/// How the front's sockets are bound, from `[web]`.
fn bind_options(web: &WebConfig) -> listeners::Options {
    listeners::Options::new(Role::Web, web.backlog)
}

/// The front's settings from `[web]`.
fn front_config(web: &WebConfig) -> FrontConfig {
    let timeout = web.timeout.get();
    FrontConfig {
        max_body: web.max_body.bytes(),
        body_buffer: web.body_buffer.bytes(),
        max_header_size: usize::try_from(web.max_header_size.bytes()).unwrap_or(usize::MAX),
        timeout: if timeout.is_zero() {
            Duration::from_secs(u64::from(u32::MAX))
        } else {
            timeout
        },
        retry_after: web.queue_timeout.get().as_secs().max(1),
        access_log: web.access_log,
        environ: EnvironConfig {
            script_name: web.script_name.clone(),
            forwarders: web.forwarded_allow_ips.clone(),
        },
    }
}

/// The main loop's handle on a running pool.
#[derive(Debug)]
pub struct PoolHandle {
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
    listen: Vec<String>,
}

/// A cheap clone of the pool actor's command channel that can only ask for the status: the main
/// loop keeps one while a reload run owns the [`PoolHandle`], so `status` stays live.
#[derive(Debug, Clone)]
pub struct PoolView {
    commands: mpsc::UnboundedSender<Command>,
    /// The addresses served when the view was taken, reported should the actor be gone.
    listen: Vec<String>,
}

impl PoolView {
    /// Every worker's pid, generation, state, requests, RSS and last error, as the actor knows
    /// them now (old and new generations side by side during a reload).
    pub async fn status(&self) -> PoolStatus {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Status(reply));
        answer.await.unwrap_or_else(|_| PoolStatus {
            listen: self.listen.clone(),
            generation: 0,
            reloading: None,
            workers_wanted: 0,
            workers: Vec::new(),
            templates: Vec::new(),
        })
    }
}

/// Binds every listen address, starts the workers and resolves once each reported ready. Fails
/// with the address that cannot be bound, or the traceback of a worker whose import failed (every
/// started worker is stopped again).
pub async fn start(
    app: &AppConfig,
    web: &WebConfig,
    base_dir: &Path,
    metrics: Arc<Metrics>,
) -> Result<PoolHandle, PoolError> {
    start_on(app, web, base_dir, metrics, None).await
}

/// [`start`] on `listeners` (one per `[web].listen` entry, in order) when given: the sockets a
/// successor adopted in an upgrade. The front accepts on them only once every worker is ready,
/// so until then their connections go to the old supervisor.
pub async fn start_on(
    app: &AppConfig,
    web: &WebConfig,
    base_dir: &Path,
    metrics: Arc<Metrics>,
    listeners: Option<Vec<Listener>>,
) -> Result<PoolHandle, PoolError> {
    let launch = Arc::new(launch_for(app, web, base_dir).map_err(PoolError::Config)?);
    let config = front_config(web);
    let listeners = match listeners {
        Some(listeners) => listeners,
        None => listeners::bind_all(&web.listen, &bind_options(web))?,
    };
    let listen = listeners.iter().map(Listener::address).collect();

    let (notices_tx, notices) = mpsc::unbounded_channel();
    let (queue_size, queue_timeout) = queue_limits(web);
    let dispatcher = Dispatcher::new(queue_size, queue_timeout, Arc::clone(&metrics), notices_tx);
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
    for slot in 0..web.workers.get() {
        actor.slots.push(Slot::default());
        actor.spawn_worker(slot, None);
    }
    actor.wait_all_ready().await?;

    let front = Arc::new(Front::new(config, dispatcher, metrics));
    actor.front = Some(front::serve(
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

impl PoolHandle {
    /// The addresses being served, with the real port where 0 was configured.
    pub fn listen_addresses(&self) -> &[String] {
        &self.listen
    }

    /// Every worker's pid, generation, state, requests, RSS and last error.
    pub async fn status(&self) -> PoolStatus {
        self.view().status().await
    }

    /// A handle that can ask the status from anywhere, for as long as the actor runs.
    pub fn view(&self) -> PoolView {
        PoolView {
            commands: self.commands.clone(),
            listen: self.listen.clone(),
        }
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

    /// Adds a duplicate of each listening socket to `table`, by its `[web].listen` entry, for a
    /// successor started by `upgrade` to inherit.
    pub async fn duplicate_into(&self, table: &mut FdTable) -> std::io::Result<()> {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::DuplicateListeners(reply));
        let duplicates = answer
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the web pool is not running")))?;
        table.append(duplicates);
        Ok(())
    }

    /// Stops the pool after an upgrade handed its sockets to a successor: stop accepting (the
    /// Unix socket files stay, they are the successor's), close each open connection after its
    /// next response, give clients `HANDOVER_LINGER` (at most `graceful_timeout`) to make
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

pub use crate::web::worker::ImportCheck;

/// Imports the app in a throwaway worker for `sauna-supervisor check`: the traceback when the
/// import fails, `NotRun` when the app cannot be run here at all. Call it outside a tokio runtime.
pub fn check_import(app: &AppConfig, base_dir: &Path) -> Result<(), ImportCheck> {
    worker::check_import(app, base_dir)
}

/// [`check_import`] as `[web]` runs the app: with `preload`, the `post_fork` hook is imported
/// too, so a misspelt hook fails `check` instead of every forked worker.
pub fn check_web_import(
    app: &AppConfig,
    web: &WebConfig,
    base_dir: &Path,
) -> Result<(), ImportCheck> {
    let post_fork = web.post_fork.as_deref().filter(|_| web.preload);
    worker::check_import_with(app, base_dir, post_fork)
}
