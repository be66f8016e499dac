//! Importing a Celery app's own `beat_schedule` (`[beat].celery_app = "module:app"`), so an
//! existing project moves over without rewriting its schedule. We run `[app].python` with a small
//! embedded script that imports the app and prints its schedule as JSON, then turn each entry
//! into a [`Job`] with **Celery's** crontab semantics, not Vixie's: all five fields must match
//! (day-of-month AND day-of-week), and the field sets are the ones Celery itself expanded, so
//! wrap-around ranges (`fri-mon`, `50-10`) and Sunday = 0 mean exactly what they meant under
//! `celery beat`. Intervals (`timedelta`, seconds, `schedule(...)`) become epoch-aligned `every`
//! jobs. Solar and custom schedule classes, options we cannot honour, and arguments that are not
//! JSON are errors naming the entry. It does not decide when jobs fire (`schedule`) or run them.

use std::path::Path;
use std::time::Duration;

use chrono_tz::Tz;
use proxy_conf::{AppConfig, CatchUp, CronSpec, DayRule, parse_time_zone};
use serde::Deserialize;
use serde_json::Value;

use super::jobs::Job;
use super::schedule::Schedule;

/// Longest the import may take (an app that connects to a database at import time may hang).
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// The script run by `[app].python`; argv: app spec, app directory.
const DUMP_SCHEDULE_PY: &str = r#"
import datetime, importlib, json, sys
spec, directory = sys.argv[1], sys.argv[2]
if directory:
    sys.path.insert(0, directory)
module_name, _, attr = spec.partition(":")
module = importlib.import_module(module_name)
if attr:
    app = module
    for part in attr.split("."):
        app = getattr(app, part)
else:
    app = getattr(module, "app", None) or getattr(module, "celery")
from celery.schedules import crontab, schedule, solar
tz = app.conf.timezone or ("UTC" if app.conf.enable_utc else None)
entries = []
for name, entry in (app.conf.beat_schedule or {}).items():
    item = {"name": name, "task": entry.get("task"), "args": list(entry.get("args") or ()),
            "kwargs": dict(entry.get("kwargs") or {}), "options": dict(entry.get("options") or {})}
    sched = entry.get("schedule")
    if isinstance(sched, bool):
        item["unsupported"] = "schedule is a boolean"
    elif isinstance(sched, (int, float)):
        item["every"] = float(sched)
    elif isinstance(sched, datetime.timedelta):
        item["every"] = sched.total_seconds()
    elif isinstance(sched, crontab):
        item["crontab"] = {
            "minute": sorted(sched.minute), "hour": sorted(sched.hour),
            "day_of_month": sorted(sched.day_of_month), "month_of_year": sorted(sched.month_of_year),
            "day_of_week": sorted(sched.day_of_week),
            "text": " ".join(str(f) for f in (sched._orig_minute, sched._orig_hour,
                sched._orig_day_of_month, sched._orig_month_of_year, sched._orig_day_of_week)),
        }
    elif isinstance(sched, solar):
        item["unsupported"] = "solar schedules are not supported"
    elif type(sched) is schedule:
        item["every"] = sched.run_every.total_seconds()
    else:
        item["unsupported"] = "custom schedule class %s.%s is not supported" % (
            type(sched).__module__, type(sched).__qualname__)
    try:
        json.dumps(item)
    except (TypeError, ValueError) as error:
        item = {"name": name, "unsupported": "args, kwargs or options are not JSON: %s" % error}
    entries.append(item)
print(json.dumps({"timezone": None if tz is None else str(tz), "entries": entries}))
"#;

/// The Celery app's schedule could not be imported; the message names the entry or the app.
#[derive(Debug, thiserror::Error)]
#[error("beat.celery_app \"{app}\": {message}")]
pub struct ImportError {
    /// The `module:app` spec.
    pub app: String,
    /// What went wrong, including the Python traceback when there is one.
    pub message: String,
}

#[derive(Debug, Deserialize)]
struct Dump {
    timezone: Option<String>,
    entries: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    name: String,
    task: Option<String>,
    #[serde(default)]
    args: Value,
    #[serde(default)]
    kwargs: Value,
    #[serde(default)]
    options: serde_json::Map<String, Value>,
    every: Option<f64>,
    crontab: Option<Crontab>,
    unsupported: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Crontab {
    minute: Vec<u32>,
    hour: Vec<u32>,
    day_of_month: Vec<u32>,
    month_of_year: Vec<u32>,
    day_of_week: Vec<u32>,
    text: String,
}

fn bits(values: &[u32], max: u32) -> Option<u64> {
    values.iter().try_fold(0u64, |set, value| {
        (*value <= max).then_some(set | 1 << value)
    })
}

/// A [`CronSpec`] from the field sets Celery expanded, with Celery's all-fields-match rule.
fn celery_spec(cron: &Crontab) -> Option<CronSpec> {
    let mut fields = cron.text.split(' ');
    let starts_star = |field: Option<&str>| field.is_some_and(|field| field.starts_with('*'));
    let wildcard = starts_star(fields.next()) || starts_star(fields.next());
    let spec = CronSpec {
        minutes: bits(&cron.minute, 59)?,
        hours: bits(&cron.hour, 23)? as u32,
        days_of_month: bits(&cron.day_of_month, 31)? as u32,
        months: bits(&cron.month_of_year, 12)? as u16,
        days_of_week: bits(&cron.day_of_week, 6)? as u8,
        dom_star: true,
        dow_star: true,
        wildcard,
        day_rule: DayRule::All,
    };
    Some(spec)
}

fn convert(entry: Entry, tz: Tz) -> Result<Job, String> {
    let name = entry.name;
    let fail = |message: String| format!("beat_schedule entry \"{name}\": {message}");
    if let Some(reason) = entry.unsupported {
        return Err(fail(reason));
    }
    let task = entry
        .task
        .filter(|task| !task.is_empty())
        .ok_or_else(|| fail("no \"task\"".to_owned()))?;
    let schedule = match (entry.every, &entry.crontab) {
        (Some(seconds), _) => {
            let interval = Duration::try_from_secs_f64(seconds)
                .map_err(|_| fail(format!("interval {seconds} s is not a positive duration")))?;
            Schedule::every(interval).map_err(|error| fail(error.0))?
        }
        (None, Some(cron)) => {
            let spec = celery_spec(cron).ok_or_else(|| {
                fail(format!("crontab \"{}\" has out-of-range values", cron.text))
            })?;
            spec.check_possible(&cron.text)
                .map_err(|error| fail(error.0))?;
            Schedule::Cron {
                spec,
                tz,
                text: cron.text.as_str().into(),
            }
        }
        (None, None) => return Err(fail("no schedule".to_owned())),
    };
    let mut queue = "celery".to_owned();
    let mut priority = None;
    let mut expires = None;
    for (key, value) in &entry.options {
        match (key.as_str(), value) {
            ("queue" | "routing_key", Value::String(name)) => queue = name.clone(),
            ("exchange", Value::String(name)) if name.is_empty() || *name == queue => {}
            ("priority", Value::Number(number)) => {
                priority = number.as_u64().filter(|p| *p <= 9).map(|p| p as u8);
                if priority.is_none() {
                    return Err(fail(format!("option priority={number} must be 0..=9")));
                }
            }
            ("expires", Value::Number(number)) => {
                expires = number
                    .as_f64()
                    .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok());
            }
            (_, Value::Null) => {}
            _ => {
                return Err(fail(format!(
                    "option {key}={value} is not supported (supported: queue, routing_key, priority, expires in seconds)"
                )));
            }
        }
    }
    let args = match entry.args {
        Value::Null => Value::Array(Vec::new()),
        other => other,
    };
    let kwargs = match entry.kwargs {
        Value::Null => Value::Object(serde_json::Map::new()),
        other => other,
    };
    Ok(Job {
        name,
        task,
        schedule,
        args,
        kwargs,
        queue,
        priority,
        expires,
        catch_up: CatchUp::Once,
        catch_up_window: None,
    })
}

/// Parses the script's JSON output into jobs; every bad entry is reported, not just the first.
fn jobs_from_dump(stdout: &str, default_tz: Tz) -> Result<Vec<Job>, String> {
    // The app may print while importing; the dump is the last line.
    let dump: Dump = serde_json::from_str(stdout)
        .or_else(|_| serde_json::from_str(stdout.trim_end().lines().last().unwrap_or_default()))
        .map_err(|error| format!("could not read the schedule dump ({error}): {stdout}"))?;
    let tz = match &dump.timezone {
        Some(name) => {
            parse_time_zone(name).map_err(|error| format!("the app's timezone: {error}"))?
        }
        None => default_tz,
    };
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    for entry in dump.entries {
        match convert(entry, tz) {
            Ok(job) => jobs.push(job),
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(jobs)
    } else {
        Err(errors.join("; "))
    }
}

/// Runs `[app].python` to import `spec` and returns its `beat_schedule` as jobs. Crontab entries
/// are read in the app's `timezone` (UTC when `enable_utc` and none is set, else `default_tz`).
pub async fn import(
    spec: &str,
    app: &AppConfig,
    base_dir: &Path,
    default_tz: Tz,
) -> Result<Vec<Job>, ImportError> {
    let error = |message: String| ImportError {
        app: spec.to_owned(),
        message,
    };
    let directory = app
        .directory
        .as_ref()
        .map(|directory| base_dir.join(directory))
        .unwrap_or_else(|| base_dir.to_path_buf());
    let mut command = tokio::process::Command::new(&app.python);
    command
        .arg("-c")
        .arg(DUMP_SCHEDULE_PY)
        .arg(spec)
        .arg(&directory)
        .current_dir(&directory)
        .envs(&app.env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(IMPORT_TIMEOUT, command.output())
        .await
        .map_err(|_| {
            error(format!(
                "importing the app took longer than {IMPORT_TIMEOUT:?}"
            ))
        })?
        .map_err(|io| {
            error(format!(
                "cannot run {}: {io} (set [app].python)",
                app.python
            ))
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(error(format!(
            "{} failed to import it ({}):\n{}",
            app.python,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    jobs_from_dump(&stdout, default_tz).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::at;

    #[test]
    fn celery_crontab_ands_the_day_fields() {
        // crontab(minute=0, hour=0, day_of_month='1', day_of_week='mon') → next Monday-the-1st.
        let dump = r#"{"timezone": "UTC", "entries": [{"name": "m", "task": "t", "args": [], "kwargs": {}, "options": {},
            "crontab": {"minute": [0], "hour": [0], "day_of_month": [1], "month_of_year": [1,2,3,4,5,6,7,8,9,10,11,12],
                        "day_of_week": [1], "text": "0 0 1 * mon"}}]}"#;
        let jobs = jobs_from_dump(dump, chrono_tz::UTC).unwrap();
        assert_eq!(
            jobs[0].schedule.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-06-01T00:00:00Z"))
        );
    }

    #[test]
    fn intervals_options_and_errors() {
        let dump = r#"{"timezone": "Europe/Berlin", "entries": [
            {"name": "a", "task": "t", "args": [1], "kwargs": {"k": 2}, "options": {"queue": "hi", "priority": 7, "expires": 30}, "every": 10.0},
            {"name": "b", "unsupported": "solar schedules are not supported"},
            {"name": "c", "task": "t", "options": {"countdown": 5}, "every": 1.0}]}"#;
        let error = jobs_from_dump(dump, chrono_tz::UTC).unwrap_err();
        assert!(error.contains("entry \"b\": solar"), "{error}");
        assert!(error.contains("entry \"c\": option countdown=5"), "{error}");
        let ok = r#"{"timezone": null, "entries": [
            {"name": "a", "task": "t", "args": [1], "kwargs": {"k": 2}, "options": {"queue": "hi", "priority": 7, "expires": 30}, "every": 10.0}]}"#;
        let jobs = jobs_from_dump(ok, chrono_tz::UTC).unwrap();
        assert_eq!(jobs[0].queue, "hi");
        assert_eq!(jobs[0].priority, Some(7));
        assert_eq!(jobs[0].expires, Some(Duration::from_secs(30)));
        assert_eq!(
            jobs[0].schedule,
            Schedule::every(Duration::from_secs(10)).unwrap()
        );
    }
}
