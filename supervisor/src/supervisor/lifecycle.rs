//! The supervisor's lifecycle phases and the ways it can be asked to stop. Shared vocabulary for the
//! main loop, the roles it stops, `status` and the tests that observe them.

use serde::{Deserialize, Serialize};

/// Where the supervisor is in its life; reported by `status` and to systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Binding sockets and starting roles; `READY=1` not sent yet.
    Starting,
    /// Every role has started.
    Running,
    /// A reload is rolling a new generation.
    Reloading,
    /// `upgrade`: a new supervisor process is starting beside this one, which keeps serving.
    Upgrading,
    /// Stopping: no new work is accepted.
    Stopping,
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
