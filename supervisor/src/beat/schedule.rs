//! When a job fires: a parsed cron spec in its time zone, or a fixed interval (`every`), and the
//! next-fire computation with its daylight-saving rules. It owns no clock and no I/O: every
//! function takes the instant to start from, so the rules are unit-tested here. The cron syntax
//! itself — fields, names, steps, the Vixie day rule — is parsed once, when the file loads, by
//! `proxy_conf::cron`; Celery's own crontabs (imported `beat_schedule` entries) arrive as the
//! same [`CronSpec`] with [`DayRule::All`].
//!
//! Daylight saving, in the job's time zone (the cronie rule, made exact):
//! - a *fixed-time* job (minute and hour fields both without a leading `*`) runs exactly once per
//!   local day: a time inside the spring-forward gap runs at the instant the gap ends, a time
//!   repeated by fall-back runs at its first occurrence only;
//! - a *wildcard* job (`*` or `*/N` in the minute or hour field, e.g. hourly) runs on real time:
//!   local times that do not exist are skipped and repeated ones run at both occurrences, so an
//!   hourly job fires every real hour, with no gap and no double.
//!
//! `every` intervals are aligned to the Unix epoch (`every = "30s"` fires at :00 and :30), so
//! every supervisor sharing a broker computes the same slots and the fenced publish can tell
//! whether a slot was already sent.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use proxy_conf::{Cron, CronSpec, DayRule, JobConfig, JobSchedule};

/// Largest difference between two UTC offsets of one zone around a transition, with margin.
const MAX_SHIFT: Duration = Duration::hours(3);
/// Years searched for the next matching day before giving up (a Feb 29 that is a Monday can be
/// 28+ years away; the Gregorian cycle is 400).
const SEARCH_YEARS: i32 = 401;

/// A job's schedule: a crontab in a time zone, or a fixed interval.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Cron fields matched in local time of `tz`.
    Cron {
        /// The fields.
        spec: CronSpec,
        /// The zone the fields are read in.
        tz: Tz,
        /// The expression as written, for status and logs (shared: thousands of runtime jobs
        /// have the same few expressions).
        text: Arc<str>,
    },
    /// Every `interval`, aligned to the Unix epoch.
    Every {
        /// The interval (at least 1 ms).
        interval: std::time::Duration,
    },
}

/// Why a cron expression or interval was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(pub String);

impl From<proxy_conf::cron::CronError> for ScheduleError {
    fn from(error: proxy_conf::cron::CronError) -> Self {
        ScheduleError(error.0)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron { tz, text, .. } => write!(f, "cron \"{text}\" ({tz})"),
            Schedule::Every { interval } => {
                write!(f, "every {}", proxy_conf::Duration(*interval))
            }
        }
    }
}

impl Schedule {
    /// A cron schedule from a Vixie crontab expression read in `tz` (`beat next --cron`).
    pub fn cron(expr: &str, tz: Tz) -> Result<Schedule, ScheduleError> {
        let cron: Cron = expr.parse()?;
        Ok(Schedule::Cron {
            spec: cron.spec,
            tz,
            text: cron.text.into(),
        })
    }

    /// The schedule of a configured job, parsed and checked when the file loaded.
    pub fn of_job(job: &JobConfig) -> Schedule {
        match &job.schedule {
            JobSchedule::Cron(cron) => Schedule::Cron {
                spec: cron.spec.clone(),
                tz: job.timezone,
                text: cron.text.as_str().into(),
            },
            JobSchedule::Every(interval) => Schedule::Every {
                interval: interval.get(),
            },
        }
    }

    /// An interval schedule; zero is refused.
    pub fn every(interval: std::time::Duration) -> Result<Schedule, ScheduleError> {
        if interval.as_millis() == 0 {
            return Err(ScheduleError(
                "`every` must be at least 1ms, e.g. \"30s\"".to_owned(),
            ));
        }
        Ok(Schedule::Every { interval })
    }

    /// The first fire instant strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every { interval } => {
                let step = i64::try_from(interval.as_millis()).ok()?;
                let now = after.timestamp_millis();
                let next = now.div_euclid(step).checked_add(1)?.checked_mul(step)?;
                DateTime::from_timestamp_millis(next)
            }
            Schedule::Cron { spec, tz, .. } => next_fire(spec, after, *tz),
        }
    }

    /// Distance from `slot` to the fire after it: the job's period around that slot.
    pub fn period_after(&self, slot: DateTime<Utc>) -> Duration {
        match self.next_after(slot) {
            Some(next) => next - slot,
            None => Duration::MAX,
        }
    }
}

/// True when `date` matches the spec's day fields under its day rule.
fn day_matches(spec: &CronSpec, date: NaiveDate) -> bool {
    let dom = spec.days_of_month & (1 << date.day()) != 0;
    let dow = spec.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
    match spec.day_rule {
        DayRule::Either if !spec.dom_star && !spec.dow_star => dom || dow,
        _ => dom && dow,
    }
}

/// The first local minute at or after `start` (seconds ignored) whose fields all match.
fn next_local(spec: &CronSpec, start: NaiveDateTime) -> Option<NaiveDateTime> {
    let start = start.date().and_hms_opt(
        chrono::Timelike::hour(&start),
        chrono::Timelike::minute(&start),
        0,
    )?;
    let mut date = start.date();
    let mut from = Some((
        chrono::Timelike::hour(&start),
        chrono::Timelike::minute(&start),
    ));
    let last_year = date.year().checked_add(SEARCH_YEARS)?;
    while date.year() <= last_year {
        if spec.months & (1 << date.month()) == 0 {
            // Jump to the first day of the next month.
            let (year, month) = if date.month() == 12 {
                (date.year() + 1, 1)
            } else {
                (date.year(), date.month() + 1)
            };
            date = NaiveDate::from_ymd_opt(year, month, 1)?;
            from = None;
            continue;
        }
        if day_matches(spec, date) {
            let (from_hour, from_minute) = from.unwrap_or((0, 0));
            for hour in from_hour..24 {
                if spec.hours & (1 << hour) == 0 {
                    continue;
                }
                let first_minute = if hour == from_hour { from_minute } else { 0 };
                if let Some(minute) =
                    (first_minute..60).find(|minute| spec.minutes & (1 << minute) != 0)
                {
                    return date.and_hms_opt(hour, minute, 0);
                }
            }
        }
        date = date.succ_opt()?;
        from = None;
    }
    None
}

/// The instants a matching local minute stands for, under the DST rules in the module doc.
fn instants(spec: &CronSpec, local: NaiveDateTime, tz: Tz) -> Vec<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(time) => vec![time.with_timezone(&Utc)],
        LocalResult::Ambiguous(first, second) => {
            let (first, second) = (first.with_timezone(&Utc), second.with_timezone(&Utc));
            if spec.wildcard {
                vec![first.min(second), first.max(second)]
            } else {
                vec![first.min(second)]
            }
        }
        LocalResult::None if spec.wildcard => Vec::new(),
        LocalResult::None => {
            // The gap ends on a minute boundary: the first local minute that exists again
            // is the transition instant.
            (1..=MAX_SHIFT.num_minutes())
                .filter_map(|minutes| {
                    tz.from_local_datetime(&(local + Duration::minutes(minutes)))
                        .earliest()
                })
                .map(|time| time.with_timezone(&Utc))
                .next()
                .into_iter()
                .collect()
        }
    }
}

/// The first instant strictly after `after` at which `spec` fires, read in zone `tz`.
fn next_fire(spec: &CronSpec, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
    let local_after = after.with_timezone(&tz).naive_local();
    // Fast path: with one offset from well before `after` to well after the candidate,
    // local order is instant order and the first later local minute is the answer.
    let first = next_local(spec, local_after + Duration::minutes(1))?;
    if let Some(&instant) = instants(spec, first, tz).first() {
        let offset_before = tz.offset_from_utc_datetime(&(after - MAX_SHIFT).naive_utc());
        let offset_after = tz.offset_from_utc_datetime(&(instant + MAX_SHIFT).naive_utc());
        if offset_before == offset_after
            && tz.from_local_datetime(&first).single().is_some()
            && instant > after
        {
            return Some(instant);
        }
    }
    // Near a transition: scan local minutes from before `after` and keep the earliest
    // instant after it; past `found + MAX_SHIFT` no local minute can map earlier.
    let mut cursor = local_after - MAX_SHIFT;
    let mut best: Option<(DateTime<Utc>, NaiveDateTime)> = None;
    loop {
        let local = next_local(spec, cursor)?;
        if let Some((_, found_at)) = best {
            if local > found_at + MAX_SHIFT {
                break;
            }
        }
        for instant in instants(spec, local, tz) {
            if instant > after && best.is_none_or(|(current, _)| instant < current) {
                best = Some((instant, local));
            }
        }
        cursor = local + Duration::minutes(1);
    }
    best.map(|(instant, _)| instant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::at;

    fn fires(expr: &str, tz: &str, after: &str, count: usize) -> Vec<String> {
        let tz = proxy_conf::parse_time_zone(tz).unwrap();
        let schedule = Schedule::cron(expr, tz).unwrap();
        let mut out = Vec::new();
        let mut cursor = at(after);
        for _ in 0..count {
            cursor = schedule.next_after(cursor).unwrap();
            out.push(cursor.with_timezone(&tz).to_rfc3339());
        }
        out
    }

    #[test]
    fn an_ad_hoc_expression_is_parsed_by_proxy_conf() {
        let error = Schedule::cron("0 0 30 2 *", chrono_tz::UTC).unwrap_err();
        assert!(error.0.contains("can never fire"), "{error}");
        let schedule = Schedule::cron(" @daily ", chrono_tz::UTC).unwrap();
        assert_eq!(schedule.to_string(), "cron \"@daily\" (UTC)");
    }

    #[test]
    fn day_fields_or_when_both_restricted() {
        // 2026-01-01 is a Thursday: the 1st OR Mondays.
        assert_eq!(
            fires("0 0 1 * mon", "UTC", "2026-01-01T00:00:00Z", 3),
            [
                "2026-01-05T00:00:00+00:00",
                "2026-01-12T00:00:00+00:00",
                "2026-01-19T00:00:00+00:00"
            ]
        );
        // `*/2` in dom starts with `*`: AND.
        assert_eq!(
            fires("0 0 */2 * mon", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2026-01-05T00:00:00+00:00", "2026-01-19T00:00:00+00:00"]
        );
    }

    #[test]
    fn leap_day() {
        assert_eq!(
            fires("0 12 29 2 *", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2028-02-29T12:00:00+00:00", "2032-02-29T12:00:00+00:00"]
        );
    }

    #[test]
    fn strictly_after() {
        assert_eq!(
            fires("@daily", "UTC", "2026-03-02T00:00:00Z", 1),
            ["2026-03-03T00:00:00+00:00"]
        );
    }

    #[test]
    fn daily_in_spring_gap_runs_when_the_gap_ends() {
        // Helsinki: 2026-03-29 03:00 EET → 04:00 EEST.
        assert_eq!(
            fires("30 3 * * *", "Europe/Helsinki", "2026-03-27T12:00:00Z", 3),
            [
                "2026-03-28T03:30:00+02:00",
                "2026-03-29T04:00:00+03:00",
                "2026-03-30T03:30:00+03:00"
            ]
        );
        // New York: 2026-03-08 02:00 EST → 03:00 EDT.
        assert_eq!(
            fires("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", 3),
            [
                "2026-03-08T03:00:00-04:00",
                "2026-03-09T02:30:00-04:00",
                "2026-03-10T02:30:00-04:00"
            ]
        );
    }

    #[test]
    fn daily_in_fall_overlap_runs_once() {
        // Helsinki: 2026-10-25 04:00 EEST → 03:00 EET, so 03:30 happens twice.
        assert_eq!(
            fires("30 3 * * *", "Europe/Helsinki", "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T03:30:00+03:00", "2026-10-26T03:30:00+02:00"]
        );
        // Asking from between the two occurrences does not fire the second one.
        assert_eq!(
            fires("30 3 * * *", "Europe/Helsinki", "2026-10-25T00:31:00Z", 1),
            ["2026-10-26T03:30:00+02:00"]
        );
    }

    #[test]
    fn hourly_follows_real_hours_across_both_transitions() {
        assert_eq!(
            fires("0 * * * *", "America/New_York", "2026-03-08T05:30:00Z", 3),
            [
                "2026-03-08T01:00:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T04:00:00-04:00"
            ]
        );
        assert_eq!(
            fires("0 * * * *", "America/New_York", "2026-11-01T04:30:00Z", 3),
            [
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00"
            ]
        );
    }

    #[test]
    fn every_is_epoch_aligned() {
        let schedule = Schedule::every(std::time::Duration::from_secs(30)).unwrap();
        assert_eq!(
            schedule.next_after(at("2026-01-01T00:00:10Z")),
            Some(at("2026-01-01T00:00:30Z"))
        );
        assert_eq!(
            schedule.next_after(at("2026-01-01T00:00:30Z")),
            Some(at("2026-01-01T00:01:00Z"))
        );
        assert!(Schedule::every(std::time::Duration::ZERO).is_err());
    }
}
