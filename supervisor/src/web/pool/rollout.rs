//! The reload state machine of the pool actor.
//!
//! A reload (`PoolHandle::reload`) is a state machine inside the actor, driven by the same worker
//! events as everything else, so the actor keeps answering `status` and handling crashes while it
//! runs. First one *canary* worker of the new generation imports the new release and answers
//! `[web].warmup`; the dispatcher gives it no other request (it routes to the served generation and
//! older ones). Only then does anything change: the new settings apply, and slot by slot a new
//! worker starts, becomes ready, takes requests beside the old ones, and the old worker of its slot
//! drains (`graceful_timeout`) — capacity never drops. A new worker that fails turns the roll
//! around: the same walk refills every slot from the old generation. Recycling waits while a reload
//! runs, and a slot that crashes during the roll is refilled by the roll from its target generation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_conf::{Listen, WarmUp, WebConfig};
use tokio::sync::oneshot;

use super::actor::Actor;
use super::slots::Slot;
use super::state::{RestartReason, Worker, WorkerState};
use super::{ReloadRequest, Rolled, bind_options, front_config, launch_for, queue_limits};
use crate::listeners::{self, Listener};
use crate::supervisor::lifecycle::Progress;
use crate::web::front::{self, FrontConfig, WarmUpAnswer};
use crate::web::worker::{self, Launch, StartError, WorkerId};

/// The pool could not be rolled to a new generation; the old one serves (it was never touched, or
/// it was rolled back). The message is one line; `detail` holds the app's traceback or the
/// warm-up response.
#[derive(Debug, Clone)]
pub struct PoolReloadError {
    message: String,
    detail: Option<String>,
}

impl PoolReloadError {
    pub(super) fn new(message: impl Into<String>) -> PoolReloadError {
        PoolReloadError {
            message: message.into(),
            detail: None,
        }
    }

    /// The error of a worker of the new generation that never became ready: the traceback goes
    /// into the detail, the message stays one line.
    fn start_failed(what: &str, error: &StartError) -> PoolReloadError {
        match error {
            StartError::Import(traceback) => PoolReloadError {
                message: format!("{what}: the app failed to import"),
                detail: Some(traceback.clone()),
            },
            other => PoolReloadError::new(format!("{what}: {other}")),
        }
    }

    /// The app's traceback or the warm-up response, when there is one.
    pub fn detail(&self) -> Option<String> {
        self.detail.clone()
    }
}

impl std::fmt::Display for PoolReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PoolReloadError {}

/// Everything one generation runs with: kept for the old generation during a roll, so that a
/// rollback refills slots exactly as they were.
#[derive(Debug, Clone)]
struct Release {
    generation: u64,
    launch: Arc<Launch>,
    web: WebConfig,
    front: FrontConfig,
}

/// Where a reload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The canary is importing the new release; nothing else has changed.
    Canary(WorkerId),
    /// The canary is ready and answering the warm-up request.
    WarmUp(WorkerId),
    /// The new release serves; slots are rolled to it one at a time.
    Rolling,
    /// A new worker failed; slots are rolled back to the old release one at a time.
    RollingBack,
}

/// A reload in progress.
pub(super) struct Rollout {
    phase: Phase,
    old: Release,
    new: Release,
    /// Listeners bound for the addresses the new config adds; they accept once the roll succeeds
    /// and are closed if it fails.
    added: Vec<(Listen, Listener)>,
    /// Addresses the new config drops; they stop accepting once the roll succeeds.
    removed: Vec<Listen>,
    started: Instant,
    canary_started: Instant,
    canary_took: Duration,
    /// Slots that got a worker of the generation rolled to.
    replaced: usize,
    /// The number of workers before the reload (`[web].workers` changed by `TTIN`/`TTOU`): what
    /// a rollback restores.
    old_slots: usize,
    progress: Progress,
    pub(super) reply: oneshot::Sender<Result<Rolled, PoolReloadError>>,
    /// Why the roll is being turned around.
    failure: Option<PoolReloadError>,
}

impl Rollout {
    fn say(&self, line: String) {
        tracing::info!("reload: {line}");
        let _ = self.progress.send(line);
    }

    /// The launches of both generations of the roll, old first.
    pub(super) fn launches(&self) -> [(u64, Arc<Launch>); 2] {
        [
            (self.old.generation, Arc::clone(&self.old.launch)),
            (self.new.generation, Arc::clone(&self.new.launch)),
        ]
    }

    pub(super) fn describe(&self) -> String {
        match self.phase {
            Phase::Canary(_) => format!("generation {}: canary starting", self.new.generation),
            Phase::WarmUp(_) => format!("generation {}: canary warming up", self.new.generation),
            Phase::Rolling => format!(
                "generation {}: {}/{} workers replaced",
                self.new.generation,
                self.replaced,
                self.new.web.workers.get()
            ),
            Phase::RollingBack => format!("rolling back to generation {}", self.old.generation),
        }
    }
}

/// The reload state machine (see the module doc).
impl Actor {
    /// True while the roll itself refills slots: crash restarts and timeout replacements leave
    /// the slot to it, so that the two never start two workers for one slot.
    pub(super) fn roll_refills(&self) -> bool {
        matches!(
            self.rollout.as_ref().map(|rollout| rollout.phase),
            Some(Phase::Rolling | Phase::RollingBack)
        )
    }

    /// The `[web]` settings workers of `generation` run with.
    pub(super) fn web_of(&self, generation: u64) -> &WebConfig {
        match &self.rollout {
            Some(rollout) if rollout.new.generation == generation => &rollout.new.web,
            Some(rollout) if rollout.old.generation == generation => &rollout.old.web,
            _ => &self.web,
        }
    }

    /// Makes `release` the one new workers, new requests' settings and the queue follow.
    fn apply_release(&mut self, release: &Release) {
        self.generation = release.generation;
        self.launch = Arc::clone(&release.launch);
        self.web = release.web.clone();
        if let Some(front) = &self.front {
            front.front().set_config(release.front.clone());
        }
        let (queue_size, queue_timeout) = queue_limits(&release.web);
        self.dispatcher.set_limits(queue_size, queue_timeout);
    }

    /// Checks the new config, binds the added addresses and starts the canary; nothing else
    /// changes until the canary is ready and warmed up.
    pub(super) fn begin_reload(&mut self, request: ReloadRequest) {
        let ReloadRequest {
            app,
            web,
            base_dir,
            generation,
            progress,
            reply,
        } = request;
        if self.rollout.is_some() {
            let _ = reply.send(Err(PoolReloadError::new(
                "a reload of the web pool is already running",
            )));
            return;
        }
        if generation <= self.generation {
            let _ = reply.send(Err(PoolReloadError::new(format!(
                "generation {generation} is not newer than the serving generation {}",
                self.generation
            ))));
            return;
        }
        let Some(front) = &self.front else {
            let _ = reply.send(Err(PoolReloadError::new("the web pool is stopping")));
            return;
        };
        let prepared = launch_for(&app, &web, &base_dir);
        let (launch, config) = match prepared {
            Ok(launch) => (launch, front_config(&web)),
            Err(message) => {
                let _ = reply.send(Err(PoolReloadError::new(format!(
                    "the new config cannot run the web pool: {message}; nothing changed"
                ))));
                return;
            }
        };
        let serving = front.configured();
        let adding: Vec<Listen> = web
            .listen
            .iter()
            .filter(|address| !serving.contains(address))
            .cloned()
            .collect();
        let removed: Vec<Listen> = serving
            .iter()
            .filter(|address| !web.listen.contains(address))
            .cloned()
            .collect();
        let added = match listeners::bind_all(&adding, &bind_options(&web)) {
            Ok(listeners) => adding.into_iter().zip(listeners).collect(),
            Err(error) => {
                let _ = reply.send(Err(PoolReloadError::new(format!(
                    "{error}; nothing changed"
                ))));
                return;
            }
        };
        let old = Release {
            generation: self.generation,
            launch: Arc::clone(&self.launch),
            web: self.web.clone(),
            front: (*front.front().config()).clone(),
        };
        let new = Release {
            generation,
            launch: Arc::new(launch),
            web,
            front: config,
        };
        let canary = self.spawn_worker_as(0, None, generation, Arc::clone(&new.launch));
        let now = Instant::now();
        let rollout = Rollout {
            phase: Phase::Canary(canary),
            old,
            new,
            added,
            removed,
            started: now,
            canary_started: now,
            canary_took: Duration::ZERO,
            replaced: 0,
            old_slots: self.slots.len(),
            progress,
            reply,
            failure: None,
        };
        rollout.say(format!(
            "generation {} → {generation}: starting a canary worker",
            rollout.old.generation
        ));
        self.rollout = Some(rollout);
    }

    /// A worker became ready: the canary moves on to its warm-up, a rolled one is counted.
    pub(super) fn rollout_worker_ready(
        &mut self,
        id: WorkerId,
        pid: u32,
        slot: usize,
        generation: u64,
    ) {
        let Some(rollout) = self.rollout.as_mut() else {
            return;
        };
        match rollout.phase {
            Phase::Canary(canary) if canary == id => {
                rollout.canary_took = rollout.canary_started.elapsed();
                rollout.say(format!(
                    "generation {} → {}: canary ready (pid {pid}, {:.1} s)",
                    rollout.old.generation,
                    rollout.new.generation,
                    rollout.canary_took.as_secs_f64()
                ));
                match rollout.new.web.warmup.clone() {
                    Some(warm_up) => {
                        rollout.phase = Phase::WarmUp(id);
                        let budget = rollout
                            .new
                            .web
                            .reload_timeout
                            .get()
                            .saturating_sub(rollout.canary_took)
                            .max(Duration::from_secs(1));
                        self.start_warm_up(id, warm_up, budget);
                    }
                    None => self.promote(),
                }
            }
            Phase::Rolling if generation == rollout.new.generation => {
                rollout.replaced += 1;
                rollout.say(format!(
                    "{}/{} workers replaced",
                    rollout.replaced,
                    rollout.new.web.workers.get()
                ));
            }
            Phase::RollingBack if generation == rollout.old.generation => {
                rollout.say(format!(
                    "worker {slot} is back on generation {}",
                    rollout.old.generation
                ));
            }
            _ => {}
        }
    }

    /// Requests `[web].warmup` through the canary in a task of its own; the answer comes back
    /// through `warm_ups` so the actor keeps serving meanwhile.
    fn start_warm_up(&mut self, canary: WorkerId, warm_up: WarmUp, budget: Duration) {
        let (Some(front), Some(lease)) = (
            self.front.as_ref().map(|front| Arc::clone(front.front())),
            self.dispatcher.acquire_from(canary),
        ) else {
            self.fail_rollout(PoolReloadError::new(
                "the canary has no free request slot for the warm-up",
            ));
            return;
        };
        let answers = self.warm_ups_tx.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(
                budget + Duration::from_secs(1),
                front::warm_up(&front, lease, &warm_up, budget),
            )
            .await
            .unwrap_or_else(|_| Err(format!("GET {warm_up} got no answer within {budget:?}")));
            let _ = answers.send((canary, answer));
        });
    }

    pub(super) fn on_warm_up(&mut self, canary: WorkerId, answer: Result<WarmUpAnswer, String>) {
        let Some(rollout) = self.rollout.as_ref() else {
            return;
        };
        if rollout.phase != Phase::WarmUp(canary) {
            return;
        }
        let generation = rollout.new.generation;
        // The URL, host included: a refusal is often the app's host check.
        let warm_up = rollout
            .new
            .web
            .warmup
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        match answer {
            Ok(answer) if (200..400).contains(&answer.status) => {
                rollout.say(format!(
                    "warm-up GET {warm_up} answered {} through the canary",
                    answer.status
                ));
                self.promote();
            }
            Ok(answer) => self.fail_rollout(PoolReloadError {
                message: format!(
                    "the canary of generation {generation} answered the warm-up GET {warm_up} with {} (2xx or 3xx needed)",
                    answer.status
                ),
                detail: Some(format!(
                    "warm-up response {}:\n{}",
                    answer.status, answer.body_head
                )),
            }),
            Err(message) => self.fail_rollout(PoolReloadError::new(format!(
                "the canary of generation {generation} failed its warm-up: {message}"
            ))),
        }
    }

    /// The canary passed: the new release serves from now on. The canary takes its slot (the old
    /// worker there drains) and the roll walks the other slots.
    fn promote(&mut self) {
        let Some(rollout) = self.rollout.as_mut() else {
            return;
        };
        let (Phase::Canary(canary) | Phase::WarmUp(canary)) = rollout.phase else {
            return;
        };
        rollout.phase = Phase::Rolling;
        rollout.replaced = 1;
        rollout.say(format!(
            "1/{} workers replaced",
            rollout.new.web.workers.get()
        ));
        let new = rollout.new.clone();
        self.apply_release(&new);
        self.dispatcher.set_generation(new.generation);
        let canary_slot = self.workers.get(&canary).map_or(0, |worker| worker.slot);
        let replaced: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(id, worker)| {
                **id != canary
                    && worker.slot == canary_slot
                    && worker.generation != new.generation
                    && matches!(worker.state(), WorkerState::Ready | WorkerState::Starting)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in replaced {
            RestartReason::Reload.count(&self.metrics);
            self.retire(id);
        }
        // Recycles and crash restarts of the old release in progress give way: the roll
        // replaces those slots with the new release anyway.
        let starting_old: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, worker)| {
                worker.generation != new.generation && worker.state() == WorkerState::Starting
            })
            .map(|(id, _)| *id)
            .collect();
        for id in starting_old {
            self.retire(id);
        }
        self.recycling = None;
        self.recycle_queue.clear();
        for slot in &mut self.slots {
            slot.restart_at = None;
        }
        self.publish_states();
        self.advance_rollout();
    }

    /// One step of the roll (or the roll back): while no worker of the target generation is
    /// starting, start one for the first slot that has none ready, replacing the slot's old
    /// worker once it is ready. When every slot serves the target generation, the leftovers
    /// (other generations, slots beyond `[web].workers`) drain and the reload ends.
    pub(super) fn advance_rollout(&mut self) {
        let wanted = match self.rollout.as_ref() {
            Some(rollout) if rollout.phase == Phase::Rolling => rollout.new.web.workers.get(),
            Some(rollout) if rollout.phase == Phase::RollingBack => rollout.old_slots.max(1),
            _ => return,
        };
        let target = self.generation;
        if self
            .workers
            .values()
            .any(|worker| worker.generation == target && worker.state() == WorkerState::Starting)
        {
            return;
        }
        for slot in 0..wanted {
            let served = self.workers.values().any(|worker| {
                worker.slot == slot
                    && worker.generation == target
                    && worker.state() == WorkerState::Ready
            });
            if served {
                continue;
            }
            while self.slots.len() <= slot {
                self.slots.push(Slot::default());
            }
            self.slots[slot].restart_at = None;
            let old = self
                .workers
                .iter()
                .find(|(_, worker)| {
                    worker.slot == slot
                        && worker.generation != target
                        && worker.state() == WorkerState::Ready
                })
                .map(|(id, _)| *id);
            self.spawn_worker(slot, old.map(|id| (id, RestartReason::Reload)));
            return;
        }
        let leftovers: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, worker)| {
                matches!(worker.state(), WorkerState::Ready | WorkerState::Starting)
                    && (worker.slot >= wanted || worker.generation != target)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in leftovers {
            RestartReason::Reload.count(&self.metrics);
            self.retire(id);
        }
        self.slots.truncate(wanted);
        self.finish_rollout();
    }

    /// The roll (or the roll back) is complete: listeners change on success, and the caller
    /// gets its answer.
    fn finish_rollout(&mut self) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        self.dispatcher.set_generation(self.generation);
        let Rollout {
            old,
            new,
            added,
            removed,
            started,
            canary_took,
            progress,
            reply,
            failure,
            ..
        } = rollout;
        let result = match failure {
            None => {
                let mut summary = format!(
                    "web pool on generation {}: {} workers replaced in {:.1} s (canary {:.1} s)",
                    new.generation,
                    new.web.workers.get(),
                    started.elapsed().as_secs_f64(),
                    canary_took.as_secs_f64()
                );
                let mut closing = Vec::new();
                if let Some(front) = self.front.as_mut() {
                    for (configured, listener) in added {
                        summary.push_str(&format!("; listening on {}", listener.address()));
                        front.add(configured, listener);
                    }
                    for configured in &removed {
                        closing.extend(front.remove(configured));
                        summary.push_str(&format!("; stopped listening on {configured}"));
                    }
                    self.listen = front.addresses();
                }
                tracing::info!("reload: {summary}");
                Ok(Rolled {
                    summary,
                    listen: self.listen.clone(),
                    closing,
                })
            }
            Some(error) => {
                let line = format!(
                    "rolled back: every worker is on generation {}",
                    old.generation
                );
                tracing::warn!("reload: {line}");
                let _ = progress.send(line);
                Err(error)
            }
        };
        let _ = reply.send(result);
        self.publish_states();
        self.pump_recycling();
    }

    /// Something of the new release failed. Before the switch only the canary goes; after it
    /// the roll turns around and refills slots from the old release.
    fn fail_rollout(&mut self, error: PoolReloadError) {
        let Some(rollout) = self.rollout.as_mut() else {
            return;
        };
        match rollout.phase {
            Phase::Canary(canary) | Phase::WarmUp(canary) => {
                if let Some(worker) = self.workers.get_mut(&canary) {
                    worker.set_state(WorkerState::Killing);
                    let _ = worker.commands.send(worker::Command::Kill);
                }
                self.dispatcher.remove(canary);
                let Some(rollout) = self.rollout.take() else {
                    return;
                };
                rollout.say(format!(
                    "{error}; generation {} keeps serving, nothing changed",
                    rollout.old.generation
                ));
                let _ = rollout.reply.send(Err(error));
                self.publish_states();
                self.pump_recycling();
            }
            Phase::Rolling => {
                let old = rollout.old.clone();
                let new_generation = rollout.new.generation;
                rollout.say(format!(
                    "{error}; rolling back to generation {} ({} of {} workers had been replaced)",
                    old.generation,
                    rollout.replaced,
                    rollout.new.web.workers.get()
                ));
                rollout.failure = Some(PoolReloadError {
                    message: format!(
                        "{}; rolled back to generation {}",
                        error.message, old.generation
                    ),
                    detail: error.detail,
                });
                rollout.phase = Phase::RollingBack;
                self.apply_release(&old);
                let starting_new: Vec<WorkerId> = self
                    .workers
                    .iter()
                    .filter(|(_, worker)| {
                        worker.generation == new_generation
                            && worker.state() == WorkerState::Starting
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in starting_new {
                    self.retire(id);
                }
                self.advance_rollout();
            }
            Phase::RollingBack => {
                // The old release does not start any more either (its files changed in place):
                // stop rolling and leave the empty slots to the crash restarts.
                let first = rollout.failure.take();
                let Some(rollout) = self.rollout.take() else {
                    return;
                };
                let message = format!(
                    "{}; rolling back failed too: {error}",
                    first
                        .as_ref()
                        .map_or("the reload failed", |first| first.message.as_str())
                );
                rollout.say(message.clone());
                let empty: Vec<usize> = (0..self.slots.len())
                    .filter(|slot| {
                        !self.workers.values().any(|worker| {
                            worker.slot == *slot
                                && matches!(
                                    worker.state(),
                                    WorkerState::Ready | WorkerState::Starting
                                )
                        })
                    })
                    .collect();
                for slot in empty {
                    self.schedule_restart(slot);
                }
                let _ = rollout.reply.send(Err(PoolReloadError {
                    message,
                    detail: first.and_then(|first| first.detail).or(error.detail),
                }));
                self.publish_states();
            }
        }
    }

    /// A worker that never became ready: true when it was the reload's to handle.
    pub(super) fn rollout_worker_failed(
        &mut self,
        id: WorkerId,
        worker: &Worker,
        error: &StartError,
    ) -> bool {
        let Some(rollout) = self.rollout.as_ref() else {
            return false;
        };
        let what = match rollout.phase {
            Phase::Canary(canary) if canary == id => {
                format!("the canary worker of generation {}", worker.generation)
            }
            Phase::Rolling | Phase::RollingBack
                if worker.generation == self.generation && worker.state().exit_is_a_crash() =>
            {
                format!(
                    "web worker {} of generation {}",
                    worker.slot, worker.generation
                )
            }
            _ => return false,
        };
        tracing::error!(worker = worker.slot, "{what} failed to start: {error}");
        if let Some(slot) = self.slots.get_mut(worker.slot) {
            slot.last_error = Some(error.to_string());
        }
        self.fail_rollout(PoolReloadError::start_failed(&what, error));
        true
    }

    /// A ready worker exited unexpectedly: true when it was the reload's to handle (the canary,
    /// or a worker of the generation being rolled to).
    pub(super) fn rollout_worker_exited(
        &mut self,
        id: WorkerId,
        worker: &Worker,
        how: &str,
    ) -> bool {
        let Some(rollout) = self.rollout.as_ref() else {
            return false;
        };
        let what = match rollout.phase {
            Phase::Canary(canary) | Phase::WarmUp(canary) if canary == id => {
                format!("the canary worker of generation {}", worker.generation)
            }
            Phase::Rolling if worker.generation == rollout.new.generation => format!(
                "web worker {} of generation {}",
                worker.slot, worker.generation
            ),
            _ => return false,
        };
        let message = format!(
            "{what} (pid {}) exited unexpectedly: {how}",
            worker.pid.unwrap_or_default()
        );
        tracing::error!(worker = worker.slot, "{message}");
        RestartReason::Crash.count(&self.metrics);
        if let Some(slot) = self.slots.get_mut(worker.slot) {
            slot.last_error = Some(message.clone());
        }
        self.fail_rollout(PoolReloadError::new(message));
        true
    }
}
