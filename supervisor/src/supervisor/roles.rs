//! The roles the configuration asks for — the web pool, the programs, beat — held together as
//! one value the main loop owns: starting them in order, stopping them in the safe order, asking
//! each for its status and health, and rolling each to a new generation on reload. What a role
//! does inside belongs to its own module; this one only sequences them.

use std::sync::Arc;

use anyhow::Context;
use proxy_conf::Loaded;

use crate::metrics::Metrics;
use crate::programs::Programs;
use crate::supervisor::lifecycle::{Progress, StopMode};
use crate::supervisor::status::StatusReport;

/// The roles the config asked for, each behind its actor handle.
pub struct Roles {
    /// The web pool, when `[web]` is configured.
    pool: Option<crate::web::pool::PoolHandle>,
    /// Every `[programs.NAME]`.
    programs: Programs,
    /// The scheduler, when `[beat]` is configured.
    beat: Option<crate::beat::BeatHandle>,
}

impl Roles {
    /// Starts every configured role, in start order.
    pub async fn start(loaded: &Loaded, metrics: &Arc<Metrics>) -> anyhow::Result<Roles> {
        Roles::start_with(loaded, metrics, None, false).await
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

    /// The roles' part of the status report.
    pub async fn fill_status(&self, report: &mut StatusReport) {
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
    pub async fn health(&self) -> (Vec<String>, String) {
        let mut problems = Vec::new();
        let mut parts = Vec::new();
        if let Some(pool) = &self.pool {
            let status = pool.status().await;
            let ready = status
                .workers
                .iter()
                .filter(|worker| worker.state == crate::web::pool::WorkerState::Ready)
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
                summary.push("web pool started".to_owned());
            }
            (Some(_), None) => {
                if let Some(pool) = self.pool.take() {
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
                summary.push("beat started".to_owned());
            }
            (Some(_), None) => {
                if let Some(beat) = self.beat.take() {
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
