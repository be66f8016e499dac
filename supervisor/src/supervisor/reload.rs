//! One reload: re-reading the config, rolling the roles to the next generation in a task of its
//! own, and telling everyone who asked how it went.
//!
//! The main loop starts a [`ReloadRun`] and hands it the roles; while the run owns them the loop
//! keeps answering `status` (from a snapshot), pinging the watchdog and forwarding progress lines
//! to every waiting `reload` client. Reloads are serialized: a request that arrives during a run
//! waits for it, and all requests that queued up meanwhile share the next run, which reads the
//! config as it is then. A config that does not load changes nothing and never starts a run.
//!
//! A run first runs `[hooks].before_reload` (migrations, collectstatic) with the new config's
//! `[app]`, before any role is touched: a failed hook ends the run with every role as it was.
//! The hook's steps and output lines reach the waiting clients as they come (the hook has logged
//! them already), and `status` can ask the run which command runs.

use std::sync::Arc;

use proxy_conf::Loaded;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::control::{ErrorKind, Responder};
use crate::metrics::Metrics;
use crate::supervisor::hooks::{self, Hook, HookFailure, HookPlan, HookStatus, HookWatch};
use crate::supervisor::roles::{RoleReloadError, Roles};

/// A reload in progress.
pub struct ReloadRun {
    task: JoinHandle<Finished>,
    progress: mpsc::UnboundedReceiver<String>,
    /// The `before_reload` hooks: their lines, the command running, the stop.
    hooks: HookWatch,
    /// The clients waiting for this run's outcome.
    pub waiters: Vec<Responder>,
    /// The generation this run rolls to.
    pub generation: u64,
}

/// What a run reports to the main loop.
pub enum ReloadEvent {
    /// A step, for the waiting clients and the log.
    Progress(String),
    /// The run ended (an error only if its task panicked).
    Finished(Box<Result<Finished, tokio::task::JoinError>>),
}

/// What a finished run gives back.
pub struct Finished {
    /// The roles, rolled or rolled back.
    pub roles: Roles,
    /// The config the run applied.
    pub loaded: Loaded,
    /// One summary line per changed role, or what failed.
    pub outcome: Result<Vec<String>, ReloadError>,
}

/// Why a run did not bring the new generation into service; the old one serves either way.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A `before_reload` hook failed, before any role changed.
    #[error("{0}")]
    Hook(HookFailure),
    /// A role failed to roll and was rolled back (the roles before it rolled).
    #[error("{0}")]
    Role(RoleReloadError),
}

impl ReloadError {
    /// The `outcome` label of `sauna_reloads_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ReloadError::Hook(_) => "hook_failed",
            ReloadError::Role(_) => "rolled_back",
        }
    }

    /// What happened to the reload, for the message before the cause.
    pub fn verdict(&self) -> &'static str {
        match self {
            ReloadError::Hook(_) => "refused by [hooks].before_reload, nothing changed",
            ReloadError::Role(_) => "rolled back",
        }
    }

    /// More text for the operator: the hook's last lines, the app's traceback.
    pub fn detail(&self) -> Option<String> {
        match self {
            ReloadError::Hook(failure) => Some(failure.output()),
            ReloadError::Role(error) => error.detail.clone(),
        }
    }
}

impl ReloadRun {
    /// Starts rolling `roles` to `loaded` as `generation`.
    pub fn start(
        mut roles: Roles,
        loaded: Loaded,
        generation: u64,
        metrics: Arc<Metrics>,
        waiters: Vec<Responder>,
    ) -> ReloadRun {
        let (progress_sender, progress) = mpsc::unbounded_channel();
        let (reporter, hook_watch) = hooks::channel();
        let task = tokio::spawn(async move {
            // Resolved now, inside the run: `[app].directory` behind a `current` symlink is the
            // release it points to at this moment, the one the canary will import.
            if let Some(plan) = HookPlan::new(Hook::BeforeReload, &loaded) {
                if let Err(failure) = hooks::run(&plan, &reporter).await {
                    return Finished {
                        roles,
                        loaded,
                        outcome: Err(ReloadError::Hook(failure)),
                    };
                }
            }
            let outcome = roles
                .reload(&loaded, generation, &metrics, &progress_sender)
                .await
                .map_err(ReloadError::Role);
            Finished {
                roles,
                loaded,
                outcome,
            }
        });
        ReloadRun {
            task,
            progress,
            hooks: hook_watch,
            waiters,
            generation,
        }
    }

    /// The run's next event, for the main loop's `select!`: every progress line is delivered
    /// before the end of the run.
    /// A hook's lines go straight to the waiters (the hook logged them already).
    pub async fn next_event(&mut self) -> ReloadEvent {
        loop {
            tokio::select! {
                biased;
                Some(line) = self.progress.recv() => return ReloadEvent::Progress(line),
                Some(line) = self.hooks.next_line() => {
                    for waiter in &self.waiters {
                        waiter.progress(line.clone());
                    }
                }
                finished = &mut self.task => return ReloadEvent::Finished(Box::new(finished)),
            }
        }
    }

    /// The `before_reload` command running now, if any.
    pub fn hook_status(&self) -> Option<HookStatus> {
        self.hooks.status()
    }

    /// The supervisor is stopping: a running hook is ended (its process group gets TERM, then
    /// KILL) instead of holding the stop for up to `hook_timeout`; the reload is then refused.
    pub fn stop_hooks(&self) {
        self.hooks.stop();
    }

    /// Waits for the run to end.
    pub async fn finished(&mut self) -> Result<Finished, tokio::task::JoinError> {
        (&mut self.task).await
    }
}

/// Tells every waiter that the config did not load; nothing changed.
pub fn refuse_config(waiters: Vec<Responder>, diagnostics: &str) {
    for waiter in waiters {
        waiter.error(
            ErrorKind::Config,
            "the config has problems; nothing changed",
            Some(diagnostics.to_owned()),
        );
    }
}

/// Tells every waiter how the run ended.
pub fn answer(
    waiters: Vec<Responder>,
    generation: u64,
    outcome: &Result<Vec<String>, ReloadError>,
) {
    for waiter in waiters {
        match outcome {
            Ok(lines) => waiter.ok(serde_json::json!({
                "generation": generation,
                "summary": format!("generation {generation} is serving: {}", lines.join("; ")),
            })),
            Err(error) => waiter.error(
                ErrorKind::Failed,
                format!(
                    "{}, generation {} kept: {error}",
                    error.verdict(),
                    generation - 1
                ),
                error.detail(),
            ),
        }
    }
}
