//! One instance of a program and its process: starting it, reading its exit, restarting it by
//! the restart policy, stopping it, and restarting it when its process tree is over `max_rss`.
//!
//! An instance *is* its process group, but a graceful stop signals the group leader first, and
//! the rest of the group only once the leader has exited (systemd's `KillMode=mixed`); SIGKILL
//! of the whole group follows after `stop_timeout`. The leader goes first because Celery's warm
//! shutdown depends on it: its prefork pool children reset SIGTERM to the default action, so a
//! TERM to the whole group kills the running tasks (`WorkerLostError`, the tasks are lost),
//! while a TERM to the main process lets it finish them and stop its children itself. A shell
//! wrapper should therefore `exec` the worker. A stop is complete when the group is empty, not
//! when the leader has exited: what is left gets the stop signal and the rest of
//! `stop_timeout` (checked on a short interval; no kernel event announces the end of a process
//! that is not our child). After an
//! exit nobody asked for, what is left of the group is SIGKILLed at once: those members would
//! otherwise outlive the instance as orphans next to its replacement. A grandchild that leaves
//! the group (`setsid`, a daemonizing double fork) escapes all of this; under systemd,
//! `KillMode=control-group` catches it.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use super::ProgramActor;
use crate::process::procfs;
use crate::process::spawn::{self as child, OutputTail};
use crate::programs::launch::Launch;
use crate::programs::state::{Decision, InstanceState, RestartHistory};
use crate::supervisor::lifecycle::StopMode;

/// How often a stopping group whose leader has exited is checked for remaining members.
const GROUP_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of output kept per process, quoted when a reload candidate dies.
const TAIL_LINES: usize = 10;
/// How long an exit report waits for the last output still in the pipes. Short: a grandchild
/// that keeps the pipes open must not delay the report.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// A waiter task's report: process `run` has exited.
pub(super) struct Exited {
    run: u64,
    status: io::Result<ExitStatus>,
    /// The last lines the process printed.
    tail: Vec<String>,
}

/// Why an instance is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
    /// The supervisor is shutting down: the instance stays stopped.
    Shutdown,
    /// Over `max_rss`: started again as soon as the group is gone.
    MaxRss,
    /// Replaced by a reload, or a candidate of a failed one: stays stopped.
    Retire,
}

/// One instance of the program.
pub(super) struct Instance {
    pub(super) index: usize,
    /// The config this instance runs (and is restarted) with.
    pub(super) launch: Arc<Launch>,
    /// The generation it started under.
    pub(super) generation: u64,
    /// Started by the reload in progress and not yet committed.
    pub(super) candidate: bool,
    pub(super) state: InstanceState,
    /// The process group leader while a process runs.
    pub(super) pid: Option<u32>,
    /// The process group while it may have members: from the spawn until the group is empty.
    pub(super) group: Option<u32>,
    /// When to look again whether a stopping group whose leader has exited is empty.
    pub(super) group_check_at: Option<Instant>,
    /// Identifies the current process, so a late exit report of an earlier one is ignored.
    run: u64,
    pub(super) started: Option<(Instant, SystemTime)>,
    pub(super) starts: u64,
    pub(super) history: RestartHistory,
    pub(super) restart_at: Option<Instant>,
    pub(super) ready_at: Option<Instant>,
    pub(super) kill_at: Option<Instant>,
    pub(super) stop_reason: Option<StopReason>,
    pub(super) rss_bytes: Option<u64>,
    rss_over: u32,
    pub(super) last_exit: Option<String>,
    pub(super) last_exit_at: Option<SystemTime>,
    /// The last non-empty line printed before that exit.
    pub(super) last_output: Option<String>,
    pub(super) fatal: Option<String>,
}

impl Instance {
    pub(super) fn new(index: usize, launch: Arc<Launch>, generation: u64) -> Instance {
        Instance {
            index,
            launch,
            generation,
            candidate: false,
            state: InstanceState::Stopped,
            pid: None,
            group: None,
            group_check_at: None,
            run: 0,
            started: None,
            starts: 0,
            history: RestartHistory::default(),
            restart_at: None,
            ready_at: None,
            kill_at: None,
            stop_reason: None,
            rss_bytes: None,
            rss_over: 0,
            last_exit: None,
            last_exit_at: None,
            last_output: None,
            fatal: None,
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        [
            self.restart_at,
            self.ready_at,
            self.kill_at,
            self.group_check_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl ProgramActor {
    pub(super) fn start(&mut self, slot: usize) {
        let label = self.label(slot);
        self.set_state(slot, InstanceState::Starting);
        let now = Instant::now();
        let instance = &mut self.instances[slot];
        instance.restart_at = None;
        instance.kill_at = None;
        instance.stop_reason = None;
        instance.rss_over = 0;
        instance.rss_bytes = None;
        instance.fatal = None;
        instance.started = Some((now, SystemTime::now()));
        instance.starts += 1;
        if instance.starts > 1 {
            self.metrics
                .program_restarts_total
                .with_label_values(&[self.launch.name.as_str()])
                .inc();
        }
        let launch = Arc::clone(&self.instances[slot].launch);
        match child::spawn(launch.spec(self.instances[slot].index)) {
            Ok(mut process) => {
                let pid = process.id().unwrap_or_default();
                self.runs += 1;
                let run = self.runs;
                let instance = &mut self.instances[slot];
                instance.pid = Some(pid);
                instance.group = Some(pid);
                instance.run = run;
                instance.ready_at = Some(now + launch.ready_after);
                tracing::info!(program = %label, pid, "program \"{label}\": started (pid {pid})");
                let tail = OutputTail::new(TAIL_LINES);
                let output =
                    child::capture_output_with_tail(&mut process, label, Some(tail.clone()));
                let exits = self.exits_tx.clone();
                tokio::spawn(async move {
                    let status = process.wait().await;
                    let _ = tokio::time::timeout(OUTPUT_GRACE, output).await;
                    let tail = tail.lines();
                    let _ = exits.send(Exited { run, status, tail });
                });
                if launch.ready_after.is_zero() {
                    self.become_ready(slot);
                }
            }
            Err(error) => {
                let description = format!("could not start: {error}");
                tracing::error!(program = %label, "program \"{label}\": {description}");
                let instance = &mut self.instances[slot];
                instance.last_exit = Some(description.clone());
                instance.last_exit_at = Some(SystemTime::now());
                instance.last_output = None;
                if self.on_trial(slot) {
                    self.candidate_failed(slot, None, &description, &[]);
                } else {
                    self.after_unrequested_exit(slot, false, description);
                }
            }
        }
    }

    pub(super) fn become_ready(&mut self, slot: usize) {
        self.instances[slot].ready_at = None;
        self.set_state(slot, InstanceState::Running);
    }

    pub(super) fn on_exit(&mut self, exited: Exited) {
        // Matched by run, not by position: a late report about an earlier process is ignored.
        let Some(slot) = self
            .instances
            .iter()
            .position(|instance| instance.run == exited.run)
        else {
            return;
        };
        let label = self.label(slot);
        let on_trial = self.on_trial(slot);
        let instance = &mut self.instances[slot];
        let Some(pid) = instance.pid.take() else {
            return;
        };
        let (description, success) = describe(&exited.status);
        instance.last_exit = Some(description.clone());
        instance.last_exit_at = Some(SystemTime::now());
        instance.last_output = exited
            .tail
            .iter()
            .rev()
            .map(|line| line.trim())
            .find(|line| !line.is_empty())
            .map(str::to_owned);
        instance.rss_bytes = None;
        instance.ready_at = None;
        if instance.state == InstanceState::Stopping {
            tracing::info!(program = %label, pid, "program \"{label}\": leader {description}");
            if let Some(group) = instance.group.filter(|_| instance.kill_at.is_some()) {
                // Graceful: the leader is done; what it left behind gets the signal now.
                let _ = child::signal_group(group, instance.launch.stop_signal);
            }
            self.check_stopped_group(slot, Instant::now());
        } else if on_trial {
            kill_group(&label, pid);
            instance.group = None;
            instance.kill_at = None;
            self.candidate_failed(slot, Some(pid), &description, &exited.tail);
        } else {
            // Members that outlived the leader would become orphans: the instance is the group.
            kill_group(&label, pid);
            instance.group = None;
            instance.kill_at = None;
            self.after_unrequested_exit(slot, success, description);
        }
    }

    /// A stopping instance's leader has exited: finishes the stop when the group is empty, else
    /// looks again shortly (the SIGKILL at `kill_at` still applies).
    pub(super) fn check_stopped_group(&mut self, slot: usize, now: Instant) {
        let instance = &mut self.instances[slot];
        instance.group_check_at = None;
        if let Some(group) = instance.group {
            if procfs::group_alive(group) {
                instance.group_check_at = Some(now + GROUP_CHECK_INTERVAL);
                return;
            }
        }
        instance.group = None;
        instance.kill_at = None;
        let reason = instance.stop_reason.take();
        let label = self.label(slot);
        tracing::info!(program = %label, "program \"{label}\": stopped");
        if reason == Some(StopReason::MaxRss) && self.shutting_down.is_none() {
            self.start(slot);
        } else {
            self.set_state(slot, InstanceState::Stopped);
        }
    }

    fn after_unrequested_exit(&mut self, slot: usize, success: bool, description: String) {
        let now = Instant::now();
        let label = self.label(slot);
        let instance = &mut self.instances[slot];
        let started_at = instance.started.map_or(now, |(at, _)| at);
        match instance
            .history
            .on_exit(&instance.launch.rules, success, started_at, now)
        {
            Decision::Restart { delay } => {
                instance.restart_at = Some(now + delay);
                tracing::warn!(
                    program = %label,
                    "program \"{label}\": {description}; restarting in {}",
                    proxy_conf::Duration(delay)
                );
                self.set_state(slot, InstanceState::Backoff);
            }
            Decision::StayDown => {
                tracing::info!(
                    program = %label,
                    "program \"{label}\": {description}; not restarted (restart = {})",
                    restart_word(instance.launch.rules.restart)
                );
                self.set_state(slot, InstanceState::Exited);
            }
            Decision::GiveUp { exits, window } => {
                let reason = format!(
                    "{description} {exits} times in {}; giving up",
                    proxy_conf::Duration(window)
                );
                tracing::error!(program = %label, "program \"{label}\": {reason}");
                instance.fatal = Some(reason);
                self.set_state(slot, InstanceState::Fatal);
            }
        }
    }

    pub(super) fn stop(&mut self, slot: usize, mode: StopMode, reason: StopReason) {
        let label = self.label(slot);
        let instance = &mut self.instances[slot];
        match instance.state {
            InstanceState::Starting | InstanceState::Running => {
                let Some(pid) = instance.pid else { return };
                let signal = match mode {
                    StopMode::Graceful => instance.launch.stop_signal,
                    StopMode::Fast => Signal::SIGKILL,
                };
                instance.stop_reason = Some(reason);
                instance.ready_at = None;
                instance.kill_at = match mode {
                    StopMode::Graceful => Some(Instant::now() + instance.launch.stop_timeout),
                    StopMode::Fast => None,
                };
                let sent = match mode {
                    StopMode::Graceful => {
                        tracing::info!(program = %label, pid, "program \"{label}\": sending {signal} to pid {pid}");
                        child::signal_process(pid, signal)
                    }
                    StopMode::Fast => {
                        tracing::info!(program = %label, pid, "program \"{label}\": sending {signal} to process group {pid}");
                        child::signal_group(pid, signal)
                    }
                };
                if let Err(error) = sent {
                    tracing::warn!(program = %label, "program \"{label}\": cannot send {signal} to {pid}: {error}");
                }
                self.set_state(slot, InstanceState::Stopping);
            }
            InstanceState::Stopping => {
                instance.stop_reason = Some(reason);
                if mode == StopMode::Fast {
                    if let Some(group) = instance.group {
                        kill_group(&label, group);
                    }
                    instance.kill_at = None;
                }
            }
            InstanceState::Backoff => {
                instance.restart_at = None;
                self.set_state(slot, InstanceState::Stopped);
            }
            InstanceState::Exited | InstanceState::Stopped | InstanceState::Fatal => {}
        }
    }

    pub(super) fn begin_shutdown(&mut self, mode: StopMode) {
        if self.shutting_down == Some(StopMode::Fast) {
            return;
        }
        self.shutting_down = Some(mode);
        if let Some(rollout) = self.rollout.take() {
            let _ = rollout.reply.send(Err(format!(
                "program \"{}\": the supervisor is stopping; reload abandoned",
                self.launch.name
            )));
        }
        for slot in 0..self.instances.len() {
            self.stop(slot, mode, StopReason::Shutdown);
        }
    }

    /// Samples the RSS of every running instance's process tree that has a `max_rss`, and
    /// restarts those over it for `max_rss_samples` samples in a row.
    pub(super) async fn sample_rss(&mut self) {
        let sampled: Vec<(usize, u32)> = self
            .instances
            .iter()
            .enumerate()
            .filter(|(_, instance)| {
                instance.launch.max_rss > 0
                    && matches!(
                        instance.state,
                        InstanceState::Starting | InstanceState::Running
                    )
            })
            .filter_map(|(slot, instance)| Some((slot, instance.pid?)))
            .collect();
        if sampled.is_empty() {
            return;
        }
        let roots: Vec<u32> = sampled.iter().map(|&(_, pid)| pid).collect();
        // Off the runtime's only thread, which also runs the web front: a scan of `/proc` reads
        // every process's stat file (milliseconds on a busy host).
        let Ok(trees) = tokio::task::spawn_blocking(move || procfs::trees_rss(&roots)).await else {
            return; // the runtime is shutting down
        };
        for (&(slot, pid), rss_bytes) in sampled.iter().zip(trees) {
            let instance = &mut self.instances[slot];
            let limit = instance.launch.max_rss;
            instance.rss_bytes = rss_bytes;
            let rss = instance.rss_bytes.unwrap_or_default();
            if rss <= limit {
                instance.rss_over = 0;
                continue;
            }
            instance.rss_over += 1;
            if instance.rss_over >= instance.launch.max_rss_samples.get() {
                let samples = instance.rss_over;
                let label = self.label(slot);
                tracing::warn!(
                    program = %label,
                    pid,
                    rss_bytes = rss,
                    "program \"{label}\": RSS {:.1}MiB of its process tree is over max_rss {} for {} consecutive samples; restarting it",
                    rss as f64 / f64::from(1u32 << 20),
                    proxy_conf::ByteSize(limit),
                    samples
                );
                self.stop(slot, StopMode::Graceful, StopReason::MaxRss);
            }
        }
    }
}

/// SIGKILL to a whole process group; a group that is already gone is fine.
pub(super) fn kill_group(label: &str, group: u32) {
    if let Err(error) = child::signal_group(group, Signal::SIGKILL) {
        tracing::warn!(program = %label, "program \"{label}\": cannot kill process group {group}: {error}");
    }
}

/// A readable exit status and whether it counts as success.
fn describe(status: &io::Result<ExitStatus>) -> (String, bool) {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => (format!("exited with status {code}"), code == 0),
            (None, Some(signal)) => {
                let name = Signal::try_from(signal)
                    .map_or_else(|_| signal.to_string(), |signal| signal.to_string());
                (format!("killed by signal {name}"), false)
            }
            (None, None) => (format!("ended ({status})"), false),
        },
        Err(error) => (format!("could not be waited for: {error}"), false),
    }
}

pub(super) fn restart_word(policy: proxy_conf::RestartPolicy) -> &'static str {
    match policy {
        proxy_conf::RestartPolicy::Always => "always",
        proxy_conf::RestartPolicy::OnFailure => "on-failure",
        proxy_conf::RestartPolicy::Never => "never",
    }
}
