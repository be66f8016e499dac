//! Runtime jobs: beat jobs kept in Redis beside the `sauna.toml` ones, so they can be added,
//! changed, paused and removed while supervisors run (`beat add` and friends, `beat import`, or
//! `python/sauna_beat.py` from application code on any host). This module owns their Redis
//! layout, the job document and its validation (the same rules as `[beat.jobs.NAME]`), and the
//! write scripts; running them and reading the keys back is `store`'s. Following the change
//! stream while leading is the actor's (`actor/runtime.rs`).
//!
//! Keys, under `[beat].key_prefix` (default `sauna:beat:`):
//! - `<prefix>jobs`: hash, job name → JSON job document (see [`JobDoc`]);
//! - `<prefix>since`: hash, job name → Unix ms (Redis's clock) of its last write or resume: slots
//!   after it are the current definition's to publish;
//! - `<prefix>paused`: set of paused job names;
//! - `<prefix>changes`: stream, one entry `name NAME` per write, trimmed to about
//!   [`CHANGES_MAXLEN`] entries; the leader reads it after the last id it applied, so a change
//!   costs one lookup however many jobs there are;
//! - `<prefix>static`: set of the `sauna.toml` (and `celery_app`) job names, written by the
//!   leader; the write script refuses those names;
//! - `<prefix>last`: hash, job name → last published slot (shared with TOML jobs, see
//!   `publisher`).
//!
//! Every write goes through one Lua script, so the document, its `since`, the stream entry and
//! the name check change together or not at all. Writers validate before writing; the leader
//! validates again what it reads and skips (logging once) a document it refuses, because anything
//! with Redis access can write the hash.

mod store;

use std::time::Duration;

use chrono_tz::Tz;
use proxy_conf::{CatchUp, DayRule, parse_time_zone};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::jobs::Job;
use super::schedule::Schedule;
pub use store::{Changes, Store, StoreError, StoredJob};

/// About this many change entries are kept; a leader that fell further behind reloads everything.
pub const CHANGES_MAXLEN: u64 = 100_000;
/// Longest job name accepted (it is a Redis hash field and a log field).
pub const MAX_NAME_LEN: usize = 200;

/// One runtime job as stored: the keys of `[beat.jobs.NAME]`, durations written as in
/// `sauna.toml` (`"30s"`), plus `one_off` and `celery_crontab`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDoc {
    /// Registered Celery task name.
    pub task: String,
    /// A 5-field crontab expression (or `@daily`…), exclusive with `every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// An interval such as `"30s"`, epoch-aligned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// IANA zone of `cron`; `[beat].timezone` of the leader when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Positional arguments, a JSON array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Keyword arguments, a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Value>,
    /// Queue; `celery` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Priority 0..=9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Relative expiry, e.g. `"10m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// `skip`, `once` (default) or `all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<String>,
    /// How old a missed slot may be and still be published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_window: Option<String>,
    /// Publish one slot, then pause the job (django-celery-beat's `one_off`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_off: bool,
    /// Read `cron` with Celery's crontab rule (every field must match, day-of-month AND
    /// day-of-week) instead of Vixie's (either day field), as `beat import` does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub celery_crontab: bool,
}

/// A runtime job as beat runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeJob {
    /// The job itself, as a TOML job would be.
    pub job: Job,
    /// Pause after the first publish.
    pub one_off: bool,
}

/// Checks a job name: what `beat add` and the leader accept.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("a job name must not be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "job name is {} bytes long; at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("job name {name:?} contains a control character"));
    }
    Ok(())
}

fn duration(key: &str, text: &str) -> Result<Duration, String> {
    text.parse::<proxy_conf::Duration>()
        .map(proxy_conf::Duration::get)
        .map_err(|error| format!("{key}: {error}"))
}

impl JobDoc {
    /// The job this document stands for, judged by the rules of `[beat.jobs.NAME]`; every
    /// problem is listed, `; `-separated.
    pub fn validate(&self, name: &str, default_tz: Tz) -> Result<RuntimeJob, String> {
        self.clone().into_job(name, default_tz)
    }

    /// [`JobDoc::validate`], consuming the document: its arguments and names move into the
    /// job rather than being copied (the leader and `beat list` judge 100 000 of them).
    pub fn into_job(self, name: &str, default_tz: Tz) -> Result<RuntimeJob, String> {
        let mut problems = Vec::new();
        if let Err(problem) = check_name(name) {
            problems.push(problem);
        }
        if self.task.trim().is_empty() {
            problems.push(
                "task: a job needs the Celery task to send, e.g. \"myapp.tasks.cleanup\""
                    .to_owned(),
            );
        }
        let tz = match &self.timezone {
            Some(zone) => parse_time_zone(zone)
                .map_err(|error| problems.push(format!("timezone: {error}")))
                .ok(),
            None => Some(default_tz),
        };
        let schedule = match (&self.cron, &self.every) {
            (None, None) => {
                problems.push(
                    "a job needs a schedule: cron (e.g. \"*/5 * * * *\") or every (e.g. \"30s\")"
                        .to_owned(),
                );
                None
            }
            (Some(_), Some(_)) => {
                problems.push("set either cron or every, not both".to_owned());
                None
            }
            (None, Some(every)) => match duration("every", every) {
                Ok(interval) if interval.is_zero() => {
                    problems.push("every: must be longer than 0s".to_owned());
                    None
                }
                Ok(interval) => Schedule::every(interval)
                    .map_err(|error| problems.push(format!("every: {error}")))
                    .ok(),
                Err(problem) => {
                    problems.push(problem);
                    None
                }
            },
            (Some(expr), None) => match expr.parse::<proxy_conf::Cron>() {
                Ok(cron) => tz.map(|tz| {
                    let mut spec = cron.spec;
                    if self.celery_crontab {
                        spec.day_rule = DayRule::All;
                    }
                    Schedule::Cron {
                        spec,
                        tz,
                        text: cron.text.into(),
                    }
                }),
                Err(error) => {
                    problems.push(format!("cron: {error}"));
                    None
                }
            },
        };
        let args = match self.args {
            None => Value::Array(Vec::new()),
            Some(args @ Value::Array(_)) => args,
            Some(other) => {
                problems.push(format!("args: must be a JSON array, not {other}"));
                Value::Null
            }
        };
        let kwargs = match self.kwargs {
            None => Value::Object(serde_json::Map::new()),
            Some(kwargs @ Value::Object(_)) => kwargs,
            Some(other) => {
                problems.push(format!("kwargs: must be a JSON object, not {other}"));
                Value::Null
            }
        };
        let queue = self.queue.unwrap_or_else(|| "celery".to_owned());
        if queue.trim().is_empty() {
            problems.push("queue: must not be empty; the default is \"celery\"".to_owned());
        }
        let priority = match self.priority {
            None => None,
            Some(priority @ 0..=9) => Some(priority as u8),
            Some(priority) => {
                problems.push(format!(
                    "priority: {priority} is out of range; expected 0 to 9 (0 is the highest under Redis)"
                ));
                None
            }
        };
        let expires = match &self.expires {
            None => None,
            Some(text) => match duration("expires", text) {
                Ok(expires) if expires.is_zero() => {
                    problems.push("expires: \"0s\" would expire every task at once; leave it out for tasks that never expire".to_owned());
                    None
                }
                Ok(expires) => Some(expires),
                Err(problem) => {
                    problems.push(problem);
                    None
                }
            },
        };
        let catch_up = match self.catch_up.as_deref() {
            None | Some("once") => CatchUp::Once,
            Some("skip") => CatchUp::Skip,
            Some("all") => CatchUp::All,
            Some(other) => {
                problems.push(format!(
                    "catch_up: \"{other}\" is not a policy; expected \"skip\", \"once\" or \"all\""
                ));
                CatchUp::Once
            }
        };
        let catch_up_window = match &self.catch_up_window {
            None => None,
            Some(text) => duration("catch_up_window", text)
                .map_err(|problem| problems.push(problem))
                .ok(),
        };
        match schedule {
            Some(schedule) if problems.is_empty() => Ok(RuntimeJob {
                job: Job {
                    name: name.to_owned(),
                    task: self.task,
                    schedule,
                    args,
                    kwargs,
                    queue,
                    priority,
                    expires,
                    catch_up,
                    catch_up_window,
                },
                one_off: self.one_off,
            }),
            _ => Err(problems.join("; ")),
        }
    }

    /// Reads a stored document; the error says why it is not one.
    pub fn parse(text: &str) -> Result<JobDoc, String> {
        serde_json::from_str(text).map_err(|error| format!("not a job document: {error}"))
    }

    /// The document as stored (compact JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The Lua script every add or change runs. KEYS: jobs, since, changes, static, paused.
/// ARGV: name, document, stream length. Returns 1 when the job is new, 0 when replaced.
pub const PUT_LUA: &str = r#"
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  return redis.error_reply('TOMLJOB job "' .. ARGV[1] .. '" is defined in sauna.toml; a runtime job cannot replace it')
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local created = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ms)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'name', ARGV[1])
return created
"#;

/// Removes a job. KEYS: jobs, since, changes, paused, last. ARGV: name, stream length.
/// Returns 1 when removed, 0 when there was no such job.
pub const REMOVE_LUA: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'name', ARGV[1])
return 1
";

/// Pauses (ARGV[3] = '1') or resumes ('0') a job; a resumed job's slots start after the resume.
/// KEYS: jobs, since, changes, paused. ARGV: name, stream length, pause.
/// Returns 1 when changed, 0 when it already was in that state, -1 when there is no such job.
pub const PAUSE_LUA: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
local changed
if ARGV[3] == '1' then
  changed = redis.call('SADD', KEYS[4], ARGV[1])
else
  changed = redis.call('SREM', KEYS[4], ARGV[1])
  if changed == 1 then
    local now = redis.call('TIME')
    redis.call('HSET', KEYS[2], ARGV[1], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
  end
end
if changed == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'name', ARGV[1])
end
return changed
";

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(json: &str) -> JobDoc {
        JobDoc::parse(json).unwrap()
    }

    /// `python/sauna_beat.py` writes the same layout from application code with its own copy of
    /// the write scripts and limits (it cannot load them from this binary): they must not drift.
    #[test]
    fn the_python_helper_writes_with_the_same_scripts_and_limits() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../python/sauna_beat.py");
        let helper = std::fs::read_to_string(path).unwrap();
        let python_string = |name: &str| {
            let start = helper
                .find(&format!("{name} = \"\"\""))
                .unwrap_or_else(|| panic!("{name} is not in {path}"));
            let body = &helper[start + name.len() + 6..];
            body[..body.find("\"\"\"").unwrap()].to_owned()
        };
        for (name, ours) in [
            ("PUT_LUA", PUT_LUA),
            ("REMOVE_LUA", REMOVE_LUA),
            ("PAUSE_LUA", PAUSE_LUA),
        ] {
            assert_eq!(python_string(name).trim(), ours.trim(), "{name} differs");
        }
        assert!(helper.contains(&format!("\nCHANGES_MAXLEN = {CHANGES_MAXLEN}\n")));
        assert!(helper.contains(&format!("\nMAX_NAME_LEN = {MAX_NAME_LEN}\n")));
    }

    #[test]
    fn a_valid_document_becomes_the_job_a_toml_entry_would() {
        let job = doc(r#"{"task":"t.x","cron":"30 3 * * *","timezone":"Europe/Helsinki","args":[1],"kwargs":{"k":"v"},"queue":"hi","priority":3,"expires":"1m","catch_up":"all","catch_up_window":"1h"}"#)
            .validate("nightly", chrono_tz::UTC)
            .unwrap();
        assert_eq!(
            job.job.schedule.to_string(),
            "cron \"30 3 * * *\" (Europe/Helsinki)"
        );
        assert_eq!(job.job.args, serde_json::json!([1]));
        assert_eq!(job.job.queue, "hi");
        assert_eq!(job.job.priority, Some(3));
        assert_eq!(job.job.expires, Some(Duration::from_secs(60)));
        assert_eq!(job.job.catch_up, CatchUp::All);
        assert_eq!(job.job.catch_up_window, Some(Duration::from_secs(3600)));
        let every = doc(r#"{"task":"t","every":"30s"}"#)
            .validate("e", chrono_tz::UTC)
            .unwrap();
        assert_eq!(every.job.queue, "celery");
        assert_eq!(every.job.kwargs, serde_json::json!({}));
    }

    #[test]
    fn every_problem_is_named() {
        let error = doc(r#"{"task":"","cron":"0 0 30 2 *","timezone":"Mars/Base","args":{"a":1},"priority":12,"expires":"0s","catch_up":"sometimes"}"#)
            .validate("bad", chrono_tz::UTC)
            .unwrap_err();
        for expected in [
            "task:",
            "timezone: unknown time zone",
            "args: must be a JSON array",
            "priority: 12",
            "expires:",
            "catch_up: \"sometimes\"",
        ] {
            assert!(error.contains(expected), "{expected} in {error}");
        }
        let error = doc(r#"{"task":"t","cron":"0 0 30 2 *"}"#)
            .validate("x", chrono_tz::UTC)
            .unwrap_err();
        assert!(error.contains("can never fire"), "{error}");
        assert!(
            doc(r#"{"task":"t"}"#)
                .validate("x", chrono_tz::UTC)
                .unwrap_err()
                .contains("needs a schedule")
        );
        assert!(
            doc(r#"{"task":"t","every":"1m","cron":"* * * * *"}"#)
                .validate("x", chrono_tz::UTC)
                .unwrap_err()
                .contains("not both")
        );
        assert!(
            doc(r#"{"task":"t","every":"soon"}"#)
                .validate("x", chrono_tz::UTC)
                .unwrap_err()
                .contains("every: invalid duration")
        );
        assert!(
            doc(r#"{"task":"t","every":"1m"}"#)
                .validate("a\nb", chrono_tz::UTC)
                .unwrap_err()
                .contains("control character")
        );
        assert!(
            JobDoc::parse(r#"{"task":"t","every":"1m","bogus":1}"#)
                .unwrap_err()
                .contains("unknown field")
        );
    }

    #[test]
    fn celery_crontab_ands_the_day_fields() {
        let job = doc(r#"{"task":"t","cron":"0 0 1 * mon","celery_crontab":true}"#)
            .validate("c", chrono_tz::UTC)
            .unwrap();
        // 2026-06-01 is the first Monday that is also the 1st.
        let next = job
            .job
            .schedule
            .next_after(crate::test_support::at("2026-01-01T00:00:00Z"));
        assert_eq!(next, Some(crate::test_support::at("2026-06-01T00:00:00Z")));
    }

    #[test]
    fn documents_round_trip_without_noise() {
        let text = r#"{"task":"t","every":"30s"}"#;
        assert_eq!(doc(text).to_json(), text);
    }
}
