//! The restart policy of one program instance as a pure state machine: the states an instance
//! can be in, the legal transitions between them (one table, [`ALLOWED_TRANSITIONS`]), and the
//! decision after an exit — restart after a backoff, stay down, or give up in a crash loop. The
//! backoff arithmetic and the crash window are [`crate::process::backoff`]'s, shared with the web
//! pool; the policy (the floor, the keys of `[programs.NAME]`, giving up) is here.
//!
//! Nothing here touches a process, a clock or a channel: the actor passes in what happened (an
//! exit, and the instants it observed) and acts on the [`Decision`] it gets back. That keeps the
//! arithmetic testable without sleeping, and the actor free of policy.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use proxy_conf::{ProgramConfig, RestartPolicy};
use serde::Serialize;

use crate::process::backoff::{Backoff, CrashWindow};

/// The shortest delay before a restart; delays double from here up to `backoff_max`.
pub const BACKOFF_FLOOR: Duration = Duration::from_secs(1);

/// Where one program instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Spawned, but has not yet survived `ready_after`.
    Starting,
    /// Has survived `ready_after` and is still running.
    Running,
    /// Exited on its own; waits out the backoff delay before the next start.
    Backoff,
    /// Exited on its own and the restart policy says it stays down (`never`, or a clean exit
    /// under `on-failure`).
    Exited,
    /// The stop signal was sent; waiting for the process group to go away.
    Stopping,
    /// Not running because the supervisor stopped it (or has not started it yet).
    Stopped,
    /// Crash loop: exited `crash_limit` times within `crash_window`; stays down.
    Fatal,
}

/// Every legal `(from, to)` pair; anything else is a bug in the actor.
pub const ALLOWED_TRANSITIONS: &[(InstanceState, InstanceState)] = {
    use InstanceState::*;
    &[
        // The first start, or a start after a stop.
        (Stopped, Starting),
        // Survived `ready_after`.
        (Starting, Running),
        // Exited on its own before or after becoming ready: restart later, stay down, give up.
        (Starting, Backoff),
        (Starting, Exited),
        (Starting, Fatal),
        (Running, Backoff),
        (Running, Exited),
        (Running, Fatal),
        // A stop (shutdown, or a restart for max_rss) sends the stop signal.
        (Starting, Stopping),
        (Running, Stopping),
        // The backoff delay ran out.
        (Backoff, Starting),
        // A stop while waiting to restart: nothing runs, so nothing to signal.
        (Backoff, Stopped),
        // The group is gone after a stop…
        (Stopping, Stopped),
        // …or after a restart, which starts the next process at once, without backoff.
        (Stopping, Starting),
    ]
};

/// True when `from → to` is in [`ALLOWED_TRANSITIONS`].
pub fn can_transition(from: InstanceState, to: InstanceState) -> bool {
    ALLOWED_TRANSITIONS.contains(&(from, to))
}

/// The keys of `[programs.NAME]` that decide what happens after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartRules {
    /// `restart = always | on-failure | never`.
    pub restart: RestartPolicy,
    /// Cap of the doubling backoff.
    pub backoff_max: Duration,
    /// Uptime after which the backoff and the crash counter start over.
    pub stable_after: Duration,
    /// Exits within `crash_window` that make the instance fatal.
    pub crash_limit: NonZeroU32,
    /// Window over which exits are counted.
    pub crash_window: Duration,
}

impl From<&ProgramConfig> for RestartRules {
    fn from(config: &ProgramConfig) -> Self {
        RestartRules {
            restart: config.restart,
            backoff_max: config.backoff_max.get(),
            stable_after: config.stable_after.get(),
            crash_limit: config.crash_limit,
            crash_window: config.crash_window.get(),
        }
    }
}

/// What to do after an instance exited on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after `delay` (→ [`InstanceState::Backoff`]).
    Restart {
        /// How long to wait first.
        delay: Duration,
    },
    /// The restart policy says it stays down (→ [`InstanceState::Exited`]).
    StayDown,
    /// Crash loop (→ [`InstanceState::Fatal`]).
    GiveUp {
        /// Exits counted within the window.
        exits: u32,
        /// The window.
        window: Duration,
    },
}

/// One instance's memory of its recent exits: the backoff step and the exits inside the crash
/// window.
#[derive(Debug, Clone, Default)]
pub struct RestartHistory {
    step: u32,
    exits: CrashWindow,
}

impl RestartHistory {
    /// Records an exit the supervisor did not ask for and decides what comes next. `started_at`
    /// is when the process that exited was started, `now` when its exit was seen.
    pub fn on_exit(
        &mut self,
        rules: &RestartRules,
        success: bool,
        started_at: Instant,
        now: Instant,
    ) -> Decision {
        if now.saturating_duration_since(started_at) >= rules.stable_after {
            // It ran long enough to count as healthy: this exit starts a new series.
            self.step = 0;
            self.exits.clear();
        }
        let wanted = match rules.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        if !wanted {
            return Decision::StayDown;
        }
        let exits = self.exits.record(now, rules.crash_window);
        let exits = u32::try_from(exits).unwrap_or(u32::MAX);
        if exits >= rules.crash_limit.get() {
            return Decision::GiveUp {
                exits,
                window: rules.crash_window,
            };
        }
        let backoff = Backoff {
            floor: BACKOFF_FLOOR,
            max: rules.backoff_max,
        };
        let delay = backoff.delay(self.step);
        self.step = self.step.saturating_add(1);
        Decision::Restart { delay }
    }

    /// The exits inside the current crash window, oldest first.
    pub fn recent_exits(&self) -> impl Iterator<Item = Instant> + '_ {
        self.exits.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;
    use super::*;

    fn rules(restart: RestartPolicy) -> RestartRules {
        RestartRules {
            restart,
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            crash_limit: 5.try_into().unwrap(),
            crash_window: Duration::from_secs(60),
        }
    }

    const ALL: [InstanceState; 7] = [Starting, Running, Backoff, Exited, Stopping, Stopped, Fatal];

    fn allowed(from: InstanceState, to: InstanceState) {
        assert!(
            can_transition(from, to),
            "{from:?} → {to:?} must be allowed"
        );
    }

    // One test per row of ALLOWED_TRANSITIONS.
    #[test]
    fn stopped_to_starting() {
        allowed(Stopped, Starting);
    }
    #[test]
    fn starting_to_running() {
        allowed(Starting, Running);
    }
    #[test]
    fn starting_to_backoff() {
        allowed(Starting, Backoff);
    }
    #[test]
    fn starting_to_exited() {
        allowed(Starting, Exited);
    }
    #[test]
    fn starting_to_fatal() {
        allowed(Starting, Fatal);
    }
    #[test]
    fn running_to_backoff() {
        allowed(Running, Backoff);
    }
    #[test]
    fn running_to_exited() {
        allowed(Running, Exited);
    }
    #[test]
    fn running_to_fatal() {
        allowed(Running, Fatal);
    }
    #[test]
    fn starting_to_stopping() {
        allowed(Starting, Stopping);
    }
    #[test]
    fn running_to_stopping() {
        allowed(Running, Stopping);
    }
    #[test]
    fn backoff_to_starting() {
        allowed(Backoff, Starting);
    }
    #[test]
    fn backoff_to_stopped() {
        allowed(Backoff, Stopped);
    }
    #[test]
    fn stopping_to_stopped() {
        allowed(Stopping, Stopped);
    }
    #[test]
    fn stopping_to_starting() {
        allowed(Stopping, Starting);
    }

    #[test]
    fn the_table_has_one_test_per_row_and_nothing_else_is_allowed() {
        assert_eq!(ALLOWED_TRANSITIONS.len(), 14, "add a test for the new row");
        let allowed_count = ALL
            .iter()
            .flat_map(|from| ALL.iter().map(move |to| (*from, *to)))
            .filter(|(from, to)| can_transition(*from, *to))
            .count();
        assert_eq!(allowed_count, ALLOWED_TRANSITIONS.len());
        // Terminal states only leave through an explicit start, which reload will add.
        for to in ALL {
            assert!(!can_transition(Fatal, to));
            assert!(!can_transition(Exited, to));
        }
        assert!(!can_transition(Running, Running));
        assert!(!can_transition(Stopping, Running));
    }

    #[test]
    fn a_cap_below_the_floor_is_used_as_is() {
        let mut rules = rules(RestartPolicy::Always);
        rules.backoff_max = Duration::from_millis(200);
        rules.crash_limit = u32::MAX.try_into().unwrap();
        let mut history = RestartHistory::default();
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                history.on_exit(&rules, false, now, now),
                Decision::Restart {
                    delay: rules.backoff_max
                }
            );
        }
    }

    #[test]
    fn quick_exits_back_off_then_give_up() {
        let rules = rules(RestartPolicy::Always);
        let mut history = RestartHistory::default();
        let t0 = Instant::now();
        let mut now = t0;
        let mut delays = Vec::new();
        loop {
            match history.on_exit(&rules, false, now, now) {
                Decision::Restart { delay } => {
                    delays.push(delay.as_secs());
                    now += delay;
                }
                Decision::GiveUp { exits, window } => {
                    assert_eq!((exits, window), (5, Duration::from_secs(60)));
                    break;
                }
                Decision::StayDown => panic!("always restarts"),
            }
        }
        // Exits at 0, 1, 3, 7, 15 s: the fifth within 60 s gives up.
        assert_eq!(delays, [1, 2, 4, 8]);
        assert_eq!(history.recent_exits().count(), 5);
    }

    #[test]
    fn a_stable_run_resets_backoff_and_crash_count() {
        let rules = rules(RestartPolicy::Always);
        let mut history = RestartHistory::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            history.on_exit(&rules, false, t0, t0);
        }
        // Started at t0 + 10 s, crashed 30 s later: stable, so the series starts over.
        let started = t0 + Duration::from_secs(10);
        let decision = history.on_exit(&rules, false, started, started + rules.stable_after);
        assert_eq!(
            decision,
            Decision::Restart {
                delay: BACKOFF_FLOOR
            }
        );
        assert_eq!(history.recent_exits().count(), 1);
    }

    #[test]
    fn exits_older_than_the_window_are_forgotten() {
        let mut rules = rules(RestartPolicy::Always);
        rules.crash_limit = 3.try_into().unwrap();
        rules.crash_window = Duration::from_secs(10);
        rules.stable_after = Duration::from_secs(3600);
        let mut history = RestartHistory::default();
        let t0 = Instant::now();
        history.on_exit(&rules, false, t0, t0);
        history.on_exit(&rules, false, t0, t0 + Duration::from_secs(5));
        // 11 s after the first exit: it left the window, two exits remain.
        let decision = history.on_exit(&rules, false, t0, t0 + Duration::from_secs(11));
        assert!(matches!(decision, Decision::Restart { .. }), "{decision:?}");
        // At 12 s the exits at 5, 11 and 12 s are three within 10 s.
        let decision = history.on_exit(&rules, false, t0, t0 + Duration::from_secs(12));
        assert!(
            matches!(decision, Decision::GiveUp { exits: 3, .. }),
            "{decision:?}"
        );
    }

    #[test]
    fn restart_policies() {
        let now = Instant::now();
        let on =
            |policy, success| RestartHistory::default().on_exit(&rules(policy), success, now, now);
        assert!(matches!(
            on(RestartPolicy::Always, true),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            on(RestartPolicy::Always, false),
            Decision::Restart { .. }
        ));
        assert_eq!(on(RestartPolicy::OnFailure, true), Decision::StayDown);
        assert!(matches!(
            on(RestartPolicy::OnFailure, false),
            Decision::Restart { .. }
        ));
        assert_eq!(on(RestartPolicy::Never, false), Decision::StayDown);
        assert_eq!(on(RestartPolicy::Never, true), Decision::StayDown);
    }
}
