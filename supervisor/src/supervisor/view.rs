//! What the main loop asks the roles — their part of `status`, and the health verdict behind
//! `/healthz` and systemd's `STATUS=` — through [`RolesView`]: cheap clones of the actors'
//! command channels, which the loop keeps whoever holds the [`Roles`](super::roles::Roles). While a
//! reload run owns the roles, `status` therefore reports the actors as they are (the pool's
//! workers of both generations, a program mid-roll) instead of a picture from before the run.
//!
//! Starting, stopping and reloading stay with `Roles`, which holds the only owning handles; a
//! view can only ask.

use crate::beat::BeatView;
use crate::programs::{Programs, ProgramsView};
use crate::supervisor::status::StatusReport;
use crate::web::pool::{PoolHandle, PoolView, WorkerState};

/// The roles as the loop asks them: one view per running role.
#[derive(Debug, Clone)]
pub struct RolesView {
    /// The web pool, when it runs.
    pool: Option<PoolView>,
    /// Every program; follows programs starting and stopping by itself.
    programs: ProgramsView,
    /// Beat, when it runs.
    beat: Option<BeatView>,
}

impl RolesView {
    /// Views of these roles.
    pub fn of(
        pool: Option<&PoolHandle>,
        programs: &Programs,
        beat: Option<&crate::beat::BeatHandle>,
    ) -> RolesView {
        RolesView {
            pool: pool.map(PoolHandle::view),
            programs: programs.view(),
            beat: beat.map(crate::beat::BeatHandle::view),
        }
    }

    /// The roles' part of the status report.
    pub async fn fill_status(&self, report: &mut StatusReport) {
        if let Some(pool) = &self.pool {
            report.pool = serde_json::to_value(pool.status().await).ok();
        }
        report.programs = serde_json::to_value(self.programs.status().await).unwrap_or_default();
        if let Some(beat) = &self.beat {
            report.beat = match beat.status().await {
                Ok(status) => serde_json::to_value(status).ok(),
                Err(error) => Some(serde_json::json!({ "error": error.to_string() })),
            };
        }
    }

    /// Whether every role is within its policy (problems for `/healthz`), and a one-line
    /// summary for systemd's `STATUS=`.
    pub async fn health(&self) -> (Vec<String>, String) {
        let mut problems = Vec::new();
        let mut parts = Vec::new();
        if let Some(pool) = &self.pool {
            let status = pool.status().await;
            let ready = status
                .workers
                .iter()
                .filter(|worker| worker.state == WorkerState::Ready)
                .count();
            if ready == 0 {
                problems.push("web pool: no worker is ready".to_owned());
            }
            parts.push(format!(
                "web {ready}/{} workers ready (generation {})",
                status.workers_wanted, status.generation
            ));
        }
        let programs = self.programs.status().await;
        if !programs.is_empty() {
            let mut up = 0;
            for program in &programs {
                if program.fatal {
                    problems.push(format!(
                        "program \"{}\" is fatal: {}",
                        program.name,
                        program
                            .instances
                            .iter()
                            .find_map(|instance| instance.detail.clone())
                            .unwrap_or_else(|| "gave up after a crash loop".to_owned())
                    ));
                } else if program
                    .instances
                    .iter()
                    .all(|instance| instance.pid.is_some())
                {
                    up += 1;
                }
            }
            parts.push(format!("programs {up}/{} up", programs.len()));
        }
        if let Some(beat) = &self.beat {
            match beat.status().await {
                Ok(status) => parts.push(format!(
                    "beat {} ({} jobs)",
                    if status.leader { "leader" } else { "standby" },
                    status.jobs.len()
                )),
                Err(error) => problems.push(format!("beat: {error}")),
            }
        }
        if parts.is_empty() {
            parts.push("running, nothing configured".to_owned());
        }
        (problems, parts.join(" · "))
    }
}
