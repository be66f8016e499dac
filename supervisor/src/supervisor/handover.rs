//! The main loop's side of an upgrade, on both ends (the sequence is described in `upgrade`).
//!
//! As the old process: when an upgrade may start (`activity` decides), gathering the sockets the
//! successor inherits, and once it is ready, `MAINPID=` to systemd and the hand-over — the roles
//! stop without unlinking any socket file, then `released` — unless the successor died
//! meanwhile: then the old process starts its roles again on spare copies of its sockets and
//! serves on, since a successor that never took over left nobody else to. As the successor:
//! taking the control socket once it is the main process, starting the roles the old process
//! ran alone once it has released them, and aborting — roles stopped, exit status non-zero —
//! when the channel closes without `released`.
//!
//! Spawning and watching the successor, the wire format and the inheritance belong to
//! `upgrade`.

use std::ops::ControlFlow::{self, Break, Continue};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_conf::Loaded;

use super::activity::{Activity, Queued, UpgradeAdmission};
use super::roles::Roles;
use super::upgrade::{self, Message, Successor, UpgradeRun};
use super::{CONTROL_FLUSH, Next, RunError, StopRequest, Supervisor, notify_or_log};
use crate::control::{ErrorKind, Responder};
use crate::listeners::{FdTable, Options, Role};
use crate::metrics::server::Health;

impl Supervisor {
    /// Starts an upgrade: spawns `binary` (this process's own by default) with every listening
    /// socket. Refused unless the loop is idle: the successor must start from a settled
    /// generation, and only one process can take over.
    pub(super) async fn request_upgrade(
        &mut self,
        activity: Activity,
        waiter: Option<Responder>,
        binary: Option<PathBuf>,
        timeout: Option<Duration>,
    ) -> Activity {
        let refuse = |waiter: Option<Responder>, message: String| {
            tracing::warn!("upgrade refused: {message}");
            if let Some(waiter) = waiter {
                waiter.error(ErrorKind::Unavailable, message, None);
            }
        };
        let roles = match activity.ask_upgrade() {
            UpgradeAdmission::Start(roles) => roles,
            UpgradeAdmission::Refused(activity, message) => {
                refuse(waiter, message);
                return activity;
            }
        };
        let Some(binary) = binary.or_else(|| self.own_binary.clone()) else {
            refuse(
                waiter,
                "the path of this supervisor's binary is unknown; pass --binary".to_owned(),
            );
            return Activity::Idle { roles };
        };
        let sockets = match self.upgrade_sockets(&roles).await {
            Ok(sockets) => sockets,
            Err(error) => {
                refuse(waiter, format!("cannot hand over the sockets: {error}"));
                return Activity::Idle { roles };
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
                Activity::Upgrading { roles, run }
            }
            Err(failure) => {
                tracing::error!("upgrade failed, nothing changed: {failure}");
                if let Some(waiter) = waiter {
                    waiter.error(ErrorKind::Failed, failure.message, failure.detail);
                }
                Activity::Idle { roles }
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
    pub(super) async fn on_upgrade_finished(
        &mut self,
        roles: Roles,
        run: UpgradeRun,
        finished: Result<Successor, upgrade::Failure>,
    ) -> Next {
        match finished {
            Ok(mut successor) => {
                let (old, new) = (std::process::id(), successor.pid);
                tracing::info!(new, "upgrade: the new supervisor is ready; handing over");
                notify_or_log(
                    self.notifier
                        .main_pid(new, &format!("upgraded: pid {old} hands over to pid {new}")),
                    "MAINPID",
                );
                // Unreachable, it is noticed at the end of the hand-over.
                successor.tell(Message::MainPid).await;
                if let Some(waiter) = &run.waiter {
                    waiter.progress(format!(
                        "new supervisor pid {new} is ready and serving; pid {old} stops accepting and drains"
                    ));
                }
                Break(StopRequest::HandOver {
                    roles,
                    successor,
                    waiter: run.waiter,
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
                Continue(Activity::Idle { roles })
            }
        }
    }

    /// As an upgrade's successor: the old process made us the main one. The loop serves the
    /// control socket from now on.
    pub(super) fn on_main_pid(&mut self) {
        tracing::info!(
            "upgrade: systemd now tracks this process as the main one; serving the control socket"
        );
        self.notifier.set_muted(false);
    }

    /// As an upgrade's successor: the old process has released its roles. Start the ones it
    /// ran alone, own the control socket's file, tell systemd `READY=1`, and start the reloads
    /// asked for meanwhile.
    pub(super) async fn on_released(&mut self, mut roles: Roles, queued: Queued) -> Activity {
        self.notifier.set_muted(false);
        self.control.set_owns_socket_file(true);
        match roles.start_deferred(&self.loaded, &self.metrics).await {
            Ok(started) if !started.is_empty() => {
                tracing::info!("upgrade: {}", started.join(", "));
            }
            Ok(_) => {}
            Err(error) => tracing::error!("upgrade: {error:#}"),
        }
        tracing::info!("the previous supervisor has handed over every role");
        notify_or_log(self.notifier.ready(), "READY");
        self.status_line.clear();
        self.publish_health().await;
        match queued {
            Some(waiters) => self.start_reload(roles, waiters).await,
            None => Activity::Idle { roles },
        }
    }

    /// The end of an upgrade: the successor serves every socket already. Stop accepting, drain,
    /// stop the roles without unlinking any socket file, release the successor and exit
    /// (`Break`). Should the successor be gone by then, it never took over: start the roles
    /// again and serve on (`Continue`).
    pub(super) async fn hand_over(
        mut self,
        roles: Roles,
        mut successor: Successor,
        waiter: Option<Responder>,
    ) -> ControlFlow<Result<(), RunError>, (Self, Activity)> {
        let began = Instant::now();
        // Copies kept until the successor is released, to serve on should it die before.
        let spare = match self.upgrade_sockets(&roles).await {
            Ok(spare) => Some(spare),
            Err(error) => {
                tracing::warn!(
                    "upgrade: cannot keep spare copies of the sockets ({error}); should the new \
                     supervisor die before it is released, nothing will serve"
                );
                None
            }
        };
        // systemd tracks the successor now: STOPPING=1 or a status from us would be refused.
        self.notifier.set_muted(true);
        drop(self.queue_sampler.take());
        if let Some(server) = self.metrics_server.take() {
            server.shutdown().await;
        }
        self.control.set_owns_socket_file(false);
        if let Some(waiter) = &waiter {
            waiter.progress(format!(
                "pid {}: draining the web front and stopping workers, programs and beat",
                std::process::id()
            ));
        }
        roles.hand_over().await;
        let (old, new) = (std::process::id(), successor.pid);
        // Gone, or the word cannot reach it: it never took over.
        if successor.is_gone() || !successor.tell(Message::Released).await {
            return match spare {
                Some(spare) => self.take_back(spare, successor, waiter).await,
                None => {
                    let message = format!(
                        "the new supervisor (pid {new}) died during the hand-over, and pid {old} \
                         has no sockets left to serve on"
                    );
                    tracing::error!("upgrade: {message}");
                    if let Some(left) = successor.end().await {
                        tracing::warn!("upgrade: {left}");
                    }
                    if let Some(waiter) = waiter {
                        waiter.error(ErrorKind::Failed, message.clone(), None);
                    }
                    self.control.shutdown(CONTROL_FLUSH).await;
                    Break(Err(RunError::Other(anyhow::anyhow!(message))))
                }
            };
        }
        drop(spare);
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
        Break(Ok(()))
    }

    /// The successor died after `ready` but before `released`: it never took over, so this
    /// process starts its roles again on `spare` (copies of every socket it handed over, which
    /// kept them open meanwhile, so connections waited in the backlog instead of being refused)
    /// and becomes systemd's main process again.
    async fn take_back(
        mut self,
        mut spare: FdTable,
        successor: Successor,
        waiter: Option<Responder>,
    ) -> ControlFlow<Result<(), RunError>, (Self, Activity)> {
        let (old, new) = (std::process::id(), successor.pid);
        tracing::error!(
            new,
            "upgrade: the new supervisor (pid {new}) is gone before it was released; pid {old} \
             starts its roles again"
        );
        if let Some(left) = successor.end().await {
            tracing::warn!("upgrade: {left}");
        }
        drop(successor);
        self.notifier.set_muted(false);
        notify_or_log(
            self.notifier.main_pid(
                old,
                &format!("upgrade failed: pid {new} died during the hand-over; pid {old} serves"),
            ),
            "MAINPID",
        );
        self.control.set_owns_socket_file(true);
        let listeners = match &self.loaded.config.web {
            Some(web) => spare
                .open_all(&web.listen, &Options::new(Role::Web, web.backlog))
                .map(Some)
                .map_err(anyhow::Error::new),
            None => Ok(None),
        };
        let started = match listeners {
            Ok(listeners) => Roles::start_on(&self.loaded, &self.metrics, listeners).await,
            Err(error) => Err(error),
        };
        let roles = match started {
            Ok(roles) => roles,
            Err(error) => {
                let message = format!(
                    "the new supervisor (pid {new}) died during the hand-over, and pid {old} \
                     cannot start its roles again: {error:#}"
                );
                tracing::error!("upgrade: {message}");
                if let Some(waiter) = waiter {
                    waiter.error(ErrorKind::Failed, message.clone(), None);
                }
                self.control.shutdown(CONTROL_FLUSH).await;
                return Break(Err(RunError::Other(anyhow::anyhow!(message))));
            }
        };
        match crate::metrics::server::start_on(
            &self.loaded.config.metrics,
            &self.loaded.config_dir(),
            Arc::clone(&self.metrics),
            self.health.subscribe(),
            Some(&mut spare),
        )
        .await
        {
            Ok(server) => self.metrics_server = server,
            Err(error) => tracing::error!("upgrade: the metrics endpoint did not restart: {error}"),
        }
        self.queue_sampler = crate::metrics::queue_sampler::spawn_for(
            &self.loaded.config,
            self.loaded.secrets.redis_password.as_ref(),
            Arc::clone(&self.metrics),
        );
        self.roles = roles.view();
        self.status_line.clear();
        self.publish_health().await;
        tracing::info!("upgrade: every role has started again; pid {old} serves on");
        if let Some(waiter) = waiter {
            waiter.error(
                ErrorKind::Failed,
                format!(
                    "the new supervisor (pid {new}) died during the hand-over; pid {old} started \
                     its roles again and keeps serving"
                ),
                None,
            );
        }
        Continue((self, Activity::Idle { roles }))
    }

    /// As an upgrade's successor: the old supervisor closed the channel without `released` —
    /// it gave up on this process (a missed deadline) or died mid-hand-over. Taking over could
    /// make two supervisors serve one port, so stop the roles (draining, without unlinking any
    /// socket file) and fail; under systemd, the service restarts.
    pub(super) async fn abort_take_over(mut self, roles: Roles, queued: Queued) -> RunError {
        let message = "the previous supervisor closed the hand-over channel without releasing its \
                       roles (it gave up on this one, or died mid-hand-over); stopping, so that \
                       two supervisors never serve at once";
        tracing::error!("upgrade: {message}");
        for waiter in queued.into_iter().flatten() {
            waiter.error(ErrorKind::Unavailable, message, None);
        }
        notify_or_log(self.notifier.stopping(), "STOPPING");
        self.health
            .send_replace(Health::now(false, vec![message.to_owned()]));
        drop(self.queue_sampler.take());
        roles.hand_over().await;
        if let Some(server) = self.metrics_server.take() {
            server.shutdown().await;
        }
        self.control.shutdown(CONTROL_FLUSH).await;
        RunError::Other(anyhow::anyhow!(message))
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
