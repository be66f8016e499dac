//! When a job fires: the 5-field Vixie cron parser for `[beat.jobs.NAME] cron`, fixed intervals
//! (`every`), and the next-fire computation with its daylight-saving rules. It owns no clock and
//! no I/O: every function takes the instant to start from, so the rules are unit-tested here.
//! Celery's own crontab semantics (imported `beat_schedule` entries) build the same [`CronSpec`]
//! in `celery_schedule`, with [`DayRule::All`].
//!
//! Why our own parser rather than the `cron` crate (protocols.md §5): that crate wants 6–7 fields
//! with seconds first, numbers Sunday as 1 (so `1-5` is Sunday–Thursday), ANDs day-of-month with
//! day-of-week, accepts Feb 30 and then never fires, skips times in the spring-forward gap and
//! fires twice in the fall-back overlap. Wrapping it would mean rewriting every expression and
//! post-filtering its iterator; a 5-field parser over bit sets is shorter than that wrapper and
//! lets the DST rules below be stated and tested directly.
//!
//! Semantics follow Debian/Vixie cron (crontab(5)): names (`jan`, `mon`), ranges, steps
//! (`*/15`, `1-30/2`), lists, Sunday as 0 or 7, and the day rule: when both day fields are
//! restricted (neither starts with `*`), a day matching *either* fires. `@hourly`, `@daily`
//! (`@midnight`), `@weekly`, `@monthly` and `@yearly` (`@annually`) are accepted. An expression
//! that can never fire (`0 0 30 2 *`) is refused.
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

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// Largest difference between two UTC offsets of one zone around a transition, with margin.
const MAX_SHIFT: Duration = Duration::hours(3);
/// Years searched for the next matching day before giving up (a Feb 29 that is a Monday can be
/// 28+ years away; the Gregorian cycle is 400).
const SEARCH_YEARS: i32 = 401;

/// How the day-of-month and day-of-week fields combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayRule {
    /// Vixie cron: when both fields are restricted, either may match.
    Either,
    /// Celery crontab: every field must match.
    All,
}

/// A parsed 5-field crontab as bit sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSpec {
    /// Bit n set = minute n (0–59).
    pub minutes: u64,
    /// Bit n set = hour n (0–23).
    pub hours: u32,
    /// Bit n set = day of month n (1–31).
    pub days_of_month: u32,
    /// Bit n set = month n (1–12).
    pub months: u16,
    /// Bit n set = weekday n, Sunday = 0 (0–6).
    pub days_of_week: u8,
    /// The day-of-month field was written starting with `*`.
    pub dom_star: bool,
    /// The day-of-week field was written starting with `*`.
    pub dow_star: bool,
    /// The minute or hour field starts with `*`: this job runs on real time across DST changes.
    pub wildcard: bool,
    /// How the two day fields combine.
    pub day_rule: DayRule,
}

/// A job's schedule: a crontab in a time zone, or a fixed interval.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Cron fields matched in local time of `tz`.
    Cron {
        /// The fields.
        spec: CronSpec,
        /// The zone the fields are read in.
        tz: Tz,
        /// The expression as written, for status and logs.
        text: String,
    },
    /// Every `interval`, aligned to the Unix epoch.
    Every {
        /// The interval (at least 1 ms).
        interval: std::time::Duration,
    },
}

/// Why a cron expression, interval or time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(pub String);

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

/// Parses an IANA time zone name such as `Europe/Helsinki`.
pub fn parse_tz(name: &str) -> Result<Tz, ScheduleError> {
    name.parse::<Tz>().map_err(|_| {
        ScheduleError(format!(
            "unknown time zone \"{name}\": use an IANA name such as \"UTC\" or \"Europe/Helsinki\""
        ))
    })
}

impl Schedule {
    /// A cron schedule from a Vixie crontab expression read in `tz`.
    pub fn cron(expr: &str, tz: Tz) -> Result<Schedule, ScheduleError> {
        Ok(Schedule::Cron {
            spec: CronSpec::parse_vixie(expr)?,
            tz,
            text: expr.trim().to_owned(),
        })
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
            Schedule::Cron { spec, tz, .. } => spec.next_after(after, *tz),
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

/// The value set of one field: bit n = value n.
fn parse_field(
    text: &str,
    what: &str,
    min: u32,
    max: u32,
    names: &[&str],
    name_base: u32,
) -> Result<u64, ScheduleError> {
    let bad = |detail: String| ScheduleError(format!("{what} field \"{text}\": {detail}"));
    let value = |token: &str| -> Result<u32, ScheduleError> {
        if let Ok(number) = token.parse::<u32>() {
            return Ok(number);
        }
        let lower = token.to_ascii_lowercase();
        names
            .iter()
            .position(|name| *name == lower)
            .map(|index| index as u32 + name_base)
            .ok_or_else(|| {
                bad(format!(
                    "\"{token}\" is not a number{}",
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(" or a name ({})", names.join(", "))
                    }
                ))
            })
    };
    let mut set = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(bad("empty list item".to_owned()));
        }
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .map_err(|_| bad(format!("step \"{step}\" is not a number")))?;
                if step == 0 {
                    return Err(bad("a step of 0 never advances".to_owned()));
                }
                (range, Some(step))
            }
            None => (item, None),
        };
        let (start, end) = if range == "*" {
            (min, max)
        } else if let Some((first, last)) = range.split_once('-') {
            (value(first)?, value(last)?)
        } else {
            let single = value(range)?;
            // `5/15` means "from 5 to the end, every 15" in Vixie cron.
            (single, if step.is_some() { max } else { single })
        };
        for bound in [start, end] {
            if bound < min || bound > max {
                return Err(bad(format!("{bound} is outside {min}-{max}")));
            }
        }
        if start > end {
            return Err(bad(format!(
                "range {start}-{end} runs backwards (write it as two ranges)"
            )));
        }
        let mut current = start;
        while current <= end {
            set |= 1 << current;
            current += step.unwrap_or(1);
        }
    }
    Ok(set)
}

const MONTH_NAMES: &[&str] = &[
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAY_NAMES: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Days in `month` at most (February counts 29: a leap year will come).
const MAX_DAYS: [u32; 13] = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

impl CronSpec {
    /// Parses a Vixie/Debian crontab expression: 5 fields or an `@` shortcut.
    pub fn parse_vixie(expr: &str) -> Result<CronSpec, ScheduleError> {
        let trimmed = expr.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_owned(),
            "@monthly" => "0 0 1 * *".to_owned(),
            "@weekly" => "0 0 * * 0".to_owned(),
            "@daily" | "@midnight" => "0 0 * * *".to_owned(),
            "@hourly" => "0 * * * *".to_owned(),
            other if other.starts_with('@') => {
                return Err(ScheduleError(format!(
                    "unknown shortcut \"{trimmed}\": use @hourly, @daily, @weekly, @monthly or @yearly"
                )));
            }
            _ => trimmed.to_owned(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(ScheduleError(format!(
                "cron expression \"{trimmed}\" has {} field(s); expected 5: minute hour day-of-month month day-of-week",
                fields.len()
            )));
        };
        let mut days_of_week = parse_field(dow, "day-of-week", 0, 7, DAY_NAMES, 0)?;
        // Sunday is 0 or 7.
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & 0x7f) | 1;
        }
        let spec = CronSpec {
            minutes: parse_field(minute, "minute", 0, 59, &[], 0)?,
            hours: parse_field(hour, "hour", 0, 23, &[], 0)? as u32,
            days_of_month: parse_field(dom, "day-of-month", 1, 31, &[], 0)? as u32,
            months: parse_field(month, "month", 1, 12, MONTH_NAMES, 1)? as u16,
            days_of_week: days_of_week as u8,
            dom_star: dom.starts_with('*'),
            dow_star: dow.starts_with('*'),
            wildcard: minute.starts_with('*') || hour.starts_with('*'),
            day_rule: DayRule::Either,
        };
        spec.check_possible(trimmed)?;
        Ok(spec)
    }

    /// Refuses a spec no date can ever match (e.g. Feb 30, or Apr 31 alone).
    pub fn check_possible(&self, shown: &str) -> Result<(), ScheduleError> {
        let empty = self.minutes == 0
            || self.hours == 0
            || self.days_of_month == 0
            || self.months == 0
            || self.days_of_week == 0;
        // With the OR rule a restricted weekday always matches some day of any month.
        let weekday_rescues = self.day_rule == DayRule::Either && !self.dom_star && !self.dow_star;
        let some_date = (1..=12u32).any(|month| {
            self.months & (1 << month) != 0
                && (1..=MAX_DAYS[month as usize]).any(|day| self.days_of_month & (1 << day) != 0)
        });
        if empty || !(some_date || weekday_rescues) {
            return Err(ScheduleError(format!(
                "cron expression \"{shown}\" can never fire (no month has such a day)"
            )));
        }
        Ok(())
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let dom = self.days_of_month & (1 << date.day()) != 0;
        let dow = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        match self.day_rule {
            DayRule::Either if !self.dom_star && !self.dow_star => dom || dow,
            _ => dom && dow,
        }
    }

    /// The first local minute at or after `start` (seconds ignored) whose fields all match.
    fn next_local(&self, start: NaiveDateTime) -> Option<NaiveDateTime> {
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
            if self.months & (1 << date.month()) == 0 {
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
            if self.day_matches(date) {
                let (from_hour, from_minute) = from.unwrap_or((0, 0));
                for hour in from_hour..24 {
                    if self.hours & (1 << hour) == 0 {
                        continue;
                    }
                    let first_minute = if hour == from_hour { from_minute } else { 0 };
                    if let Some(minute) =
                        (first_minute..60).find(|minute| self.minutes & (1 << minute) != 0)
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
    fn instants(&self, local: NaiveDateTime, tz: Tz) -> Vec<DateTime<Utc>> {
        match tz.from_local_datetime(&local) {
            LocalResult::Single(time) => vec![time.with_timezone(&Utc)],
            LocalResult::Ambiguous(first, second) => {
                let (first, second) = (first.with_timezone(&Utc), second.with_timezone(&Utc));
                if self.wildcard {
                    vec![first.min(second), first.max(second)]
                } else {
                    vec![first.min(second)]
                }
            }
            LocalResult::None if self.wildcard => Vec::new(),
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

    /// The first fire instant strictly after `after`, in zone `tz`.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local_after = after.with_timezone(&tz).naive_local();
        // Fast path: with one offset from well before `after` to well after the candidate,
        // local order is instant order and the first later local minute is the answer.
        let first = self.next_local(local_after + Duration::minutes(1))?;
        if let Some(&instant) = self.instants(first, tz).first() {
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
            let local = self.next_local(cursor)?;
            if let Some((_, found_at)) = best {
                if local > found_at + MAX_SHIFT {
                    break;
                }
            }
            for instant in self.instants(local, tz) {
                if instant > after && best.is_none_or(|(current, _)| instant < current) {
                    best = Some((instant, local));
                }
            }
            cursor = local + Duration::minutes(1);
        }
        best.map(|(instant, _)| instant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::at;

    fn fires(expr: &str, tz: &str, after: &str, count: usize) -> Vec<String> {
        let tz = parse_tz(tz).unwrap();
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
    fn fields_names_ranges_steps_lists() {
        let spec = CronSpec::parse_vixie("*/15 9-17/4 1,15 jan-mar MON-fri").unwrap();
        assert_eq!(spec.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(spec.hours, 1 << 9 | 1 << 13 | 1 << 17);
        assert_eq!(spec.days_of_month, 1 << 1 | 1 << 15);
        assert_eq!(spec.months, 0b1110);
        assert_eq!(spec.days_of_week, 0b111110);
        assert!(spec.wildcard);
        let point_step = CronSpec::parse_vixie("5/20 * * * *").unwrap();
        assert_eq!(point_step.minutes, 1 << 5 | 1 << 25 | 1 << 45);
    }

    #[test]
    fn sunday_is_zero_or_seven() {
        let zero = CronSpec::parse_vixie("0 0 * * 0").unwrap();
        let seven = CronSpec::parse_vixie("0 0 * * 7").unwrap();
        let range = CronSpec::parse_vixie("0 0 * * 5-7").unwrap();
        assert_eq!(zero.days_of_week, 1);
        assert_eq!(seven.days_of_week, 1);
        assert_eq!(range.days_of_week, 1 | 1 << 5 | 1 << 6);
    }

    #[test]
    fn refuses_bad_expressions_with_reasons() {
        for (expr, needle) in [
            ("* * * *", "expected 5"),
            ("60 * * * *", "outside 0-59"),
            ("*/0 * * * *", "step of 0"),
            ("0 0 30 2 *", "never fire"),
            ("0 0 31 4,6 *", "never fire"),
            ("0 0 * * 8", "outside 0-7"),
            ("0 0 * * funday", "not a number or a name"),
            ("50-10 * * * *", "backwards"),
            ("@reboot", "unknown shortcut"),
            ("1,,2 * * * *", "empty list item"),
        ] {
            let error = CronSpec::parse_vixie(expr).unwrap_err().0;
            assert!(error.contains(needle), "{expr}: {error}");
        }
        // Feb 30 OR Mondays can fire (on Mondays).
        assert!(CronSpec::parse_vixie("0 0 30 2 mon").is_ok());
        assert!(CronSpec::parse_vixie("0 0 29 2 *").is_ok());
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
