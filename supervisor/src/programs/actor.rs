//! The actor that owns one program: its instances' processes, their restart histories and
//! timers, and the stop sequence. One tokio task per program; commands arrive over an mpsc
//! channel and answers leave through oneshot senders, so nothing about a program is shared.
//!
//! Each spawned process is awaited by a small waiter task that owns its `Child` and reports the
//! exit back to the actor. The actor never waits on a child itself, so it can answer `status`
//! and run timers while a process is stopping. What to do after an exit is decided by the pure
//! machine in `state.rs`; the actor carries the decisions out.
//!
//! This file holds the actor's loop, its timers, the `sauna_program_up` gauge and the status it
//! answers. How one instance is started, stopped and restarted (the process group, the stop
//! sequence, `max_rss`) is [`instance`]'s; how a reload replaces the instances is [`rollout`]'s.

mod instance;
mod rollout;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::programs::launch::Launch;
use crate::programs::state::{InstanceState, can_transition};
use crate::programs::{InstanceStatus, ProgramStatus};
use crate::supervisor::lifecycle::StopMode;
use instance::{Exited, Instance, StopReason, kill_group};
use rollout::Rollout;
pub use rollout::{Reload, Reloaded};

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
                () = timer => {
                    let now = Instant::now();
                    self.on_timers(now);
                    if self.next_rss_sample.is_some_and(|at| at <= now)
                        && self.shutting_down.is_none()
                    {
                        self.next_rss_sample = Some(now + self.launch.rss_interval);
                        self.sample_rss().await;
                    }
                }
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
