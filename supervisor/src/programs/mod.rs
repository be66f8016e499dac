//! Programs: the supervised commands of `[programs.NAME]` (Celery workers and the like). This
//! module is the facade the main loop uses: it starts one actor per program in start order
//! ([`start_order`]: by `priority`, then name), asks them for their status in that order (also
//! through a [`ProgramsView`], which follows the programs from wherever the facade is, a reload
//! included), and stops them in reverse order.
//!
//! The rest of the role, by job: `resolve` turns a config into the programs to run, in start
//! order (the keys of one program are resolved by `launch`); `plan` decides what a reload
//! does with each program and `reload` carries that out; the restart policy lives in
//! [`state`], the per-program process handling in `actor`, the rows `status` shows in
//! `status`; what `/proc` says about processes is [`crate::process::procfs`]'s.

mod actor;
mod launch;
mod plan;
mod reload;
mod resolve;
pub mod state;
mod status;

use std::path::Path;
use std::sync::Arc;

use proxy_conf::{Config, ProgramReload};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::supervisor::lifecycle::StopMode;
use actor::{Command, ProgramActor};
use launch::Fingerprint;
pub use plan::{Planned, Step, plan};
pub use resolve::start_order;
use resolve::{Resolved, base_dir_or_current, resolve, start_key};
pub use state::InstanceState;
pub use status::{InstanceStatus, ProgramStatus};

/// A running program actor as the facade sees it.
struct ProgramHandle {
    name: String,
    /// Its `priority`, from the config last applied (a new one alone restarts nothing).
    priority: i64,
    /// What the running instances were started from.
    fingerprint: Fingerprint,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

impl ProgramHandle {
    /// Starts the actor of one program; its instances spawn now.
    fn start(resolved: Resolved, metrics: &Arc<Metrics>, generation: u64) -> ProgramHandle {
        let Resolved {
            priority,
            launch,
            fingerprint,
            ..
        } = resolved;
        let name = launch.name.clone();
        let mut actor = ProgramActor::new(launch, Arc::clone(metrics), generation);
        actor.start_all();
        let (commands, receiver) = mpsc::channel(16);
        let task = tokio::spawn(actor.run(receiver));
        ProgramHandle {
            name,
            priority,
            fingerprint,
            commands,
            task,
        }
    }

    /// What the [`ProgramsView`] holds of it.
    fn view(&self) -> ProgramView {
        ProgramView {
            name: self.name.clone(),
            commands: self.commands.clone(),
        }
    }

    /// Stops the program gracefully and waits until its process groups are gone.
    async fn stop(self, mode: StopMode) {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::Shutdown(mode, reply))
            .await
            .is_err()
        {
            tracing::error!("program \"{}\": its actor is gone", self.name);
            return;
        }
        let _ = answer.await;
        let _ = self.task.await;
    }
}

/// Every program of the configuration, each run by its own actor.
pub struct Programs {
    /// In start order ([`start_key`]).
    programs: Vec<ProgramHandle>,
    metrics: Arc<Metrics>,
    /// The programs as [`ProgramsView`]s see them, republished whenever one starts, stops or
    /// moves in start order.
    views: watch::Sender<Vec<ProgramView>>,
}

/// One program actor's command channel, cloned: enough to ask for its status.
#[derive(Debug, Clone)]
struct ProgramView {
    name: String,
    commands: mpsc::Sender<Command>,
}

/// The running programs, for asking their status from anywhere: cheap to clone, and it follows
/// [`Programs`] as programs start and stop, also while a reload is applying a new config. The main
/// loop keeps one so that `status` during a reload reports the actors as they are.
#[derive(Debug, Clone)]
pub struct ProgramsView(watch::Receiver<Vec<ProgramView>>);

impl ProgramsView {
    /// The status of every program, in start order.
    pub async fn status(&self) -> Vec<ProgramStatus> {
        // Cloned out: the watch's lock must not be held across the awaits below.
        let programs = self.0.borrow().clone();
        let mut statuses = Vec::with_capacity(programs.len());
        for program in &programs {
            let (reply, answer) = oneshot::channel();
            if program.commands.send(Command::Status(reply)).await.is_err() {
                tracing::error!("program \"{}\": its actor is gone", program.name);
                continue;
            }
            if let Ok(status) = answer.await {
                statuses.push(status);
            }
        }
        statuses
    }
}

impl Programs {
    /// Starts every `[programs.NAME]` in start order. Relative paths are taken from `base_dir`
    /// (the config file's directory). RSS for `max_rss` is sampled every
    /// `[metrics].sample_interval`. Must be called on the tokio runtime that will run the
    /// actors: children are spawned from its threads (see `process::spawn` on `PR_SET_PDEATHSIG`).
    /// Instances start under generation 1.
    pub fn start(config: &Config, base_dir: &Path, metrics: Arc<Metrics>) -> Programs {
        Programs::start_rolling_only(config, base_dir, metrics, false)
    }

    /// [`Programs::start`], or with `rolling_only` just the programs with `reload = "rolling"`:
    /// a successor started by `upgrade` runs those beside the old supervisor's copies, and
    /// starts the others ([`Programs::start_missing`]) only once the old ones have stopped —
    /// two copies of a `restart` program (a server on a fixed port, say) must never run at once.
    pub fn start_rolling_only(
        config: &Config,
        base_dir: &Path,
        metrics: Arc<Metrics>,
        rolling_only: bool,
    ) -> Programs {
        let programs = resolve(config, base_dir_or_current(base_dir))
            .into_iter()
            .filter(|resolved| !rolling_only || resolved.policy == ProgramReload::Rolling)
            .map(|resolved| ProgramHandle::start(resolved, &metrics, 1))
            .collect::<Vec<_>>();
        let views = watch::Sender::new(programs.iter().map(ProgramHandle::view).collect());
        Programs {
            programs,
            metrics,
            views,
        }
    }

    /// A view that follows these programs, for asking their status while something else holds
    /// them.
    pub fn view(&self) -> ProgramsView {
        ProgramsView(self.views.subscribe())
    }

    /// Puts the programs back into start order after one was added or got a new `priority`,
    /// and tells the views.
    fn reorder(&mut self) {
        self.programs
            .sort_by(|a, b| start_key(a.priority, &a.name).cmp(&start_key(b.priority, &b.name)));
        self.publish();
    }

    /// Tells the views which programs run now.
    fn publish(&self) {
        self.views
            .send_replace(self.programs.iter().map(ProgramHandle::view).collect());
    }

    /// Starts every program of `config` that is not running yet, in start order, and puts it
    /// in its place among the running ones; returns their names.
    pub fn start_missing(&mut self, config: &Config, base_dir: &Path) -> Vec<String> {
        let mut started = Vec::new();
        for resolved in resolve(config, base_dir_or_current(base_dir)) {
            if self
                .programs
                .iter()
                .any(|program| program.name == resolved.name)
            {
                continue;
            }
            started.push(resolved.name.clone());
            let handle = ProgramHandle::start(resolved, &self.metrics, 1);
            self.programs.push(handle);
        }
        self.reorder();
        started
    }

    /// Gives a running program the `priority` of the config being applied and moves it to its
    /// place in start order.
    fn set_priority(&mut self, name: &str, priority: i64) {
        if let Some(program) = self
            .programs
            .iter_mut()
            .find(|program| program.name == name)
        {
            program.priority = priority;
        }
        self.reorder();
    }

    /// The status of every program, in start order.
    pub async fn status(&self) -> Vec<ProgramStatus> {
        self.view().status().await
    }

    /// True when some program gave up after a crash loop; `/healthz` reports unhealthy then.
    pub async fn any_fatal(&self) -> bool {
        self.status().await.iter().any(|program| program.fatal)
    }

    /// Stops every program and returns once all their process groups are gone. Graceful: one
    /// program after the other in reverse start order, each instance getting `stop_signal` and
    /// SIGKILL after `stop_timeout`. Fast: every group gets SIGKILL at once.
    pub async fn shutdown(self, mode: StopMode) {
        let mut pending = Vec::new();
        for program in self.programs.into_iter().rev() {
            let (reply, answer) = oneshot::channel();
            if program
                .commands
                .send(Command::Shutdown(mode, reply))
                .await
                .is_err()
            {
                tracing::error!("program \"{}\": its actor is gone", program.name);
                continue;
            }
            match mode {
                StopMode::Graceful => {
                    let _ = answer.await;
                    let _ = program.task.await;
                }
                StopMode::Fast => pending.push((answer, program.task)),
            }
        }
        for (answer, task) in pending {
            let _ = answer.await;
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::procfs;
    use crate::process::spawn as child;
    use crate::test_support::runtime;
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    pub(super) fn start(toml: &str) -> Programs {
        start_with_metrics(toml, Arc::new(Metrics::new().unwrap()))
    }

    fn start_with_metrics(toml: &str, metrics: Arc<Metrics>) -> Programs {
        let config = proxy_conf::load_str(toml, "sauna.toml").unwrap();
        Programs::start(&config, Path::new("/tmp"), metrics)
    }

    pub(super) async fn wait_for(
        programs: &Programs,
        what: &str,
        predicate: impl Fn(&[ProgramStatus]) -> bool,
    ) -> Vec<ProgramStatus> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = programs.status().await;
            if predicate(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True while `pid` exists and is not a zombie.
    pub(super) fn alive(pid: u32) -> bool {
        procfs::read_processes(Path::new("/proc"))
            .iter()
            .any(|process| process.pid == pid && process.state != 'Z')
    }

    fn tree(pid: u32) -> BTreeSet<u32> {
        procfs::tree_members(&procfs::read_processes(Path::new("/proc")), pid)
    }

    #[test]
    fn a_killed_instance_comes_back_with_a_new_pid_and_env() {
        runtime().block_on(async {
            let metrics = Arc::new(Metrics::new().unwrap());
            let programs = start_with_metrics(
                r#"
                [programs.sleeper]
                command = ["sh", "-c", "test \"$SAUNA_INSTANCE\" = 1 || exit 3; exec sleep 300"]
                instances = 2
                ready_after = "0s"
                [programs.steady]
                command = ["sleep", "300"]
                ready_after = "0s"
                "#,
                Arc::clone(&metrics),
            );
            let up = |name: &str| metrics.program_up.with_label_values(&[name]).get();
            // Instance 0 counts as running (ready_after 0s) until its exit is seen.
            let status = wait_for(&programs, "instance 1 up, instance 0 down", |status| {
                status[0].instances[1].state == InstanceState::Running
                    && status[0].instances[0].state != InstanceState::Running
            })
            .await;
            let first = status[0].instances[1].pid.unwrap();
            assert_eq!(status[1].state, InstanceState::Running);
            assert_eq!(
                (up("sleeper"), up("steady")),
                (0, 1),
                "up only when every instance runs"
            );
            // Instance 0 exits with 3: it is not SAUNA_INSTANCE=1.
            wait_for(&programs, "instance 0 backing off", |status| {
                status[0].instances[0].last_exit.as_deref() == Some("exited with status 3")
            })
            .await;
            child::signal_group(first, nix::sys::signal::Signal::SIGKILL).unwrap();
            let killed = Instant::now();
            let status = wait_for(&programs, "a new pid", |status| {
                let instance = &status[0].instances[1];
                instance.pid.is_some_and(|pid| pid != first)
            })
            .await;
            assert!(killed.elapsed() < Duration::from_secs(2));
            let instance = &status[0].instances[1];
            assert_eq!(instance.restarts, 1);
            assert_eq!(
                instance.last_exit.as_deref(),
                Some("killed by signal SIGKILL")
            );
            let restarts = metrics
                .program_restarts_total
                .with_label_values(&["sleeper"])
                .get();
            assert!(restarts >= 1, "{restarts}");
            programs.shutdown(StopMode::Fast).await;
            assert_eq!(up("steady"), 0);
        });
    }

    #[test]
    fn a_stop_ends_grandchildren_and_kills_what_ignores_the_signal() {
        runtime().block_on(async {
            let programs = start(
                r#"
                [programs.polite]
                command = ["sh", "-c", "sleep 300 & sleep 300 & wait"]
                [programs.stubborn]
                command = ["sh", "-c", "trap '' TERM; sleep 300 & wait"]
                stop_timeout = "300ms"
                "#,
            );
            let status = wait_for(&programs, "grandchildren", |status| {
                status.iter().all(|program| {
                    program.instances[0]
                        .pid
                        .is_some_and(|pid| tree(pid).len() >= 2)
                })
            })
            .await;
            let mut pids = BTreeSet::new();
            for program in &status {
                pids.extend(tree(program.instances[0].pid.unwrap()));
            }
            let stopping = Instant::now();
            programs.shutdown(StopMode::Graceful).await;
            let took = stopping.elapsed();
            assert!(
                took >= Duration::from_millis(300),
                "{took:?}: the stubborn one waited for stop_timeout"
            );
            assert!(took < Duration::from_secs(5), "{took:?}");
            for pid in pids {
                assert!(!alive(pid), "pid {pid} survived the stop");
            }
        });
    }

    #[test]
    fn an_instance_over_max_rss_is_restarted() {
        runtime().block_on(async {
            // The leader is a small shell; the memory is in its child, as in Celery's prefork pool.
            let programs = start(
                r#"
                [programs.hog]
                command = ["sh", "-c", "python3 -c 'import time; b = b\"x\" * (64 << 20); time.sleep(300)' & wait"]
                max_rss = "32MiB"
                max_rss_samples = 2
                [metrics]
                sample_interval = "100ms"
                "#,
            );
            let status = wait_for(&programs, "a max_rss restart", |status| {
                status[0].instances[0].restarts >= 1
            })
            .await;
            assert_eq!(
                status[0].instances[0].last_exit.as_deref(),
                Some("killed by signal SIGTERM")
            );
            programs.shutdown(StopMode::Fast).await;
        });
    }
}
