//! What a worker is in the pool: its state, the actor's record of it, why its process is expected
//! to end, why workers are replaced, what `status` reports about workers and the pool, and the
//! labels of the `workers` gauge and of `sauna_worker_restarts_total`.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

use super::actor::Actor;
use crate::metrics::Metrics;
use crate::web::worker::{self, WorkerId};

/// The state of one worker or worker slot, as `status` shows it. A worker's state also says what
/// its exit means to the pool: a crash while it is `Starting` or `Ready`, an immediate restart of
/// its slot while `Restarting`, nothing while `Draining` or `Killing`. A worker moves between
/// states only through `Worker::set_state`, checked against `ALLOWED_TRANSITIONS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Spawned, importing the app; receives no requests yet.
    Starting,
    /// Serving requests.
    Ready,
    /// Retired (replaced, scaled down, or the pool is stopping): receives no new requests and
    /// exits by itself once its in-flight ones are done; its slot is not refilled for it.
    Draining,
    /// Being killed for good (a fast stop, a failed canary, a drain past its deadline, a worker
    /// retired before it was ready); its slot is not refilled for it.
    Killing,
    /// Being killed because a request timed out or its channel broke; its slot gets a new
    /// worker at once when it is gone (no backoff: the app did not crash). `status` and the
    /// `workers` gauge show it as `killing`.
    #[serde(rename = "killing")]
    Restarting,
    /// No process: the slot waits to restart after a crash. Only an empty slot is in this state,
    /// never a worker.
    Backoff,
    /// No process: the slot crashed repeatedly and restarts at the longest backoff. Only an
    /// empty slot is in this state, never a worker.
    CrashLoop,
}

impl WorkerState {
    /// True when the worker's process ending now would be a crash: nobody asked it to end.
    pub(super) fn exit_is_a_crash(self) -> bool {
        matches!(self, WorkerState::Starting | WorkerState::Ready)
    }

    /// The `state` label of the `workers` gauge (one of [`GAUGE_STATES`]).
    fn gauge_label(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Killing | WorkerState::Restarting => "killing",
            WorkerState::Backoff | WorkerState::CrashLoop => "backoff",
        }
    }
}

/// The `state` label values of the `workers` gauge.
const GAUGE_STATES: [&str; 5] = ["starting", "ready", "draining", "killing", "backoff"];

/// Every legal `(from, to)` pair of a worker's states; anything else is a bug in the actor. A
/// worker is born `Starting` and leaves the pool when its process is gone, from any state.
pub const ALLOWED_TRANSITIONS: &[(WorkerState, WorkerState)] = {
    use WorkerState::*;
    &[
        // It imported the app and reported ready.
        (Starting, Ready),
        // Retired before it was ready (replaced, removed, a failed canary, a fast stop).
        (Starting, Killing),
        // Retired: replaced by a ready successor, scaled down, rolled away, graceful stop.
        (Ready, Draining),
        // The canary failed its warm-up; a fast stop.
        (Ready, Killing),
        // One of its requests timed out, or a channel broke.
        (Ready, Restarting),
        // It overstayed its drain deadline; a fast stop.
        (Draining, Killing),
        // A request it was finishing timed out, or a channel broke.
        (Draining, Restarting),
        // Scaled down, replaced or stopped while being killed: its slot must not be refilled.
        (Restarting, Killing),
    ]
};

/// True when `from → to` is in [`ALLOWED_TRANSITIONS`].
pub fn can_transition(from: WorkerState, to: WorkerState) -> bool {
    ALLOWED_TRANSITIONS.contains(&(from, to))
}

/// One worker (or an empty slot waiting to restart) in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    /// Slot number (the `worker` label of the metrics).
    pub slot: usize,
    /// Process id; none while the slot waits to restart.
    pub pid: Option<u32>,
    /// The generation it was started under.
    pub generation: u64,
    /// Its state.
    pub state: WorkerState,
    /// Requests it completed.
    pub requests: u64,
    /// Requests in progress.
    pub in_flight: usize,
    /// Last sampled resident memory (with `preload`, pages shared with the template included).
    pub rss_bytes: u64,
    /// Last sampled proportional set size: shared pages divided among the processes sharing them.
    pub pss_bytes: u64,
    /// The slot's last error: an import traceback, a crash, a timeout with the Python stack.
    pub last_error: Option<String>,
}

/// What `status` reports about the pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// The addresses being served (with real ports).
    pub listen: Vec<String>,
    /// The generation new workers start under (during a roll, the one being rolled to).
    pub generation: u64,
    /// The step of a reload in progress ("generation 3: canary", "generation 3: 2/4 workers
    /// replaced", "rolling back to generation 2").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reloading: Option<String>,
    /// Configured number of workers (changed by `scale`).
    pub workers_wanted: usize,
    /// Every worker and waiting slot.
    pub workers: Vec<WorkerStatus>,
    /// With `[web] preload`: the running template of each generation (two during a reload).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<TemplateStatus>,
}

/// What `status` reports about a generation's template (`[web] preload`).
#[derive(Debug, Clone, Serialize)]
pub struct TemplateStatus {
    /// The generation it forks workers for.
    pub generation: u64,
    /// Its process id.
    pub pid: u32,
    /// Resident memory.
    pub rss_bytes: u64,
    /// Proportional set size (its share of the pages its workers still share with it).
    pub pss_bytes: u64,
}

/// Why a worker was replaced or added: the `reason` label of `sauna_worker_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// It exited unexpectedly, failed to start, or broke its channel.
    Crash,
    /// A request passed `[web].timeout`; it was killed.
    Timeout,
    /// It served `[web].max_requests` (plus its jitter); recycled.
    MaxRequests,
    /// Its memory stayed above `[web].max_rss`; recycled.
    MaxRss,
    /// A reload rolled its slot to another generation.
    Reload,
    /// `TTIN`/`TTOU` added or removed a worker.
    Scale,
}

impl RestartReason {
    /// The `reason` label of `sauna_worker_restarts_total`, also written in the log.
    pub fn label(self) -> &'static str {
        match self {
            RestartReason::Crash => "crash",
            RestartReason::Timeout => "timeout",
            RestartReason::MaxRequests => "max_requests",
            RestartReason::MaxRss => "max_rss",
            RestartReason::Reload => "reload",
            RestartReason::Scale => "scale",
        }
    }

    /// Counts one restart for this reason in `sauna_worker_restarts_total`.
    pub(super) fn count(self, metrics: &Metrics) {
        metrics
            .worker_restarts_total
            .with_label_values(&[self.label()])
            .inc();
    }
}

/// The actor's record of one worker process.
#[derive(Debug)]
pub(super) struct Worker {
    pub(super) slot: usize,
    pub(super) generation: u64,
    pub(super) pid: Option<u32>,
    /// Changed only by [`Worker::set_state`].
    state: WorkerState,
    pub(super) commands: mpsc::UnboundedSender<worker::Command>,
    /// Replaces this worker once ready.
    pub(super) replaces: Option<(WorkerId, RestartReason)>,
    pub(super) rss: u64,
    pub(super) pss: u64,
    pub(super) rss_over: u32,
    pub(super) served: u64,
    pub(super) in_flight: usize,
    pub(super) ready_at: Option<Instant>,
    pub(super) drain_deadline: Option<Instant>,
}

impl Worker {
    /// A worker just spawned for `slot`: `Starting`, no pid yet.
    pub(super) fn starting(
        slot: usize,
        generation: u64,
        commands: mpsc::UnboundedSender<worker::Command>,
        replaces: Option<(WorkerId, RestartReason)>,
    ) -> Worker {
        Worker {
            slot,
            generation,
            pid: None,
            state: WorkerState::Starting,
            commands,
            replaces,
            rss: 0,
            pss: 0,
            rss_over: 0,
            served: 0,
            in_flight: 0,
            ready_at: None,
            drain_deadline: None,
        }
    }

    /// Where the worker is in its life.
    pub(super) fn state(&self) -> WorkerState {
        self.state
    }

    /// Moves the worker to `to` when [`ALLOWED_TRANSITIONS`] has the pair, and says whether it
    /// did. Any other move is a bug in the actor: it is logged at error level and the worker
    /// keeps its state (the supervisor goes on serving). Asking for the state the worker is
    /// already in is no move and succeeds: two requests of one worker can time out together,
    /// and a fast stop kills workers already being killed.
    pub(super) fn set_state(&mut self, to: WorkerState) -> bool {
        let from = self.state;
        if from == to {
            return true;
        }
        if !can_transition(from, to) {
            tracing::error!(
                worker = self.slot,
                "web worker {} (pid {}): internal error: transition {from:?} → {to:?} is not in the table; it stays {from:?}",
                self.slot,
                self.pid.unwrap_or_default()
            );
            return false;
        }
        self.state = to;
        true
    }
}

impl Actor {
    pub(super) fn publish_states(&self) {
        let mut counts: BTreeMap<&'static str, i64> =
            GAUGE_STATES.into_iter().map(|state| (state, 0)).collect();
        for worker in self.workers.values() {
            *counts.entry(worker.state.gauge_label()).or_default() += 1;
        }
        *counts
            .entry(WorkerState::Backoff.gauge_label())
            .or_default() += self
            .slots
            .iter()
            .filter(|slot| slot.restart_at.is_some())
            .count() as i64;
        for (state, count) in counts {
            self.metrics.workers.with_label_values(&[state]).set(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WorkerState::*;
    use super::*;

    const ALL: [WorkerState; 7] = [
        Starting, Ready, Draining, Killing, Restarting, Backoff, CrashLoop,
    ];

    fn allowed(from: WorkerState, to: WorkerState) {
        assert!(
            can_transition(from, to),
            "{from:?} → {to:?} must be allowed"
        );
        let (commands, _) = mpsc::unbounded_channel();
        let mut worker = Worker::starting(0, 1, commands, None);
        worker.state = from;
        assert!(worker.set_state(to));
        assert_eq!(worker.state(), to);
    }

    // One test per row of ALLOWED_TRANSITIONS.
    #[test]
    fn starting_to_ready() {
        allowed(Starting, Ready);
    }
    #[test]
    fn starting_to_killing() {
        allowed(Starting, Killing);
    }
    #[test]
    fn ready_to_draining() {
        allowed(Ready, Draining);
    }
    #[test]
    fn ready_to_killing() {
        allowed(Ready, Killing);
    }
    #[test]
    fn ready_to_restarting() {
        allowed(Ready, Restarting);
    }
    #[test]
    fn draining_to_killing() {
        allowed(Draining, Killing);
    }
    #[test]
    fn draining_to_restarting() {
        allowed(Draining, Restarting);
    }
    #[test]
    fn restarting_to_killing() {
        allowed(Restarting, Killing);
    }

    #[test]
    fn the_table_has_one_test_per_row_and_nothing_else_is_allowed() {
        assert_eq!(ALLOWED_TRANSITIONS.len(), 8, "add a test for the new row");
        let allowed_count = ALL
            .iter()
            .flat_map(|from| ALL.iter().map(move |to| (*from, *to)))
            .filter(|(from, to)| can_transition(*from, *to))
            .count();
        assert_eq!(allowed_count, ALLOWED_TRANSITIONS.len());
        // A worker killed for good is never brought back to serve or to be restarted.
        for to in ALL {
            assert!(!can_transition(Killing, to), "Killing → {to:?}");
        }
        // Nothing returns to Starting: a new process is a new worker.
        for from in ALL {
            assert!(!can_transition(from, Starting), "{from:?} → Starting");
        }
        // Empty slots are never a worker's state.
        for state in ALL {
            for empty in [Backoff, CrashLoop] {
                assert!(!can_transition(state, empty) && !can_transition(empty, state));
            }
        }
    }

    #[test]
    fn an_illegal_transition_keeps_the_state() {
        let (commands, _) = mpsc::unbounded_channel();
        let mut worker = Worker::starting(3, 1, commands, None);
        assert!(!worker.set_state(Draining), "Starting → Draining");
        assert_eq!(worker.state(), Starting);
        assert!(worker.set_state(Ready));
        assert!(!worker.set_state(Starting), "Ready → Starting");
        assert_eq!(worker.state(), Ready);
        // Staying put is no transition.
        assert!(worker.set_state(Ready));
        assert!(worker.set_state(Killing));
        assert!(!worker.set_state(Restarting), "Killing → Restarting");
        assert_eq!(worker.state(), Killing);
    }

    #[test]
    fn only_an_exit_nobody_asked_for_is_a_crash() {
        let crashes: Vec<WorkerState> = ALL
            .into_iter()
            .filter(|state| state.exit_is_a_crash())
            .collect();
        assert_eq!(crashes, [Starting, Ready]);
    }

    #[test]
    fn status_and_the_gauge_show_the_states_they_always_did() {
        let shown: Vec<String> = ALL
            .iter()
            .map(|state| {
                serde_json::to_value(state)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            shown,
            [
                "starting",
                "ready",
                "draining",
                "killing",
                "killing",
                "backoff",
                "crash_loop"
            ]
        );
        let gauge: Vec<&str> = ALL.iter().map(|state| state.gauge_label()).collect();
        assert_eq!(
            gauge,
            [
                "starting", "ready", "draining", "killing", "killing", "backoff", "backoff"
            ]
        );
        assert!(gauge.iter().all(|label| GAUGE_STATES.contains(label)));
    }

    #[test]
    fn restart_reasons_are_the_labels_metrics_registers() {
        use RestartReason::*;
        // Metric label values are an interface (dashboards, alerts): they never change.
        let labels = [Crash, Timeout, MaxRequests, MaxRss, Reload, Scale].map(RestartReason::label);
        assert_eq!(labels, crate::metrics::WORKER_RESTART_REASONS);
        assert_eq!(
            labels,
            [
                "crash",
                "timeout",
                "max_requests",
                "max_rss",
                "reload",
                "scale"
            ]
        );
    }
}
