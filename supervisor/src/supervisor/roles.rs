//! The roles the configuration asks for — the web pool, the programs, beat — held together as
//! one value the main loop owns: starting them in order, stopping them in the safe order, and
//! rolling each to a new generation on reload. Asking them for status and health goes through the
//! [`RolesView`] they publish, which the loop keeps while a reload run owns the roles. What a
//! role does inside belongs to its own module; this one only sequences them.

use std::sync::Arc;

use anyhow::Context;
use proxy_conf::Loaded;

use crate::metrics::Metrics;
use crate::programs::Programs;
use crate::supervisor::lifecycle::{Progress, StopMode};
use crate::supervisor::view::RolesView;

/// The roles the config asked for, each behind its actor handle.
pub struct Roles {
    /// The web pool, when `[web]` is configured.
    pool: Option<crate::web::pool::PoolHandle>,
    /// Every `[programs.NAME]`.
    programs: Programs,
    /// The scheduler, when `[beat]` is configured.
    beat: Option<crate::beat::BeatHandle>,
    /// What [`Roles::view`]'s receivers see; republished whenever the pool or beat comes or
    /// goes (the programs' view follows them by itself).
    views: tokio::sync::watch::Sender<RolesView>,
}

impl Roles {
    /// Starts every configured role, in start order.
    pub async fn start(loaded: &Loaded, metrics: &Arc<Metrics>) -> anyhow::Result<Roles> {
        Roles::start_with(loaded, metrics, None, false).await
    }

    /// Starts every configured role, the web pool on `listeners` (one per `[web].listen` entry)
    /// instead of binding: an old supervisor whose successor died mid-upgrade serves again on
    /// the sockets it kept.
    pub async fn start_on(
        loaded: &Loaded,
        metrics: &Arc<Metrics>,
        listeners: Option<Vec<crate::listeners::Listener>>,
    ) -> anyhow::Result<Roles> {
        Roles::start_with(loaded, metrics, listeners, false).await
    }

    /// The start of a successor in an upgrade: the web pool on `listeners` (adopted or bound,
    /// one per `[web].listen` entry) and only the programs with `reload = "rolling"`; the other
    /// programs and beat wait for [`Roles::start_deferred`], once the old supervisor has
    /// stopped its own.
    pub async fn start_for_upgrade(
        loaded: &Loaded,
        metrics: &Arc<Metrics>,
        listeners: Option<Vec<crate::listeners::Listener>>,
    ) -> anyhow::Result<Roles> {
        Roles::start_with(loaded, metrics, listeners, true).await
    }

    async fn start_with(
        loaded: &Loaded,
        metrics: &Arc<Metrics>,
        listeners: Option<Vec<crate::listeners::Listener>>,
        upgrade: bool,
    ) -> anyhow::Result<Roles> {
        // The pool first: it binds the listening sockets, and a bind error stops the start.
        let pool = match &loaded.config.web {
            Some(web) => {
                let pool_dir = loaded.config_dir();
                let pool = crate::web::pool::start_on(
                    &loaded.config.app,
                    web,
                    &pool_dir,
                    Arc::clone(metrics),
                    listeners,
                )
                .await
                .context("the web pool did not start")?;
                Some(pool)
            }
            None => None,
        };
        let base_dir = &loaded.config_dir();
        let programs =
            Programs::start_rolling_only(&loaded.config, base_dir, Arc::clone(metrics), upgrade);
        let beat = match &loaded.config.beat {
            Some(_) if upgrade => None,
            Some(config) => {
                let password = loaded.secrets.redis_password.as_ref();
                match crate::beat::start(
                    config,
                    password,
                    &loaded.config.app,
                    base_dir,
                    Arc::clone(metrics),
                )
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
        let view = RolesView::of(pool.as_ref(), &programs, beat.as_ref());
        Ok(Roles {
            pool,
            programs,
            beat,
            views: tokio::sync::watch::Sender::new(view),
        })
    }

    /// The roles as they are now and as they will be: status and health can be asked through it
    /// whoever holds the roles, a reload run included.
    pub fn view(&self) -> tokio::sync::watch::Receiver<RolesView> {
        self.views.subscribe()
    }

    /// Tells the views that the pool or beat came or went.
    fn publish(&self) {
        self.views.send_replace(RolesView::of(
            self.pool.as_ref(),
            &self.programs,
            self.beat.as_ref(),
        ));
    }

    /// Stops every role: the pool stops accepting and drains first, then beat, then programs in
    /// reverse start order. Beat goes before the programs because it needs the broker — often
    /// a supervised Redis — to release its lock, and publishing to queues whose workers are
    /// stopping helps nobody.
    pub async fn shutdown(self, mode: StopMode) {
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

    /// After an upgrade's hand-over: starts the programs and beat that [`Roles::start_for_upgrade`]
    /// left for the old supervisor to stop first. Returns what it started, one line each.
    pub async fn start_deferred(
        &mut self,
        loaded: &Loaded,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Vec<String>> {
        let base_dir = loaded.config_dir();
        let mut started: Vec<String> = self
            .programs
            .start_missing(&loaded.config, &base_dir)
            .into_iter()
            .map(|name| format!("program \"{name}\" started"))
            .collect();
        if let (None, Some(config)) = (&self.beat, &loaded.config.beat) {
            let password = loaded.secrets.redis_password.as_ref();
            let beat = crate::beat::start(
                config,
                password,
                &loaded.config.app,
                &base_dir,
                Arc::clone(metrics),
            )
            .await
            .context("cannot start beat")?;
            self.beat = Some(beat);
            self.publish();
            started.push("beat started".to_owned());
        }
        Ok(started)
    }

    /// Adds a duplicate of each of the web pool's listening sockets to `table`, for a successor
    /// started by `upgrade` to inherit.
    pub async fn duplicate_into(
        &self,
        table: &mut crate::listeners::FdTable,
    ) -> std::io::Result<()> {
        match &self.pool {
            Some(pool) => pool.duplicate_into(table).await,
            None => Ok(()),
        }
    }

    /// Stops every role after an upgrade handed the sockets to a successor: the pool drains
    /// without unlinking its Unix socket files, then beat and the programs stop as in a graceful
    /// [`Roles::shutdown`].
    pub async fn hand_over(self) {
        if let Some(pool) = self.pool {
            pool.hand_over().await;
        }
        if let Some(beat) = self.beat {
            beat.shutdown().await;
        }
        self.programs.shutdown(StopMode::Graceful).await;
    }
}

impl Roles {
    /// Changes the number of web workers (TTIN/TTOU); `false` when there is no pool.
    pub fn scale(&self, delta: i32) -> bool {
        match &self.pool {
            Some(pool) => {
                pool.scale(delta);
                true
            }
            None => false,
        }
    }

    /// Rolls every role to `new`, as generation `generation`: the web pool first (canary, then
    /// worker by worker), then programs, then beat. The first role that fails stops the reload:
    /// it has rolled itself back, the roles after it are untouched, and the error says which
    /// role failed and why. Returns a one-line summary per role that changed.
    pub async fn reload(
        &mut self,
        new: &Loaded,
        generation: u64,
        metrics: &Arc<Metrics>,
        progress: &Progress,
    ) -> Result<Vec<String>, RoleReloadError> {
        let base_dir = new.config_dir();
        let mut summary = Vec::new();
        match (self.pool.as_mut(), &new.config.web) {
            (Some(pool), Some(web)) => {
                let rolled = pool
                    .reload(&new.config.app, web, &base_dir, generation, progress)
                    .await
                    .map_err(|error| RoleReloadError {
                        role: "web pool".to_owned(),
                        message: error.to_string(),
                        detail: error.detail(),
                    })?;
                summary.push(rolled);
                // The fallback status of a gone actor names the addresses served now.
                self.publish();
            }
            (None, Some(web)) => {
                let pool =
                    crate::web::pool::start(&new.config.app, web, &base_dir, Arc::clone(metrics))
                        .await
                        .map_err(|error| RoleReloadError {
                            role: "web pool".to_owned(),
                            message: format!("the new web pool did not start: {error}"),
                            detail: None,
                        })?;
                self.pool = Some(pool);
                self.publish();
                summary.push("web pool started".to_owned());
            }
            (Some(_), None) => {
                if let Some(pool) = self.pool.take() {
                    // Before the drain: the actor answers no status while it drains.
                    self.publish();
                    let _ =
                        progress.send("web pool removed from the config: draining it".to_owned());
                    pool.shutdown(StopMode::Graceful).await;
                }
                summary.push("web pool stopped".to_owned());
            }
            (None, None) => {}
        }
        let programs = self
            .programs
            .reload(&new.config, &base_dir, progress, generation)
            .await
            .map_err(|message| RoleReloadError {
                role: "programs".to_owned(),
                message,
                detail: None,
            })?;
        summary.push(programs);
        let password = new.secrets.redis_password.as_ref();
        match (self.beat.as_ref(), &new.config.beat) {
            (Some(beat), Some(config)) => {
                beat.reload(config, password, &new.config.app, &base_dir)
                    .await
                    .map_err(|error| RoleReloadError {
                        role: "beat".to_owned(),
                        message: error.to_string(),
                        detail: None,
                    })?;
                summary.push(format!("beat: {} job(s) scheduled", config.jobs.len()));
            }
            (None, Some(config)) => {
                let beat = crate::beat::start(
                    config,
                    password,
                    &new.config.app,
                    &base_dir,
                    Arc::clone(metrics),
                )
                .await
                .map_err(|error| RoleReloadError {
                    role: "beat".to_owned(),
                    message: format!("beat did not start: {error}"),
                    detail: None,
                })?;
                self.beat = Some(beat);
                self.publish();
                summary.push("beat started".to_owned());
            }
            (Some(_), None) => {
                if let Some(beat) = self.beat.take() {
                    // Before the stop: the actor answers no status while it releases its lock.
                    self.publish();
                    beat.shutdown().await;
                }
                summary.push("beat stopped".to_owned());
            }
            (None, None) => {}
        }
        summary.retain(|line| !line.is_empty());
        Ok(summary)
    }
}

/// A role could not be rolled to the new generation; it kept (or went back to) the old one.
#[derive(Debug, thiserror::Error)]
#[error("{role}: {message}")]
pub struct RoleReloadError {
    /// Which role.
    pub role: String,
    /// What failed, and what was kept.
    pub message: String,
    /// More text for the operator: the app's traceback, a warm-up response.
    pub detail: Option<String>,
}
