//! The main loop: the one task that owns the supervisor's state (lifecycle phase, generation, the
//! loaded config and the handles of the roles) and reacts to signals, control-socket requests and
//! the watchdog timer in a single `select!`.
//!
//! It starts the roles in order (web pool — which binds the listening sockets first — then
//! programs in name order, then beat), tells systemd `READY=1` once all of them have started, and
//! stops them in the opposite order: the pool stops accepting and drains, then programs stop in
//! reverse start order, then beat releases its lock. It never sits on the request hot path: the
//! HTTP front talks to the workers without passing through here.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use proxy_conf::Loaded;

use crate::cli::RunArgs;
use crate::control::{ControlRequest, ControlServer, ErrorKind, Request, Responder};
use crate::lifecycle::{Phase, StopMode};
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::programs::Programs;
use crate::signals::{SignalEvent, Signals};
use crate::status::StatusReport;

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
        .worker_threads(2)
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
    /// Every `[programs.NAME]`.
    programs: Programs,
    /// The scheduler, when `[beat]` is configured.
    beat: Option<crate::beat::BeatHandle>,
}

impl Roles {
    /// Starts every configured role, in start order.
    async fn start(loaded: &Loaded, metrics: &Arc<Metrics>) -> anyhow::Result<Roles> {
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
                        return Err(anyhow::Error::new(error).context("cannot start beat"));
                    }
                }
            }
            None => None,
        };
        Ok(Roles { programs, beat })
    }

    /// Stops every role, in reverse start order.
    async fn shutdown(self, mode: StopMode) {
        self.programs.shutdown(mode).await;
        // Even a fast stop releases the beat lock: one Redis round trip lets a standby take
        // over at once instead of after the lock's TTL.
        if let Some(beat) = self.beat {
            beat.shutdown().await;
        }
    }

    /// The roles' part of the status report.
    async fn fill_status(&self, report: &mut StatusReport) {
        report.programs = serde_json::to_value(self.programs.status().await).unwrap_or_default();
        if let Some(beat) = &self.beat {
            report.beat = match beat.status().await {
                Ok(status) => serde_json::to_value(status).ok(),
                Err(error) => Some(serde_json::json!({ "error": error.to_string() })),
            };
        }
    }

    /// A one-line summary for systemd's `STATUS=`.
    fn summary(&self) -> String {
        "running".to_owned()
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
        let roles = match Roles::start(&loaded, &metrics).await {
            Ok(roles) => roles,
            Err(error) => {
                control.shutdown(Duration::ZERO).await;
                return Err(error);
            }
        };
        metrics.generation.set(1);
        notify_or_log(notifier.ready(), "READY");
        notify_or_log(notifier.status(&roles.summary()), "STATUS");
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
        })
    }

    /// The loop itself; returns when a stop was requested and every role has stopped.
    async fn run(mut self) -> anyhow::Result<ExitCode> {
        let mut watchdog = self.notifier.watchdog_interval().map(tokio::time::interval);
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

    async fn scale_workers(&mut self, delta: i32) {
        tracing::warn!(delta, "no web pool in this build to scale (issue #3)");
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
        let began = Instant::now();
        self.roles.shutdown(stop.mode).await;
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
