//! The main loop: the one task that owns the supervisor's state (lifecycle phase, generation, the
//! loaded config and the handles of the roles) and reacts to signals, control-socket requests and
//! the watchdog timer in a single `select!`.
//!
//! It starts the roles in order (web pool — which binds the listening sockets first — then
//! programs in name order, then beat), tells systemd `READY=1` once all of them have started, and
//! stops them: the pool stops accepting and drains, beat releases its lock, then programs stop in
//! reverse start order. It never sits on the request hot path: the
//! HTTP front talks to the workers without passing through here.

use std::path::Path;
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
use crate::programs::Programs;
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
        let supervisor = Supervisor::start(loaded, notifier, log).await?;
        supervisor.run().await
    })
}

/// The roles the config asked for, each behind its actor handle.
struct Roles {
    /// The web pool, when `[web]` is configured.
    pool: Option<crate::pool::PoolHandle>,
    /// Every `[programs.NAME]`.
    programs: Programs,
    /// The scheduler, when `[beat]` is configured.
    beat: Option<crate::beat::BeatHandle>,
}

impl Roles {
    /// Starts every configured role, in start order.
    async fn start(loaded: &Loaded, metrics: &Arc<Metrics>) -> anyhow::Result<Roles> {
        // The pool first: it binds the listening sockets, and a bind error stops the start.
        let pool = match &loaded.config.web {
            Some(web) => {
                let pool_dir = crate::config::base_dir(loaded);
                let pool = crate::pool::Pool::start(
                    &loaded.config.app,
                    web,
                    &pool_dir,
                    Arc::clone(metrics),
                )
                .await
                .context("the web pool did not start")?;
                Some(pool)
            }
            None => None,
        };
        let base_dir = loaded.path.parent().unwrap_or(Path::new("."));
        let programs = Programs::start(&loaded.config, base_dir, Arc::clone(metrics));
        let beat = match &loaded.config.beat {
            Some(config) => {
                match crate::beat::start(config, &loaded.config.app, base_dir, Arc::clone(metrics))
                    .await
                {
                    Ok(beat) => Some(beat),
                    Err(error) => {
                        programs.shutdown(StopMode::Graceful).await;
                        if let Some(pool) = pool {
                            pool.shutdown(StopMode::Graceful).await;
                        }
                        return Err(anyhow::Error::new(error).context("cannot start beat"));
                    }
                }
            }
            None => None,
        };
        Ok(Roles {
            pool,
            programs,
            beat,
        })
    }

    /// Stops every role: the pool stops accepting and drains first, then beat, then programs in
    /// reverse start order. Beat goes before the programs because it needs the broker — often
    /// a supervised Redis — to release its lock, and publishing to queues whose workers are
    /// stopping helps nobody.
    async fn shutdown(self, mode: StopMode) {
        if let Some(pool) = self.pool {
            pool.shutdown(mode).await;
        }
        // Even a fast stop releases the beat lock: one Redis round trip lets a standby take
        // over at once instead of after the lock's TTL.
        if let Some(beat) = self.beat {
            beat.shutdown().await;
        }
        self.programs.shutdown(mode).await;
    }

    /// The roles' part of the status report.
    async fn fill_status(&self, report: &mut StatusReport) {
        if let Some(pool) = &self.pool {
            report.pool = serde_json::to_value(pool.status().await).ok();
        }
        report.programs = serde_json::to_value(self.programs.status().await).unwrap_or_default();
        if let Some(beat) = &self.beat {
            report.beat = match beat.status().await {
                Ok(status) => serde_json::to_value(status).ok(),
                Err(error) => Some(serde_json::json!({ "error": error.to_string() })),
            };
        }
    }

    /// Whether every role is within its policy (problems for `/healthz`), and a one-line
    /// summary for systemd's `STATUS=`.
    async fn health(&self) -> (Vec<String>, String) {
        let mut problems = Vec::new();
        let mut parts = Vec::new();
        if let Some(pool) = &self.pool {
            let status = pool.status().await;
            let ready = status
                .workers
                .iter()
                .filter(|worker| worker.state == crate::pool::WorkerState::Ready)
                .count();
            if ready == 0 {
                problems.push("web pool: no worker is ready".to_owned());
            }
            parts.push(format!(
                "web {ready}/{} workers ready (generation {})",
                status.workers_wanted, status.generation
            ));
        }
        let programs = self.programs.status().await;
        if !programs.is_empty() {
            let mut up = 0;
            for program in &programs {
                if program.fatal {
                    problems.push(format!(
                        "program \"{}\" is fatal: {}",
                        program.name,
                        program
                            .instances
                            .iter()
                            .find_map(|instance| instance.detail.clone())
                            .unwrap_or_else(|| "gave up after a crash loop".to_owned())
                    ));
                } else if program
                    .instances
                    .iter()
                    .all(|instance| instance.pid.is_some())
                {
                    up += 1;
                }
            }
            parts.push(format!("programs {up}/{} up", programs.len()));
        }
        if let Some(beat) = &self.beat {
            match beat.status().await {
                Ok(status) => parts.push(format!(
                    "beat {} ({} jobs)",
                    if status.leader { "leader" } else { "standby" },
                    status.jobs.len()
                )),
                Err(error) => problems.push(format!("beat: {error}")),
            }
        }
        if parts.is_empty() {
            parts.push("running, nothing configured".to_owned());
        }
        (problems, parts.join(" · "))
    }
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
    roles: Roles,
    /// The verdict `/healthz` and `/readyz` serve, refreshed by the loop every second.
    health: watch::Sender<Health>,
    /// The `/metrics` endpoint, unless `[metrics].listen` is empty.
    metrics_server: Option<MetricsServer>,
    /// Samples Celery queue lengths, when there are queues and a broker.
    queue_sampler: Option<QueueSampler>,
    /// The last `STATUS=` line sent, so that systemd hears only changes.
    status_line: String,
}

/// Why the main loop ended.
struct StopRequest {
    mode: StopMode,
    /// The `stop` client waiting for the end, if the request came over the control socket.
    waiter: Option<Responder>,
}

impl Supervisor {
    /// Binds the control socket, installs the signal handlers and starts every role.
    async fn start(loaded: Loaded, mut notifier: Notifier, log: LogHandle) -> anyhow::Result<Self> {
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
            &crate::config::base_dir(&loaded),
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
            roles,
            health,
            metrics_server,
            queue_sampler,
            status_line,
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
            }
        };
        self.shutdown(stop).await;
        Ok(ExitCode::SUCCESS)
    }

    async fn on_signal(&mut self, event: SignalEvent) -> Option<StopRequest> {
        match event {
            SignalEvent::Shutdown(mode) => {
                tracing::info!(?mode, "stop requested by signal");
                return Some(StopRequest { mode, waiter: None });
            }
            SignalEvent::Reload => {
                if let Err(message) = self.reload(None).await {
                    tracing::error!("reload failed: {message}");
                }
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
            Request::Status => {
                let report = self.status_report().await;
                match serde_json::to_value(&report) {
                    Ok(data) => reply.ok(data),
                    Err(error) => reply.error(ErrorKind::Failed, error.to_string(), None),
                }
            }
            Request::Stop { mode } => {
                tracing::info!(?mode, "stop requested over the control socket");
                reply.progress("stopping");
                return Some(StopRequest {
                    mode,
                    waiter: Some(reply),
                });
            }
            Request::Reload { .. } => match self.reload(Some(&reply)).await {
                Ok(summary) => reply.ok(serde_json::json!({ "summary": summary })),
                Err(ReloadError::Config(diagnostics)) => reply.error(
                    ErrorKind::Config,
                    "the new config has problems; nothing changed",
                    Some(diagnostics),
                ),
                Err(ReloadError::Failed(message)) => reply.error(ErrorKind::Failed, message, None),
            },
        }
        None
    }

    /// Re-reads the config. Rolling the roles to a new generation is issue #4's work; until it
    /// lands, a reload validates the new file and says plainly that nothing was rolled.
    async fn reload(&mut self, progress: Option<&Responder>) -> Result<String, ReloadError> {
        self.phase = Phase::Reloading;
        notify_or_log(self.notifier.reloading(), "RELOADING");
        let outcome = match crate::config::load_path(&self.loaded.path) {
            Ok(_) => {
                if let Some(progress) = progress {
                    progress.progress("config re-read: valid");
                }
                Err(ReloadError::Failed(
                    "the config is valid, but rolling the roles to a new generation is not \
                     available in this build yet (issue #4); restart the service to apply it"
                        .to_owned(),
                ))
            }
            Err(error) => Err(ReloadError::Config(error.to_string())),
        };
        self.metrics
            .reloads_total
            .with_label_values(&[if outcome.is_ok() {
                "success"
            } else {
                "failure"
            }])
            .inc();
        self.phase = Phase::Running;
        notify_or_log(self.notifier.ready(), "READY");
        outcome
    }

    /// Refreshes `/healthz`'s verdict (which also proves this loop alive) and tells systemd
    /// when the one-line status changed.
    async fn publish_health(&mut self) {
        let (problems, line) = self.roles.health().await;
        self.health
            .send_replace(Health::now(self.phase != Phase::Starting, problems));
        if line != self.status_line {
            notify_or_log(self.notifier.status(&line), "STATUS");
            self.status_line = line;
        }
    }

    async fn scale_workers(&mut self, delta: i32) {
        match &self.roles.pool {
            Some(pool) => pool.scale(delta),
            None => tracing::warn!(delta, "no [web] pool configured to scale"),
        }
    }

    async fn status_report(&self) -> StatusReport {
        let mut report = StatusReport {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
            phase: self.phase,
            generation: self.generation,
            uptime_seconds: self.started.elapsed().as_secs(),
            config: self.loaded.path.display().to_string(),
            pool: None,
            programs: serde_json::Value::Array(Vec::new()),
            beat: None,
        };
        self.roles.fill_status(&mut report).await;
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
        self.roles.shutdown(stop.mode).await;
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

/// Why a reload did not apply.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    /// The new config is invalid: every diagnostic, one per line.
    #[error("{0}")]
    Config(String),
    /// Something else failed; the message says what.
    #[error("{0}")]
    Failed(String),
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
