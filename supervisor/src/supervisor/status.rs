//! The status report: what `status --json` prints and how `status` renders it as a compact
//! table. The main loop assembles it from each role's own status; the CLI side only sees JSON,
//! so an older or newer client can still print what it understands.

use serde::Serialize;
use serde_json::Value;

use crate::supervisor::hooks::HookStatus;
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
    /// The config file in use, as the supervisor was given it.
    pub config: String,
    /// The same file as an absolute path (symlinks kept), so a client in another directory
    /// can tell whether this supervisor runs its file.
    pub config_path: String,
    /// The web pool, when configured.
    pub pool: Option<Value>,
    /// Every program.
    pub programs: Value,
    /// Beat, when configured.
    pub beat: Option<Value>,
    /// Live request, rejection, restart and reload counts (the metrics' own values).
    pub figures: Value,
    /// The `[hooks]` command running now (`before_start` while starting, `before_reload` while
    /// a reload has not touched any role yet); absent when none runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookStatus>,
}

impl StatusReport {
    /// The supervisor's own part of the report, before the roles fill in theirs.
    pub fn of_supervisor(
        phase: Phase,
        generation: u64,
        started: std::time::Instant,
        loaded: &proxy_conf::Loaded,
        metrics: &crate::metrics::Metrics,
    ) -> StatusReport {
        StatusReport {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
            phase,
            generation,
            uptime_seconds: started.elapsed().as_secs(),
            config: loaded.path.display().to_string(),
            config_path: std::path::absolute(&loaded.path)
                .unwrap_or_else(|_| loaded.path.clone())
                .display()
                .to_string(),
            pool: None,
            programs: Value::Array(Vec::new()),
            beat: None,
            figures: metrics.figures(),
            hook: None,
        }
    }
}

/// Renders a `status --json` document as the tables `status` prints, for people: every figure
/// with its unit (`12.3 MiB`, `3m12s`), the last error of each program instance, worker and of
/// beat with how long ago it happened (`now` is the reader's Unix time), and a final newline.
/// Fields it does not know are ignored and missing ones shown as `-`, so an older or newer
/// supervisor's document still renders.
pub fn render_text(status: &Value, now: f64) -> String {
    let mut out = String::new();
    let mut header = vec![
        format!("sauna-supervisor {}", text(status, "version")),
        format!("pid {}", text(status, "pid")),
        text(status, "phase"),
        format!("generation {}", text(status, "generation")),
        format!("up {}", seconds(status.get("uptime_seconds"))),
    ];
    header.push(
        status
            .get("config_path")
            .and_then(Value::as_str)
            .map_or_else(|| text(status, "config"), str::to_owned),
    );
    out.push_str(&header.join(" · "));
    out.push('\n');
    if let Some(hook) = status.get("hook").filter(|hook| !hook.is_null()) {
        out.push_str(&render_hook(hook, now));
    }
    if let Some(pool) = status.get("pool").filter(|pool| !pool.is_null()) {
        out.push('\n');
        out.push_str(&render_pool(pool));
        if let Some(figures) = status.get("figures") {
            out.push_str(&render_figures(figures));
        }
    }
    if let Some(programs) = status.get("programs").and_then(Value::as_array) {
        if !programs.is_empty() {
            out.push_str("\nPROGRAMS\n");
            out.push_str(&render_programs(programs, now));
        }
    }
    if let Some(beat) = status.get("beat").filter(|beat| !beat.is_null()) {
        out.push('\n');
        out.push_str(&render_beat(beat, now));
    }
    out
}

/// `hook before_reload[0] (1/2): python manage.py migrate --noinput · pid 4242 · running 12s`.
fn render_hook(hook: &Value, now: f64) -> String {
    let position = |key: &str| hook.get(key).and_then(Value::as_u64);
    let of = match (position("index"), position("commands")) {
        (Some(index), Some(count)) => format!(" ({}/{count})", index + 1),
        _ => String::new(),
    };
    let running = hook
        .get("started_at")
        .and_then(Value::as_f64)
        .map_or_else(|| "-".to_owned(), |at| span(now - at));
    format!(
        "hook {}[{}]{of}: {} · pid {} · running {running}\n",
        text(hook, "hook"),
        text(hook, "index"),
        text(hook, "command"),
        text(hook, "pid"),
    )
}

/// A scalar field as text; `-` when absent or null.
fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// A number of seconds as `45s`, `3m12s`, `2h5m` or `4d3h`; `-` when absent.
fn seconds(value: Option<&Value>) -> String {
    value
        .and_then(Value::as_f64)
        .map_or_else(|| "-".to_owned(), span)
}

/// A non-negative span of seconds in its two largest units (`3m12s`).
fn span(secs: f64) -> String {
    // Whole seconds are precise enough for people; a negative span (clock skew) counts as 0.
    let secs = secs.max(0.0).round() as u64;
    let (days, hours, minutes, rest) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{rest}s"),
        (0, 0, _) => format!("{minutes}m{rest}s"),
        (0, _, _) => format!("{hours}h{minutes}m"),
        _ => format!("{days}d{hours}h"),
    }
}

/// How long ago the Unix time in `at` was: `12s ago`; `None` when absent.
fn ago(at: Option<&Value>, now: f64) -> Option<String> {
    at.and_then(Value::as_f64)
        .map(|at| format!("{} ago", span(now - at)))
}

/// Bytes as `12.3 MiB`; `-` when absent or zero (not sampled).
fn mebibytes(value: Option<&Value>) -> String {
    match value.and_then(Value::as_u64) {
        Some(bytes) if bytes > 0 => format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20)),
        _ => "-".to_owned(),
    }
}

/// The last non-empty line of a possibly multi-line message (a traceback's exception).
fn last_line(message: &str) -> &str {
    message
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or_default()
}

/// Left-aligned columns two spaces apart; the last column is not padded, so no line ends in
/// spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
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
        text(figures, "in_flight"),
        text(figures, "queue_depth"),
        total("rejected"),
        total("worker_restarts"),
        total("reloads"),
    )
}

/// `WEB POOL · 127.0.0.1:8000 · 4 workers wanted · generation 2`, then one row per worker.
fn render_pool(pool: &Value) -> String {
    let mut header = vec!["WEB POOL".to_owned()];
    if let Some(listen) = pool.get("listen").and_then(Value::as_array) {
        let addresses: Vec<&str> = listen.iter().filter_map(Value::as_str).collect();
        if !addresses.is_empty() {
            header.push(addresses.join(" "));
        }
    }
    header.push(format!("{} workers wanted", text(pool, "workers_wanted")));
    header.push(format!("generation {}", text(pool, "generation")));
    if let Some(reloading) = pool.get("reloading").and_then(Value::as_str) {
        header.push(format!("reloading: {reloading}"));
    }
    let mut out = header.join(" · ");
    out.push('\n');
    let mut rows = vec![
        [
            "SLOT",
            "PID",
            "GEN",
            "STATE",
            "REQUESTS",
            "IN FLIGHT",
            "RSS",
            "PSS",
            "LAST ERROR",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for worker in pool
        .get("workers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        rows.push(vec![
            text(worker, "slot"),
            text(worker, "pid"),
            text(worker, "generation"),
            text(worker, "state"),
            text(worker, "requests"),
            text(worker, "in_flight"),
            mebibytes(worker.get("rss_bytes")),
            mebibytes(worker.get("pss_bytes")),
            worker
                .get("last_error")
                .and_then(Value::as_str)
                .map_or_else(|| "-".to_owned(), |error| last_line(error).to_owned()),
        ]);
    }
    out.push_str(&table(&rows));
    for template in pool
        .get("templates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "template of generation {} · pid {} · RSS {} · PSS {}\n",
            text(template, "generation"),
            text(template, "pid"),
            mebibytes(template.get("rss_bytes")),
            mebibytes(template.get("pss_bytes")),
        ));
    }
    out
}

/// One row per program instance, with its last exit and why.
fn render_programs(programs: &[Value], now: f64) -> String {
    let mut rows = vec![
        [
            "NAME",
            "STATE",
            "PID",
            "GEN",
            "RESTARTS",
            "UPTIME",
            "RSS",
            "LAST EXIT",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for program in programs {
        let name = text(program, "name");
        let instances = program
            .get("instances")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if instances.is_empty() {
            rows.push(vec![name.clone(), text(program, "state")]);
        }
        for instance in &instances {
            let label = if instances.len() > 1 {
                format!("{name}:{}", text(instance, "index"))
            } else {
                name.clone()
            };
            rows.push(vec![
                label,
                text(instance, "state"),
                text(instance, "pid"),
                text(instance, "generation"),
                text(instance, "restarts"),
                seconds(instance.get("uptime_seconds")),
                mebibytes(instance.get("rss_bytes")),
                last_exit(instance, now),
            ]);
        }
    }
    table(&rows)
}

/// What an instance's last exit was and when, e.g. `exited with status 1 (12s ago):
/// ImportError: …; restarting in 2.0s`, or the crash-loop verdict of a fatal one; `-` before
/// any exit.
fn last_exit(instance: &Value, now: f64) -> String {
    let state = instance.get("state").and_then(Value::as_str);
    let detail = instance.get("detail").and_then(Value::as_str);
    let exit = instance.get("last_exit").and_then(Value::as_str);
    // A fatal instance's detail already names the exit: `exited with status 1 5 times in 1m;
    // giving up`.
    let (what, after) = match (state, detail, exit) {
        (Some("fatal"), Some(detail), _) => (Some(format!("crash loop: {detail}")), None),
        (_, detail, Some(exit)) => (Some(exit.to_owned()), detail),
        (_, Some(detail), None) => (Some(detail.to_owned()), None),
        (_, None, None) => (None, None),
    };
    let Some(mut line) = what else {
        return "-".to_owned();
    };
    if let Some(ago) = ago(instance.get("last_exit_at"), now) {
        line.push_str(&format!(" ({ago})"));
    }
    if let Some(output) = instance.get("last_output").and_then(Value::as_str) {
        line.push_str(&format!(": {output}"));
    }
    if let Some(after) = after {
        line.push_str(&format!("; {after}"));
    }
    line
}

/// `BEAT · leader · Redis up · redis://…`, the last Redis error, then one row per job.
fn render_beat(beat: &Value, now: f64) -> String {
    if let Some(error) = beat.get("error").and_then(Value::as_str) {
        return format!("BEAT · cannot read its status: {error}\n");
    }
    let role = match (
        beat.get("leader").and_then(Value::as_bool),
        beat.get("lock_holder").and_then(Value::as_str),
    ) {
        (Some(true), _) => "leader".to_owned(),
        (_, Some(holder)) => format!("standby (the lock is held by {holder})"),
        _ => "standby".to_owned(),
    };
    let redis = match beat.get("redis_up").and_then(Value::as_bool) {
        Some(true) => "Redis up",
        _ => "Redis down",
    };
    let mut out = format!("BEAT · {role} · {redis} · {}\n", text(beat, "broker"));
    if let Some(error) = beat.get("last_error").and_then(Value::as_str) {
        match ago(beat.get("last_error_at"), now) {
            Some(ago) => out.push_str(&format!("last error ({ago}): {error}\n")),
            None => out.push_str(&format!("last error: {error}\n")),
        }
    }
    let mut rows = vec![
        [
            "JOB",
            "TASK",
            "SCHEDULE",
            "NEXT RUN",
            "LAST RUN",
            "PUBLISHED",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for job in beat
        .get("jobs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let when = |key: &str| -> String {
            let Some(at) = job.get(key).and_then(Value::as_str) else {
                return "-".to_owned();
            };
            match chrono::DateTime::parse_from_rfc3339(at) {
                Ok(time) => {
                    let offset = time.timestamp_millis() as f64 / 1000.0 - now;
                    if offset >= 0.0 {
                        format!("{at} (in {})", span(offset))
                    } else {
                        format!("{at} ({} ago)", span(-offset))
                    }
                }
                Err(_) => at.to_owned(),
            }
        };
        rows.push(vec![
            text(job, "name"),
            text(job, "task"),
            text(job, "schedule"),
            when("next_run"),
            when("last_run"),
            text(job, "published"),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: f64 = 1_800_000_000.0;

    fn document() -> Value {
        serde_json::json!({
            "pid": 10, "version": "0.1.0", "phase": "running", "generation": 2,
            "uptime_seconds": 192, "config": "sauna.toml", "config_path": "/srv/app/sauna.toml",
            "pool": {
                "listen": ["127.0.0.1:8000"], "generation": 2, "workers_wanted": 1,
                "workers": [{"slot": 0, "pid": 41, "generation": 2, "state": "ready",
                             "requests": 7, "in_flight": 0, "rss_bytes": 12_897_485,
                             "pss_bytes": 4_404_019,
                             "last_error": "Traceback (most recent call last):\n  File \"x\"\nZeroDivisionError: division by zero\n"}],
                "templates": [{"generation": 2, "pid": 40, "rss_bytes": 31_457_280, "pss_bytes": 9_437_184}]
            },
            "figures": {"requests": {"2xx": 7}, "in_flight": 0, "queue_depth": 0},
            "programs": [
                {"name": "celery", "state": "running", "instances": [
                    {"index": 0, "pid": 42, "generation": 2, "state": "running", "restarts": 1,
                     "uptime_seconds": 3725, "rss_bytes": 104_857_600,
                     "last_exit": "killed by signal SIGKILL", "last_exit_at": NOW - 4000.0,
                     "last_output": null, "detail": null}]},
                {"name": "mailer", "state": "fatal", "instances": [
                    {"index": 0, "pid": null, "generation": 1, "state": "fatal", "restarts": 4,
                     "uptime_seconds": null, "rss_bytes": null,
                     "last_exit": "exited with status 1", "last_exit_at": NOW - 12.0,
                     "last_output": "ModuleNotFoundError: No module named 'mailer'",
                     "detail": "exited with status 1 5 times in 1m; giving up"}]},
                {"name": "flaky", "state": "backoff", "instances": [
                    {"index": 0, "pid": null, "generation": 1, "state": "backoff", "restarts": 0,
                     "uptime_seconds": null, "last_exit": "exited with status 3",
                     "last_exit_at": NOW - 1.0, "detail": "restarting in 1.0s"}]}
            ],
            "beat": {
                "leader": false, "lock_holder": null, "broker": "redis://127.0.0.1:6379/3",
                "redis_up": false,
                "last_error": "Redis at redis://127.0.0.1:6379/3: Connection refused (os error 111)",
                "last_error_at": NOW - 5.0,
                "jobs": [{"name": "cleanup", "task": "app.cleanup", "schedule": "every 30s",
                          "next_run": "2027-01-15T08:00:25+00:00", "last_run": null, "published": 0}]
            }
        })
    }

    fn line_of<'a>(text: &'a str, start: &str) -> &'a str {
        text.lines()
            .find(|line| line.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting with {start:?} in\n{text}"))
    }

    #[test]
    fn every_figure_has_its_unit_and_the_text_ends_with_one_newline() {
        let text = render_text(&document(), NOW);
        assert!(text.ends_with('\n') && !text.ends_with("\n\n"), "{text:?}");
        assert!(
            text.lines()
                .next()
                .unwrap()
                .contains("pid 10 · running · generation 2 · up 3m12s · /srv/app/sauna.toml"),
            "{text}"
        );
        let worker = line_of(&text, "0 ");
        assert!(worker.contains("12.3 MiB  4.2 MiB"), "{worker}");
        assert!(
            text.contains("template of generation 2 · pid 40 · RSS 30.0 MiB · PSS 9.0 MiB\n"),
            "{text}"
        );
        assert!(
            worker.ends_with("ZeroDivisionError: division by zero"),
            "{worker}"
        );
        let celery = line_of(&text, "celery");
        assert!(celery.contains("1h2m"), "{celery}");
        assert!(celery.contains("100.0 MiB"), "{celery}");
        assert!(
            celery.contains("killed by signal SIGKILL (1h6m ago)"),
            "{celery}"
        );
        assert!(
            text.lines().all(|line| line == line.trim_end()),
            "no trailing spaces:\n{text}"
        );
    }

    #[test]
    fn a_failing_program_shows_its_last_error_and_when() {
        let text = render_text(&document(), NOW);
        let mailer = line_of(&text, "mailer");
        assert!(
            mailer.ends_with(
                "crash loop: exited with status 1 5 times in 1m; giving up (12s ago): ModuleNotFoundError: No module named 'mailer'"
            ),
            "{mailer}"
        );
        let flaky = line_of(&text, "flaky");
        assert!(
            flaky.ends_with("exited with status 3 (1s ago); restarting in 1.0s"),
            "{flaky}"
        );
    }

    #[test]
    fn beat_shows_its_role_redis_and_last_error() {
        let text = render_text(&document(), NOW);
        assert!(
            text.contains("BEAT · standby · Redis down · redis://127.0.0.1:6379/3\n"),
            "{text}"
        );
        assert!(
            text.contains("last error (5s ago): Redis at redis://127.0.0.1:6379/3: Connection refused (os error 111)\n"),
            "{text}"
        );
        let job = line_of(&text, "cleanup");
        assert!(job.contains("2027-01-15T08:00:25+00:00 (in 25s)"), "{job}");
    }

    #[test]
    fn spans_use_their_two_largest_units() {
        assert_eq!(span(0.0), "0s");
        assert_eq!(span(-3.0), "0s");
        assert_eq!(span(59.4), "59s");
        assert_eq!(span(192.0), "3m12s");
        assert_eq!(span(3725.0), "1h2m");
        assert_eq!(span(90_061.0), "1d1h");
    }

    #[test]
    fn a_running_hook_is_shown_under_the_header() {
        let status = serde_json::json!({
            "pid": 7, "phase": "reloading", "generation": 3,
            "hook": {"hook": "before_reload", "index": 0, "commands": 2,
                     "command": "python manage.py migrate --noinput", "pid": 4242,
                     "started_at": NOW - 12.0}
        });
        let text = render_text(&status, NOW);
        assert!(
            text.contains("\nhook before_reload[0] (1/2): python manage.py migrate --noinput · pid 4242 · running 12s\n"),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_or_partial_document_still_renders() {
        let text = render_text(&serde_json::json!({"pid": 1}), NOW);
        assert_eq!(
            text,
            "sauna-supervisor - · pid 1 · - · generation - · up - · -\n"
        );
    }

    #[test]
    fn text_shows_why_beat_cannot_use_redis() {
        let status = serde_json::json!({
            "programs": [],
            "beat": {"leader": false, "redis_up": false, "jobs": [],
                     "last_error": "Redis at redis://127.0.0.1:6379/0: authentication failed (NOAUTH: …)"}
        });
        let text = render_text(&status, NOW);
        assert!(
            text.contains("\nBEAT · standby · Redis down · -\nlast error: Redis at redis://127.0.0.1:6379/0: authentication failed"),
            "{text}"
        );
    }
}
