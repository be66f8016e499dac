//! One reload: re-reading the config, rolling the roles to the next generation in a task of its
//! own, and telling everyone who asked how it went.
//!
//! The main loop starts a [`ReloadRun`] and hands it the roles; while the run owns them the loop
//! keeps answering `status` (from a snapshot), pinging the watchdog and forwarding progress lines
//! to every waiting `reload` client. Reloads are serialized: a request that arrives during a run
//! waits for it, and all requests that queued up meanwhile share the next run, which reads the
//! config as it is then. A config that does not load changes nothing and never starts a run.

use std::sync::Arc;

use proxy_conf::Loaded;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::control::{ErrorKind, Responder};
use crate::metrics::Metrics;
use crate::supervisor::roles::{RoleReloadError, Roles};

/// A reload in progress.
pub struct ReloadRun {
    task: JoinHandle<Finished>,
    progress: mpsc::UnboundedReceiver<String>,
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
    pub outcome: Result<Vec<String>, RoleReloadError>,
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
        let task = tokio::spawn(async move {
            let outcome = roles
                .reload(&loaded, generation, &metrics, &progress_sender)
                .await;
            Finished {
                roles,
                loaded,
                outcome,
            }
        });
        ReloadRun {
            task,
            progress,
            waiters,
            generation,
        }
    }

    /// The run's next event, for the main loop's `select!`: every progress line is delivered
    /// before the end of the run.
    pub async fn next_event(&mut self) -> ReloadEvent {
        tokio::select! {
            biased;
            Some(line) = self.progress.recv() => ReloadEvent::Progress(line),
            finished = &mut self.task => ReloadEvent::Finished(Box::new(finished)),
        }
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
    outcome: &Result<Vec<String>, RoleReloadError>,
) {
    for waiter in waiters {
        match outcome {
            Ok(lines) => waiter.ok(serde_json::json!({
                "generation": generation,
                "summary": format!("generation {generation} is serving: {}", lines.join("; ")),
            })),
            Err(error) => waiter.error(
                ErrorKind::Failed,
                format!("rolled back, generation {} kept: {error}", generation - 1),
                error.detail.clone(),
            ),
        }
    }
}
