//! The main loop: the one task that owns the supervisor's state — the generation, the loaded
//! config, and in one [`Activity`] what is in progress and who holds the roles — and reacts to
//! one [`Trigger`] at a time: a signal, a control-socket request, `--watch`, the timers, or an
//! event of what is in progress.
//!
//! It runs `[hooks].before_start` (not as an upgrade's successor), then starts the roles in order
//! (web pool — which binds the listening sockets first — then programs in start order, by
//! `priority` then name, then beat), tells systemd `READY=1` once all of them have started, and
//! stops them: the pool stops accepting and drains, beat releases its lock, then programs stop in
//! reverse start order. It never sits on the request hot path: the HTTP front talks to the workers
//! without passing through here.
//!
//! It also runs both sides of an upgrade (see `upgrade` for the sequence): as the old process
//! it spawns the successor, keeps serving while it starts, and hands over once it is ready —
//! `MAINPID=` to systemd, then the roles stop without unlinking any socket; as the successor
//! it stays quiet towards systemd and leaves the control socket alone until it is the main
//! process, and the non-rolling programs and beat until the old process has released them.
//!
//! This file holds the loop and the handling of each trigger; its helpers live beside it, by
//! job: bringing it up (`start`), its state (`activity`), what wakes it (`trigger`, `signals`,
//! `watch`), the roles it starts and stops (`roles`) and asks for status and health (`view`),
//! the deploy hooks (`hooks`), the reload and upgrade sequences (`reload`; `upgrade` for the
//! mechanism and `handover` for the loop's side), what it tells systemd (`notify`), the `status` report (`status`) and the
//! lifecycle vocabulary shared with the roles (`lifecycle`).

pub mod activity;
mod handover;
pub mod hooks;
pub mod lifecycle;
pub mod notify;
pub mod reload;
pub mod roles;
pub mod signals;
mod start;
pub mod status;
pub mod trigger;
pub mod upgrade;
pub mod view;
pub mod watch;

use std::ops::ControlFlow::{self, Break, Continue};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use proxy_conf::Loaded;

use crate::config::ConfigError;
use crate::control::{ControlRequest, ControlServer, ErrorKind, Request, Responder};
use crate::logging::{LogHandle, LogOptions};
use crate::metrics::Metrics;
use crate::metrics::queue_sampler::QueueSampler;
use crate::metrics::server::{Health, MetricsServer};
use crate::supervisor::activity::{Activity, Queued, ReloadAdmission};
use crate::supervisor::lifecycle::StopMode;
use crate::supervisor::notify::Notifier;
use crate::supervisor::reload::ReloadEvent;
use crate::supervisor::roles::Roles;
use crate::supervisor::signals::SignalEvent;
use crate::supervisor::status::StatusReport;
use crate::supervisor::trigger::{Trigger, Triggers};
use crate::supervisor::upgrade::{Inherited, Message, Successor, UpgradeEvent, Word};
use crate::supervisor::view::RolesView;

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
    // Declared before the runtime so that it drops after it: whatever the requests still open
    // when the runtime stops log on their way out is written too, on every way out of here.
    let _flush = FlushOnExit(log.clone());
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
        let (supervisor, activity) = match start.await {
            Ok(started) => started,
            Err(error) => {
                if let Some(hooks::BeforeStartError::Stopped) = error.downcast_ref() {
                    tracing::info!("{error}");
                    return Ok(());
                }
                report(&format_args!("{error:#}"));
                return Err(error.into());
            }
        };
        supervisor.run(activity).await
    })
}

/// Writes the buffered access-log lines when dropped: the log's writer thread does not outlive
/// the process, so a clean stop (signal, `stop`, hand-over to an upgrade) ends through here.
struct FlushOnExit(LogHandle);

impl Drop for FlushOnExit {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// What the main loop owns for as long as it runs; what it has in progress, and the roles, are
/// the [`Activity`] it carries from one trigger to the next.
struct Supervisor {
    /// The config of the generation serving.
    loaded: Loaded,
    /// The generation serving: 1 at start, one more for each reload that succeeded.
    generation: u64,
    started: Instant,
    notifier: Notifier,
    log: LogHandle,
    metrics: Arc<Metrics>,
    control: ControlServer,
    /// Where `status` and the health verdict ask the roles, whoever holds them: live also while
    /// a reload run owns the roles.
    roles: tokio::sync::watch::Receiver<RolesView>,
    /// The verdict `/healthz` and `/readyz` serve, refreshed by the loop every second.
    health: tokio::sync::watch::Sender<Health>,
    /// The `/metrics` endpoint, unless `[metrics].listen` is empty.
    metrics_server: Option<MetricsServer>,
    /// Samples Celery queue lengths, when there are queues and a broker.
    queue_sampler: Option<QueueSampler>,
    /// The last `STATUS=` line sent, so that systemd hears only changes.
    status_line: String,
    /// The binary `upgrade` starts by default: this process's own, as resolved at start-up.
    own_binary: Option<PathBuf>,
    /// Signals, `--watch` and the timers.
    triggers: Triggers,
}

/// Why the main loop ended, with what it still holds.
enum StopRequest {
    /// A signal or a `stop` client asked for it.
    Requested {
        /// What was in progress; it ends before the roles stop.
        activity: Activity,
        mode: StopMode,
        /// The `stop` client waiting for the end, if the request came over the control socket.
        waiter: Option<Responder>,
    },
    /// The supervisor can no longer serve (a reload task failed, taking the roles with it);
    /// it exits with status 1.
    Failed,
    /// As an upgrade's successor: the old supervisor closed the hand-over channel without
    /// releasing its roles. The roles stop without unlinking any socket file and the process
    /// exits non-zero.
    Aborted {
        roles: Roles,
        /// Reloads asked for meanwhile; they are refused.
        queued: Queued,
    },
    /// A successor took over in an upgrade: the roles stop without unlinking any socket.
    HandOver {
        roles: Roles,
        successor: Successor,
        /// The `upgrade` client waiting for the end, if any.
        waiter: Option<Responder>,
    },
}

/// What handling one trigger leads to: the loop's next state, or the end.
type Next = ControlFlow<StopRequest, Activity>;

impl Supervisor {
    /// The loop itself: wait for a trigger, handle it, again; returns once a stop was requested
    /// and every role has stopped.
    async fn run(mut self, mut activity: Activity) -> Result<(), RunError> {
        loop {
            let stop = loop {
                let serves_control = activity.serves_control();
                let trigger = self
                    .triggers
                    .next(&mut self.control, serves_control, activity.next_event())
                    .await;
                match self.handle(activity, trigger).await {
                    Continue(next) => activity = next,
                    Break(stop) => break stop,
                }
            };
            match stop {
                StopRequest::HandOver {
                    roles,
                    successor,
                    waiter,
                } => match self.hand_over(roles, successor, waiter).await {
                    // The successor died before it was released: this process serves on.
                    Continue((supervisor, taken_back)) => {
                        self = supervisor;
                        activity = taken_back;
                    }
                    Break(result) => return result,
                },
                StopRequest::Aborted { roles, queued } => {
                    return Err(self.abort_take_over(roles, queued).await);
                }
                stop => return self.shutdown(stop).await,
            }
        }
    }

    /// One trigger, in the state it arrived in. The events of what is in progress come from
    /// that state itself, within the same turn, so they always meet the state that made them.
    async fn handle(&mut self, activity: Activity, trigger: Trigger) -> Next {
        match (activity, trigger) {
            (activity, Trigger::Signal(event)) => self.on_signal(activity, event).await,
            (activity, Trigger::Request(request)) => self.on_request(activity, request).await,
            (activity, Trigger::AppFilesChanged(paths)) => {
                let shown: Vec<String> = paths
                    .iter()
                    .take(3)
                    .map(|path| path.display().to_string())
                    .collect();
                tracing::info!(
                    changed = paths.len(),
                    "--watch: {}{}; reloading",
                    shown.join(", "),
                    if paths.len() > shown.len() {
                        ", …"
                    } else {
                        ""
                    }
                );
                Continue(self.request_reload(activity, None).await)
            }
            (activity, Trigger::WatcherStopped) => {
                tracing::error!(
                    "--watch: the file watcher stopped; changes are no longer picked up"
                );
                Continue(activity)
            }
            (activity, Trigger::Watchdog) => {
                notify_or_log(self.notifier.watchdog(), "WATCHDOG");
                Continue(activity)
            }
            (activity, Trigger::Heartbeat) => {
                self.publish_health().await;
                Continue(activity)
            }
            (Activity::Reloading { run, queued }, Trigger::Reload(event)) => match event {
                ReloadEvent::Progress(line) => {
                    tracing::info!("reload: {line}");
                    for waiter in &run.waiters {
                        waiter.progress(line.clone());
                    }
                    Continue(Activity::Reloading { run, queued })
                }
                ReloadEvent::Finished(finished) => {
                    self.on_reload_finished(run, queued, *finished).await
                }
            },
            (Activity::Upgrading { roles, run }, Trigger::Upgrade(event)) => match event {
                UpgradeEvent::Progress(line) => {
                    tracing::info!("upgrade: {line}");
                    if let Some(waiter) = &run.waiter {
                        waiter.progress(line);
                    }
                    Continue(Activity::Upgrading { roles, run })
                }
                UpgradeEvent::Finished(finished) => {
                    self.on_upgrade_finished(roles, run, *finished).await
                }
            },
            (
                Activity::TakingOver {
                    roles,
                    predecessor,
                    queued,
                    ..
                },
                Trigger::Predecessor(message),
            ) => match message {
                Word::MainPid => {
                    self.on_main_pid();
                    Continue(Activity::TakingOver {
                        roles,
                        predecessor,
                        queued,
                        serves_control: true,
                    })
                }
                Word::Released => Continue(self.on_released(roles, queued).await),
                Word::Gone => Break(StopRequest::Aborted { roles, queued }),
            },
            // A state's event meeting another state cannot happen (see above); nothing to do.
            (activity, Trigger::Reload(_) | Trigger::Upgrade(_) | Trigger::Predecessor(_)) => {
                Continue(activity)
            }
        }
    }

    async fn on_signal(&mut self, activity: Activity, event: SignalEvent) -> Next {
        match event {
            SignalEvent::Shutdown(mode) => {
                tracing::info!(?mode, "stop requested by signal");
                return Break(StopRequest::Requested {
                    activity,
                    mode,
                    waiter: None,
                });
            }
            SignalEvent::Reload => {
                tracing::info!("reload requested by SIGHUP");
                return Continue(self.request_reload(activity, None).await);
            }
            SignalEvent::ReopenLogs => match self.log.reopen() {
                Ok(()) => tracing::info!("log file reopened"),
                Err(error) => tracing::error!("cannot reopen the log file: {error}"),
            },
            SignalEvent::ScaleWorkers(delta) => match activity.roles() {
                Some(roles) if roles.scale(delta) => tracing::info!(delta, "scaling the web pool"),
                Some(_) => tracing::warn!(delta, "no [web] pool configured to scale"),
                None => tracing::warn!(
                    delta,
                    "a reload is in progress; scale again when it is done"
                ),
            },
            SignalEvent::Upgrade => {
                tracing::info!("upgrade requested by SIGUSR2");
                return Continue(self.request_upgrade(activity, None, None, None).await);
            }
        }
        Continue(activity)
    }

    async fn on_request(&mut self, activity: Activity, request: ControlRequest) -> Next {
        let ControlRequest { request, reply } = request;
        match request {
            Request::Status => {
                match serde_json::to_value(self.status_report(&activity).await) {
                    Ok(data) => reply.ok(data),
                    Err(error) => reply.error(ErrorKind::Failed, error.to_string(), None),
                }
                Continue(activity)
            }
            Request::Stop { mode } => {
                tracing::info!(?mode, "stop requested over the control socket");
                reply.progress("stopping");
                Break(StopRequest::Requested {
                    activity,
                    mode,
                    waiter: Some(reply),
                })
            }
            Request::Reload { .. } => {
                tracing::info!("reload requested over the control socket");
                Continue(self.request_reload(activity, Some(reply)).await)
            }
            Request::Upgrade {
                binary,
                timeout_secs,
            } => {
                tracing::info!("upgrade requested over the control socket");
                let timeout = timeout_secs.map(Duration::from_secs);
                Continue(
                    self.request_upgrade(activity, Some(reply), binary, timeout)
                        .await,
                )
            }
        }
    }

    /// Starts a reload now, or queues or refuses it, as the state decides (the client is told).
    async fn request_reload(&mut self, activity: Activity, waiter: Option<Responder>) -> Activity {
        match activity.ask_reload(waiter) {
            ReloadAdmission::Start(roles, waiters) => self.start_reload(roles, waiters).await,
            ReloadAdmission::Held(activity) => activity,
        }
    }

    /// Refreshes `/healthz`'s verdict (which also proves this loop alive) from the live roles
    /// and tells systemd when the one-line status changed.
    async fn publish_health(&mut self) {
        let roles = self.roles.borrow().clone();
        let (problems, line) = roles.health().await;
        self.health.send_replace(Health::now(true, problems));
        if line != self.status_line {
            notify_or_log(self.notifier.status(&line), "STATUS");
            self.status_line = line;
        }
    }

    /// The status document, from the live roles whoever holds them.
    async fn status_report(&self, activity: &Activity) -> StatusReport {
        let mut report = StatusReport::of_supervisor(
            activity.phase(),
            self.generation,
            self.started,
            &self.loaded,
            &self.metrics,
        );
        report.hook = activity.hook_status();
        let roles = self.roles.borrow().clone();
        roles.fill_status(&mut report).await;
        report
    }

    async fn shutdown(mut self, stop: StopRequest) -> Result<(), RunError> {
        let (activity, mode, waiter) = match stop {
            // `run` ends these itself.
            StopRequest::HandOver { .. } | StopRequest::Aborted { .. } => return Ok(()),
            StopRequest::Requested {
                activity,
                mode,
                waiter,
            } => (Some(activity), mode, waiter),
            StopRequest::Failed => (None, StopMode::Fast, None),
        };
        let failed = activity.is_none();
        notify_or_log(self.notifier.stopping(), "STOPPING");
        self.health.send_replace(Health::now(
            false,
            vec!["sauna-supervisor is stopping".to_owned()],
        ));
        let began = Instant::now();
        drop(self.queue_sampler.take());
        // A successor not yet released leaves the Unix socket files alone: the old process
        // still serves on them.
        let released = !matches!(activity, Some(Activity::TakingOver { .. }));
        let roles = match activity {
            Some(activity) => activity.into_roles().await,
            None => None,
        };
        match roles {
            Some(roles) if released => roles.shutdown(mode).await,
            Some(roles) => roles.hand_over().await,
            None => {}
        }
        // Last, so that the final scrape can still see the roles stopping.
        if let Some(server) = self.metrics_server.take() {
            server.shutdown().await;
        }
        tracing::info!(
            elapsed_ms = began.elapsed().as_millis() as u64,
            "every role has stopped"
        );
        if let Some(waiter) = waiter {
            waiter.ok(serde_json::json!({ "stopped": true }));
        }
        self.control.shutdown(CONTROL_FLUSH).await;
        if failed {
            Err(RunError::Stopped)
        } else {
            Ok(())
        }
    }
}

/// sd_notify failures never stop the supervisor, but they must be visible: systemd would
/// otherwise time the service out with no hint why.
fn notify_or_log(result: std::io::Result<()>, what: &str) {
    if let Err(error) = result {
        tracing::warn!("cannot notify systemd ({what}): {error}");
    }
}
