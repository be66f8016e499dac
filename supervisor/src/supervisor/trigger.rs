//! Everything that wakes the main loop, as one [`Trigger`] enum, and the one `select!` that
//! waits for the next ([`Triggers::next`]). Signals, control requests, `--watch`, the timers and
//! the events of the loop's state all become a `Trigger` here, so that the loop itself is a plain
//! "wait, then handle" and nothing else in the supervisor waits on them.
//!
//! This module only produces triggers; what each one does belongs to the loop (`supervisor`).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};

use crate::control::{ControlRequest, ControlServer};
use crate::supervisor::reload::ReloadEvent;
use crate::supervisor::signals::{SignalEvent, Signals};
use crate::supervisor::upgrade::{UpgradeEvent, Word};

/// How often the loop refreshes the health verdict; `/healthz` calls the loop hung after a few
/// missed beats.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// One reason for the main loop to act.
pub enum Trigger {
    /// A Unix signal, as what it asks for.
    Signal(SignalEvent),
    /// A request on the control socket.
    Request(ControlRequest),
    /// `--watch`: these app files changed.
    AppFilesChanged(Vec<PathBuf>),
    /// `--watch`: the file watcher stopped; changes are no longer picked up.
    WatcherStopped,
    /// As an upgrade's successor: the old supervisor's word.
    Predecessor(Word),
    /// The upgrade in progress: a step of the successor's start, or its end.
    Upgrade(UpgradeEvent),
    /// The reload in progress: a step, or its end.
    Reload(ReloadEvent),
    /// Time to ping systemd's watchdog.
    Watchdog,
    /// Time to refresh the health verdict.
    Heartbeat,
}

/// The sources of triggers that live as long as the loop: signals, `--watch` and the timers.
pub struct Triggers {
    signals: Signals,
    /// With `run --watch`: batches of changed app files; `None` without it, or once the watcher
    /// has stopped.
    app_changes: Option<mpsc::Receiver<Vec<PathBuf>>>,
    /// When systemd asked for watchdog pings: their period. Pinged from the loop itself, so a
    /// hung loop stops pinging and systemd acts.
    watchdog: Option<Interval>,
    heartbeat: Interval,
}

impl Triggers {
    /// The sources for a loop that handles `signals`, watches `app_changes` if given and pings
    /// systemd's watchdog every `watchdog` if given.
    pub fn new(
        signals: Signals,
        app_changes: Option<mpsc::Receiver<Vec<PathBuf>>>,
        watchdog: Option<Duration>,
    ) -> Triggers {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Triggers {
            signals,
            app_changes,
            watchdog: watchdog.map(tokio::time::interval),
            heartbeat,
        }
    }

    /// Waits for the next trigger: from these sources, from `control` while `serves_control`,
    /// or from `state_event` — the next event of what the loop has in progress. Every branch is
    /// cancel-safe, so whatever loses the race stays pending for the next call.
    pub async fn next(
        &mut self,
        control: &mut ControlServer,
        serves_control: bool,
        state_event: impl Future<Output = Trigger>,
    ) -> Trigger {
        tokio::select! {
            event = self.signals.recv() => Trigger::Signal(event),
            request = control.accept(), if serves_control => Trigger::Request(request),
            changes = or_never(self.app_changes.as_mut().map(mpsc::Receiver::recv)) => {
                match changes {
                    Some(paths) => Trigger::AppFilesChanged(paths),
                    None => {
                        self.app_changes = None;
                        Trigger::WatcherStopped
                    }
                }
            }
            _ = or_never(self.watchdog.as_mut().map(Interval::tick)) => Trigger::Watchdog,
            _ = self.heartbeat.tick() => Trigger::Heartbeat,
            trigger = state_event => trigger,
        }
    }
}

/// `future`'s output when there is one; never otherwise, which disables a `select!` branch for
/// a source that is off.
async fn or_never<F: Future>(future: Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::runtime;

    /// The next trigger that is not a signal (another test may be raising some) nor the heartbeat.
    async fn next_other(
        triggers: &mut Triggers,
        control: &mut ControlServer,
        state_event: impl Future<Output = Trigger>,
    ) -> Trigger {
        let mut state_event = std::pin::pin!(state_event);
        loop {
            let next = triggers.next(control, true, state_event.as_mut());
            match tokio::time::timeout(Duration::from_secs(5), next).await {
                Ok(Trigger::Signal(_) | Trigger::Heartbeat) => {}
                Ok(other) => return other,
                Err(_) => panic!("no trigger within 5 s"),
            }
        }
    }

    #[test]
    fn app_changes_then_a_stopped_watcher_once_and_the_state_events_come_through() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut control = ControlServer::bind(&dir.path().join("control.sock")).unwrap();
            let (changes, receiver) = mpsc::channel(1);
            let signals = Signals::install().unwrap();
            let mut triggers = Triggers::new(signals, Some(receiver), None);
            changes.send(vec![PathBuf::from("app.py")]).await.unwrap();
            drop(changes);
            let never = || std::future::pending::<Trigger>();
            match next_other(&mut triggers, &mut control, never()).await {
                Trigger::AppFilesChanged(paths) => assert_eq!(paths, [PathBuf::from("app.py")]),
                _ => panic!("not the changed files"),
            }
            assert!(matches!(
                next_other(&mut triggers, &mut control, never()).await,
                Trigger::WatcherStopped
            ));
            // The watcher's branch is off now, and without a watchdog period nothing else
            // produces `Watchdog`: this one is the state's event.
            for _ in 0..3 {
                let state_event = async { Trigger::Watchdog };
                assert!(matches!(
                    next_other(&mut triggers, &mut control, state_event).await,
                    Trigger::Watchdog
                ));
            }
        });
    }
}
