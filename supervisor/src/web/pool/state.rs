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

/// The state of one worker or worker slot, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Spawned, importing the app; receives no requests yet.
    Starting,
    /// Serving requests.
    Ready,
    /// Receives no new requests; finishing its in-flight ones before it exits.
    Draining,
    /// Being killed (timeout, broken channel, stop).
    Killing,
    /// No process: waiting to restart after a crash.
    Backoff,
    /// No process: crashed repeatedly; restarts at the longest backoff.
    CrashLoop,
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
    /// Last sampled resident memory.
    pub rss_bytes: u64,
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

/// Why a worker's process is expected to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// It should not end: an exit is a crash.
    Unexpected,
    /// Replaced; the restart was counted when its replacement became ready.
    Replaced,
    /// Killed after a timeout; restart the slot at once.
    TimedOut,
    /// Killed because its channel broke; restart the slot at once.
    Broken,
    /// Removed by scale-down or stop; do not restart.
    Removed,
}

#[derive(Debug)]
pub(super) struct Worker {
    pub(super) slot: usize,
    pub(super) generation: u64,
    pub(super) pid: Option<u32>,
    pub(super) state: WorkerState,
    pub(super) commands: mpsc::UnboundedSender<worker::Command>,
    /// Replaces this worker once ready.
    pub(super) replaces: Option<(WorkerId, RestartReason)>,
    pub(super) ending: Ending,
    pub(super) rss: u64,
    pub(super) rss_over: u32,
    pub(super) served: u64,
    pub(super) in_flight: usize,
    pub(super) ready_at: Option<Instant>,
    pub(super) drain_deadline: Option<Instant>,
}

impl Actor {
    pub(super) fn publish_states(&self) {
        let mut counts: BTreeMap<&'static str, i64> =
            ["starting", "ready", "draining", "killing", "backoff"]
                .into_iter()
                .map(|state| (state, 0))
                .collect();
        for worker in self.workers.values() {
            let label = match worker.state {
                WorkerState::Starting => "starting",
                WorkerState::Ready => "ready",
                WorkerState::Draining => "draining",
                WorkerState::Killing => "killing",
                WorkerState::Backoff | WorkerState::CrashLoop => "backoff",
            };
            *counts.entry(label).or_default() += 1;
        }
        *counts.entry("backoff").or_default() += self
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
    use super::*;

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
