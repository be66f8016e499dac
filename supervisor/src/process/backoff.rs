//! Restart backoff and the crash window, shared by the web pool's worker slots and the program
//! instances: how long to wait before starting again a process that exited on its own, and which
//! of its recent exits still count.
//!
//! Both are pure arithmetic over the instants the caller passes in — no clock, no timer — so they
//! are tested without sleeping. Each caller keeps its own policy: the floor and the cap of the
//! delays, the length of the window, and what it does with the count (the pool waits the longest
//! delay in a crash loop; a program gives up).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Doubling delays between restarts: `floor × 2^step`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay of step 0.
    pub floor: Duration,
    /// The longest delay. A cap below the floor is used as is, so a test or an impatient
    /// operator can ask for quick restarts.
    pub max: Duration,
}

impl Backoff {
    /// The delay before restart number `step` (0-based since the series began). Saturates
    /// instead of overflowing, however large `step` is.
    pub fn delay(self, step: u32) -> Duration {
        let factor = 1u32.checked_shl(step).unwrap_or(u32::MAX);
        self.floor.saturating_mul(factor).min(self.max)
    }
}

/// The exits of one process (a worker slot, a program instance) that fall within a sliding
/// window ending at the latest one.
#[derive(Debug, Clone, Default)]
pub struct CrashWindow {
    exits: VecDeque<Instant>,
}

impl CrashWindow {
    /// Records an exit seen at `now` and forgets the exits more than `window` before it.
    /// Returns how many exits are left in the window, this one included.
    pub fn record(&mut self, now: Instant, window: Duration) -> usize {
        self.exits.push_back(now);
        while let Some(&oldest) = self.exits.front() {
            if now.saturating_duration_since(oldest) > window {
                self.exits.pop_front();
            } else {
                break;
            }
        }
        self.exits.len()
    }

    /// Forgets every exit: the process has run long enough to count as healthy.
    pub fn clear(&mut self) {
        self.exits.clear();
    }

    /// Exits in the window as of the last [`CrashWindow::record`].
    pub fn len(&self) -> usize {
        self.exits.len()
    }

    /// True when no exit is remembered.
    pub fn is_empty(&self) -> bool {
        self.exits.is_empty()
    }

    /// The remembered exits, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Instant> + '_ {
        self.exits.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn delays_double_from_the_floor_to_the_cap() {
        let backoff = Backoff {
            floor: SECOND,
            max: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (0..8).map(|step| backoff.delay(step).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn sub_second_floors_double_too() {
        let backoff = Backoff {
            floor: Duration::from_millis(100),
            max: Duration::from_secs(30),
        };
        let delays: Vec<u128> = (0..10)
            .map(|step| backoff.delay(step).as_millis())
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000]
        );
    }

    #[test]
    fn huge_steps_saturate_instead_of_overflowing() {
        let capped = Backoff {
            floor: SECOND,
            max: Duration::from_secs(60),
        };
        assert_eq!(capped.delay(31), capped.max);
        assert_eq!(capped.delay(32), capped.max);
        assert_eq!(capped.delay(u32::MAX), capped.max);
        let uncapped = Backoff {
            floor: SECOND,
            max: Duration::MAX,
        };
        assert_eq!(uncapped.delay(40), SECOND * u32::MAX);
    }

    #[test]
    fn a_cap_below_the_floor_is_used_as_is() {
        let backoff = Backoff {
            floor: SECOND,
            max: Duration::from_millis(200),
        };
        assert_eq!(backoff.delay(0), backoff.max);
        assert_eq!(backoff.delay(3), backoff.max);
    }

    #[test]
    fn the_window_counts_recent_exits_and_forgets_old_ones() {
        let window = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut crashes = CrashWindow::default();
        assert!(crashes.is_empty());
        assert_eq!(crashes.record(t0, window), 1);
        assert_eq!(crashes.record(t0 + 5 * SECOND, window), 2);
        // Exactly one window after the first exit: it still counts.
        assert_eq!(crashes.record(t0 + 10 * SECOND, window), 3);
        // 11 s after the first exit: it left the window.
        assert_eq!(crashes.record(t0 + 11 * SECOND, window), 3);
        let seconds: Vec<u64> = crashes
            .iter()
            .map(|at| at.duration_since(t0).as_secs())
            .collect();
        assert_eq!(seconds, [5, 10, 11]);
        // A long quiet spell leaves only the latest exit.
        assert_eq!(crashes.record(t0 + 60 * SECOND, window), 1);
        assert_eq!(crashes.len(), 1);
        crashes.clear();
        assert!(crashes.is_empty());
    }

    #[test]
    fn an_exit_seen_out_of_order_is_kept_not_miscounted() {
        // Instants from different observers may arrive slightly out of order; an exit "before"
        // the oldest must not underflow the arithmetic.
        let window = Duration::from_secs(10);
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut crashes = CrashWindow::default();
        crashes.record(t0, window);
        assert_eq!(crashes.record(t0 - SECOND, window), 2);
    }
}
