//! Per-slot bookkeeping of the pool actor: the restart policy after a crash (0.1 s doubling to
//! 30 s, and crash-loop protection, on the shared [`crate::process::backoff`] arithmetic), the
//! per-worker `max_requests` limit, and RSS (and PSS, for `status` and metrics) sampling for
//! `max_rss` recycling and for draining
//! workers that overstay `graceful_timeout`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::actor::Actor;
use super::state::{RestartReason, WorkerState};
use crate::process::backoff::{Backoff, CrashWindow};
use crate::process::procfs;
use crate::web::worker::{self, WorkerId};

/// How often worker RSS is sampled.
pub(super) const RSS_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive samples over `max_rss` before a worker is recycled (one spike is not a leak).
const RSS_SAMPLES: u32 = 2;
/// Crashes further back than this are forgotten.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// A slot with this many crashes within `CRASH_WINDOW` is in a crash loop.
pub(super) const CRASH_LOOP: usize = 5;
/// Delays before restarting a crashed slot: short at first (a one-off crash costs little
/// capacity), at most 30 s.
const BACKOFF: Backoff = Backoff {
    floor: Duration::from_millis(100),
    max: Duration::from_secs(30),
};

#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) crashes: CrashWindow,
    pub(super) restart_at: Option<Instant>,
    pub(super) last_error: Option<String>,
}

/// Delay before restarting a slot that crashed `recent` times within the crash window: 0.1 s,
/// doubling, capped at 30 s; a crash loop waits the cap. With `preload` the first crash is
/// replaced at once: the replacement is a fork of the imported app (milliseconds, no import
/// competing with the serving workers for CPU), and a second crash backs off as usual.
fn restart_delay(recent: usize, preload: bool) -> Duration {
    if recent >= CRASH_LOOP {
        return BACKOFF.max;
    }
    if preload && recent <= 1 {
        return Duration::ZERO;
    }
    BACKOFF.delay(u32::try_from(recent.saturating_sub(1)).unwrap_or(u32::MAX))
}

/// `max_requests` plus a per-worker random part of the jitter; `None` when recycling by count is off.
/// Resident memory (RSS, PSS) in bytes of the workers and the template, read from `/proc`;
/// a process that is gone has no entry.
#[derive(Debug, Default)]
struct Memory {
    workers: BTreeMap<WorkerId, (u64, u64)>,
    template: Option<(u64, u64)>,
}

impl Memory {
    fn read(workers: &[(WorkerId, u32)], template: Option<u32>) -> Memory {
        // RSS says whether the process is still there; PSS is 0 where the kernel lacks it.
        let of = |pid: u32| Some((procfs::rss(pid)?, procfs::pss(pid).unwrap_or(0)));
        Memory {
            workers: workers
                .iter()
                .filter_map(|&(id, pid)| Some((id, of(pid)?)))
                .collect(),
            template: template.and_then(of),
        }
    }
}

pub(super) fn request_limit(max_requests: u64, jitter: u64) -> Option<u64> {
    use std::hash::{BuildHasher, Hasher};
    if max_requests == 0 {
        return None;
    }
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Some(
        max_requests
            + if jitter == 0 {
                0
            } else {
                random % (jitter + 1)
            },
    )
}

impl Actor {
    pub(super) fn schedule_restart(&mut self, slot_index: usize) {
        let preload = self.launch.preloads();
        let Some(slot) = self.slots.get_mut(slot_index) else {
            return;
        };
        let now = Instant::now();
        let recent = slot.crashes.record(now, CRASH_WINDOW);
        let delay = restart_delay(recent, preload);
        if recent >= CRASH_LOOP {
            tracing::error!(
                worker = slot_index,
                "web worker slot {slot_index} crashed {recent} times within {CRASH_WINDOW:?}; next restart in {delay:?}"
            );
        }
        slot.restart_at = Some(now + delay);
    }

    pub(super) fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.restart_at.is_some_and(|at| at <= now))
            .map(|(index, _)| index)
            .collect();
        for index in due {
            self.slots[index].restart_at = None;
            self.spawn_worker(index, None);
        }
    }

    /// Samples the workers' and the template's memory and acts on it: `max_rss` recycling, the
    /// memory metrics, the drain deadline and the crash record of workers that served long.
    pub(super) async fn sample(&mut self) {
        let pids: Vec<(WorkerId, u32)> = self
            .workers
            .iter()
            .filter_map(|(id, worker)| Some((*id, worker.pid?)))
            .collect();
        let template = self.launch.template_pid();
        // Off the runtime's only thread, which also runs the front: `smaps_rollup` walks every
        // page table of a process (about 0.2 ms for a 43 MB Django worker, more for bigger
        // ones), and a pool of large workers would stall every request that long each second.
        let Ok(memory) = tokio::task::spawn_blocking(move || Memory::read(&pids, template)).await
        else {
            return; // the runtime is shutting down
        };
        self.apply_sample(&memory);
    }

    fn apply_sample(&mut self, memory: &Memory) {
        let max_rss = self.web.max_rss.bytes();
        let now = Instant::now();
        let mut over = Vec::new();
        let mut overdue = Vec::new();
        for (id, worker) in &mut self.workers {
            if let Some(deadline) = worker.drain_deadline {
                if now >= deadline && worker.state() == WorkerState::Draining {
                    overdue.push(*id);
                }
            }
            // A worker started since the pids were taken is sampled next time.
            let Some(&(rss, pss)) = memory.workers.get(id) else {
                continue;
            };
            worker.rss = rss;
            worker.pss = pss;
            if worker.state() == WorkerState::Ready {
                let slot = worker.slot.to_string();
                self.metrics
                    .worker_rss_bytes
                    .with_label_values(&[&slot])
                    .set(i64::try_from(rss).unwrap_or(i64::MAX));
                self.metrics
                    .worker_pss_bytes
                    .with_label_values(&[&slot])
                    .set(i64::try_from(worker.pss).unwrap_or(i64::MAX));
                if max_rss > 0 && rss > max_rss {
                    worker.rss_over += 1;
                    if worker.rss_over == RSS_SAMPLES {
                        over.push(*id);
                    }
                } else {
                    worker.rss_over = 0;
                }
                // A worker that served steadily for the crash window clears its slot's record.
                if worker
                    .ready_at
                    .is_some_and(|at| now.duration_since(at) > CRASH_WINDOW)
                {
                    if let Some(slot) = self.slots.get_mut(worker.slot) {
                        slot.crashes.clear();
                    }
                }
            }
        }
        let gauge = |bytes: u64| i64::try_from(bytes).unwrap_or(i64::MAX);
        let (template_rss, template_pss) = memory.template.unwrap_or_default();
        self.metrics.template_rss_bytes.set(gauge(template_rss));
        self.metrics.template_pss_bytes.set(gauge(template_pss));
        for id in over {
            if !self.recycle_queue.iter().any(|(queued, _)| *queued == id) {
                self.recycle_queue.push_back((id, RestartReason::MaxRss));
            }
        }
        for id in overdue {
            if let Some(worker) = self.workers.get_mut(&id) {
                tracing::warn!(
                    worker = worker.slot,
                    pid = worker.pid,
                    "draining web worker did not finish in time; killing it"
                );
                worker.set_state(WorkerState::Killing);
                let _ = worker.commands.send(worker::Command::Kill);
            }
        }
        self.pump_recycling();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delay_doubles_then_caps_and_crash_loops_wait_longest() {
        assert_eq!(restart_delay(1, false), Duration::from_millis(100));
        assert_eq!(restart_delay(2, false), Duration::from_millis(200));
        assert_eq!(restart_delay(4, false), Duration::from_millis(800));
        assert_eq!(restart_delay(CRASH_LOOP, false), Duration::from_secs(30));
        assert_eq!(restart_delay(100, false), Duration::from_secs(30));
    }

    #[test]
    fn with_preload_a_first_crash_is_forked_again_at_once_and_later_ones_back_off() {
        assert_eq!(restart_delay(1, true), Duration::ZERO);
        assert_eq!(restart_delay(2, true), Duration::from_millis(200));
        assert_eq!(restart_delay(CRASH_LOOP, true), Duration::from_secs(30));
    }

    #[test]
    fn request_limit_adds_at_most_the_jitter() {
        assert_eq!(request_limit(0, 10), None);
        assert_eq!(request_limit(100, 0), Some(100));
        for _ in 0..50 {
            let limit = request_limit(100, 10).unwrap();
            assert!((100..=110).contains(&limit), "{limit}");
        }
    }
}
