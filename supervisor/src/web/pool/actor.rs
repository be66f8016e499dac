//! The web pool actor: owns the set of workers and decides their lives — start the pool, replace a
//! worker that crashed (with backoff and per-slot crash-loop protection) or timed out, recycle
//! workers by `max_requests` and `max_rss` one at a time with the replacement ready first, add and
//! remove workers (`TTIN`/`TTOU`), stop gracefully — and reports `status`. The main loop drives it
//! through a `PoolHandle`; requests never pass through it (front → dispatcher → worker slot).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_conf::WebConfig;
use tokio::sync::mpsc;

use super::rollout::{PoolReloadError, Rollout};
use super::slots::{CRASH_LOOP, RSS_INTERVAL, Slot, request_limit};
use super::state::{RestartReason, TemplateStatus, Worker, WorkerState, WorkerStatus};
use super::{Command, HANDOVER_LINGER, PoolError, PoolStatus};
use crate::metrics::Metrics;
use crate::process::procfs;
use crate::supervisor::lifecycle::StopMode;
use crate::web::dispatch::{Dispatcher, Notice};
use crate::web::front::{FrontHandle, WarmUpAnswer};
use crate::web::worker::{self, Event, Launch, StartError, WorkerId};

pub(super) struct Actor {
    pub(super) launch: Arc<Launch>,
    pub(super) web: WebConfig,
    pub(super) dispatcher: Arc<Dispatcher>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) front: Option<FrontHandle>,
    pub(super) listen: Vec<String>,
    pub(super) generation: u64,
    pub(super) next_id: WorkerId,
    pub(super) workers: BTreeMap<WorkerId, Worker>,
    pub(super) slots: Vec<Slot>,
    pub(super) recycle_queue: VecDeque<(WorkerId, RestartReason)>,
    pub(super) recycling: Option<WorkerId>,
    pub(super) events_tx: mpsc::UnboundedSender<Event>,
    pub(super) events: mpsc::UnboundedReceiver<Event>,
    pub(super) notices: mpsc::UnboundedReceiver<Notice>,
    pub(super) stack_context: BTreeMap<WorkerId, String>,
    pub(super) rollout: Option<Rollout>,
    pub(super) warm_ups_tx: mpsc::UnboundedSender<(WorkerId, Result<WarmUpAnswer, String>)>,
    pub(super) warm_ups: mpsc::UnboundedReceiver<(WorkerId, Result<WarmUpAnswer, String>)>,
}

impl Actor {
    pub(super) fn spawn_worker(
        &mut self,
        slot: usize,
        replaces: Option<(WorkerId, RestartReason)>,
    ) -> WorkerId {
        let launch = Arc::clone(&self.launch);
        self.spawn_worker_as(slot, replaces, self.generation, launch)
    }

    /// Starts a worker of `generation` run as `launch` (the canary is of a later generation than
    /// the pool's).
    pub(super) fn spawn_worker_as(
        &mut self,
        slot: usize,
        replaces: Option<(WorkerId, RestartReason)>,
        generation: u64,
        launch: Arc<Launch>,
    ) -> WorkerId {
        let id = self.next_id;
        self.next_id += 1;
        let label = format!("web worker {slot}");
        let commands = worker::spawn(id, label, launch, self.events_tx.clone());
        self.workers
            .insert(id, Worker::starting(slot, generation, commands, replaces));
        self.publish_states();
        id
    }

    /// Start-up: every worker ready, or the first failure (after stopping the others).
    pub(super) async fn wait_all_ready(&mut self) -> Result<(), PoolError> {
        while self
            .workers
            .values()
            .any(|worker| worker.state() == WorkerState::Starting)
        {
            let Some(event) = self.events.recv().await else {
                return Err(PoolError::Config("the worker tasks stopped".to_owned()));
            };
            match event {
                Event::Ready { id, pid, slots } => self.on_ready(id, pid, slots),
                Event::Failed { id, error } => {
                    let slot = self.workers.get(&id).map_or(0, |worker| worker.slot);
                    for worker in self.workers.values() {
                        let _ = worker.commands.send(worker::Command::Kill);
                    }
                    // Wait for the others to be gone so that no process outlives a failed start.
                    let alive = self.workers.len().saturating_sub(1);
                    let mut ended = 0;
                    while ended < alive {
                        match tokio::time::timeout(Duration::from_secs(5), self.events.recv()).await
                        {
                            Ok(Some(Event::Exited { .. } | Event::Failed { .. })) => ended += 1,
                            Ok(Some(Event::Ready { id, .. })) => {
                                if let Some(worker) = self.workers.get(&id) {
                                    let _ = worker.commands.send(worker::Command::Kill);
                                }
                            }
                            Ok(Some(Event::Stack { .. })) => {}
                            Ok(None) | Err(_) => break,
                        }
                    }
                    return Err(match error {
                        StartError::Import(traceback) => PoolError::Import { slot, traceback },
                        other => PoolError::Start {
                            slot,
                            message: other.to_string(),
                        },
                    });
                }
                Event::Stack { .. } | Event::Exited { .. } => {}
            }
        }
        Ok(())
    }

    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut rss_tick = tokio::time::interval(RSS_INTERVAL);
        rss_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_restart = self.slots.iter().filter_map(|slot| slot.restart_at).min();
            let restart_timer = async {
                match next_restart {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Status(reply)) => { let _ = reply.send(self.status()); }
                    Some(Command::Scale(delta)) => self.scale(delta),
                    Some(Command::Reload(request)) => self.begin_reload(*request),
                    Some(Command::Shutdown(mode, reply)) => {
                        if let Some(rollout) = self.rollout.take() {
                            let _ = rollout.reply.send(Err(PoolReloadError::new(
                                "the pool is stopping; the reload was abandoned",
                            )));
                        }
                        self.shutdown(mode).await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(Command::DuplicateListeners(reply)) => {
                        let mut duplicates = crate::listeners::FdTable::default();
                        let duplicated = match &self.front {
                            Some(front) => front.duplicate_into(&mut duplicates),
                            None => Ok(()),
                        };
                        let duplicates = duplicated.map(|()| duplicates);
                        let _ = reply.send(duplicates);
                    }
                    Some(Command::HandOver(reply)) => {
                        if let Some(rollout) = self.rollout.take() {
                            let _ = rollout.reply.send(Err(PoolReloadError::new(
                                "the pool is handed over; the reload was abandoned",
                            )));
                        }
                        if let Some(front) = &mut self.front {
                            front
                                .hand_over(HANDOVER_LINGER.min(self.web.graceful_timeout.get()))
                                .await;
                        }
                        self.shutdown(StopMode::Graceful).await;
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        self.shutdown(StopMode::Fast).await;
                        return;
                    }
                },
                Some(event) = self.events.recv() => {
                    self.on_event(event);
                    self.advance_rollout();
                }
                Some(notice) = self.notices.recv() => self.on_notice(notice),
                Some((id, answer)) = self.warm_ups.recv() => self.on_warm_up(id, answer),
                _ = rss_tick.tick() => self.sample().await,
                () = restart_timer => self.restart_due(),
            }
        }
    }

    fn on_ready(&mut self, id: WorkerId, pid: u32, slots: Vec<worker::RequestSlot>) {
        let Some(generation) = self.workers.get(&id).map(|worker| worker.generation) else {
            return;
        };
        let web = self.web_of(generation);
        let limit = request_limit(web.max_requests, web.max_requests_jitter);
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.pid = Some(pid);
        if worker.state() != WorkerState::Starting {
            // Retired or killed while it was importing, and the kill is on its way: it must
            // neither take requests nor stand in for the worker it was to replace.
            tracing::debug!(
                worker = worker.slot,
                pid,
                "web worker ready while being killed; ignored"
            );
            return;
        }
        worker.set_state(WorkerState::Ready);
        worker.ready_at = Some(Instant::now());
        let (slot, generation, replaces) = (worker.slot, worker.generation, worker.replaces.take());
        tracing::info!(worker = slot, pid, generation, "web worker ready");
        self.dispatcher
            .add_worker(id, slot, generation, slots, limit);
        if let Some((old, reason)) = replaces {
            reason.count(&self.metrics);
            self.retire(old);
        }
        self.publish_states();
        self.rollout_worker_ready(id, pid, slot, generation);
    }

    /// Takes a worker out of service for good: a ready one stops getting requests and exits by
    /// itself once its last request ends, a starting one is killed, and the slot of one being
    /// killed after a timeout is no longer refilled for it.
    pub(super) fn retire(&mut self, id: WorkerId) {
        let grace = self.web.graceful_timeout.get() + self.web.timeout.get();
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match worker.state() {
            WorkerState::Starting => {
                let _ = worker.commands.send(worker::Command::Kill);
                worker.set_state(WorkerState::Killing);
            }
            WorkerState::Ready => {
                worker.set_state(WorkerState::Draining);
                worker.drain_deadline = Some(Instant::now() + grace);
                self.dispatcher.retire(id);
            }
            WorkerState::Restarting => {
                worker.set_state(WorkerState::Killing);
            }
            WorkerState::Draining
            | WorkerState::Killing
            | WorkerState::Backoff
            | WorkerState::CrashLoop => {}
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { id, pid, slots } => self.on_ready(id, pid, slots),
            Event::Failed { id, error } => {
                let Some(worker) = self.workers.remove(&id) else {
                    return;
                };
                if self.rollout_worker_failed(id, &worker, &error) {
                    self.publish_states();
                    return;
                }
                let text = error.to_string();
                tracing::error!(worker = worker.slot, "web worker failed to start: {text}");
                if let Some(slot) = self.slots.get_mut(worker.slot) {
                    slot.last_error = Some(text);
                }
                if let Some((old, _)) = worker.replaces {
                    // The old worker keeps serving; a later recycle trigger tries again.
                    if self.recycling == Some(old) {
                        self.recycling = None;
                    }
                    self.pump_recycling();
                } else if worker.state().exit_is_a_crash() {
                    RestartReason::Crash.count(&self.metrics);
                    if !self.roll_refills() {
                        self.schedule_restart(worker.slot);
                    }
                }
                self.publish_states();
            }
            Event::Stack { id, text } => {
                let context = self.stack_context.remove(&id).unwrap_or_default();
                if let Some(slot) = self
                    .workers
                    .get(&id)
                    .and_then(|worker| self.slots.get_mut(worker.slot))
                {
                    slot.last_error = Some(format!("{context}\nPython stack:\n{text}"));
                }
            }
            Event::Exited { id, how } => self.on_exit(id, &how),
        }
    }

    fn on_exit(&mut self, id: WorkerId, how: &str) {
        self.dispatcher.remove(id);
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        if self.recycling == Some(id) {
            self.recycling = None;
        }
        if worker.state().exit_is_a_crash() && self.rollout_worker_exited(id, &worker, how) {
            self.pump_recycling();
            self.publish_states();
            return;
        }
        match worker.state() {
            WorkerState::Draining
            | WorkerState::Killing
            | WorkerState::Backoff
            | WorkerState::CrashLoop => {
                tracing::info!(
                    worker = worker.slot,
                    pid = worker.pid,
                    "web worker stopped ({how})"
                );
            }
            WorkerState::Restarting => {
                if worker.slot < self.slots.len()
                    && !self.roll_refills()
                    && !self.slot_has_successor(worker.slot, id)
                {
                    self.spawn_worker(worker.slot, None);
                }
            }
            WorkerState::Starting | WorkerState::Ready => {
                let message = format!(
                    "web worker {} (pid {}) exited unexpectedly: {how}",
                    worker.slot,
                    worker.pid.unwrap_or_default()
                );
                tracing::error!("{message}");
                RestartReason::Crash.count(&self.metrics);
                if let Some(slot) = self.slots.get_mut(worker.slot) {
                    slot.last_error = Some(message);
                }
                // A replacement already on its way takes over the slot instead of a restart.
                let successor = self
                    .workers
                    .values_mut()
                    .find(|other| other.replaces.is_some_and(|(old, _)| old == id));
                if let Some(successor) = successor {
                    successor.replaces = None;
                } else if worker.slot < self.slots.len() && !self.roll_refills() {
                    self.schedule_restart(worker.slot);
                }
            }
        }
        self.metrics
            .worker_rss_bytes
            .with_label_values(&[&worker.slot.to_string()])
            .set(0);
        self.metrics
            .worker_pss_bytes
            .with_label_values(&[&worker.slot.to_string()])
            .set(0);
        self.pump_recycling();
        self.publish_states();
    }

    fn slot_has_successor(&self, slot: usize, except: WorkerId) -> bool {
        self.workers.iter().any(|(id, worker)| {
            *id != except
                && worker.slot == slot
                && matches!(worker.state(), WorkerState::Starting | WorkerState::Ready)
        })
    }

    fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::RecycleWanted(id) => {
                self.recycle_queue
                    .push_back((id, RestartReason::MaxRequests));
                self.pump_recycling();
            }
            Notice::TimedOut {
                worker: id,
                context,
            } => {
                let Some(worker) = self.workers.get_mut(&id) else {
                    return;
                };
                self.dispatcher.retire(id);
                // One already being killed for good stays so: its slot is not refilled for it.
                if worker.state() != WorkerState::Killing {
                    worker.set_state(WorkerState::Restarting);
                }
                RestartReason::Timeout.count(&self.metrics);
                if let Some(slot) = self.slots.get_mut(worker.slot) {
                    slot.last_error = Some(context.clone());
                }
                self.stack_context.insert(id, context.clone());
                let _ = worker
                    .commands
                    .send(worker::Command::KillWithStack { context });
                self.publish_states();
            }
            Notice::Broken { worker: id, reason } => {
                let Some(worker) = self.workers.get_mut(&id) else {
                    return;
                };
                tracing::error!(worker = worker.slot, "web worker replaced: {reason}");
                self.dispatcher.remove(id);
                if worker.state() != WorkerState::Killing {
                    worker.set_state(WorkerState::Restarting);
                }
                RestartReason::Crash.count(&self.metrics);
                let _ = worker.commands.send(worker::Command::Kill);
                self.publish_states();
            }
        }
    }

    /// Starts the next queued recycle when none is running: the replacement is spawned first and
    /// the old worker retired only once the replacement is ready, so capacity never drops.
    pub(super) fn pump_recycling(&mut self) {
        // A reload replaces every worker anyway; recycling meanwhile would fight over slots.
        if self.recycling.is_some() || self.rollout.is_some() {
            return;
        }
        while let Some((old, reason)) = self.recycle_queue.pop_front() {
            let Some(worker) = self.workers.get(&old) else {
                continue;
            };
            if worker.state() != WorkerState::Ready || worker.slot >= self.slots.len() {
                continue;
            }
            tracing::info!(
                worker = worker.slot,
                pid = worker.pid,
                "recycling web worker ({})",
                reason.label()
            );
            let slot = worker.slot;
            self.recycling = Some(old);
            self.spawn_worker(slot, Some((old, reason)));
            return;
        }
    }

    fn scale(&mut self, delta: i32) {
        if self.rollout.is_some() {
            tracing::warn!(
                "a reload is rolling the web pool; scaling by {delta} ignored (set [web].workers and reload instead)"
            );
            return;
        }
        if delta > 0 {
            for _ in 0..delta {
                let slot = self.slots.len();
                self.slots.push(Slot::default());
                RestartReason::Scale.count(&self.metrics);
                self.spawn_worker(slot, None);
            }
        } else {
            for _ in 0..delta.unsigned_abs() {
                if self.slots.len() <= 1 {
                    tracing::warn!("the web pool keeps at least one worker");
                    break;
                }
                self.slots.pop();
                let slot = self.slots.len();
                let ids: Vec<WorkerId> = self
                    .workers
                    .iter()
                    .filter(|(_, worker)| worker.slot == slot)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    RestartReason::Scale.count(&self.metrics);
                    self.retire(id);
                }
            }
        }
        tracing::info!("web pool scaled to {} workers", self.slots.len());
        self.publish_states();
    }

    fn status(&mut self) -> PoolStatus {
        for load in self.dispatcher.loads() {
            if let Some(worker) = self.workers.get_mut(&load.id) {
                worker.served = load.served;
                worker.in_flight = load.busy;
            }
        }
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .values()
            .map(|worker| WorkerStatus {
                slot: worker.slot,
                pid: worker.pid,
                generation: worker.generation,
                state: worker.state(),
                requests: worker.served,
                in_flight: worker.in_flight,
                rss_bytes: worker.rss,
                pss_bytes: worker.pss,
                last_error: self
                    .slots
                    .get(worker.slot)
                    .and_then(|slot| slot.last_error.clone()),
            })
            .collect();
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.restart_at.is_some() {
                workers.push(WorkerStatus {
                    slot: index,
                    pid: None,
                    generation: self.generation,
                    state: if slot.crashes.len() >= CRASH_LOOP {
                        WorkerState::CrashLoop
                    } else {
                        WorkerState::Backoff
                    },
                    requests: 0,
                    in_flight: 0,
                    rss_bytes: 0,
                    pss_bytes: 0,
                    last_error: slot.last_error.clone(),
                });
            }
        }
        workers.sort_by_key(|worker| worker.slot);
        PoolStatus {
            listen: self.listen.clone(),
            generation: self.generation,
            reloading: self.rollout.as_ref().map(Rollout::describe),
            workers_wanted: self.slots.len(),
            workers,
            templates: self.templates(),
        }
    }

    /// The running templates (`[web] preload`) of the generations the pool knows: the serving
    /// one and, during a reload, the other one of the roll.
    fn templates(&self) -> Vec<TemplateStatus> {
        let mut launches = vec![(self.generation, Arc::clone(&self.launch))];
        launches.extend(self.rollout.iter().flat_map(Rollout::launches));
        let mut templates: Vec<TemplateStatus> = launches
            .into_iter()
            .filter_map(|(generation, launch)| {
                let pid = launch.template_pid()?;
                Some(TemplateStatus {
                    generation,
                    pid,
                    rss_bytes: procfs::rss(pid).unwrap_or(0),
                    pss_bytes: procfs::pss(pid).unwrap_or(0),
                })
            })
            .collect();
        templates.sort_by_key(|template| template.generation);
        templates.dedup_by_key(|template| template.pid);
        templates
    }

    async fn shutdown(&mut self, mode: StopMode) {
        let grace = self.web.graceful_timeout.get();
        let deadline = Instant::now() + grace;
        for slot in &mut self.slots {
            slot.restart_at = None;
        }
        if let Some(front) = self.front.take() {
            match mode {
                StopMode::Graceful => {
                    if !front.shutdown(grace).await {
                        tracing::warn!(
                            "some requests did not finish within graceful_timeout ({grace:?})"
                        );
                    }
                }
                StopMode::Fast => {
                    let _ = front.shutdown(Duration::ZERO).await;
                }
            }
        }
        self.dispatcher.close();
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            match mode {
                StopMode::Graceful => self.retire(id),
                StopMode::Fast => {
                    if let Some(worker) = self.workers.get_mut(&id) {
                        worker.set_state(WorkerState::Killing);
                        let _ = worker.commands.send(worker::Command::Kill);
                    }
                }
            }
        }
        // Idle workers exit as soon as their slots close; give the rest until the deadline.
        let mut killed = mode == StopMode::Fast;
        while !self.workers.is_empty() {
            let wait_until = if killed {
                Instant::now() + Duration::from_secs(5)
            } else {
                deadline
            };
            match tokio::time::timeout_at(wait_until.into(), self.events.recv()).await {
                Ok(Some(Event::Exited { id, .. } | Event::Failed { id, .. })) => {
                    self.dispatcher.remove(id);
                    self.workers.remove(&id);
                }
                Ok(Some(Event::Ready { id, .. })) => {
                    if let Some(worker) = self.workers.get(&id) {
                        let _ = worker.commands.send(worker::Command::Kill);
                    }
                }
                Ok(Some(Event::Stack { .. })) => {}
                Ok(None) => break,
                Err(_) if killed => break,
                Err(_) => {
                    tracing::warn!(
                        "{} web worker(s) still busy after graceful_timeout; killing them",
                        self.workers.len()
                    );
                    for worker in self.workers.values() {
                        let _ = worker.commands.send(worker::Command::Kill);
                    }
                    killed = true;
                }
            }
        }
        self.publish_states();
    }
}
