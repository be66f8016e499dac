//! The rows `status` shows for programs: one [`ProgramStatus`] per program, one
//! [`InstanceStatus`] per instance, and how a program's state follows from its instances' (the
//! least healthy one wins). The actor fills them in; `status --json` serializes them as they are.

use serde::Serialize;

use super::state::InstanceState;

/// The status of one program, as `status --json` shows it under `programs`.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    /// `[programs.NAME]`.
    pub name: String,
    /// The least healthy state among its instances (`running` only when all are running).
    pub state: InstanceState,
    /// True when an instance gave up after a crash loop (for `/healthz`).
    pub fatal: bool,
    /// Each instance, by index.
    pub instances: Vec<InstanceStatus>,
}

impl ProgramStatus {
    pub(super) fn new(name: String, instances: Vec<InstanceStatus>) -> ProgramStatus {
        let state = instances
            .iter()
            .map(|instance| instance.state)
            .min_by_key(|state| health_rank(*state))
            .unwrap_or(InstanceState::Stopped);
        ProgramStatus {
            name,
            state,
            fatal: state == InstanceState::Fatal,
            instances,
        }
    }
}

/// Orders states from least to most healthy for [`ProgramStatus::state`].
fn health_rank(state: InstanceState) -> u8 {
    match state {
        InstanceState::Fatal => 0,
        InstanceState::Backoff => 1,
        InstanceState::Stopping => 2,
        InstanceState::Starting => 3,
        InstanceState::Exited => 4,
        InstanceState::Stopped => 5,
        InstanceState::Running => 6,
    }
}

/// The status of one instance of a program.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// 0-based index, also in `$SAUNA_INSTANCE` and in log labels (`celery:1`). During a
    /// reload an index can appear twice: the old instance and its replacement.
    pub index: usize,
    /// The generation (config epoch) the instance started under: 1 at start-up, then the
    /// generation of the reload that last replaced it.
    pub generation: u64,
    /// The process group leader, while one runs.
    pub pid: Option<u32>,
    /// Where the instance is in its life.
    pub state: InstanceState,
    /// Unix time (seconds) the current or last process was started.
    pub started_at: Option<f64>,
    /// Seconds the current process has been running.
    pub uptime_seconds: Option<u64>,
    /// Times the instance was started again after its first start.
    pub restarts: u64,
    /// How the last process ended, e.g. `exited with status 1` or `killed by signal SIGKILL`.
    pub last_exit: Option<String>,
    /// Unix time of that exit.
    pub last_exit_at: Option<f64>,
    /// The last non-empty line the process printed before that exit (stdout or stderr), e.g.
    /// a Python exception: what `status` shows beside the exit to say why.
    pub last_output: Option<String>,
    /// Unix times of the unrequested exits inside the crash window, oldest first; the gaps show
    /// the backoff delays.
    pub recent_exits: Vec<f64>,
    /// RSS of the instance's process tree at the last sample (only sampled with `max_rss`).
    pub rss_bytes: Option<u64>,
    /// Why it is in this state: the crash-loop reason, the time left before a restart, ….
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(state: InstanceState) -> InstanceStatus {
        InstanceStatus {
            index: 0,
            generation: 1,
            pid: None,
            state,
            started_at: None,
            uptime_seconds: None,
            restarts: 0,
            last_exit: None,
            last_exit_at: None,
            last_output: None,
            recent_exits: Vec::new(),
            rss_bytes: None,
            detail: None,
        }
    }

    #[test]
    fn a_program_is_as_healthy_as_its_worst_instance() {
        let status = ProgramStatus::new(
            "celery".into(),
            vec![
                instance(InstanceState::Running),
                instance(InstanceState::Fatal),
            ],
        );
        assert_eq!(status.state, InstanceState::Fatal);
        assert!(status.fatal);
        let status = ProgramStatus::new(
            "celery".into(),
            vec![
                instance(InstanceState::Running),
                instance(InstanceState::Running),
            ],
        );
        assert_eq!(status.state, InstanceState::Running);
        assert!(!status.fatal);
        assert_eq!(
            ProgramStatus::new("x".into(), Vec::new()).state,
            InstanceState::Stopped
        );
    }
}
