//! The main loop: the one task that owns the supervisor's state (lifecycle phase, generation, the
//! loaded config and the handles of the roles) and reacts to signals, control-socket requests and
//! the watchdog timer in a single `select!`.
//!
//! It starts the roles in order (web pool — which binds the listening sockets first — then
//! programs in name order, then beat), tells systemd `READY=1` once all of them have started, and
//! stops them: the pool stops accepting and drains, beat releases its lock, then programs stop in
//! reverse start order. It never sits on the request hot path: the
//! HTTP front talks to the workers without passing through here.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use proxy_conf::Loaded;
use tokio::sync::watch;

use crate::celery_queues::QueueSampler;
use crate::cli::RunArgs;
use crate::control::{ControlRequest, ControlServer, ErrorKind, Request, Responder};
use crate::lifecycle::{Phase, StopMode};
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::metrics_server::{Health, MetricsServer};
use crate::notify::Notifier;

use crate::reload::{self, ReloadEvent, ReloadRun};
use crate::roles::Roles;
use crate::signals::{SignalEvent, Signals};
use crate::status::StatusReport;

/// How often the loop refreshes the health verdict; `/healthz` calls the loop hung after a few
/// missed beats.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long the last answers on the control socket get to reach their clients at exit.
const CONTROL_FLUSH: Duration = Duration::from_secs(2);

/// `sauna-supervisor run`: runs the stack until a stop request or signal.
pub fn run_command(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let loaded = crate::config::load(&args.config)?;
    // SAFETY: nothing has started a thread yet; the runtime is built below.
    let notifier = unsafe { Notifier::from_env_take() };
    let log = crate::logging::init(&args.log)?;
    // SAFETY: still single-threaded: the runtime is built below.
    if let Err(error) = unsafe { crate::orphans::install() } {
        tracing::warn!(
            "cannot start the group reaper ({error}): grandchildren of programs may outlive a crash of the supervisor"
        );
    }
    crate::worker::frame::tune_allocator();
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
        let supervisor = Supervisor::start(loaded, notifier, log, args.watch).await?;
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
    health: watch::Sender<Health>,
    /// The `/metrics` endpoint, unless `[metrics].listen` is empty.
    metrics_server: Option<MetricsServer>,
    /// Samples Celery queue lengths, when there are queues and a broker.
    queue_sampler: Option<QueueSampler>,
    /// The last `STATUS=` line sent, so that systemd hears only changes.
    status_line: String,
    /// With `run --watch`: batches of changed app files, each one a reload trigger.
    app_changes: Option<tokio::sync::mpsc::Receiver<Vec<std::path::PathBuf>>>,
}

/// Why the main loop ended.
struct StopRequest {
    mode: StopMode,
    /// The `stop` client waiting for the end, if the request came over the control socket.
    waiter: Option<Responder>,
    /// The supervisor stops because it can no longer serve; it exits with status 1.
    failed: bool,
}

impl Supervisor {
    /// Binds the control socket, installs the signal handlers and starts every role.
    async fn start(
        loaded: Loaded,
        mut notifier: Notifier,
        log: LogHandle,
        watch_app: bool,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        // Handlers first, so that a TERM during start-up is not fatal before children exist.
        let signals = Signals::install().context("cannot install signal handlers")?;
        let control = ControlServer::bind(&crate::config::control_socket(&loaded))?;
        tracing::info!(
            config = %loaded.path.display(),
            control = %control.path().display(),
            version = env!("CARGO_PKG_VERSION"),
            "sauna-supervisor starting"
        );
        notify_or_log(notifier.status("starting"), "STATUS");
        let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
        let (health, health_receiver) = watch::channel(Health::starting());
        // The endpoint comes up before the roles so that probes see "starting", not a refusal.
        let metrics_server = match crate::metrics_server::start(
            &loaded.config.metrics,
            &loaded.config_dir(),
            Arc::clone(&metrics),
            health_receiver,
        )
        .await
        {
            Ok(server) => server,
            Err(error) => {
                control.shutdown(Duration::ZERO).await;
                return Err(error.into());
            }
        };
        let roles = match Roles::start(&loaded, &metrics).await {
            Ok(roles) => roles,
            Err(error) => {
                if let Some(server) = metrics_server {
                    server.shutdown().await;
                }
                control.shutdown(Duration::ZERO).await;
                return Err(error);
            }
        };
        let queue_sampler = crate::celery_queues::spawn_for(&loaded.config, Arc::clone(&metrics));
        let app_changes = if watch_app {
            let directory = loaded.config_dir().join(
                loaded
                    .config
                    .app
                    .directory
                    .as_deref()
                    .unwrap_or(std::path::Path::new(".")),
            );
            let changes = crate::watch::spawn(directory.clone())
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
        tracing::info!(
            startup_ms = started.elapsed().as_millis() as u64,
            "every role has started"
        );
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
        })
    }

    /// The loop itself; returns when a stop was requested and every role has stopped.
    async fn run(mut self) -> anyhow::Result<ExitCode> {
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
                request = self.control.accept() => {
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
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }

    async fn on_signal(&mut self, event: SignalEvent) -> Option<StopRequest> {
        match event {
            SignalEvent::Shutdown(mode) => {
                tracing::info!(?mode, "stop requested by signal");
                return Some(StopRequest {
                    mode,
                    waiter: None,
                    failed: false,
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
                });
            }
            Request::Reload { .. } => {
                tracing::info!("reload requested over the control socket");
                self.request_reload(Some(reply)).await;
            }
        }
        None
    }

    /// Starts a reload now, or queues it behind the one in progress (the client is told).
    async fn request_reload(&mut self, waiter: Option<Responder>) {
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
        let loaded = match crate::config::load_path(&self.loaded.path) {
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
                        self.queue_sampler = crate::celery_queues::spawn_for(
                            &finished.loaded.config,
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
