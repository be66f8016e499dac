//! The status report: what `status --json` prints and how `status` renders it as a compact
//! table. The main loop assembles it from each role's own status; the CLI side only sees JSON,
//! so an older or newer client can still print what it understands.

use serde::Serialize;
use serde_json::Value;

use crate::supervisor::lifecycle::Phase;

/// The whole status of a running supervisor.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// The supervisor's pid.
    pub pid: u32,
    /// sauna-supervisor's version.
    pub version: &'static str,
    /// Lifecycle phase.
    pub phase: Phase,
    /// The generation now serving.
    pub generation: u64,
    /// Seconds since the supervisor started.
    pub uptime_seconds: u64,
    /// The config file in use.
    pub config: String,
    /// The web pool, when configured.
    pub pool: Option<Value>,
    /// Every program.
    pub programs: Value,
    /// Beat, when configured.
    pub beat: Option<Value>,
    /// Live request, rejection, restart and reload counts (the metrics' own values).
    pub figures: Value,
}

/// Renders a `status --json` document as the compact table `status` prints.
pub fn render_text(status: &Value) -> String {
    let mut out = String::new();
    let field = |value: &Value, key: &str| -> String {
        match value.get(key) {
            None | Some(Value::Null) => "-".to_owned(),
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
        }
    };
    out.push_str(&format!(
        "sauna-supervisor {} pid {} · {} · generation {} · up {}s · {}\n",
        field(status, "version"),
        field(status, "pid"),
        field(status, "phase"),
        field(status, "generation"),
        field(status, "uptime_seconds"),
        field(status, "config"),
    ));
    if let Some(pool) = status.get("pool").filter(|pool| !pool.is_null()) {
        out.push_str("\nWEB POOL\n");
        out.push_str(&render_pool(pool));
        if let Some(figures) = status.get("figures") {
            out.push_str(&render_figures(figures));
        }
    }
    if let Some(programs) = status.get("programs").and_then(Value::as_array) {
        if !programs.is_empty() {
            out.push_str("\nPROGRAMS\n");
            out.push_str(&format!(
                "{:<20} {:<10} {:<8} {:>8} {:>9}  {}\n",
                "NAME", "STATE", "PID", "RESTARTS", "UPTIME", "DETAIL"
            ));
            for program in programs {
                let name = field(program, "name");
                let instances = program
                    .get("instances")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if instances.is_empty() {
                    out.push_str(&format!("{name:<20} {:<10}\n", field(program, "state")));
                }
                for instance in &instances {
                    let label = if instances.len() > 1 {
                        format!("{name}:{}", field(instance, "index"))
                    } else {
                        name.clone()
                    };
                    out.push_str(&format!(
                        "{:<20} {:<10} {:<8} {:>8} {:>9}  {}\n",
                        label,
                        field(instance, "state"),
                        field(instance, "pid"),
                        field(instance, "restarts"),
                        field(instance, "uptime_seconds"),
                        instance
                            .get("detail")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                    ));
                }
            }
        }
    }
    if let Some(beat) = status.get("beat").filter(|beat| !beat.is_null()) {
        out.push_str("\nBEAT\n");
        out.push_str(&format!(
            "leader: {}\n",
            beat.get("leader").map(Value::to_string).unwrap_or_default()
        ));
        if let Some(error) = beat.get("last_error").and_then(Value::as_str) {
            out.push_str(&format!("error: {error}\n"));
        }
        if let Some(jobs) = beat.get("jobs").and_then(Value::as_array) {
            out.push_str(&format!(
                "{:<24} {:<27} {:<27}\n",
                "JOB", "NEXT RUN", "LAST RUN"
            ));
            for job in jobs {
                out.push_str(&format!(
                    "{:<24} {:<27} {:<27}\n",
                    field(job, "name"),
                    field(job, "next_run"),
                    field(job, "last_run")
                ));
            }
        }
    }
    out
}

/// `requests 2xx=10 4xx=1 · in flight 2 · queued 0 · rejected 0 · restarts 1 · reloads 3`.
fn render_figures(figures: &Value) -> String {
    let counts = |key: &str| -> Vec<(String, u64)> {
        figures
            .get(key)
            .and_then(Value::as_object)
            .map(|map| {
                map.iter()
                    .map(|(label, value)| (label.clone(), value.as_u64().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let total = |key: &str| counts(key).iter().map(|(_, n)| n).sum::<u64>();
    let requests: Vec<String> = counts("requests")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(class, n)| format!("{class}={n}"))
        .collect();
    format!(
        "requests {} · in flight {} · queued {} · rejected {} · worker restarts {} · reloads {}\n",
        if requests.is_empty() {
            "0".to_owned()
        } else {
            requests.join(" ")
        },
        figures.get("in_flight").cloned().unwrap_or_default(),
        figures.get("queue_depth").cloned().unwrap_or_default(),
        total("rejected"),
        total("worker_restarts"),
        total("reloads"),
    )
}

fn render_pool(pool: &Value) -> String {
    let mut out = String::new();
    for (key, value) in pool.as_object().into_iter().flatten() {
        if key != "workers" && !value.is_array() && !value.is_object() && !value.is_null() {
            out.push_str(&format!("{key}: {value}  "));
        }
    }
    out.push('\n');
    if let Some(workers) = pool.get("workers").and_then(Value::as_array) {
        let columns = [
            "slot",
            "pid",
            "generation",
            "state",
            "requests",
            "rss_bytes",
        ];
        for column in columns {
            out.push_str(&format!("{:<12}", column.to_uppercase()));
        }
        out.push('\n');
        for worker in workers {
            for column in columns {
                let text = match worker.get(column) {
                    None | Some(Value::Null) => "-".to_owned(),
                    Some(Value::String(text)) => text.clone(),
                    Some(other) => other.to_string(),
                };
                out.push_str(&format!("{text:<12}"));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lists_programs_with_their_instances() {
        let status = serde_json::json!({
            "pid": 10, "version": "0.1.0", "phase": "running", "generation": 1,
            "uptime_seconds": 5, "config": "sauna.toml", "pool": null, "beat": null, "figures": {},
            "programs": [{"name": "celery", "state": "running",
                          "instances": [{"index": 0, "pid": 42, "state": "running", "restarts": 1, "uptime_seconds": 3}]}]
        });
        let text = render_text(&status);
        assert!(text.contains("pid 10 · running · generation 1"), "{text}");
        assert!(
            text.lines()
                .any(|line| line.starts_with("celery") && line.contains("42")),
            "{text}"
        );
    }

    #[test]
    fn text_shows_why_beat_cannot_use_redis() {
        let status = serde_json::json!({
            "programs": [],
            "beat": {"leader": false, "redis_up": false, "jobs": [],
                     "last_error": "Redis at redis://127.0.0.1:6379/0: authentication failed (NOAUTH: …)"}
        });
        let text = render_text(&status);
        assert!(
            text.contains("\nBEAT\nleader: false\nerror: Redis at redis://127.0.0.1:6379/0: authentication failed"),
            "{text}"
        );
    }
}
