//! The actor that owns one program: its instances' processes, their restart histories and
//! timers, and the stop sequence. One tokio task per program; commands arrive over an mpsc
//! channel and answers leave through oneshot senders, so nothing about a program is shared.
//!
//! Each spawned process is awaited by a small waiter task that owns its `Child` and reports the
//! exit back to the actor. The actor never waits on a child itself, so it can answer `status`
//! and run timers while a process is stopping. What to do after an exit is decided by the pure
//! machine in `state.rs`; this file carries the decisions out.
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
//!
//! A reload ([`Command::Reload`]) is a [`Rollout`] the actor drives from its own loop: new
//! instances (*candidates*, each with its own [`Launch`] and generation) run beside the old ones,
//! and after every event the actor looks whether the rollout can take its next step. `rolling`
//! starts the candidates first and retires the old instances only once every candidate has
//! survived `ready_after`, so a Celery queue always has a consumer; `restart` retires first and
//! starts after. A candidate that exits before that point fails the rollout: the other
//! candidates are stopped and the old instances, never touched by `rolling`, keep running (after
//! `restart`, they are started again with the old config). Starts of candidates are not counted in
//! `sauna_program_restarts_total`: that counter means "came back after an exit or a recycle"
//! (crash loops, `max_rss`), and a deploy that rolls every program must not look like a crash.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::process::procfs;
use crate::process::spawn::{self as child, OutputTail};
use crate::programs::launch::Launch;
use crate::programs::state::{Decision, InstanceState, RestartHistory, can_transition};
use crate::programs::{InstanceStatus, ProgramStatus};
use crate::supervisor::lifecycle::{Progress, StopMode};

/// How often a stopping group whose leader has exited is checked for remaining members.
const GROUP_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of output kept per process, quoted when a reload candidate dies.
const TAIL_LINES: usize = 10;
/// How long an exit report waits for the last output still in the pipes. Short: a grandchild
/// that keeps the pipes open must not delay the report.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// What the facade can ask a program actor.
#[derive(Debug)]
pub enum Command {
    /// Report the program's status.
    Status(oneshot::Sender<ProgramStatus>),
    /// Stop every instance; the answer comes once every process group is gone.
    Shutdown(StopMode, oneshot::Sender<()>),
    /// Replace the instances with ones started from a new config.
    Reload(Box<Reload>),
}

/// A reload of one program, as the facade asks for it.
#[derive(Debug)]
pub struct Reload {
    /// The new config, resolved.
    pub launch: Launch,
    /// Rolling (new first) or restart (old first); `none` never reaches the actor.
    pub policy: proxy_conf::ProgramReload,
    /// Whether `launch` differs from what the instances run. An unchanged program whose
    /// instances have all exited for good (`restart = "never"`, or `"on-failure"` after a
    /// success: a one-shot command) is left as it is instead of being run again.
    pub changed: bool,
    /// The generation the new instances start under.
    pub generation: u64,
    /// Where the steps are reported.
    pub progress: Progress,
    /// What was done once the old instances are gone, or what failed.
    pub reply: oneshot::Sender<Result<Reloaded, String>>,
}

/// A reload of one program that went through.
#[derive(Debug)]
pub struct Reloaded {
    /// A progress line, e.g. `program "celery": rolled to generation 2 (1 instance)`.
    pub summary: String,
    /// What happened, for the reload's summary after the program's name: `rolled`,
    /// `restarted`, or `left exited (restart = "never")`.
    pub outcome: String,
}

/// A waiter task's report: process `run` has exited.
struct Exited {
    run: u64,
    status: io::Result<ExitStatus>,
    /// The last lines the process printed.
    tail: Vec<String>,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `restart`: waiting for the old instances to be gone before the candidates start.
    Draining,
    /// Candidates run and must all survive `ready_after`.
    Starting,
    /// Every candidate is ready; the old instances were sent the stop signal.
    Retiring,
    /// A candidate failed; waiting for the other candidates to be gone.
    RollingBack,
}

/// A reload in progress; see the module documentation.
struct Rollout {
    launch: Arc<Launch>,
    policy: proxy_conf::ProgramReload,
    generation: u64,
    phase: Phase,
    /// What the first failing candidate did.
    failure: Option<String>,
    progress: Progress,
    reply: oneshot::Sender<Result<Reloaded, String>>,
}

/// Why an instance is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// The supervisor is shutting down: the instance stays stopped.
    Shutdown,
    /// Over `max_rss`: started again as soon as the group is gone.
    MaxRss,
    /// Replaced by a reload, or a candidate of a failed one: stays stopped.
    Retire,
}

/// One instance of the program.
struct Instance {
    index: usize,
    /// The config this instance runs (and is restarted) with.
    launch: Arc<Launch>,
    /// The generation it started under.
    generation: u64,
    /// Started by the reload in progress and not yet committed.
    candidate: bool,
    state: InstanceState,
    /// The process group leader while a process runs.
    pid: Option<u32>,
    /// The process group while it may have members: from the spawn until the group is empty.
    group: Option<u32>,
    /// When to look again whether a stopping group whose leader has exited is empty.
    group_check_at: Option<Instant>,
    /// Identifies the current process, so a late exit report of an earlier one is ignored.
    run: u64,
    started: Option<(Instant, SystemTime)>,
    starts: u64,
    history: RestartHistory,
    restart_at: Option<Instant>,
    ready_at: Option<Instant>,
    kill_at: Option<Instant>,
    stop_reason: Option<StopReason>,
    rss_bytes: Option<u64>,
    rss_over: u32,
    last_exit: Option<String>,
    last_exit_at: Option<SystemTime>,
    /// The last non-empty line printed before that exit.
    last_output: Option<String>,
    fatal: Option<String>,
}

impl Instance {
    fn new(index: usize, launch: Arc<Launch>, generation: u64) -> Instance {
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

    fn next_deadline(&self) -> Option<Instant> {
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

/// The actor's state; see the module documentation.
pub struct ProgramActor {
    /// The current config: what new instances of the committed generation run.
    launch: Arc<Launch>,
    /// The committed generation.
    generation: u64,
    rollout: Option<Rollout>,
    metrics: Arc<Metrics>,
    instances: Vec<Instance>,
    exits_tx: mpsc::UnboundedSender<Exited>,
    exits_rx: mpsc::UnboundedReceiver<Exited>,
    next_rss_sample: Option<Instant>,
    shutting_down: Option<StopMode>,
    shutdown_replies: Vec<oneshot::Sender<()>>,
    runs: u64,
}

impl ProgramActor {
    /// An actor for `launch` with every instance stopped; they will start under `generation`.
    pub fn new(launch: Launch, metrics: Arc<Metrics>, generation: u64) -> ProgramActor {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let launch = Arc::new(launch);
        let instances = (0..launch.instances.get())
            .map(|index| Instance::new(index, Arc::clone(&launch), generation))
            .collect();
        let next_rss_sample = (launch.max_rss > 0).then(|| Instant::now() + launch.rss_interval);
        metrics
            .program_up
            .with_label_values(&[launch.name.as_str()])
            .set(0);
        metrics
            .program_restarts_total
            .with_label_values(&[launch.name.as_str()])
            .inc_by(0);
        ProgramActor {
            launch,
            generation,
            rollout: None,
            metrics,
            instances,
            exits_tx,
            exits_rx,
            next_rss_sample,
            shutting_down: None,
            shutdown_replies: Vec::new(),
            runs: 0,
        }
    }

    /// Spawns every instance now, in index order. Called from the runtime before `run`, so
    /// programs start in the order the facade starts them.
    pub fn start_all(&mut self) {
        for slot in 0..self.instances.len() {
            self.start(slot);
        }
    }

    /// Serves commands until a shutdown has completed or the facade is gone.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut commands_open = true;
        loop {
            if self.shutting_down.is_some() && self.all_down() {
                for reply in self.shutdown_replies.drain(..) {
                    let _ = reply.send(());
                }
                return;
            }
            let deadline = self.next_deadline();
            let timer = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = commands.recv(), if commands_open => match command {
                    Some(Command::Status(reply)) => {
                        let _ = reply.send(self.status());
                    }
                    Some(Command::Shutdown(mode, reply)) => {
                        self.shutdown_replies.push(reply);
                        self.begin_shutdown(mode);
                    }
                    Some(Command::Reload(reload)) => self.begin_rollout(*reload),
                    None => {
                        // The facade was dropped without a shutdown: leave nothing running.
                        commands_open = false;
                        self.begin_shutdown(StopMode::Fast);
                    }
                },
                Some(exited) = self.exits_rx.recv() => self.on_exit(exited),
                () = timer => self.on_timers(Instant::now()),
            }
            self.advance_rollout();
        }
    }

    /// The log label of the instance in `slot` (a position in `instances`; reload will keep old
    /// and new processes of one index side by side).
    fn label(&self, slot: usize) -> String {
        let instance = &self.instances[slot];
        instance.launch.label(instance.index)
    }

    fn set_state(&mut self, slot: usize, to: InstanceState) {
        let from = self.instances[slot].state;
        if !can_transition(from, to) {
            tracing::error!(
                "program \"{}\": internal error: transition {from:?} → {to:?} is not in the table",
                self.label(slot)
            );
        }
        self.instances[slot].state = to;
        self.update_up();
    }

    /// `sauna_program_up` is 1 while every index of the current config has a running instance,
    /// old or new: during a rolling reload the queue has a consumer throughout.
    fn update_up(&self) {
        let count = self.launch.instances.get();
        let all_running = (0..count).all(|index| {
            self.instances
                .iter()
                .any(|instance| instance.index == index && instance.state == InstanceState::Running)
        });
        self.metrics
            .program_up
            .with_label_values(&[self.launch.name.as_str()])
            .set(i64::from(all_running && count > 0));
    }

    fn start(&mut self, slot: usize) {
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

    fn become_ready(&mut self, slot: usize) {
        self.instances[slot].ready_at = None;
        self.set_state(slot, InstanceState::Running);
    }

    fn on_exit(&mut self, exited: Exited) {
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
    fn check_stopped_group(&mut self, slot: usize, now: Instant) {
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

    fn stop(&mut self, slot: usize, mode: StopMode, reason: StopReason) {
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

    fn begin_shutdown(&mut self, mode: StopMode) {
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

    /// Starts a reload: `rolling` spawns the candidates now, `restart` first stops the old
    /// instances. [`ProgramActor::advance_rollout`] takes it from there.
    fn begin_rollout(&mut self, reload: Reload) {
        if self.shutting_down.is_some() {
            let _ = reload.reply.send(Err(format!(
                "program \"{}\": the supervisor is stopping; not reloaded",
                self.launch.name
            )));
            return;
        }
        if self.rollout.is_some() {
            // The facade waits for each answer, so this is a bug there; refuse rather than mix
            // two rollouts' candidates.
            let _ = reload.reply.send(Err(format!(
                "program \"{}\": a reload of it is already in progress",
                self.launch.name
            )));
            return;
        }
        let finished = !self.instances.is_empty()
            && self
                .instances
                .iter()
                .all(|instance| instance.state == InstanceState::Exited);
        if !reload.changed && finished {
            let restart = restart_word(self.launch.rules.restart);
            let _ = reload.reply.send(Ok(Reloaded {
                summary: format!(
                    "program \"{}\": unchanged and exited for good (restart = \"{restart}\"); not started again",
                    self.launch.name
                ),
                outcome: format!("left exited (restart = \"{restart}\")"),
            }));
            return;
        }
        let restart = reload.policy == proxy_conf::ProgramReload::Restart;
        self.rollout = Some(Rollout {
            launch: Arc::new(reload.launch),
            policy: reload.policy,
            generation: reload.generation,
            phase: if restart {
                Phase::Draining
            } else {
                Phase::Starting
            },
            failure: None,
            progress: reload.progress,
            reply: reload.reply,
        });
        let name = &self.launch.name;
        if restart {
            self.say(format!(
                "program \"{name}\": changed; stopping the old instances (reload = \"restart\")"
            ));
            for slot in 0..self.instances.len() {
                self.stop(slot, StopMode::Graceful, StopReason::Retire);
            }
        } else {
            self.say(if reload.changed {
                format!("program \"{name}\": changed; starting the new instances (reload = \"rolling\")")
            } else {
                format!(
                    "program \"{name}\": config unchanged; rolling it onto the code on disk now (reload = \"rolling\")"
                )
            });
            self.start_candidates();
        }
    }

    /// True for a candidate whose rollout has not committed yet: its exit fails the rollout
    /// instead of being restarted.
    fn on_trial(&self, slot: usize) -> bool {
        self.instances[slot].candidate
            && self
                .rollout
                .as_ref()
                .is_some_and(|rollout| rollout.phase == Phase::Starting)
    }

    /// Spawns one candidate per index of the rollout's config.
    fn start_candidates(&mut self) {
        let Some(rollout) = &self.rollout else { return };
        let launch = Arc::clone(&rollout.launch);
        let generation = rollout.generation;
        for index in 0..launch.instances.get() {
            let mut instance = Instance::new(index, Arc::clone(&launch), generation);
            instance.candidate = true;
            self.instances.push(instance);
            self.start(self.instances.len() - 1);
        }
    }

    /// A candidate exited (or could not start) before the rollout committed: the rollout fails.
    fn candidate_failed(
        &mut self,
        slot: usize,
        pid: Option<u32>,
        description: &str,
        tail: &[String],
    ) {
        let label = self.label(slot);
        self.set_state(slot, InstanceState::Exited);
        let Some(rollout) = self.rollout.as_mut() else {
            return;
        };
        if rollout.failure.is_some() {
            return;
        }
        let pid = pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default();
        let mut failure = format!(
            "program \"{label}\": new instance{pid} {description} before it had run for ready_after {}",
            proxy_conf::Duration(rollout.launch.ready_after)
        );
        if !tail.is_empty() {
            failure.push_str("; its last output:");
            for line in tail {
                failure.push_str("\n    ");
                failure.push_str(line);
            }
        }
        tracing::error!(program = %label, "{failure}");
        rollout.failure = Some(failure);
    }

    /// Reports one reload step to the `reload` client and the log.
    fn say(&self, line: String) {
        tracing::info!(program = %self.launch.name, "{line}");
        if let Some(rollout) = &self.rollout {
            let _ = rollout.progress.send(line);
        }
    }

    /// True when no instance selected by `which` has a process left.
    fn gone(&self, which: impl Fn(&Instance) -> bool) -> bool {
        self.instances
            .iter()
            .filter(|instance| which(instance))
            .all(|instance| instance.pid.is_none() && instance.group.is_none())
    }

    /// Takes every step of the rollout that the instances' states allow now.
    fn advance_rollout(&mut self) {
        loop {
            let Some(rollout) = &self.rollout else { return };
            match rollout.phase {
                Phase::Draining => {
                    if !self.gone(|instance| !instance.candidate) {
                        return;
                    }
                    self.instances.clear();
                    self.set_phase(Phase::Starting);
                    self.start_candidates();
                }
                Phase::Starting => {
                    if rollout.failure.is_some() {
                        for slot in 0..self.instances.len() {
                            if self.instances[slot].candidate {
                                self.stop(slot, StopMode::Graceful, StopReason::Retire);
                            }
                        }
                        self.set_phase(Phase::RollingBack);
                        continue;
                    }
                    let ready = self
                        .instances
                        .iter()
                        .filter(|instance| instance.candidate)
                        .all(|instance| instance.state == InstanceState::Running);
                    if !ready {
                        return;
                    }
                    self.commit();
                }
                Phase::Retiring => {
                    if !self.gone(|instance| !instance.candidate) {
                        return;
                    }
                    self.finish(Ok(()));
                    return;
                }
                Phase::RollingBack => {
                    if !self.gone(|instance| instance.candidate) {
                        return;
                    }
                    self.finish(Err(()));
                    return;
                }
            }
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(rollout) = self.rollout.as_mut() {
            rollout.phase = phase;
        }
    }

    /// Every candidate survived `ready_after`: the new config becomes current and the old
    /// instances get the stop signal (Celery's warm shutdown finishes the running tasks).
    fn commit(&mut self) {
        let Some(rollout) = &self.rollout else { return };
        self.launch = Arc::clone(&rollout.launch);
        self.generation = rollout.generation;
        if self.launch.max_rss > 0 && self.next_rss_sample.is_none() {
            self.next_rss_sample = Some(Instant::now() + self.launch.rss_interval);
        }
        let mut lines = Vec::new();
        for instance in self.instances.iter().filter(|instance| instance.candidate) {
            let old: Vec<String> = self
                .instances
                .iter()
                .filter(|old| !old.candidate && old.index == instance.index)
                .filter_map(|old| old.pid)
                .map(|pid| format!(" (pid {pid})"))
                .collect();
            let new_pid = instance
                .pid
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            let tail = if old.is_empty() {
                String::new()
            } else {
                format!(", stopping the old one{}", old.concat())
            };
            lines.push(format!(
                "program \"{}\": new instance {} up{new_pid}{tail}",
                self.launch.name, instance.index
            ));
        }
        for line in lines {
            self.say(line);
        }
        for slot in 0..self.instances.len() {
            if !self.instances[slot].candidate {
                self.stop(slot, StopMode::Graceful, StopReason::Retire);
            }
        }
        self.update_up();
        self.set_phase(Phase::Retiring);
    }

    /// Ends the rollout: drops the instances that are gone for good and answers the facade.
    fn finish(&mut self, outcome: Result<(), ()>) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        let name = self.launch.name.clone();
        let answer = match outcome {
            Ok(()) => {
                self.instances.retain(|instance| instance.candidate);
                for instance in &mut self.instances {
                    instance.candidate = false;
                }
                let count = self.instances.len();
                let outcome = match rollout.policy {
                    proxy_conf::ProgramReload::Restart => "restarted",
                    _ => "rolled",
                };
                Ok(Reloaded {
                    summary: format!(
                        "program \"{name}\": {outcome} to generation {} ({count} instance{})",
                        rollout.generation,
                        if count == 1 { "" } else { "s" }
                    ),
                    outcome: outcome.to_owned(),
                })
            }
            Err(()) => {
                self.instances.retain(|instance| !instance.candidate);
                let failure = rollout.failure.unwrap_or_default();
                let kept = if rollout.policy == proxy_conf::ProgramReload::Restart {
                    // The old instances were stopped first: bring them back with the old config.
                    for index in 0..self.launch.instances.get() {
                        self.instances.push(Instance::new(
                            index,
                            Arc::clone(&self.launch),
                            self.generation,
                        ));
                        self.start(self.instances.len() - 1);
                    }
                    "the old config was started again"
                } else {
                    "the old instances kept running"
                };
                Err(format!("{failure}\nprogram \"{name}\" rolled back: {kept}"))
            }
        };
        self.update_up();
        let _ = rollout.reply.send(answer);
    }

    fn all_down(&self) -> bool {
        self.instances
            .iter()
            .all(|instance| instance.pid.is_none() && instance.group.is_none())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let instances = self.instances.iter().filter_map(Instance::next_deadline);
        let sample = self
            .next_rss_sample
            .filter(|_| self.shutting_down.is_none());
        instances.chain(sample).min()
    }

    fn on_timers(&mut self, now: Instant) {
        for slot in 0..self.instances.len() {
            let instance = &mut self.instances[slot];
            if instance.restart_at.is_some_and(|at| at <= now) {
                instance.restart_at = None;
                if instance.state == InstanceState::Backoff && self.shutting_down.is_none() {
                    self.start(slot);
                }
            }
            let instance = &mut self.instances[slot];
            if instance.ready_at.is_some_and(|at| at <= now) {
                self.become_ready(slot);
            }
            let instance = &mut self.instances[slot];
            if instance.kill_at.is_some_and(|at| at <= now) {
                instance.kill_at = None;
                if let Some(group) = instance.group {
                    let (timeout, signal) =
                        (instance.launch.stop_timeout, instance.launch.stop_signal);
                    let label = self.label(slot);
                    tracing::warn!(
                        program = %label,
                        "program \"{label}\": still running {} after {signal}; sending SIGKILL to process group {group}",
                        proxy_conf::Duration(timeout),
                    );
                    kill_group(&label, group);
                }
            }
            if self.instances[slot]
                .group_check_at
                .is_some_and(|at| at <= now)
            {
                self.check_stopped_group(slot, now);
            }
        }
        if self.next_rss_sample.is_some_and(|at| at <= now) && self.shutting_down.is_none() {
            self.next_rss_sample = Some(now + self.launch.rss_interval);
            self.sample_rss();
        }
    }

    fn sample_rss(&mut self) {
        for slot in 0..self.instances.len() {
            let instance = &mut self.instances[slot];
            let limit = instance.launch.max_rss;
            if limit == 0 {
                continue;
            }
            let running = matches!(
                instance.state,
                InstanceState::Starting | InstanceState::Running
            );
            let Some(pid) = instance.pid.filter(|_| running) else {
                continue;
            };
            instance.rss_bytes = procfs::tree_rss(pid);
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

    fn status(&self) -> ProgramStatus {
        let now = Instant::now();
        let wall_now = SystemTime::now();
        let to_unix = |at: SystemTime| {
            at.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |since| since.as_secs_f64())
        };
        let instances: Vec<InstanceStatus> = self
            .instances
            .iter()
            .map(|instance| {
                let running = instance.pid.is_some();
                let detail = match instance.state {
                    InstanceState::Fatal => instance.fatal.clone(),
                    InstanceState::Backoff => instance.restart_at.map(|at| {
                        format!(
                            "restarting in {:.1}s",
                            at.saturating_duration_since(now).as_secs_f64()
                        )
                    }),
                    InstanceState::Stopping if instance.stop_reason == Some(StopReason::MaxRss) => {
                        Some("restarting: over max_rss".to_owned())
                    }
                    _ => None,
                };
                InstanceStatus {
                    index: instance.index,
                    generation: instance.generation,
                    pid: instance.pid,
                    state: instance.state,
                    started_at: instance.started.map(|(_, wall)| to_unix(wall)),
                    uptime_seconds: instance
                        .started
                        .filter(|_| running)
                        .map(|(at, _)| now.saturating_duration_since(at).as_secs()),
                    restarts: instance.starts.saturating_sub(1),
                    last_exit: instance.last_exit.clone(),
                    last_exit_at: instance.last_exit_at.map(to_unix),
                    last_output: instance.last_output.clone(),
                    recent_exits: instance
                        .history
                        .recent_exits()
                        .map(|at| {
                            wall_now
                                .checked_sub(now.saturating_duration_since(at))
                                .map_or(0.0, to_unix)
                        })
                        .collect(),
                    rss_bytes: instance.rss_bytes,
                    detail,
                }
            })
            .collect();
        ProgramStatus::new(self.launch.name.clone(), instances)
    }
}

/// SIGKILL to a whole process group; a group that is already gone is fine.
fn kill_group(label: &str, group: u32) {
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

fn restart_word(policy: proxy_conf::RestartPolicy) -> &'static str {
    match policy {
        proxy_conf::RestartPolicy::Always => "always",
        proxy_conf::RestartPolicy::OnFailure => "on-failure",
        proxy_conf::RestartPolicy::Never => "never",
    }
}
