//! Programs: the supervised commands of `[programs.NAME]` (Celery workers and the like). This
//! module is the facade the main loop uses: it starts one actor per program in start order
//! ([`start_order`]: by `priority`, then name), asks them for their status in that order, and
//! stops them in reverse order. The restart policy lives in
//! [`state`], the per-program process handling in `actor`, the resolution of config keys in
//! `launch`; what `/proc` says about processes is [`crate::process::procfs`]'s.
//!
//! A reload ([`Programs::reload`]) decides one [`Step`] per program ([`plan`]): added programs
//! start, removed ones stop gracefully, and the others follow their new `reload` policy.
//! `rolling` programs are rolled by their actor on *every* reload, whether or not their
//! [`launch::Fingerprint`] changed: the code a program runs is not in the config, and a release
//! deployed in place (new files in the same directory) changes nothing a fingerprint sees, yet a
//! Celery worker must import the new task modules. `restart` and `none` programs are compared by
//! fingerprint: a changed `restart` program is stopped and started again, a changed `none`
//! program keeps running its old config, and an unchanged one of either is left running — a
//! supervised broker or database must not go down on every deploy. Programs are reloaded one
//! after the other in the new start order, then the removed ones are stopped in reverse of their
//! start order; the first failure stops the reload there, and what was already applied stays
//! applied.

mod actor;
mod launch;
pub mod state;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proxy_conf::{Config, ProgramConfig, ProgramReload};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::supervisor::lifecycle::{Progress, StopMode};
use actor::{Command, ProgramActor, Reload, Reloaded};
use launch::{Fingerprint, Launch};
pub use state::InstanceState;

/// The shortest RSS sampling interval, so a `sample_interval = "0s"` cannot spin the actor.
const MIN_RSS_INTERVAL: Duration = Duration::from_millis(50);

/// The status of one program, as `status --json` shows it under `programs`.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    /// `[programs.NAME]`.
    pub name: String,
    /// The least healthy state among its instances (`running` only when all are running).
    pub state: InstanceState,
    /// True when an instance gave up after a crash loop (for `/healthz`).
    pub fatal: bool,
    /// Each instance, by index.
    pub instances: Vec<InstanceStatus>,
}

impl ProgramStatus {
    fn new(name: String, instances: Vec<InstanceStatus>) -> ProgramStatus {
        let state = instances
            .iter()
            .map(|instance| instance.state)
            .min_by_key(|state| health_rank(*state))
            .unwrap_or(InstanceState::Stopped);
        ProgramStatus {
            name,
            state,
            fatal: state == InstanceState::Fatal,
            instances,
        }
    }
}

/// The `reload` key's value as written in sauna.toml.
fn policy_name(policy: ProgramReload) -> &'static str {
    match policy {
        ProgramReload::Rolling => "rolling",
        ProgramReload::Restart => "restart",
        ProgramReload::None => "none",
    }
}

/// Orders states from least to most healthy for [`ProgramStatus::state`].
fn health_rank(state: InstanceState) -> u8 {
    match state {
        InstanceState::Fatal => 0,
        InstanceState::Backoff => 1,
        InstanceState::Stopping => 2,
        InstanceState::Starting => 3,
        InstanceState::Exited => 4,
        InstanceState::Stopped => 5,
        InstanceState::Running => 6,
    }
}

/// The status of one instance of a program.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// 0-based index, also in `$SAUNA_INSTANCE` and in log labels (`celery:1`). During a
    /// reload an index can appear twice: the old instance and its replacement.
    pub index: usize,
    /// The generation (config epoch) the instance started under: 1 at start-up, then the
    /// generation of the reload that last replaced it.
    pub generation: u64,
    /// The process group leader, while one runs.
    pub pid: Option<u32>,
    /// Where the instance is in its life.
    pub state: InstanceState,
    /// Unix time (seconds) the current or last process was started.
    pub started_at: Option<f64>,
    /// Seconds the current process has been running.
    pub uptime_seconds: Option<u64>,
    /// Times the instance was started again after its first start.
    pub restarts: u64,
    /// How the last process ended, e.g. `exited with status 1` or `killed by signal SIGKILL`.
    pub last_exit: Option<String>,
    /// Unix time of that exit.
    pub last_exit_at: Option<f64>,
    /// The last non-empty line the process printed before that exit (stdout or stderr), e.g.
    /// a Python exception: what `status` shows beside the exit to say why.
    pub last_output: Option<String>,
    /// Unix times of the unrequested exits inside the crash window, oldest first; the gaps show
    /// the backoff delays.
    pub recent_exits: Vec<f64>,
    /// RSS of the instance's process tree at the last sample (only sampled with `max_rss`).
    pub rss_bytes: Option<u64>,
    /// Why it is in this state: the crash-loop reason, the time left before a restart, ….
    pub detail: Option<String>,
}

/// Where a program stands in start order: ascending `priority`, equal priorities by name (as
/// supervisord orders them). Every order of programs in this module comes from this key.
fn start_key(priority: i64, name: &str) -> (i64, &str) {
    (priority, name)
}

/// The names of `programs` in start order (see [`start_key`]); stops go the reverse way.
pub fn start_order(programs: &BTreeMap<String, ProgramConfig>) -> Vec<&str> {
    let mut names: Vec<(&str, i64)> = programs
        .iter()
        .map(|(name, program)| (name.as_str(), program.priority))
        .collect();
    names.sort_by(|(a, a_priority), (b, b_priority)| {
        start_key(*a_priority, a).cmp(&start_key(*b_priority, b))
    });
    names.into_iter().map(|(name, _)| name).collect()
}

/// Puts running programs back into start order after one was added or got a new `priority`.
fn sort_into_start_order(programs: &mut [ProgramHandle]) {
    programs.sort_by(|a, b| start_key(a.priority, &a.name).cmp(&start_key(b.priority, &b.name)));
}

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

/// What a reload does with one program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Only in the new config: start it.
    Start,
    /// Only in the old config: stop it gracefully.
    Stop,
    /// `reload = "rolling"`: new instances first, the old ones get their stop signal once every
    /// new one has survived `ready_after`. Taken on every reload; `changed` says whether the
    /// fingerprint differs (only the progress lines tell the two apart).
    Roll {
        /// Keys, `[app]` values or resolved paths differ from the running instances'.
        changed: bool,
    },
    /// `reload = "restart"` and changed: stop the old instances, then start the new ones.
    Restart,
    /// `reload = "none"` and changed: it keeps running with its old config.
    KeepOld,
    /// `reload = "restart"` or `"none"` and unchanged: left running.
    Leave,
}

/// What [`plan`] knows about a program of the new config.
#[derive(Debug, Clone)]
pub struct Planned {
    /// `[programs.NAME]`.
    pub name: String,
    /// What its instances would be started from.
    pub fingerprint: Fingerprint,
    /// Its `reload` key in the new config.
    pub policy: ProgramReload,
}

/// Decides the reload of every program: first each program of `new` (in the new config's start
/// order) with the step its new `reload` policy and its fingerprint call for (see the module
/// documentation), then the programs only in `old` (the running ones, in their start order) in
/// reverse order, the way a stop goes. Starting before stopping keeps a queue consumed when a
/// program is renamed.
pub fn plan(old: &[(String, Fingerprint)], new: &[Planned]) -> Vec<(String, Step)> {
    let find = |name: &str| {
        old.iter()
            .find(|(other, _)| other == name)
            .map(|(_, fingerprint)| fingerprint)
    };
    let kept = new.iter().map(|program| {
        let step = match (find(&program.name), program.policy) {
            (None, _) => Step::Start,
            (Some(old), ProgramReload::Rolling) => Step::Roll {
                changed: *old != program.fingerprint,
            },
            (Some(old), _) if *old == program.fingerprint => Step::Leave,
            (Some(_), ProgramReload::Restart) => Step::Restart,
            (Some(_), ProgramReload::None) => Step::KeepOld,
        };
        (program.name.clone(), step)
    });
    let removed = old
        .iter()
        .rev()
        .filter(|(name, _)| !new.iter().any(|program| program.name == *name))
        .map(|(name, _)| (name.clone(), Step::Stop));
    kept.chain(removed).collect()
}

/// Every program of the configuration, each run by its own actor.
pub struct Programs {
    /// In start order ([`start_key`]).
    programs: Vec<ProgramHandle>,
    metrics: Arc<Metrics>,
}

/// `sauna.toml` given without a directory has an empty parent: the current directory.
fn base_dir_or_current(base_dir: &Path) -> &Path {
    if base_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base_dir
    }
}

/// One program of a config, ready to start.
struct Resolved {
    name: String,
    priority: i64,
    policy: ProgramReload,
    launch: Launch,
    fingerprint: Fingerprint,
}

/// Every program of `config`, resolved, in start order.
fn resolve(config: &Config, base_dir: &Path) -> Vec<Resolved> {
    let rss_interval = config.metrics.sample_interval.get().max(MIN_RSS_INTERVAL);
    start_order(&config.programs)
        .into_iter()
        .filter_map(|name| {
            let program = config.programs.get(name)?;
            let launch = Launch::new(name, program, &config.app, base_dir, rss_interval);
            let fingerprint = launch.fingerprint(program);
            Some(Resolved {
                name: name.to_owned(),
                priority: program.priority,
                policy: program.reload,
                launch,
                fingerprint,
            })
        })
        .collect()
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
            .collect();
        Programs { programs, metrics }
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
        sort_into_start_order(&mut self.programs);
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
        sort_into_start_order(&mut self.programs);
    }

    /// Applies a new config to the running programs (see the module documentation); new
    /// instances start under `generation`. Returns a one-line summary naming what happened to
    /// each program, e.g. `programs: "celery" rolled, "redis" left running (unchanged, reload =
    /// "restart")` (empty when there are no programs before or after), or what failed: the
    /// program, how its new instance ended and its last output, and which programs were already
    /// reloaded before it (those stay reloaded; the ones after it were not touched).
    ///
    /// A changed program with `reload = "none"` keeps running with its old config, which it
    /// also keeps for later restarts after an exit: the next reload still sees it as changed.
    pub async fn reload(
        &mut self,
        config: &Config,
        base_dir: &Path,
        progress: &Progress,
        generation: u64,
    ) -> Result<String, String> {
        let resolved = resolve(config, base_dir_or_current(base_dir));
        let old: Vec<(String, Fingerprint)> = self
            .programs
            .iter()
            .map(|program| (program.name.clone(), program.fingerprint.clone()))
            .collect();
        let planned: Vec<Planned> = resolved
            .iter()
            .map(|program| Planned {
                name: program.name.clone(),
                fingerprint: program.fingerprint.clone(),
                policy: program.policy,
            })
            .collect();
        let mut new: BTreeMap<String, Resolved> = resolved
            .into_iter()
            .map(|program| (program.name.clone(), program))
            .collect();
        let say = |line: String| {
            tracing::info!("{line}");
            let _ = progress.send(line);
        };
        // What happened to each program, in plan order, for the summary; and the subset that
        // changed something, which a later failure leaves in place.
        let mut done: Vec<String> = Vec::new();
        let mut applied: Vec<String> = Vec::new();
        for (name, step) in plan(&old, &planned) {
            match step {
                Step::Leave | Step::KeepOld => {
                    if let Some(program) = new.get(&name) {
                        self.set_priority(&name, program.priority);
                    }
                    let policy = policy_name(
                        new.get(&name)
                            .map_or(ProgramReload::Rolling, |program| program.policy),
                    );
                    if step == Step::Leave {
                        say(format!(
                            "program \"{name}\": unchanged, left running (reload = \"{policy}\")"
                        ));
                        done.push(format!(
                            "\"{name}\" left running (unchanged, reload = \"{policy}\")"
                        ));
                    } else {
                        say(format!(
                            "program \"{name}\": changed, but reload = \"none\": it keeps running with its old config"
                        ));
                        done.push(format!(
                            "\"{name}\" kept the old config (reload = \"none\")"
                        ));
                    }
                }
                Step::Start => {
                    let Some(program) = new.remove(&name) else {
                        continue;
                    };
                    let handle = ProgramHandle::start(program, &self.metrics, generation);
                    self.programs.push(handle);
                    sort_into_start_order(&mut self.programs);
                    say(format!("program \"{name}\": added, started"));
                    applied.push(format!("\"{name}\" started"));
                    done.push(format!("\"{name}\" started"));
                }
                Step::Stop => {
                    let Some(at) = self
                        .programs
                        .iter()
                        .position(|program| program.name == name)
                    else {
                        continue;
                    };
                    say(format!("program \"{name}\": removed, stopping it"));
                    self.programs.remove(at).stop(StopMode::Graceful).await;
                    say(format!("program \"{name}\": stopped"));
                    applied.push(format!("\"{name}\" stopped"));
                    done.push(format!("\"{name}\" stopped"));
                }
                Step::Roll { .. } | Step::Restart => {
                    let Some(Resolved {
                        priority,
                        policy,
                        launch,
                        fingerprint,
                        ..
                    }) = new.remove(&name)
                    else {
                        continue;
                    };
                    let Some(handle) = self
                        .programs
                        .iter_mut()
                        .find(|program| program.name == name)
                    else {
                        continue;
                    };
                    let changed = step != Step::Roll { changed: false };
                    let (reply, answer) = oneshot::channel();
                    let reload = Reload {
                        launch,
                        policy,
                        changed,
                        generation,
                        progress: progress.clone(),
                        reply,
                    };
                    let outcome = match handle
                        .commands
                        .send(Command::Reload(Box::new(reload)))
                        .await
                    {
                        Ok(()) => answer.await.unwrap_or_else(|_| {
                            Err(format!(
                                "program \"{name}\": its actor ended during the reload"
                            ))
                        }),
                        Err(_) => Err(format!("program \"{name}\": its actor is gone")),
                    };
                    match outcome {
                        Ok(Reloaded { summary, outcome }) => {
                            handle.fingerprint = fingerprint;
                            self.set_priority(&name, priority);
                            say(summary);
                            applied.push(format!("\"{name}\" {outcome}"));
                            done.push(format!("\"{name}\" {outcome}"));
                        }
                        Err(failure) => {
                            let before = if applied.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    "\nalready applied before it, and kept: {}",
                                    applied.join(", ")
                                )
                            };
                            return Err(format!("{failure}{before}"));
                        }
                    }
                }
            }
        }
        if done.is_empty() {
            // No programs before or after: nothing to say.
            return Ok(String::new());
        }
        Ok(format!("programs: {}", done.join(", ")))
    }

    /// The status of every program, in start order.
    pub async fn status(&self) -> Vec<ProgramStatus> {
        let mut statuses = Vec::with_capacity(self.programs.len());
        for program in &self.programs {
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
    use std::time::Instant;

    fn start(toml: &str) -> Programs {
        start_with_metrics(toml, Arc::new(Metrics::new().unwrap()))
    }

    fn start_with_metrics(toml: &str, metrics: Arc<Metrics>) -> Programs {
        let config = proxy_conf::load_str(toml, "sauna.toml").unwrap();
        Programs::start(&config, Path::new("/tmp"), metrics)
    }

    async fn wait_for(
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
    fn alive(pid: u32) -> bool {
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

    /// The programs of `toml` as [`plan`] sees the new config.
    fn planned(toml: &str, base_dir: &Path) -> Vec<Planned> {
        let config = proxy_conf::load_str(toml, "sauna.toml").unwrap();
        resolve(&config, base_dir)
            .into_iter()
            .map(|program| Planned {
                name: program.name,
                fingerprint: program.fingerprint,
                policy: program.policy,
            })
            .collect()
    }

    /// The programs of `toml` as [`plan`] sees the running ones.
    fn running(toml: &str, base_dir: &Path) -> Vec<(String, Fingerprint)> {
        planned(toml, base_dir)
            .into_iter()
            .map(|program| (program.name, program.fingerprint))
            .collect()
    }

    fn steps(steps: &[(&str, Step)]) -> Vec<(String, Step)> {
        steps
            .iter()
            .map(|(name, step)| ((*name).to_owned(), *step))
            .collect()
    }

    const ROLL: Step = Step::Roll { changed: true };
    const ROLL_UNCHANGED: Step = Step::Roll { changed: false };

    fn order(toml: &str) -> Vec<String> {
        let config = proxy_conf::load_str(toml, "sauna.toml").unwrap();
        start_order(&config.programs)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn programs_start_by_priority_then_name() {
        assert_eq!(
            order(
                r#"
                [programs.celery]
                command = ["celery"]
                [programs.redis]
                command = ["redis-server"]
                priority = 10
                [programs.beta]
                command = ["x"]
                priority = 999
                [programs.alpha]
                command = ["x"]
                [programs.first]
                command = ["x"]
                priority = -5
                [programs.last]
                command = ["x"]
                priority = 1000
                "#
            ),
            ["first", "redis", "alpha", "beta", "celery", "last"],
            "lower first; the default is 999; equal priorities in name order"
        );
        assert!(order("").is_empty());
    }

    #[test]
    fn the_plan_follows_the_new_start_order_and_removes_in_reverse() {
        let base = Path::new("/tmp");
        let old = running(
            "[programs.a]\ncommand = [\"x\"]\n[programs.b]\ncommand = [\"x\"]\npriority = 1\n[programs.c]\ncommand = [\"x\"]\npriority = 2\n",
            base,
        );
        let new = planned(
            "[programs.z]\ncommand = [\"x\"]\npriority = 0\n[programs.y]\ncommand = [\"y\"]\n",
            base,
        );
        assert_eq!(
            plan(&old, &new),
            steps(&[
                ("z", Step::Start),
                ("y", Step::Start),
                // Running in the order b, c, a: stopped a, c, b.
                ("a", Step::Stop),
                ("c", Step::Stop),
                ("b", Step::Stop),
            ])
        );
    }

    #[test]
    fn a_new_priority_alone_changes_no_program() {
        let base = Path::new("/tmp");
        let toml = |priority: i64| {
            format!(
                "[programs.a]\ncommand = [\"x\"]\n[programs.b]\ncommand = [\"x\"]\npriority = {priority}\n[programs.c]\ncommand = [\"x\"]\nreload = \"restart\"\npriority = {priority}\n"
            )
        };
        assert_eq!(
            plan(&running(&toml(999), base), &planned(&toml(1), base)),
            steps(&[
                ("b", ROLL_UNCHANGED),
                ("c", Step::Leave),
                ("a", ROLL_UNCHANGED),
            ]),
            "the new start order, and nothing counts as changed"
        );
    }

    #[test]
    fn rolling_programs_roll_on_every_reload_the_others_only_when_changed() {
        let base = Path::new("/tmp");
        let toml = |version: &str| {
            format!(
                r#"
                [programs.celery]
                command = ["celery", "worker"]
                env = {{ V = "{version}" }}
                [programs.worker]
                command = ["worker"]
                reload = "rolling"
                [programs.broker]
                command = ["redis-server"]
                reload = "restart"
                priority = 10
                [programs.broker-v]
                command = ["redis-server"]
                env = {{ V = "{version}" }}
                reload = "restart"
                priority = 10
                [programs.mailer]
                command = ["mailer"]
                reload = "none"
                [programs.mailer-v]
                command = ["mailer"]
                env = {{ V = "{version}" }}
                reload = "none"
                "#
            )
        };
        // An in-place deploy: nothing in the config changed, the code on disk did.
        assert_eq!(
            plan(&running(&toml("1"), base), &planned(&toml("1"), base)),
            steps(&[
                ("broker", Step::Leave),
                ("broker-v", Step::Leave),
                ("celery", ROLL_UNCHANGED),
                ("mailer", Step::Leave),
                ("mailer-v", Step::Leave),
                ("worker", ROLL_UNCHANGED),
            ])
        );
        assert_eq!(
            plan(&running(&toml("1"), base), &planned(&toml("2"), base)),
            steps(&[
                ("broker", Step::Leave),
                ("broker-v", Step::Restart),
                ("celery", ROLL),
                ("mailer", Step::Leave),
                ("mailer-v", Step::KeepOld),
                ("worker", ROLL_UNCHANGED),
            ])
        );
    }

    #[test]
    fn the_plan_sees_what_changed_in_a_program_and_the_app() {
        let base = Path::new("/tmp");
        let old = running(
            r#"
            [app]
            wsgi = "a:app"
            env = { A = "1" }
            [programs.same]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.gone]
            command = ["sleep", "1"]
            [programs.edited]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.envy]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.py]
            command = ["python", "-V"]
            reload = "restart"
            "#,
            base,
        );
        // [app].wsgi matters to no program; [app].env to all of them; [app].python only to
        // a program whose command is `python`.
        let new = planned(
            r#"
            [app]
            wsgi = "b:app"
            env = { A = "1" }
            python = "/usr/bin/python3"
            [programs.same]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.edited]
            command = ["sleep", "2"]
            reload = "restart"
            [programs.envy]
            command = ["sleep", "1"]
            env = { B = "2" }
            reload = "restart"
            [programs.py]
            command = ["python", "-V"]
            reload = "restart"
            [programs.fresh]
            command = ["sleep", "1"]
            "#,
            base,
        );
        assert_eq!(
            plan(&old, &new),
            steps(&[
                ("edited", Step::Restart),
                ("envy", Step::Restart),
                ("fresh", Step::Start),
                ("py", Step::Restart),
                ("same", Step::Leave),
                // Removed ones come last, once the new config runs.
                ("gone", Step::Stop),
            ])
        );
        // A new `reload` policy alone is a change of the program's keys, too: the new policy
        // applies.
        let plain = running("[programs.same]\ncommand = [\"sleep\", \"1\"]\n", base);
        let restart = planned(
            "[programs.same]\ncommand = [\"sleep\", \"1\"]\nreload = \"restart\"\n",
            base,
        );
        assert_eq!(plan(&plain, &restart), steps(&[("same", Step::Restart)]));
        let to_rolling = running(
            "[programs.same]\ncommand = [\"sleep\", \"1\"]\nreload = \"none\"\n",
            base,
        );
        let rolling = planned("[programs.same]\ncommand = [\"sleep\", \"1\"]\n", base);
        assert_eq!(plan(&to_rolling, &rolling), steps(&[("same", ROLL)]));
    }

    #[test]
    fn a_retargeted_current_symlink_changes_the_program() {
        let dir = tempfile::tempdir().unwrap();
        for release in ["r1", "r2"] {
            std::fs::create_dir_all(dir.path().join(release).join("venv/bin")).unwrap();
        }
        let current = dir.path().join("current");
        std::os::unix::fs::symlink("r1", &current).unwrap();
        let toml = r#"
            [app]
            directory = "current"
            python = "current/venv/bin/python"
            [programs.worker]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.elsewhere]
            command = ["sleep", "1"]
            directory = "/"
            reload = "restart"
            [programs.pinned]
            command = ["/bin/sleep", "1"]
            directory = "/"
            reload = "restart"
            [programs.venv]
            command = ["python", "-V"]
            directory = "/"
            reload = "restart"
            [programs.rolling]
            command = ["sleep", "1"]
            "#;
        let before = running(toml, dir.path());
        assert_eq!(
            plan(&before, &planned(toml, dir.path())),
            steps(&[
                ("elsewhere", Step::Leave),
                ("pinned", Step::Leave),
                ("rolling", ROLL_UNCHANGED),
                ("venv", Step::Leave),
                ("worker", Step::Leave),
            ]),
            "same target: only the rolling program rolls"
        );
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink("r2", &current).unwrap();
        assert_eq!(
            plan(&before, &planned(toml, dir.path())),
            steps(&[
                ("elsewhere", Step::Leave),
                ("pinned", Step::Leave),
                // Its working directory is the release.
                ("rolling", ROLL),
                // Its interpreter lives in the release.
                ("venv", Step::Restart),
                // Its working directory is the release.
                ("worker", Step::Restart),
            ])
        );
    }

    /// A program config whose instance records, in `dir`, when it started and when it got
    /// SIGTERM (nanoseconds since the epoch), then runs until stopped.
    fn recording(dir: &Path, name: &str, extra: &str) -> String {
        let dir = dir.display();
        format!(
            r#"
            [programs.{name}]
            command = ["sh", "-c", "date +%s%N > {dir}/start-$$; trap 'date +%s%N > {dir}/term-$$; exit 0' TERM; sleep 300 & wait"]
            ready_after = "600ms"
            stop_timeout = "5s"
            {extra}
            "#
        )
    }

    fn recorded(dir: &Path, what: &str, pid: u32) -> u128 {
        let text = std::fs::read_to_string(dir.join(format!("{what}-{pid}")))
            .unwrap_or_else(|error| panic!("{what}-{pid}: {error}"));
        text.trim().parse().unwrap()
    }

    fn drain(progress: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = progress.try_recv() {
            lines.push(line);
        }
        lines
    }

    async fn reload(
        programs: &mut Programs,
        toml: &str,
        generation: u64,
    ) -> (Result<String, String>, Vec<String>) {
        let config = proxy_conf::load_str(toml, "sauna.toml").unwrap();
        let (progress, mut lines) = mpsc::unbounded_channel();
        let outcome = programs
            .reload(&config, Path::new("/tmp"), &progress, generation)
            .await;
        (outcome, drain(&mut lines))
    }

    #[test]
    fn rolling_keeps_the_old_instance_until_the_new_one_survived_ready_after() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let old_toml = recording(dir.path(), "celery", "instances = 2");
            let mut programs = start(&old_toml);
            let status = wait_for(&programs, "two running instances", |status| {
                status[0].state == InstanceState::Running
            })
            .await;
            let old: Vec<u32> = status[0].instances.iter().map(|i| i.pid.unwrap()).collect();
            // Any change of the command is a change; this one also sets an env var.
            let new_toml = recording(
                dir.path(),
                "celery",
                "instances = 2\nenv = { RELEASE = \"2\" }",
            );
            let (outcome, lines) = reload(&mut programs, &new_toml, 2).await;
            let summary = outcome.unwrap();
            assert!(summary.contains("\"celery\" rolled"), "{summary}");
            let status = programs.status().await;
            let instances = &status[0].instances;
            assert_eq!(instances.len(), 2, "{instances:#?}");
            for (index, instance) in instances.iter().enumerate() {
                let new = instance.pid.unwrap();
                assert_eq!((instance.index, instance.generation), (index, 2));
                assert!(!old.contains(&new));
                assert!(alive(new));
                assert!(!alive(old[index]));
                // The old one got TERM only after the new one had run for ready_after (counted
                // from the spawn, which `started_at` records).
                let term = recorded(dir.path(), "term", old[index]) as f64 / 1e9;
                let gap = term - instance.started_at.unwrap();
                assert!(gap >= 0.6, "old stopped {gap} s after the new start");
            }
            assert!(
                lines.iter().any(|line| line.contains("new instance 1 up")
                    && line.contains("stopping the old one")),
                "{lines:#?}"
            );
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn a_new_instance_that_dies_rolls_back_and_the_old_one_is_untouched() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut programs = start(&format!(
                "{}{}",
                recording(dir.path(), "celery", ""),
                "[programs.beta]\ncommand = [\"sleep\", \"300\"]\nready_after = \"0s\"\n"
            ));
            // `beta` sorts first, so it is rolled before celery fails.
            let status = wait_for(&programs, "running", |status| {
                status.iter().all(|p| p.state == InstanceState::Running)
            })
            .await;
            let old = status[1].instances[0].pid.unwrap();
            let toml = r#"
                [programs.beta]
                command = ["sleep", "301"]
                ready_after = "0s"
                [programs.celery]
                command = ["sh", "-c", "echo 'ImportError: no module named tasks' >&2; exit 7"]
                ready_after = "2s"
                "#;
            let (outcome, _) = reload(&mut programs, toml, 2).await;
            let error = outcome.unwrap_err();
            assert!(error.contains("program \"celery\""), "{error}");
            assert!(error.contains("exited with status 7"), "{error}");
            assert!(
                error.contains("ImportError: no module named tasks"),
                "{error}"
            );
            assert!(error.contains("old instances kept running"), "{error}");
            assert!(error.contains("\"beta\" rolled"), "{error}");
            let status = programs.status().await;
            assert_eq!(status[0].instances[0].generation, 2, "beta stays rolled");
            let celery = &status[1].instances;
            assert_eq!(celery.len(), 1, "{celery:#?}");
            assert_eq!((celery[0].pid, celery[0].generation), (Some(old), 1));
            assert_eq!(celery[0].state, InstanceState::Running);
            assert!(
                !dir.path().join(format!("term-{old}")).exists(),
                "the old instance never got a signal"
            );
            // The next reload still sees the change and tries again.
            let (outcome, _) = reload(&mut programs, toml, 3).await;
            assert!(outcome.unwrap_err().contains("exited with status 7"));
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn restart_stops_first_and_none_keeps_the_old_config() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let toml = |restart_env: &str, none_env: &str| {
                format!(
                    "{}{}",
                    recording(
                        dir.path(),
                        "again",
                        &format!("reload = \"restart\"\nenv = {{ V = \"{restart_env}\" }}")
                    ),
                    recording(
                        dir.path(),
                        "steady",
                        &format!("reload = \"none\"\nenv = {{ V = \"{none_env}\" }}")
                    )
                )
            };
            let mut programs = start(&toml("1", "1"));
            let status = wait_for(&programs, "running", |status| {
                status.iter().all(|p| p.state == InstanceState::Running)
            })
            .await;
            let (again, steady) = (
                status[0].instances[0].pid.unwrap(),
                status[1].instances[0].pid.unwrap(),
            );
            let (outcome, lines) = reload(&mut programs, &toml("2", "2"), 2).await;
            let summary = outcome.unwrap();
            assert!(summary.contains("\"again\" restarted"), "{summary}");
            assert!(
                summary.contains("\"steady\" kept the old config"),
                "{summary}"
            );
            assert!(
                lines.iter().any(|line| line.contains("reload = \"none\"")),
                "{lines:#?}"
            );
            let status = programs.status().await;
            let new = status[0].instances[0].pid.unwrap();
            assert_ne!(new, again);
            assert_eq!(status[0].instances[0].generation, 2);
            assert!(
                recorded(dir.path(), "start", new) >= recorded(dir.path(), "term", again),
                "restart: the old one was stopped before the new one started"
            );
            assert_eq!(status[1].instances[0].pid, Some(steady));
            assert_eq!(status[1].instances[0].generation, 1);
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn a_failed_restart_brings_the_old_config_back() {
        runtime().block_on(async {
            let toml = |command: &str| {
                format!(
                    "[programs.svc]\ncommand = {command}\nreload = \"restart\"\nready_after = \"0s\"\n"
                )
            };
            let mut programs = start(&toml(r#"["sleep", "300"]"#));
            let status = wait_for(&programs, "running", |status| {
                status[0].instances[0].pid.is_some()
            })
            .await;
            let old = status[0].instances[0].pid.unwrap();
            let (outcome, _) = reload(&mut programs, &toml(r#"["/nonexistent/svc"]"#), 2).await;
            let error = outcome.unwrap_err();
            assert!(error.contains("could not start"), "{error}");
            assert!(error.contains("/nonexistent/svc"), "{error}");
            assert!(error.contains("old config was started again"), "{error}");
            assert!(!alive(old), "restart stopped the old process first");
            let status = wait_for(&programs, "the old config back", |status| {
                status[0].instances[0].state == InstanceState::Running
            })
            .await;
            let instances = &status[0].instances;
            assert_eq!(instances.len(), 1, "{instances:#?}");
            assert_eq!(instances[0].generation, 1);
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn rolling_to_fewer_instances_retires_the_extra_ones() {
        runtime().block_on(async {
            let toml = |instances: u32| {
                format!(
                    "[programs.pool]\ncommand = [\"sleep\", \"300\"]\ninstances = {instances}\nready_after = \"0s\"\n"
                )
            };
            let mut programs = start(&toml(3));
            let status = wait_for(&programs, "three running", |status| {
                status[0].state == InstanceState::Running
            })
            .await;
            let old: Vec<u32> = status[0].instances.iter().map(|i| i.pid.unwrap()).collect();
            let (outcome, lines) = reload(&mut programs, &toml(1), 2).await;
            outcome.unwrap();
            let status = programs.status().await;
            let instances = &status[0].instances;
            assert_eq!(instances.len(), 1, "{instances:#?}");
            assert_eq!((instances[0].index, instances[0].generation), (0, 2));
            assert!(old.iter().all(|pid| !alive(*pid)));
            assert_eq!(lines.iter().filter(|line| line.contains(" up (pid")).count(), 1);
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn reload_starts_added_and_stops_removed_programs() {
        runtime().block_on(async {
            let same_toml = "[programs.same]\ncommand = [\"sleep\", \"300\"]\nreload = \"restart\"\n";
            let mut programs = start(&format!(
                "[programs.old]\ncommand = [\"sleep\", \"300\"]\n{same_toml}"
            ));
            let status = wait_for(&programs, "started", |status| {
                status.iter().all(|p| p.instances[0].pid.is_some())
            })
            .await;
            let (old, same) = (status[0].instances[0].pid.unwrap(), status[1].instances[0].pid.unwrap());
            let (outcome, _) = reload(
                &mut programs,
                &format!("[programs.new]\ncommand = [\"sleep\", \"300\"]\n{same_toml}"),
                2,
            )
            .await;
            assert_eq!(
                outcome.unwrap(),
                "programs: \"new\" started, \"same\" left running (unchanged, reload = \"restart\"), \"old\" stopped"
            );
            let status = programs.status().await;
            let names: Vec<&str> = status.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["new", "same"]);
            assert_eq!(status[0].instances[0].generation, 2);
            assert_eq!(status[1].instances[0].pid, Some(same));
            assert!(!alive(old));
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn a_reload_with_new_priorities_reorders_without_restarting() {
        runtime().block_on(async {
            let toml = |a: i64, b: i64| {
                format!(
                    "[programs.a]\ncommand = [\"sleep\", \"300\"]\nready_after = \"0s\"\nreload = \"restart\"\npriority = {a}\n[programs.b]\ncommand = [\"sleep\", \"300\"]\nready_after = \"0s\"\nreload = \"none\"\npriority = {b}\n"
                )
            };
            let mut programs = start(&toml(1, 2));
            let status = wait_for(&programs, "started", |status| {
                status.iter().all(|p| p.instances[0].pid.is_some())
            })
            .await;
            let names: Vec<&str> = status.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["a", "b"]);
            let pids: Vec<Option<u32>> = status.iter().map(|p| p.instances[0].pid).collect();
            let (outcome, _) = reload(&mut programs, &toml(2, 1), 2).await;
            assert_eq!(
                outcome.unwrap(),
                "programs: \"b\" left running (unchanged, reload = \"none\"), \"a\" left running (unchanged, reload = \"restart\")"
            );
            let status = programs.status().await;
            let names: Vec<&str> = status.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["b", "a"], "status lists the new start order");
            let now: Vec<Option<u32>> = status.iter().map(|p| p.instances[0].pid).collect();
            assert_eq!(now, [pids[1], pids[0]], "nothing was restarted");
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn an_unchanged_rolling_program_is_rolled_new_first_on_every_reload() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let toml = recording(dir.path(), "celery", "");
            let mut programs = start(&toml);
            let status = wait_for(&programs, "running", |status| {
                status[0].state == InstanceState::Running
            })
            .await;
            let mut old = status[0].instances[0].pid.unwrap();
            for generation in [2, 3] {
                let (outcome, lines) = reload(&mut programs, &toml, generation).await;
                assert_eq!(outcome.unwrap(), "programs: \"celery\" rolled");
                assert!(
                    lines
                        .iter()
                        .any(|line| line.contains("config unchanged; rolling it")),
                    "{lines:#?}"
                );
                let status = programs.status().await;
                let instance = &status[0].instances[0];
                let new = instance.pid.unwrap();
                assert_ne!(new, old);
                assert_eq!(instance.generation, generation);
                assert!(!alive(old));
                let term = recorded(dir.path(), "term", old) as f64 / 1e9;
                let gap = term - instance.started_at.unwrap();
                assert!(gap >= 0.6, "old stopped {gap} s after the new start");
                old = new;
            }
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn an_unchanged_one_shot_program_that_exited_is_not_run_again() {
        runtime().block_on(async {
            let toml = "[programs.once]\ncommand = [\"true\"]\nrestart = \"on-failure\"\nready_after = \"0s\"\n";
            let mut programs = start(toml);
            wait_for(&programs, "exited", |status| {
                status[0].state == InstanceState::Exited
            })
            .await;
            let (outcome, _) = reload(&mut programs, toml, 2).await;
            assert_eq!(
                outcome.unwrap(),
                "programs: \"once\" left exited (restart = \"on-failure\")"
            );
            let status = programs.status().await;
            assert_eq!(status[0].instances[0].generation, 1);
            assert_eq!(status[0].instances[0].restarts, 0);
            programs.shutdown(StopMode::Fast).await;
        });
    }

    fn instance(state: InstanceState) -> InstanceStatus {
        InstanceStatus {
            index: 0,
            generation: 1,
            pid: None,
            state,
            started_at: None,
            uptime_seconds: None,
            restarts: 0,
            last_exit: None,
            last_exit_at: None,
            last_output: None,
            recent_exits: Vec::new(),
            rss_bytes: None,
            detail: None,
        }
    }

    #[test]
    fn a_program_is_as_healthy_as_its_worst_instance() {
        let status = ProgramStatus::new(
            "celery".into(),
            vec![
                instance(InstanceState::Running),
                instance(InstanceState::Fatal),
            ],
        );
        assert_eq!(status.state, InstanceState::Fatal);
        assert!(status.fatal);
        let status = ProgramStatus::new(
            "celery".into(),
            vec![
                instance(InstanceState::Running),
                instance(InstanceState::Running),
            ],
        );
        assert_eq!(status.state, InstanceState::Running);
        assert!(!status.fatal);
        assert_eq!(
            ProgramStatus::new("x".into(), Vec::new()).state,
            InstanceState::Stopped
        );
    }
}
