//! The main loop's state as one value: what the supervisor has in progress, and who holds the
//! roles meanwhile. Each [`Activity`] carries exactly what is valid in it, so the combinations
//! that must never happen — roles both with the loop and with a reload run, a reload during an
//! upgrade, a hand-over channel outside a take-over — cannot be written down.
//!
//! | activity | holds | a reload request | an upgrade request |
//! |---|---|---|---|
//! | [`Idle`](Activity::Idle) | the roles | starts a run | starts a successor |
//! | [`Reloading`](Activity::Reloading) | the run (which holds the roles), queued reloads | queues | refused |
//! | [`Upgrading`](Activity::Upgrading) | the roles, the successor's run | refused | refused |
//! | [`TakingOver`](Activity::TakingOver) | the roles, the old supervisor's channel, queued reloads | queues | refused |
//!
//! This module owns the state, the [`Phase`] it reports, the events it waits for and the
//! decisions of that table. What a reload or an upgrade then does (re-reading the config,
//! spawning the successor, answering clients) belongs to `reload` and `handover`.

use crate::control::{ErrorKind, Responder};
use crate::supervisor::hooks::HookStatus;
use crate::supervisor::lifecycle::Phase;
use crate::supervisor::reload::{self, ReloadRun};
use crate::supervisor::roles::Roles;
use crate::supervisor::trigger::Trigger;
use crate::supervisor::upgrade::{Predecessor, UpgradeRun};

/// What the main loop has in progress, with everything that is valid only while it lasts.
pub enum Activity {
    /// Serving a settled generation; the loop holds the roles, and a reload or an upgrade may
    /// start.
    Idle {
        /// The running roles.
        roles: Roles,
    },
    /// A reload run owns the roles and rolls them to the next generation.
    Reloading {
        /// The run in progress.
        run: ReloadRun,
        /// Reloads asked for during the run; they share the next one.
        queued: Queued,
    },
    /// `upgrade`: a successor is starting beside this process, which keeps serving.
    Upgrading {
        /// The running roles.
        roles: Roles,
        /// The successor, until it is ready or gone.
        run: UpgradeRun,
    },
    /// As an upgrade's successor: serving beside the old supervisor until it has released its
    /// roles; the programs that must not run twice, and beat, start only then.
    TakingOver {
        /// The roles started so far.
        roles: Roles,
        /// The old supervisor's end of the hand-over channel.
        predecessor: Predecessor,
        /// Reloads asked for meanwhile; the first run starts once every role has started.
        queued: Queued,
        /// Whether this process answers on the control socket yet: only once the old one has
        /// made it the main process (and stopped accepting), so that a `status` during the old
        /// one's drain gets an answer instead of waiting for it.
        serves_control: bool,
    },
}

/// Reload requests waiting for the next run: `None` when there is none, `Some(empty)` for one
/// asked for by a signal or `--watch`, with nobody waiting for the outcome.
pub type Queued = Option<Vec<Responder>>;

/// What a reload request leads to, by [`Activity::ask_reload`].
pub enum ReloadAdmission {
    /// Start a run now, with these roles, for these clients.
    Start(Roles, Vec<Responder>),
    /// Nothing starts now: the request was queued or refused (its client was told which).
    Held(Activity),
}

/// What an upgrade request leads to, by [`Activity::ask_upgrade`].
pub enum UpgradeAdmission {
    /// Start a successor beside these roles.
    Start(Roles),
    /// Refused, for this reason; nothing changed.
    Refused(Activity, String),
}

impl Activity {
    /// The `before_reload` command a reload runs now, if any.
    pub fn hook_status(&self) -> Option<HookStatus> {
        match self {
            Activity::Reloading { run, .. } => run.hook_status(),
            _ => None,
        }
    }

    /// The phase `status` reports.
    pub fn phase(&self) -> Phase {
        match self {
            Activity::Idle { .. } | Activity::TakingOver { .. } => Phase::Running,
            Activity::Reloading { .. } => Phase::Reloading,
            Activity::Upgrading { .. } => Phase::Upgrading,
        }
    }

    /// Whether the loop accepts control requests now.
    pub fn serves_control(&self) -> bool {
        match self {
            Activity::TakingOver { serves_control, .. } => *serves_control,
            _ => true,
        }
    }

    /// The roles, unless a reload run owns them.
    pub fn roles(&self) -> Option<&Roles> {
        match self {
            Activity::Idle { roles }
            | Activity::Upgrading { roles, .. }
            | Activity::TakingOver { roles, .. } => Some(roles),
            Activity::Reloading { .. } => None,
        }
    }

    /// The next event of what is in progress: a reload's or an upgrade's step or end, the old
    /// supervisor's word; never while idle. Cancel-safe, for the loop's `select!`.
    pub async fn next_event(&mut self) -> Trigger {
        match self {
            Activity::Idle { .. } => std::future::pending().await,
            Activity::Reloading { run, .. } => Trigger::Reload(run.next_event().await),
            Activity::Upgrading { run, .. } => Trigger::Upgrade(run.next_event().await),
            Activity::TakingOver { predecessor, .. } => {
                Trigger::Predecessor(predecessor.next().await)
            }
        }
    }

    /// A reload request (`waiter` is its client, if any). Reloads are serialized: one during a
    /// run waits for it, and one during a take-over waits until every role has started, since
    /// rolling a half-started set would start the programs the old supervisor still runs. An
    /// upgrade in progress refuses it: the successor reads the config anyway.
    pub fn ask_reload(self, waiter: Option<Responder>) -> ReloadAdmission {
        match self {
            Activity::Idle { roles } => ReloadAdmission::Start(roles, waiter.into_iter().collect()),
            Activity::Reloading { run, mut queued } => {
                if let Some(waiter) = &waiter {
                    waiter.progress("another reload is in progress; this one starts when it ends");
                }
                queue(&mut queued, waiter);
                ReloadAdmission::Held(Activity::Reloading { run, queued })
            }
            Activity::TakingOver {
                roles,
                predecessor,
                mut queued,
                serves_control,
            } => {
                if let Some(waiter) = &waiter {
                    waiter.progress(
                        "this supervisor is still taking over from the previous one; the reload starts once it has",
                    );
                }
                queue(&mut queued, waiter);
                ReloadAdmission::Held(Activity::TakingOver {
                    roles,
                    predecessor,
                    queued,
                    serves_control,
                })
            }
            upgrading @ Activity::Upgrading { .. } => {
                let message =
                    "an upgrade is in progress; reload the new supervisor once it has finished";
                tracing::warn!("reload refused: {message}");
                if let Some(waiter) = waiter {
                    waiter.error(ErrorKind::Unavailable, message, None);
                }
                ReloadAdmission::Held(upgrading)
            }
        }
    }

    /// An upgrade request: only a settled generation hands its sockets to a successor, and only
    /// one process can take over at a time.
    pub fn ask_upgrade(self) -> UpgradeAdmission {
        match self {
            Activity::Idle { roles } => UpgradeAdmission::Start(roles),
            busy => {
                let reason = match &busy {
                    Activity::Upgrading { run, .. } => format!(
                        "an upgrade is already in progress (new supervisor pid {}); wait for it",
                        run.pid
                    ),
                    Activity::TakingOver { .. } => {
                        "this supervisor is still taking over from the previous one; try again in a moment"
                            .to_owned()
                    }
                    _ => "a reload is in progress; run upgrade again when it has finished"
                        .to_owned(),
                };
                UpgradeAdmission::Refused(busy, reason)
            }
        }
    }

    /// Ends what is in progress so that the roles can stop: a successor still starting is killed
    /// (it must not outlive us half-started), a reload run is waited for — it is bounded by the
    /// roles' own timeouts, and stopping half-rolled roles would leave orphans of either
    /// generation — and its clients get their answer. `None` only if the run's task failed,
    /// taking the roles with it.
    pub async fn into_roles(self) -> Option<Roles> {
        match self {
            Activity::Idle { roles } | Activity::TakingOver { roles, .. } => Some(roles),
            Activity::Upgrading { roles, run } => {
                run.abandon().await;
                Some(roles)
            }
            Activity::Reloading { mut run, .. } => {
                // A hook still running is ended instead: it could hold the stop for
                // hook_timeout.
                run.stop_hooks();
                tracing::info!("waiting for the reload in progress before stopping");
                let finished = run.finished().await.ok()?;
                reload::answer(run.waiters, run.generation, &finished.outcome);
                Some(finished.roles)
            }
        }
    }
}

/// Adds a request to the queue; one from a signal (no `waiter`) still asks for a run.
fn queue(queued: &mut Queued, waiter: Option<Responder>) {
    queued.get_or_insert_with(Vec::new).extend(waiter);
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use proxy_conf::Loaded;

    use super::*;
    use crate::listeners::FdTable;
    use crate::metrics::Metrics;
    use crate::supervisor::reload::ReloadEvent;
    use crate::supervisor::upgrade::{UpgradeEvent, Word};
    use crate::test_support::runtime;

    /// A config with no role at all: its roles start and stop at once.
    fn empty() -> Loaded {
        Loaded {
            config: proxy_conf::load_str("", "sauna.toml").unwrap(),
            path: PathBuf::from("sauna.toml"),
            source: String::new(),
            secrets: Default::default(),
        }
    }

    async fn roles() -> Roles {
        Roles::start(&empty(), &Arc::new(Metrics::new().unwrap()))
            .await
            .unwrap()
    }

    async fn idle() -> Activity {
        Activity::Idle {
            roles: roles().await,
        }
    }

    async fn reloading() -> Activity {
        let metrics = Arc::new(Metrics::new().unwrap());
        let run = ReloadRun::start(roles().await, empty(), 2, metrics, Vec::new());
        Activity::Reloading { run, queued: None }
    }

    /// A successor that exits at once: `true` never says `ready`.
    async fn upgrading() -> Activity {
        let run = UpgradeRun::start(
            Path::new("true"),
            FdTable::default(),
            &[],
            Duration::from_secs(10),
        )
        .unwrap();
        Activity::Upgrading {
            roles: roles().await,
            run,
        }
    }

    /// A successor's state, with the old supervisor's end of the channel.
    async fn taking_over() -> (Activity, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let activity = Activity::TakingOver {
            roles: roles().await,
            predecessor: Predecessor::new(ours).unwrap(),
            queued: None,
            serves_control: false,
        };
        (activity, theirs)
    }

    async fn next(activity: &mut Activity) -> Option<Trigger> {
        tokio::time::timeout(Duration::from_secs(10), activity.next_event())
            .await
            .ok()
    }

    #[test]
    fn each_activity_reports_its_phase_and_whether_it_serves_control() {
        runtime().block_on(async {
            let (taking_over, _old) = taking_over().await;
            let table = [
                (idle().await, Phase::Running, true, true),
                (reloading().await, Phase::Reloading, true, false),
                (upgrading().await, Phase::Upgrading, true, true),
                (taking_over, Phase::Running, false, true),
            ];
            for (activity, phase, serves_control, has_roles) in table {
                assert_eq!(activity.phase(), phase);
                assert_eq!(activity.serves_control(), serves_control, "{phase:?}");
                assert_eq!(activity.roles().is_some(), has_roles, "{phase:?}");
            }
        });
    }

    #[test]
    fn idle_starts_a_reload_with_its_roles() {
        runtime().block_on(async {
            match idle().await.ask_reload(None) {
                ReloadAdmission::Start(_, waiters) => assert!(waiters.is_empty()),
                ReloadAdmission::Held(activity) => panic!("held in {:?}", activity.phase()),
            }
        });
    }

    #[test]
    fn a_reload_during_a_run_or_a_take_over_is_queued_and_refused_during_an_upgrade() {
        runtime().block_on(async {
            let (taking_over, _old) = taking_over().await;
            for activity in [reloading().await, taking_over] {
                let ReloadAdmission::Held(activity) = activity.ask_reload(None) else {
                    panic!("started a reload");
                };
                match activity {
                    Activity::Reloading { queued, .. } | Activity::TakingOver { queued, .. } => {
                        assert_eq!(queued.map(|waiters| waiters.len()), Some(0));
                    }
                    other => panic!("now {:?}", other.phase()),
                }
            }
            let ReloadAdmission::Held(activity) = upgrading().await.ask_reload(None) else {
                panic!("started a reload during an upgrade");
            };
            assert_eq!(activity.phase(), Phase::Upgrading);
        });
    }

    #[test]
    fn only_idle_starts_an_upgrade() {
        runtime().block_on(async {
            assert!(matches!(
                idle().await.ask_upgrade(),
                UpgradeAdmission::Start(_)
            ));
            let (taking_over, _old) = taking_over().await;
            for (activity, reason) in [
                (reloading().await, "a reload is in progress"),
                (upgrading().await, "an upgrade is already in progress"),
                (taking_over, "still taking over"),
            ] {
                let phase = activity.phase();
                match activity.ask_upgrade() {
                    UpgradeAdmission::Start(_) => panic!("started in {phase:?}"),
                    UpgradeAdmission::Refused(activity, message) => {
                        assert_eq!(activity.phase(), phase, "unchanged");
                        assert!(message.contains(reason), "{message}");
                    }
                }
            }
        });
    }

    #[test]
    fn each_activity_waits_for_its_own_events() {
        runtime().block_on(async {
            let mut idle = idle().await;
            let quiet = tokio::time::timeout(Duration::from_millis(50), idle.next_event()).await;
            assert!(quiet.is_err(), "idle has nothing to wait for");

            let mut reloading = reloading().await;
            assert!(matches!(
                next(&mut reloading).await,
                Some(Trigger::Reload(ReloadEvent::Finished(_)))
            ));

            let mut upgrading = upgrading().await;
            match next(&mut upgrading).await {
                Some(Trigger::Upgrade(UpgradeEvent::Finished(finished))) => {
                    let failure = finished.err().expect("`true` is never ready");
                    assert!(
                        failure.message.contains("exited before it was ready"),
                        "{failure}"
                    );
                }
                _ => panic!("no end of the upgrade"),
            }

            let (mut taking_over, old) = taking_over().await;
            std::io::Write::write_all(&mut &old, b"{\"msg\":\"main_pid\"}\n").unwrap();
            assert!(matches!(
                next(&mut taking_over).await,
                Some(Trigger::Predecessor(Word::MainPid))
            ));
            std::io::Write::write_all(&mut &old, b"{\"msg\":\"released\"}\n").unwrap();
            assert!(matches!(
                next(&mut taking_over).await,
                Some(Trigger::Predecessor(Word::Released))
            ));
            // The old process gone without `released` is never a go.
            let (mut abandoned, old) = self::taking_over().await;
            std::io::Write::write_all(&mut &old, b"{\"msg\":\"main_pid\"}\n").unwrap();
            drop(old);
            assert!(matches!(
                next(&mut abandoned).await,
                Some(Trigger::Predecessor(Word::MainPid))
            ));
            assert!(matches!(
                next(&mut abandoned).await,
                Some(Trigger::Predecessor(Word::Gone))
            ));
        });
    }

    #[test]
    fn stopping_waits_for_a_reload_run_and_gives_back_its_roles() {
        runtime().block_on(async {
            assert!(reloading().await.into_roles().await.is_some());
            assert!(upgrading().await.into_roles().await.is_some());
            assert!(idle().await.into_roles().await.is_some());
        });
    }
}
