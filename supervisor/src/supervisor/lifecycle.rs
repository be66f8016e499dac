//! The supervisor's lifecycle phases and the ways it can be asked to stop. Shared vocabulary for the
//! main loop, the roles it stops, `status` and the tests that observe them.

use serde::{Deserialize, Serialize};

/// What the supervisor is doing while it serves, as `status` reports it; derived from the main
/// loop's state. There is no phase for starting or stopping: the control socket answers only
/// between the two, and `/readyz` already says "not ready" before the first generation serves
/// and once the stop has begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// `[hooks].before_start` runs: no role has started, `READY=1` is not sent yet, and the
    /// control socket answers `status` and `stop` only.
    Starting,
    /// Every role has started and nothing is in progress (also for an upgrade's successor
    /// that is still taking over from the old process).
    Running,
    /// A reload is rolling a new generation.
    Reloading,
    /// `upgrade`: a new supervisor process is starting beside this one, which keeps serving.
    Upgrading,
}

/// How a role should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// Stop accepting, let in-flight work finish within its timeout, then force.
    Graceful,
    /// Kill at once (SIGQUIT to the supervisor).
    Fast,
}

/// Where a role reports the steps of a reload ("canary ready", "celery: new instance up"), for
/// the `reload` client and the log. Sending never blocks; a reload nobody watches drops them.
pub type Progress = tokio::sync::mpsc::UnboundedSender<String>;
