//! The job table beat runs: `[beat.jobs.NAME]` entries (checked and parsed when the file loaded)
//! and imported Celery `beat_schedule` entries resolved into [`Job`]s, and the pure catch-up
//! decision — which due slots to publish after a wake-up, a
//! restart or an outage. It does not talk to Redis or keep time; the actor does.
//!
//! A *slot* is one scheduled instant of a job. Slots up to a job's *cursor* are handled. At a
//! wake-up at `now`, the due slots are those in `(cursor, now]`; the most recent is *on time*
//! when it is at most [`ON_TIME`] old (half the interval for sub-2 s intervals), all others are
//! *missed*, and the job's `catch_up` policy decides:
//! - `skip`: publish only an on-time slot;
//! - `once` (default): publish the on-time slot, or else the latest missed one if it lies within
//!   `catch_up_window` (no window: always the latest);
//! - `all`: publish every missed slot (within `catch_up_window` when one is set), oldest first,
//!   at most the newest [`MAX_CATCH_UP`].
//!
//! The policy alone decides, whatever the cause of the miss (a Redis outage, a leader that died
//! holding the lock, a partition) and whichever supervisor publishes after it: the cursor comes
//! from the last slot published to Redis, so every leader sees the same missed slots.
//!
//! Every slot not published is reported, so loss is never silent.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use proxy_conf::{AppConfig, BeatConfig, CatchUp, JobConfig};
use serde_json::Value;

use super::celery_schedule::{self, ImportError};
use super::message::toml_to_json;
use super::schedule::Schedule;

/// A slot this recent counts as on time rather than missed.
pub const ON_TIME: chrono::Duration = chrono::Duration::seconds(1);
/// Most missed slots `catch_up = "all"` publishes at once; older ones are reported as skipped.
pub const MAX_CATCH_UP: usize = 1000;

/// One resolved job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The job's name (`[beat.jobs.NAME]` or the `beat_schedule` key).
    pub name: String,
    /// Registered Celery task name.
    pub task: String,
    /// When it fires.
    pub schedule: Schedule,
    /// Positional arguments, a JSON array.
    pub args: Value,
    /// Keyword arguments, a JSON object.
    pub kwargs: Value,
    /// Queue name.
    pub queue: String,
    /// Priority 0..=9.
    pub priority: Option<u8>,
    /// Relative expiry from the publish instant.
    pub expires: Option<std::time::Duration>,
    /// Missed-slot policy.
    pub catch_up: CatchUp,
    /// How old a missed slot may be and still be published.
    pub catch_up_window: Option<std::time::Duration>,
}

/// A problem with the beat configuration: the key path it concerns and what is wrong.
pub type Problem = (Vec<String>, String);

/// A `[beat.jobs.NAME]` entry as beat runs it.
pub fn config_job(name: &str, job: &JobConfig) -> Job {
    Job {
        name: name.to_owned(),
        task: job.task.clone(),
        schedule: Schedule::of_job(job),
        args: Value::Array(job.args.iter().map(toml_to_json).collect()),
        kwargs: toml_to_json(&toml::Value::Table(job.kwargs.clone())),
        queue: job.queue.clone(),
        priority: job.priority,
        expires: job.expires.map(|expires| expires.get()),
        catch_up: job.catch_up,
        catch_up_window: job.catch_up_window.map(|window| window.get()),
    }
}

/// Why the job table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The configuration has problems (key path, message).
    #[error("{}", .0.iter().map(|(path, message)| format!("{}: {message}", path.join("."))).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
    /// The Celery app's schedule could not be imported.
    #[error(transparent)]
    Import(#[from] ImportError),
}

/// Resolves the configured jobs, plus the Celery app's `beat_schedule` when `celery_app` is set
/// (this runs `[app].python`).
pub async fn build_jobs(
    config: &BeatConfig,
    app: &AppConfig,
    base_dir: &Path,
) -> Result<Vec<Job>, JobsError> {
    let mut jobs: Vec<Job> = config
        .jobs
        .iter()
        .map(|(name, job)| config_job(name, job))
        .collect();
    if let Some(spec) = &config.celery_app {
        let imported = celery_schedule::import(spec, app, base_dir, config.timezone).await?;
        let mut problems = Vec::new();
        let names: BTreeMap<&str, ()> = jobs.iter().map(|job| (job.name.as_str(), ())).collect();
        for job in &imported {
            if names.contains_key(job.name.as_str()) {
                problems.push((
                    vec!["beat".to_owned(), "jobs".to_owned(), job.name.clone()],
                    format!(
                        "job \"{}\" is also in {spec}'s beat_schedule; rename one of them",
                        job.name
                    ),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(JobsError::Invalid(problems));
        }
        jobs.extend(imported);
    }
    Ok(jobs)
}

/// What to do with a job's due slots at one wake-up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DuePlan {
    /// Slots to publish, oldest first.
    pub publish: Vec<DateTime<Utc>>,
    /// Missed slots not published, as (first, last) bounds, when there are any.
    pub skipped: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// How late a slot may go out and still count as on time (shorter than the schedule's period).
pub fn on_time_tolerance(schedule: &Schedule) -> chrono::Duration {
    match schedule {
        Schedule::Every { interval } if interval.as_millis() < 2000 => {
            chrono::Duration::milliseconds(interval.as_millis() as i64 / 2)
        }
        _ => ON_TIME,
    }
}

/// The most recent slot in `(cursor, now]`, found without walking every slot since `cursor`.
pub fn latest_slot(
    schedule: &Schedule,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut span = chrono::Duration::minutes(2);
    loop {
        let from = (now - span).max(cursor);
        let mut latest = None;
        let mut slot = schedule.next_after(from)?;
        while slot <= now {
            latest = Some(slot);
            slot = schedule.next_after(slot)?;
        }
        if latest.is_some() || from == cursor {
            return latest;
        }
        span = span.checked_mul(4).unwrap_or(chrono::Duration::MAX);
    }
}

/// Decides which due slots in `(cursor, now]` to publish under `policy` (see the module doc).
pub fn plan_due(
    schedule: &Schedule,
    policy: CatchUp,
    window: Option<std::time::Duration>,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DuePlan {
    // The common case at a minute boundary, one slot due and on time, in two fire computations
    // rather than the search below: thousands of jobs are planned before the last batch leaves.
    if let Some(first) = schedule.next_after(cursor).filter(|first| *first <= now)
        && now - first <= on_time_tolerance(schedule)
        && schedule.next_after(first).is_none_or(|after| after > now)
    {
        return DuePlan {
            publish: vec![first],
            skipped: None,
        };
    }
    search_plan(schedule, policy, window, cursor, now)
}

/// `plan_due` for any case: finds the latest due slot, then applies the policy.
fn search_plan(
    schedule: &Schedule,
    policy: CatchUp,
    window: Option<std::time::Duration>,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DuePlan {
    let Some(latest) = latest_slot(schedule, cursor, now) else {
        return DuePlan::default();
    };
    let on_time = now - latest <= on_time_tolerance(schedule);
    let window = window.and_then(|window| chrono::Duration::from_std(window).ok());
    let first_due = schedule.next_after(cursor).unwrap_or(latest);
    let publish: Vec<DateTime<Utc>> = match policy {
        _ if on_time && first_due == latest => vec![latest],
        CatchUp::Skip if on_time => vec![latest],
        CatchUp::Skip => Vec::new(),
        CatchUp::Once if on_time => vec![latest],
        CatchUp::Once => match window {
            Some(window) if now - latest > window => Vec::new(),
            _ => vec![latest],
        },
        CatchUp::All => {
            let from = match window {
                Some(window) => (now - window).max(cursor),
                None => cursor,
            };
            let mut slots = std::collections::VecDeque::new();
            let mut slot = schedule.next_after(from - chrono::Duration::milliseconds(1));
            while let Some(current) = slot.filter(|slot| *slot <= now) {
                if current > cursor {
                    slots.push_back(current);
                    if slots.len() > MAX_CATCH_UP {
                        slots.pop_front();
                    }
                }
                slot = schedule.next_after(current);
            }
            slots.into_iter().collect()
        }
    };
    let skipped = match publish.first() {
        None => Some((first_due, latest)),
        Some(&first) if first > first_due => {
            let before_first = publish_gap_end(schedule, first_due, first);
            Some((first_due, before_first))
        }
        Some(_) => None,
    };
    DuePlan { publish, skipped }
}

/// The last slot before `until`, starting from `from` (which is before it).
fn publish_gap_end(
    schedule: &Schedule,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> DateTime<Utc> {
    latest_slot(
        schedule,
        from - chrono::Duration::milliseconds(1),
        until - chrono::Duration::milliseconds(1),
    )
    .unwrap_or(from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::at;

    fn every(secs: u64) -> Schedule {
        Schedule::every(std::time::Duration::from_secs(secs)).unwrap()
    }

    #[test]
    fn on_time_slot_is_published_under_every_policy() {
        for policy in [CatchUp::Skip, CatchUp::Once, CatchUp::All] {
            let plan = plan_due(
                &every(10),
                policy,
                None,
                at("2026-01-01T00:00:00Z"),
                at("2026-01-01T00:00:10.020Z"),
            );
            assert_eq!(plan.publish, [at("2026-01-01T00:00:10Z")], "{policy:?}");
            assert_eq!(plan.skipped, None);
        }
    }

    #[test]
    fn all_without_a_window_publishes_every_missed_slot() {
        // Whoever publishes after a gap (a Redis outage, a leader that died holding the lock)
        // continues from the last slot in Redis: 20, 30, 40 were missed by everyone.
        let (cursor, now) = (at("2026-01-01T00:00:10Z"), at("2026-01-01T00:00:45.5Z"));
        let all = plan_due(&every(10), CatchUp::All, None, cursor, now);
        assert_eq!(
            all.publish,
            [
                at("2026-01-01T00:00:20Z"),
                at("2026-01-01T00:00:30Z"),
                at("2026-01-01T00:00:40Z")
            ]
        );
        assert_eq!(all.skipped, None);
    }

    #[test]
    fn outage_under_each_policy() {
        // Cursor at 00:00:00, back at 00:00:35.5: slots 10, 20, 30 missed (none on time).
        let (cursor, now) = (at("2026-01-01T00:00:00Z"), at("2026-01-01T00:00:35.5Z"));
        let skip = plan_due(&every(10), CatchUp::Skip, None, cursor, now);
        assert!(skip.publish.is_empty());
        assert_eq!(
            skip.skipped,
            Some((at("2026-01-01T00:00:10Z"), at("2026-01-01T00:00:30Z")))
        );
        let once = plan_due(&every(10), CatchUp::Once, None, cursor, now);
        assert_eq!(once.publish, [at("2026-01-01T00:00:30Z")]);
        assert_eq!(
            once.skipped,
            Some((at("2026-01-01T00:00:10Z"), at("2026-01-01T00:00:20Z")))
        );
        let once_narrow = plan_due(
            &every(10),
            CatchUp::Once,
            Some(std::time::Duration::from_secs(5)),
            cursor,
            now,
        );
        assert!(once_narrow.publish.is_empty());
        let all = plan_due(
            &every(10),
            CatchUp::All,
            Some(std::time::Duration::from_secs(60)),
            cursor,
            now,
        );
        assert_eq!(
            all.publish,
            [
                at("2026-01-01T00:00:10Z"),
                at("2026-01-01T00:00:20Z"),
                at("2026-01-01T00:00:30Z")
            ]
        );
        assert_eq!(all.skipped, None);
        let all_window = plan_due(
            &every(10),
            CatchUp::All,
            Some(std::time::Duration::from_secs(20)),
            cursor,
            now,
        );
        assert_eq!(
            all_window.publish,
            [at("2026-01-01T00:00:20Z"), at("2026-01-01T00:00:30Z")]
        );
        assert_eq!(
            all_window.skipped,
            Some((at("2026-01-01T00:00:10Z"), at("2026-01-01T00:00:10Z")))
        );
    }

    #[test]
    fn missed_slots_collapse_into_an_on_time_one() {
        let plan = plan_due(
            &every(10),
            CatchUp::Once,
            None,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:00:40.1Z"),
        );
        assert_eq!(plan.publish, [at("2026-01-01T00:00:40Z")]);
        assert!(plan.skipped.is_some());
        let skip = plan_due(
            &every(10),
            CatchUp::Skip,
            None,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:00:40.1Z"),
        );
        assert_eq!(skip.publish, [at("2026-01-01T00:00:40Z")]);
    }

    #[test]
    fn all_is_capped() {
        let plan = plan_due(
            &every(1),
            CatchUp::All,
            Some(std::time::Duration::from_secs(3600)),
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T01:00:00.9Z"),
        );
        assert_eq!(plan.publish.len(), MAX_CATCH_UP);
        assert_eq!(plan.publish.last(), Some(&at("2026-01-01T01:00:00Z")));
    }

    #[test]
    fn latest_slot_of_a_rare_cron_job_far_back() {
        let yearly = Schedule::cron("@yearly", chrono_tz::UTC).unwrap();
        assert_eq!(
            latest_slot(
                &yearly,
                at("2020-06-01T00:00:00Z"),
                at("2026-03-01T00:00:00Z")
            ),
            Some(at("2026-01-01T00:00:00Z"))
        );
        assert_eq!(
            latest_slot(
                &yearly,
                at("2026-01-01T00:00:00Z"),
                at("2026-03-01T00:00:00Z")
            ),
            None
        );
    }

    #[test]
    fn the_on_time_shortcut_plans_what_the_search_plans() {
        let schedules = [
            Schedule::cron("* * * * *", chrono_tz::UTC).unwrap(),
            Schedule::cron("30 3 * * *", chrono_tz::Europe::Helsinki).unwrap(),
            Schedule::every(std::time::Duration::from_secs(120)).unwrap(),
            Schedule::every(std::time::Duration::from_millis(500)).unwrap(),
        ];
        let boundary = at("2026-03-29T01:00:00Z");
        let offsets_ms = [
            -90_000, -1, 0, 1, 250, 999, 1_000, 5_000, 59_999, 60_000, 61_000,
        ];
        for schedule in &schedules {
            for cursor_ms in offsets_ms {
                for now_ms in offsets_ms {
                    let cursor = boundary + chrono::Duration::milliseconds(cursor_ms);
                    let now = boundary + chrono::Duration::milliseconds(now_ms + 120_000);
                    for policy in [CatchUp::Skip, CatchUp::Once, CatchUp::All] {
                        assert_eq!(
                            plan_due(schedule, policy, None, cursor, now),
                            search_plan(schedule, policy, None, cursor, now),
                            "{schedule} {policy:?} cursor {cursor} now {now}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_configured_job_keeps_what_the_file_says() {
        let config = proxy_conf::load_str(
            "[beat]\ntimezone = \"Europe/Helsinki\"\n[beat.jobs.a]\ntask = \"t\"\ncron = \"30 3 * * *\"\nargs = [1]\nkwargs = { k = \"v\" }\nexpires = \"1m\"\n",
            "sauna.toml",
        )
        .unwrap();
        let beat = config.beat.unwrap();
        let job = config_job("a", &beat.jobs["a"]);
        assert_eq!(
            job.schedule.to_string(),
            "cron \"30 3 * * *\" (Europe/Helsinki)"
        );
        assert_eq!(job.args, serde_json::json!([1]));
        assert_eq!(job.kwargs, serde_json::json!({"k": "v"}));
        assert_eq!(job.queue, "celery");
        assert_eq!(job.expires, Some(std::time::Duration::from_secs(60)));
    }
}
