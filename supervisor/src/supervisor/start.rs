//! Bringing the supervisor up: the signal handlers first (an upgrade's successor installs them
//! only once its roles have started, so that until then a TERM from the old process ends it at
//! once), then the control socket (bound, or adopted from the old process in an upgrade), the
//! metrics endpoint — so that probes see "starting" rather than a refusal — `[hooks].before_start`
//! (not in an upgrade), and the roles in start order; then `READY=1`, or, as an upgrade's
//! successor, `ready` on the hand-over channel and a wait for the old process.
//!
//! What it hands the loop is the [`Supervisor`] and its first [`Activity`]: `Idle`, or
//! `TakingOver` for a successor. A failure stops whatever had started and says what failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use proxy_conf::Loaded;

use super::activity::Activity;
use super::hooks;
use super::lifecycle::Phase;
use super::notify::Notifier;
use super::roles::Roles;
use super::signals::Signals;
use super::status::StatusReport;
use super::trigger::Triggers;
use super::upgrade::{Inherited, Message, Predecessor};
use super::{CONTROL_FLUSH, Supervisor, notify_or_log, watch};
use crate::control::ControlServer;
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::metrics::server::Health;

impl Supervisor {
    /// Installs the signal handlers, binds the control socket and starts every role.
    pub(super) async fn start(
        loaded: Loaded,
        mut notifier: Notifier,
        log: LogHandle,
        watch_app: bool,
        mut inherited: Option<Inherited>,
        own_binary: Option<std::path::PathBuf>,
    ) -> anyhow::Result<(Self, Activity)> {
        let started = Instant::now();
        // A successor speaks to systemd only once the old process has made it the main one.
        notifier.set_muted(inherited.is_some());
        // Handlers first, so that a TERM during start-up is not fatal before children exist. Not
        // for an upgrade's successor: until it is ready, a TERM (the old process giving up on
        // it) must end it at once, before its front accepts a connection it would then drop;
        // its children follow through PR_SET_PDEATHSIG and the reaper.
        let mut early_signals = match inherited {
            None => Some(Signals::install().context("cannot install signal handlers")?),
            Some(_) => None,
        };
        let control_path = crate::config::control_socket(&loaded);
        // A control socket that moved in the config is closed; the new path is bound.
        let mut control =
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
        // Migrations and the like, before any role: `upgrade` runs none (same release).
        if let (None, Some(signals)) = (&inherited, &mut early_signals)
            && !loaded.config.hooks.before_start.is_empty()
        {
            notify_or_log(notifier.status("running [hooks].before_start"), "STATUS");
            let status = |hook| {
                let mut report =
                    StatusReport::of_supervisor(Phase::Starting, 1, started, &loaded, &metrics);
                report.hook = hook;
                serde_json::to_value(report).unwrap_or_default()
            };
            let hooks = hooks::before_start(&loaded, signals, &mut control, &log, status);
            if let Err(error) = hooks.await {
                if let Some(server) = metrics_server {
                    server.shutdown().await;
                }
                control.shutdown(CONTROL_FLUSH).await;
                return Err(error.into());
            }
        }
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
        // A successor's handlers, now that it is about to say ready.
        let signals = match early_signals {
            Some(signals) => signals,
            None => Signals::install().context("cannot install signal handlers")?,
        };
        metrics.generation.set(1);
        let view = roles.view();
        let (problems, status_line) = view.borrow().clone().health().await;
        health.send_replace(Health::now(true, problems));
        notify_or_log(notifier.ready(), "READY");
        notify_or_log(notifier.status(&status_line), "STATUS");
        let activity = match inherited {
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
                Activity::TakingOver {
                    roles,
                    predecessor,
                    queued: None,
                    serves_control: false,
                }
            }
            None => {
                tracing::info!(
                    startup_ms = started.elapsed().as_millis() as u64,
                    "every role has started"
                );
                Activity::Idle { roles }
            }
        };
        let triggers = Triggers::new(signals, app_changes, notifier.watchdog_interval());
        let supervisor = Supervisor {
            loaded,
            generation: 1,
            started,
            notifier,
            log,
            metrics,
            control,
            roles: view,
            health,
            metrics_server,
            queue_sampler,
            status_line,
            own_binary,
            triggers,
        };
        Ok((supervisor, activity))
    }
}
