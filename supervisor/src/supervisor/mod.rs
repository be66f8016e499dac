//! The main loop: the one task that owns the supervisor's state (lifecycle phase, generation, the
//! loaded config and the handles of the roles) and reacts to signals, control-socket requests and
//! the watchdog timer in a single `select!`.
//!
//! It starts the roles in order (web pool — which binds the listening sockets first — then
//! programs in start order, by `priority` then name, then beat), tells systemd `READY=1` once
//! all of them have started, and stops them: the pool stops accepting and drains, beat releases
//! its lock, then programs stop in reverse start order. It never sits on the request hot path: the
//! HTTP front talks to the workers without passing through here.
//!
//! It also runs both sides of an upgrade (see `upgrade` for the sequence): as the old process
//! it spawns the successor, keeps serving while it starts, and hands over once it is ready —
//! `MAINPID=` to systemd, then the roles stop without unlinking any socket; as the successor
//! it stays quiet towards systemd and leaves the control socket alone until it is the main
//! process, and the non-rolling programs and beat until the old process has released them.
//!
//! The loop's helpers live beside it: the roles it starts and stops (`roles`), the reload and
//! upgrade sequences (`reload`, `upgrade`), the signals it handles (`signals`), what it tells
//! systemd (`notify`), the `status` report (`status`), the `--watch` file watcher (`watch`) and
//! the lifecycle vocabulary shared with the roles (`lifecycle`).

pub mod lifecycle;
pub mod notify;
pub mod reload;
pub mod roles;
pub mod signals;
pub mod status;
pub mod upgrade;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use proxy_conf::Loaded;

use crate::config::ConfigError;
use crate::control::{ControlRequest, ControlServer, ErrorKind, Request, Responder};
use crate::listeners::FdTable;
use crate::logging::{LogHandle, LogOptions};
use crate::metrics::Metrics;
use crate::metrics::queue_sampler::QueueSampler;
use crate::metrics::server::{Health, MetricsServer};
use crate::supervisor::lifecycle::{Phase, StopMode};
use crate::supervisor::notify::Notifier;

use crate::supervisor::reload::{ReloadEvent, ReloadRun};
use crate::supervisor::roles::Roles;
use crate::supervisor::signals::{SignalEvent, Signals};
use crate::supervisor::status::StatusReport;
use crate::supervisor::upgrade::{
    Inherited, Message, Predecessor, Successor, UpgradeEvent, UpgradeRun,
};

/// How often the loop refreshes the health verdict; `/healthz` calls the loop hung after a few
/// missed beats.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long the last answers on the control socket get to reach their clients at exit.
const CONTROL_FLUSH: Duration = Duration::from_secs(2);

/// What `sauna-supervisor run` was asked for, as the command line gave it.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The configuration file given with `-c`; `None` for `$SAUNA_CONFIG`, else `./sauna.toml`.
    pub config: Option<PathBuf>,
    /// Where log lines go and what they look like.
    pub log: LogOptions,
    /// Development mode: reload when the app's .py or .ini files change.
    pub watch: bool,
}

/// Why `run` ended other than by a requested stop; the command line picks the exit status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config file cannot be read, has problems, or names a secret that cannot be read;
    /// nothing was started.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The supervisor stopped because it could no longer serve (a reload task failed, leaving
    /// no roles); the reason was logged when it happened.
    #[error("the supervisor stopped because it could no longer serve")]
    Stopped,
    /// It could not start (the runtime, the control socket, a role) or take over from the
    /// supervisor it replaces.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// `sauna-supervisor run`: runs the stack until a stop request or signal.
pub fn run(args: &RunOptions) -> Result<(), RunError> {
    // Resolved now, while it names the file we run: once a package has replaced that file,
    // /proc/self/exe reads "… (deleted)", whereas this path runs the new file — which is what
    // `upgrade` wants by default.
    let own_binary = std::env::current_exe().ok();
    // SAFETY: nothing has started a thread yet; the runtime is built below.
    let inherited = unsafe { Inherited::take_from_env() }.map_err(|message| {
        anyhow::anyhow!("cannot take over from the previous supervisor: {message}")
    })?;
    // The successor of an upgrade reports a failure to start on the hand-over channel, so that
    // `upgrade` can print it; this handle outlives `inherited`, which `start` takes apart.
    let reporter = match &inherited {
        Some(inherited) => Some(
            inherited
                .channel()
                .context("cannot use the hand-over channel")?,
        ),
        None => None,
    };
    let report = |error: &dyn std::fmt::Display| {
        if let Some(channel) = &reporter {
            upgrade::tell(
                channel,
                &Message::Failed {
                    message: error.to_string(),
                },
            );
        }
    };
    // The secrets the file names are read now: a missing one stops the start here (exit 2), with
    // the key that names it, instead of beat failing its login forever.
    let config_path = crate::config::config_path(args.config.as_deref());
    let loaded = match crate::config::load_with_secrets(&config_path) {
        Ok(loaded) => loaded,
        Err(error) => {
            report(&error);
            return Err(error.into());
        }
    };
    // SAFETY: nothing has started a thread yet; the runtime is built below.
    let notifier = unsafe { Notifier::from_env_take() };
    let log = crate::logging::init(&args.log)?;
    // SAFETY: still single-threaded: the runtime is built below.
    if let Err(error) = unsafe { crate::process::reaper::install() } {
        tracing::warn!(
            "cannot start the group reaper ({error}): grandchildren of programs may outlive a crash of the supervisor"
        );
    }
    crate::web::worker::frame::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // One runtime thread: on a 2-core host the Python workers need the other core, and one
        // thread doing all the front's I/O avoids cross-thread wake-ups. Measured with wrk on
        // hello world, 2 workers: 1 thread 31.5k req/s, 2 threads 27.8k (see benches/).
        .worker_threads(1)
        .thread_name("sauna")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let start = Supervisor::start(loaded, notifier, log, args.watch, inherited, own_binary);
        let supervisor = match start.await {
            Ok(supervisor) => supervisor,
            Err(error) => {
                report(&format_args!("{error:#}"));
                return Err(error.into());
            }
        };
        supervisor.run().await
    })
}

/// The state the main loop owns.
struct Supervisor {
    loaded: Loaded,
    phase: Phase,
    generation: u64,
    started: Instant,
    notifier: Notifier,
    log: LogHandle,
    metrics: Arc<Metrics>,
    signals: Signals,
    control: ControlServer,
    /// The running roles; `None` while a reload run owns them.
    roles: Option<Roles>,
    /// The reload in progress, if any.
    reload: Option<ReloadRun>,
    /// Reload requests that arrived during the run in progress; they share the next run.
    /// `Some(empty)` is a reload asked for by a signal, with nobody waiting.
    queued_reloads: Option<Vec<Responder>>,
    /// The last full status, served while a reload run owns the roles.
    status_snapshot: Option<serde_json::Value>,
    /// The verdict `/healthz` and `/readyz` serve, refreshed by the loop every second.
    health: tokio::sync::watch::Sender<Health>,
    /// The `/metrics` endpoint, unless `[metrics].listen` is empty.
    metrics_server: Option<MetricsServer>,
    /// Samples Celery queue lengths, when there are queues and a broker.
    queue_sampler: Option<QueueSampler>,
    /// The last `STATUS=` line sent, so that systemd hears only changes.
    status_line: String,
    /// With `run --watch`: batches of changed app files, each one a reload trigger.
    app_changes: Option<tokio::sync::mpsc::Receiver<Vec<std::path::PathBuf>>>,
    /// The binary `upgrade` starts by default: this process's own, as resolved at start-up.
    own_binary: Option<std::path::PathBuf>,
    /// The upgrade in progress: a successor is starting.
    upgrade: Option<UpgradeRun>,
    /// As an upgrade's successor: the old supervisor, until it has released its roles.
    predecessor: Option<Predecessor>,
    /// Whether this process answers on the control socket: as an upgrade's successor only once
    /// the old process has handed the main role over (it stops accepting then), so that a
    /// `status` during the old one's drain gets an answer instead of waiting for it.
    serves_control: bool,
}

/// Why the main loop ended.
struct StopRequest {
    mode: StopMode,
    /// The `stop` client waiting for the end, if the request came over the control socket.
    waiter: Option<Responder>,
    /// The supervisor stops because it can no longer serve; it exits with status 1.
    failed: bool,
    /// The supervisor stops because a successor took over (an upgrade), with the `upgrade`
    /// client waiting for the end, if any.
    handover: Option<(Successor, Option<Responder>)>,
}

impl Supervisor {
    /// Binds the control socket, installs the signal handlers and starts every role.
    async fn start(
        loaded: Loaded,
        mut notifier: Notifier,
        log: LogHandle,
        watch_app: bool,
        mut inherited: Option<Inherited>,
        own_binary: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        // A successor speaks to systemd only once the old process has made it the main one.
        notifier.set_muted(inherited.is_some());
        // Handlers first, so that a TERM during start-up is not fatal before children exist.
        let signals = Signals::install().context("cannot install signal handlers")?;
        let control_path = crate::config::control_socket(&loaded);
        // A control socket that moved in the config is closed; the new path is bound.
        let control =
            ControlServer::open(&control_path, inherited.as_mut().map(Inherited::sockets))?;
        tracing::info!(
            config = %loaded.path.display(),
            control = %control.path().display(),
            version = env!("CARGO_PKG_VERSION"),
            "sauna-supervisor starting"
        );
        notify_or_log(notifier.status("starting"), "STATUS");
        let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
        let (health, health_receiver) = tokio::sync::watch::channel(Health::starting());
        // The endpoint comes up before the roles so that probes see "starting", not a refusal.
        let metrics_server = match crate::metrics::server::start_on(
            &loaded.config.metrics,
            &loaded.config_dir(),
            Arc::clone(&metrics),
            health_receiver,
            inherited.as_mut().map(Inherited::sockets),
        )
        .await
        {
            Ok(server) => server,
            Err(error) => {
                control.shutdown(Duration::ZERO).await;
                return Err(error.into());
            }
        };
        let started_roles = match &mut inherited {
            None => Roles::start(&loaded, &metrics).await,
            Some(inherited) => {
                let listeners = match &loaded.config.web {
                    Some(web) => inherited
                        .web_listeners(&web.listen, web.backlog)
                        .map(Some)
                        .map_err(anyhow::Error::new),
                    None => Ok(None),
                };
                inherited.tell(&Message::Progress {
                    message: "sockets adopted; starting the web pool and rolling programs"
                        .to_owned(),
                });
                match listeners {
                    Ok(listeners) => Roles::start_for_upgrade(&loaded, &metrics, listeners).await,
                    Err(error) => Err(error),
                }
            }
        };
        let roles = match started_roles {
            Ok(roles) => roles,
            Err(error) => {
                if let Some(server) = metrics_server {
                    server.shutdown().await;
                }
                control.shutdown(Duration::ZERO).await;
                return Err(error);
            }
        };
        let queue_sampler = crate::metrics::queue_sampler::spawn_for(
            &loaded.config,
            loaded.secrets.redis_password.as_ref(),
            Arc::clone(&metrics),
        );
        let app_changes = if watch_app {
            let directory = loaded.config_dir().join(
                loaded
                    .config
                    .app
                    .directory
                    .as_deref()
                    .unwrap_or(std::path::Path::new(".")),
            );
            let changes = watch::spawn(directory.clone())
                .with_context(|| format!("--watch: cannot watch {}", directory.display()))?;
            tracing::info!(
                directory = %directory.display(),
                "--watch: reloading when .py or .ini files change"
            );
            Some(changes)
        } else {
            None
        };
        metrics.generation.set(1);
        let (problems, status_line) = roles.health().await;
        health.send_replace(Health::now(true, problems));
        notify_or_log(notifier.ready(), "READY");
        notify_or_log(notifier.status(&status_line), "STATUS");
        let predecessor = match inherited {
            Some(inherited) => {
                tracing::info!(
                    startup_ms = started.elapsed().as_millis() as u64,
                    "serving beside the old supervisor; waiting for it to hand over"
                );
                let predecessor = inherited
                    .channel()
                    .and_then(Predecessor::new)
                    .context("cannot use the hand-over channel")?;
                inherited.tell(&Message::Ready {
                    pid: std::process::id(),
                });
                Some(predecessor)
            }
            None => {
                tracing::info!(
                    startup_ms = started.elapsed().as_millis() as u64,
                    "every role has started"
                );
                None
            }
        };
        Ok(Supervisor {
            loaded,
            phase: Phase::Running,
            generation: 1,
            started,
            notifier,
            log,
            metrics,
            signals,
            control,
            roles: Some(roles),
            reload: None,
            queued_reloads: None,
            status_snapshot: None,
            health,
            metrics_server,
            queue_sampler,
            status_line,
            app_changes,
            own_binary,
            upgrade: None,
            serves_control: predecessor.is_none(),
            predecessor,
        })
    }

    /// The loop itself; returns when a stop was requested and every role has stopped.
    async fn run(mut self) -> Result<(), RunError> {
        let mut watchdog = self.notifier.watchdog_interval().map(tokio::time::interval);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = loop {
            tokio::select! {
                event = self.signals.recv() => {
                    if let Some(stop) = self.on_signal(event).await {
                        break stop;
                    }
                }
                request = self.control.accept(), if self.serves_control => {
                    if let Some(stop) = self.on_request(request).await {
                        break stop;
                    }
                }
                _ = tick(&mut watchdog) => {
                    // Pinged from the loop itself: a hung loop stops pinging and systemd acts.
                    notify_or_log(self.notifier.watchdog(), "WATCHDOG");
                }
                _ = heartbeat.tick() => self.publish_health().await,
                changes = next_app_change(&mut self.app_changes) => match changes {
                    Some(paths) => {
                        let shown: Vec<String> =
                            paths.iter().take(3).map(|path| path.display().to_string()).collect();
                        tracing::info!(
                            changed = paths.len(),
                            "--watch: {}{}; reloading",
                            shown.join(", "),
                            if paths.len() > shown.len() { ", …" } else { "" }
                        );
                        self.request_reload(None).await;
                    }
                    None => {
                        tracing::error!("--watch: the file watcher stopped; changes are no longer picked up");
                        self.app_changes = None;
                    }
                },
                message = next_word_of(&mut self.predecessor) => self.on_predecessor(message).await,
                event = next_upgrade_event(&mut self.upgrade) => match event {
                    UpgradeEvent::Progress(line) => {
                        tracing::info!("upgrade: {line}");
                        if let Some(waiter) = self.upgrade.as_ref().and_then(|run| run.waiter.as_ref()) {
                            waiter.progress(line);
                        }
                    }
                    UpgradeEvent::Finished(finished) => {
                        if let Some(stop) = self.on_upgrade_finished(*finished).await {
                            break stop;
                        }
                    }
                },
                event = next_reload_event(&mut self.reload) => match event {
                    ReloadEvent::Progress(line) => {
                        tracing::info!("reload: {line}");
                        for waiter in self.reload.iter().flat_map(|run| &run.waiters) {
                            waiter.progress(line.clone());
                        }
                    }
                    ReloadEvent::Finished(finished) => {
                        if let Some(stop) = self.on_reload_finished(*finished).await {
                            break stop;
                        }
                    }
                },
            }
        };
        let failed = stop.failed;
        self.shutdown(stop).await;
        if failed {
            Err(RunError::Stopped)
        } else {
            Ok(())
        }
    }

    async fn on_signal(&mut self, event: SignalEvent) -> Option<StopRequest> {
        match event {
            SignalEvent::Shutdown(mode) => {
                tracing::info!(?mode, "stop requested by signal");
                return Some(StopRequest {
                    mode,
                    waiter: None,
                    failed: false,
                    handover: None,
                });
            }
            SignalEvent::Reload => {
                tracing::info!("reload requested by SIGHUP");
                self.request_reload(None).await;
            }
            SignalEvent::ReopenLogs => match self.log.reopen() {
                Ok(()) => tracing::info!("log file reopened"),
                Err(error) => tracing::error!("cannot reopen the log file: {error}"),
            },
            SignalEvent::ScaleWorkers(delta) => self.scale_workers(delta).await,
            SignalEvent::Upgrade => {
                tracing::info!("upgrade requested by SIGUSR2");
                self.request_upgrade(None, None, None).await;
            }
        }
        None
    }

    async fn on_request(&mut self, request: ControlRequest) -> Option<StopRequest> {
        let ControlRequest { request, reply } = request;
        match request {
            Request::Status => match self.status_value().await {
                Ok(data) => reply.ok(data),
                Err(error) => reply.error(ErrorKind::Failed, error.to_string(), None),
            },
            Request::Stop { mode } => {
                tracing::info!(?mode, "stop requested over the control socket");
                reply.progress("stopping");
                return Some(StopRequest {
                    mode,
                    waiter: Some(reply),
                    failed: false,
                    handover: None,
                });
            }
            Request::Reload { .. } => {
                tracing::info!("reload requested over the control socket");
                self.request_reload(Some(reply)).await;
            }
            Request::Upgrade {
                binary,
                timeout_secs,
            } => {
                tracing::info!("upgrade requested over the control socket");
                self.request_upgrade(Some(reply), binary, timeout_secs.map(Duration::from_secs))
                    .await;
            }
        }
        None
    }

    /// Starts an upgrade: spawns `binary` (this process's own by default) with every listening
    /// socket. Refused while a reload or another upgrade runs: the successor must start from
    /// a settled generation, and only one process can take over.
    async fn request_upgrade(
        &mut self,
        waiter: Option<Responder>,
        binary: Option<std::path::PathBuf>,
        timeout: Option<Duration>,
    ) {
        let refuse = |waiter: Option<Responder>, message: String| {
            tracing::warn!("upgrade refused: {message}");
            if let Some(waiter) = waiter {
                waiter.error(ErrorKind::Unavailable, message, None);
            }
        };
        if let Some(run) = &self.upgrade {
            return refuse(
                waiter,
                format!(
                    "an upgrade is already in progress (new supervisor pid {}); wait for it",
                    run.pid
                ),
            );
        }
        if self.predecessor.is_some() {
            return refuse(
                waiter,
                "this supervisor is still taking over from the previous one; try again in a moment"
                    .to_owned(),
            );
        }
        let Some(roles) = self.roles.as_ref().filter(|_| self.reload.is_none()) else {
            return refuse(
                waiter,
                "a reload is in progress; run upgrade again when it has finished".to_owned(),
            );
        };
        let Some(binary) = binary.or_else(|| self.own_binary.clone()) else {
            return refuse(
                waiter,
                "the path of this supervisor's binary is unknown; pass --binary".to_owned(),
            );
        };
        let sockets = match self.upgrade_sockets(roles).await {
            Ok(sockets) => sockets,
            Err(error) => {
                return refuse(waiter, format!("cannot hand over the sockets: {error}"));
            }
        };
        let timeout = timeout.unwrap_or_else(|| upgrade_timeout(&self.loaded));
        if let Some(waiter) = &waiter {
            waiter.progress(format!(
                "starting {} ({} listening socket(s) handed over, ready within {timeout:?})",
                binary.display(),
                sockets.len()
            ));
        }
        let env = self.notifier.successor_env().to_vec();
        match UpgradeRun::start(&binary, sockets, &env, timeout) {
            Ok(mut run) => {
                tracing::info!(pid = run.pid, binary = %binary.display(), "upgrade: new supervisor started");
                if let Some(waiter) = &waiter {
                    waiter.progress(format!("new supervisor started as pid {}", run.pid));
                }
                run.waiter = waiter;
                self.upgrade = Some(run);
                self.phase = Phase::Upgrading;
            }
            Err(failure) => {
                tracing::error!("upgrade failed, nothing changed: {failure}");
                if let Some(waiter) = waiter {
                    waiter.error(ErrorKind::Failed, failure.message, failure.detail);
                }
            }
        }
    }

    /// Duplicates of every listening socket, for the successor.
    async fn upgrade_sockets(&self, roles: &Roles) -> std::io::Result<FdTable> {
        let mut sockets = FdTable::default();
        self.control.duplicate_into(&mut sockets)?;
        if let Some(server) = &self.metrics_server {
            server.duplicate_into(&mut sockets)?;
        }
        roles.duplicate_into(&mut sockets).await?;
        Ok(sockets)
    }

    /// The successor is ready (hand over and stop) or gone (say why and carry on).
    async fn on_upgrade_finished(
        &mut self,
        finished: Result<Successor, upgrade::Failure>,
    ) -> Option<StopRequest> {
        let run = self.upgrade.take()?;
        self.phase = Phase::Running;
        match finished {
            Ok(mut successor) => {
                let (old, new) = (std::process::id(), successor.pid);
                tracing::info!(new, "upgrade: the new supervisor is ready; handing over");
                notify_or_log(
                    self.notifier
                        .main_pid(new, &format!("upgraded: pid {old} hands over to pid {new}")),
                    "MAINPID",
                );
                successor.tell(Message::MainPid).await;
                if let Some(waiter) = &run.waiter {
                    waiter.progress(format!(
                        "new supervisor pid {new} is ready and serving; pid {old} stops accepting and drains"
                    ));
                }
                Some(StopRequest {
                    mode: StopMode::Graceful,
                    waiter: None,
                    failed: false,
                    handover: Some((successor, run.waiter)),
                })
            }
            Err(failure) => {
                tracing::error!("upgrade failed, this supervisor keeps serving: {failure}");
                if let Some(detail) = &failure.detail {
                    tracing::error!("{detail}");
                }
                if let Some(waiter) = run.waiter {
                    waiter.error(
                        ErrorKind::Failed,
                        format!(
                            "{}; the running supervisor (pid {}) keeps serving",
                            failure.message,
                            std::process::id()
                        ),
                        failure.detail,
                    );
                }
                None
            }
        }
    }

    /// As an upgrade's successor: the old process made us the main one, or released its roles.
    async fn on_predecessor(&mut self, message: Message) {
        match message {
            Message::MainPid => {
                tracing::info!(
                    "upgrade: systemd now tracks this process as the main one; serving the control socket"
                );
                self.notifier.set_muted(false);
                self.serves_control = true;
            }
            _ => {
                self.predecessor = None;
                self.notifier.set_muted(false);
                self.serves_control = true;
                self.control.set_owns_socket_file(true);
                if let Some(roles) = &mut self.roles {
                    match roles.start_deferred(&self.loaded, &self.metrics).await {
                        Ok(started) if !started.is_empty() => {
                            tracing::info!("upgrade: {}", started.join(", "));
                        }
                        Ok(_) => {}
                        Err(error) => tracing::error!("upgrade: {error:#}"),
                    }
                }
                tracing::info!("the previous supervisor has handed over every role");
                notify_or_log(self.notifier.ready(), "READY");
                self.status_line.clear();
                self.publish_health().await;
                if let Some(waiters) = self.queued_reloads.take() {
                    self.start_reload(waiters).await;
                }
            }
        }
    }

    /// Starts a reload now, or queues it behind the one in progress (the client is told).
    async fn request_reload(&mut self, waiter: Option<Responder>) {
        if self.upgrade.is_some() {
            let message =
                "an upgrade is in progress; reload the new supervisor once it has finished";
            tracing::warn!("reload refused: {message}");
            if let Some(waiter) = waiter {
                waiter.error(ErrorKind::Unavailable, message, None);
            }
            return;
        }
        if self.predecessor.is_some() {
            // Some programs and beat start only once the old process has released them; a
            // reload before that would roll a half-started set.
            if let Some(waiter) = &waiter {
                waiter.progress(
                    "this supervisor is still taking over from the previous one; the reload starts once it has",
                );
            }
            self.queued_reloads
                .get_or_insert_with(Vec::new)
                .extend(waiter);
            return;
        }
        if self.reload.is_some() || self.roles.is_none() {
            if let Some(waiter) = &waiter {
                waiter.progress("another reload is in progress; this one starts when it ends");
            }
            self.queued_reloads
                .get_or_insert_with(Vec::new)
                .extend(waiter);
            return;
        }
        self.start_reload(waiter.into_iter().collect()).await;
    }

    /// Re-reads the config; if it loads, hands the roles to a new [`ReloadRun`].
    async fn start_reload(&mut self, waiters: Vec<Responder>) {
        notify_or_log(self.notifier.reloading(), "RELOADING");
        let loaded = match crate::config::load_with_secrets(&self.loaded.path) {
            Ok(loaded) => loaded,
            Err(error) => {
                let diagnostics = error.to_string();
                tracing::error!("reload refused, nothing changed:\n{diagnostics}");
                reload::refuse_config(waiters, &diagnostics);
                self.metrics
                    .reloads_total
                    .with_label_values(&["config_error"])
                    .inc();
                notify_or_log(self.notifier.ready(), "READY");
                return;
            }
        };
        let Some(roles) = self.roles.take() else {
            // Only a failed reload task leaves no roles, and the loop is stopping then.
            notify_or_log(self.notifier.ready(), "READY");
            return;
        };
        self.status_snapshot = serde_json::to_value(self.status_report_of(&roles).await).ok();
        let generation = self.generation + 1;
        for waiter in &waiters {
            waiter.progress(format!(
                "generation {} → {generation}: config re-read, rolling",
                self.generation
            ));
        }
        tracing::info!(from = self.generation, to = generation, "reload: rolling");
        self.phase = Phase::Reloading;
        self.reload = Some(ReloadRun::start(
            roles,
            loaded,
            generation,
            Arc::clone(&self.metrics),
            waiters,
        ));
    }

    /// Takes the roles back from a finished run, answers its waiters and starts the queued one.
    async fn on_reload_finished(
        &mut self,
        finished: Result<reload::Finished, tokio::task::JoinError>,
    ) -> Option<StopRequest> {
        let run = self.reload.take()?;
        self.phase = Phase::Running;
        self.status_snapshot = None;
        match finished {
            Ok(finished) => {
                match &finished.outcome {
                    Ok(lines) => {
                        tracing::info!(
                            generation = run.generation,
                            "reload done: {}",
                            lines.join("; ")
                        );
                        self.generation = run.generation;
                        self.metrics.generation.set(run.generation as i64);
                        self.metrics
                            .reloads_total
                            .with_label_values(&["success"])
                            .inc();
                        self.queue_sampler = None;
                        self.queue_sampler = crate::metrics::queue_sampler::spawn_for(
                            &finished.loaded.config,
                            finished.loaded.secrets.redis_password.as_ref(),
                            Arc::clone(&self.metrics),
                        );
                        self.loaded = finished.loaded;
                    }
                    Err(error) => {
                        tracing::error!(
                            "reload rolled back, generation {} kept: {error}",
                            self.generation
                        );
                        if let Some(detail) = &error.detail {
                            tracing::error!("{detail}");
                        }
                        self.metrics
                            .reloads_total
                            .with_label_values(&["rolled_back"])
                            .inc();
                    }
                }
                reload::answer(run.waiters, run.generation, &finished.outcome);
                self.roles = Some(finished.roles);
            }
            Err(error) => {
                // The run panicked: its roles were dropped with it (their children killed on
                // drop), so nothing is served any more. Stop, and let systemd's Restart= act.
                tracing::error!("reload task failed: {error}; stopping");
                for waiter in run.waiters {
                    waiter.error(
                        ErrorKind::Failed,
                        format!("the reload task failed: {error}"),
                        None,
                    );
                }
                self.metrics
                    .reloads_total
                    .with_label_values(&["failed"])
                    .inc();
                return Some(StopRequest {
                    mode: StopMode::Fast,
                    waiter: None,
                    failed: true,
                    handover: None,
                });
            }
        }
        notify_or_log(self.notifier.ready(), "READY");
        if let Some(waiters) = self.queued_reloads.take() {
            self.start_reload(waiters).await;
        }
        None
    }

    /// Refreshes `/healthz`'s verdict (which also proves this loop alive) and tells systemd
    /// when the one-line status changed.
    async fn publish_health(&mut self) {
        let Some(roles) = &self.roles else {
            // A reload run owns the roles: the loop is alive, the verdict stays as it was.
            self.health
                .send_modify(|health| health.heartbeat = Instant::now());
            return;
        };
        let (problems, line) = roles.health().await;
        self.health
            .send_replace(Health::now(self.phase != Phase::Starting, problems));
        if line != self.status_line {
            notify_or_log(self.notifier.status(&line), "STATUS");
            self.status_line = line;
        }
    }

    async fn scale_workers(&mut self, delta: i32) {
        match &self.roles {
            Some(roles) if roles.scale(delta) => tracing::info!(delta, "scaling the web pool"),
            Some(_) => tracing::warn!(delta, "no [web] pool configured to scale"),
            None => tracing::warn!(
                delta,
                "a reload is in progress; scale again when it is done"
            ),
        }
    }

    /// The status document: live from the roles, or while a reload run owns them, the snapshot
    /// taken when it started, with the phase brought up to date.
    async fn status_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        match (&self.roles, &self.status_snapshot) {
            (Some(roles), _) => serde_json::to_value(self.status_report_of(roles).await),
            (None, Some(snapshot)) => {
                let mut snapshot = snapshot.clone();
                snapshot["phase"] = serde_json::to_value(self.phase)?;
                snapshot["uptime_seconds"] = self.started.elapsed().as_secs().into();
                Ok(snapshot)
            }
            (None, None) => serde_json::to_value(self.supervisor_status()),
        }
    }

    /// The supervisor's own part of the status, before the roles fill in theirs.
    fn supervisor_status(&self) -> StatusReport {
        StatusReport {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
            phase: self.phase,
            generation: self.generation,
            uptime_seconds: self.started.elapsed().as_secs(),
            config: self.loaded.path.display().to_string(),
            config_path: std::path::absolute(&self.loaded.path)
                .unwrap_or_else(|_| self.loaded.path.clone())
                .display()
                .to_string(),
            pool: None,
            programs: serde_json::Value::Array(Vec::new()),
            beat: None,
            figures: self.metrics.figures(),
        }
    }

    async fn status_report_of(&self, roles: &Roles) -> StatusReport {
        let mut report = self.supervisor_status();
        roles.fill_status(&mut report).await;
        report
    }

    async fn shutdown(mut self, stop: StopRequest) {
        self.phase = Phase::Stopping;
        if let Some((successor, waiter)) = stop.handover {
            return self.hand_over(successor, waiter).await;
        }
        if let Some(run) = self.upgrade.take() {
            // Stopping while a successor starts: it must not outlive us half-started.
            run.abandon();
        }
        notify_or_log(self.notifier.stopping(), "STOPPING");
        self.health.send_replace(Health::now(
            false,
            vec!["sauna-supervisor is stopping".to_owned()],
        ));
        let began = Instant::now();
        drop(self.queue_sampler.take());
        if let Some(mut run) = self.reload.take() {
            // A stop during a reload waits for the run: it is bounded by the roles' own
            // timeouts, and stopping half-rolled roles would leave orphans of either generation.
            tracing::info!("waiting for the reload in progress before stopping");
            if let Ok(finished) = run.finished().await {
                reload::answer(run.waiters, run.generation, &finished.outcome);
                self.roles = Some(finished.roles);
            }
        }
        if let Some(roles) = self.roles.take() {
            roles.shutdown(stop.mode).await;
        }
        // Last, so that the final scrape can still see the roles stopping.
        if let Some(server) = self.metrics_server.take() {
            server.shutdown().await;
        }
        tracing::info!(
            elapsed_ms = began.elapsed().as_millis() as u64,
            "every role has stopped"
        );
        if let Some(waiter) = stop.waiter {
            waiter.ok(serde_json::json!({ "stopped": true }));
        }
        self.control.shutdown(CONTROL_FLUSH).await;
    }
}

impl Supervisor {
    /// The end of an upgrade: the successor serves every socket already. Stop accepting, drain,
    /// stop the roles without unlinking any socket file, release the successor and exit.
    async fn hand_over(mut self, mut successor: Successor, waiter: Option<Responder>) {
        let began = Instant::now();
        // systemd tracks the successor now: STOPPING=1 or a status from us would be refused.
        self.notifier.set_muted(true);
        drop(self.queue_sampler.take());
        if let Some(server) = self.metrics_server.take() {
            server.shutdown().await;
        }
        self.control.set_owns_socket_file(false);
        if let Some(roles) = self.roles.take() {
            if let Some(waiter) = &waiter {
                waiter.progress(format!(
                    "pid {}: draining the web front and stopping workers, programs and beat",
                    std::process::id()
                ));
            }
            roles.hand_over().await;
        }
        successor.tell(Message::Released).await;
        let (old, new) = (std::process::id(), successor.pid);
        tracing::info!(
            new,
            elapsed_ms = began.elapsed().as_millis() as u64,
            "upgrade done: every role has stopped; pid {new} serves on"
        );
        if let Some(waiter) = waiter {
            waiter.ok(serde_json::json!({
                "old_pid": old,
                "new_pid": new,
                "summary": format!("sauna-supervisor pid {old} handed over to pid {new}, which serves now"),
            }));
        }
        self.control.shutdown(CONTROL_FLUSH).await;
    }
}

/// The default deadline for a successor to become ready: its web pool starts every worker
/// within `[web].reload_timeout`, plus time for the config, the sockets and the programs.
fn upgrade_timeout(loaded: &Loaded) -> Duration {
    let pool = loaded
        .config
        .web
        .as_ref()
        .map_or(Duration::ZERO, |web| web.reload_timeout.get());
    pool + Duration::from_secs(30)
}

/// The old supervisor's next word; pending unless this process is an upgrade's successor.
async fn next_word_of(predecessor: &mut Option<Predecessor>) -> Message {
    match predecessor {
        Some(predecessor) => predecessor.next().await,
        None => std::future::pending().await,
    }
}

/// The upgrade's next event; pending while there is none.
async fn next_upgrade_event(run: &mut Option<UpgradeRun>) -> UpgradeEvent {
    match run {
        Some(run) => run.next_event().await,
        None => std::future::pending().await,
    }
}

/// The next batch of changed app files; pending without `--watch`, `None` if the watcher died.
async fn next_app_change(
    changes: &mut Option<tokio::sync::mpsc::Receiver<Vec<std::path::PathBuf>>>,
) -> Option<Vec<std::path::PathBuf>> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
    }
}

/// The run's next event; pending while there is no run.
async fn next_reload_event(run: &mut Option<ReloadRun>) -> ReloadEvent {
    match run {
        Some(run) => run.next_event().await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// sd_notify failures never stop the supervisor, but they must be visible: systemd would
/// otherwise time the service out with no hint why.
fn notify_or_log(result: std::io::Result<()>, what: &str) {
    if let Err(error) = result {
        tracing::warn!("cannot notify systemd ({what}): {error}");
    }
}
