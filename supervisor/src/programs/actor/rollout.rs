//! How a reload replaces one program's instances. A reload ([`super::Command::Reload`]) is a
//! [`Rollout`] the actor drives from its own loop: new instances (*candidates*, each with its own
//! [`Launch`] and generation) run beside the old ones, and after every event the actor looks
//! whether the rollout can take its next step. `rolling` starts the candidates first and retires
//! the old instances only once every candidate has survived `ready_after`, so a Celery queue always
//! has a consumer; `restart` retires first and starts after. A candidate that exits before that
//! point fails the rollout: the other candidates are stopped and the old instances, never touched
//! by `rolling`, keep running (after `restart`, they are started again with the old config). Starts
//! of candidates are not counted in `sauna_program_restarts_total`: that counter means "came back
//! after an exit or a recycle" (crash loops, `max_rss`), and a deploy that rolls every program must
//! not look like a crash.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::ProgramActor;
use super::instance::{Instance, StopReason, restart_word};
use crate::programs::launch::Launch;
use crate::programs::state::InstanceState;
use crate::supervisor::lifecycle::{Progress, StopMode};

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
pub(super) struct Rollout {
    launch: Arc<Launch>,
    policy: proxy_conf::ProgramReload,
    generation: u64,
    phase: Phase,
    /// What the first failing candidate did.
    failure: Option<String>,
    progress: Progress,
    pub(super) reply: oneshot::Sender<Result<Reloaded, String>>,
}

impl ProgramActor {
    /// Starts a reload: `rolling` spawns the candidates now, `restart` first stops the old
    /// instances. [`ProgramActor::advance_rollout`] takes it from there.
    pub(super) fn begin_rollout(&mut self, reload: Reload) {
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
    pub(super) fn on_trial(&self, slot: usize) -> bool {
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
    pub(super) fn candidate_failed(
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
    pub(super) fn advance_rollout(&mut self) {
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
}
