//! The syntax of a `[beat.jobs.NAME] cron` expression: the 5-field Vixie cron parser that turns
//! it into a [`CronSpec`] of bit sets, refusing an expression that can never fire. Parsing only:
//! when a spec fires, in which time zone and across daylight-saving changes, is computed by the
//! supervisor's beat, which owns the clock.
//!
//! Why our own parser rather than the `cron` crate: that crate wants 6–7 fields with seconds
//! first, numbers Sunday as 1 (so `1-5` is Sunday–Thursday), ANDs day-of-month with day-of-week
//! and accepts Feb 30, which then never fires. A 5-field parser over bit sets is shorter than a
//! wrapper that would rewrite every expression.
//!
//! Semantics follow Debian/Vixie cron (crontab(5)): names (`jan`, `mon`), ranges, steps
//! (`*/15`, `1-30/2`), lists, Sunday as 0 or 7, and the day rule: when both day fields are
//! restricted (neither starts with `*`), a day matching *either* fires. `@hourly`, `@daily`
//! (`@midnight`), `@weekly`, `@monthly` and `@yearly` (`@annually`) are accepted. Celery's own
//! crontab semantics (imported `beat_schedule` entries) build the same [`CronSpec`] with
//! [`DayRule::All`].

use std::fmt;
use std::str::FromStr;

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

/// A cron expression as written, with its parsed fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    /// The fields.
    pub spec: CronSpec,
    /// The expression as written (trimmed), for status, logs and `beat next`.
    pub text: String,
}

/// Why a cron expression was refused; the text names the field and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CronError(pub String);

impl FromStr for Cron {
    type Err = CronError;

    fn from_str(expr: &str) -> Result<Self, Self::Err> {
        Ok(Cron {
            spec: CronSpec::parse_vixie(expr)?,
            text: expr.trim().to_owned(),
        })
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
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
) -> Result<u64, CronError> {
    let bad = |detail: String| CronError(format!("{what} field \"{text}\": {detail}"));
    let value = |token: &str| -> Result<u32, CronError> {
        if let Ok(number) = token.parse::<u32>() {
            return Ok(number);
        }
        let lower = token.to_ascii_lowercase();
        names
            .iter()
            .position(|name| *name == lower)
            .and_then(|index| u32::try_from(index).ok())
            .map(|index| index + name_base)
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
    pub fn parse_vixie(expr: &str) -> Result<CronSpec, CronError> {
        let trimmed = expr.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_owned(),
            "@monthly" => "0 0 1 * *".to_owned(),
            "@weekly" => "0 0 * * 0".to_owned(),
            "@daily" | "@midnight" => "0 0 * * *".to_owned(),
            "@hourly" => "0 * * * *".to_owned(),
            other if other.starts_with('@') => {
                return Err(CronError(format!(
                    "unknown shortcut \"{trimmed}\": use @hourly, @daily, @weekly, @monthly or @yearly"
                )));
            }
            _ => trimmed.to_owned(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(CronError(format!(
                "cron expression \"{trimmed}\" has {} field(s); expected 5: minute hour day-of-month month day-of-week",
                fields.len()
            )));
        };
        let mut days_of_week = parse_field(dow, "day-of-week", 0, 7, DAY_NAMES, 0)?;
        // Sunday is 0 or 7.
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & 0x7f) | 1;
        }
        // Each field's bits stay below its maximum (checked by `parse_field`), so the
        // narrowing conversions cannot lose a bit.
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

    /// Refuses a spec no date can ever match (e.g. Feb 30, or Apr 31 alone); `shown` is the
    /// expression as the message should quote it.
    pub fn check_possible(&self, shown: &str) -> Result<(), CronError> {
        let empty = self.minutes == 0
            || self.hours == 0
            || self.days_of_month == 0
            || self.months == 0
            || self.days_of_week == 0;
        // With the OR rule a restricted weekday always matches some day of any month.
        let weekday_rescues = self.day_rule == DayRule::Either && !self.dom_star && !self.dow_star;
        let some_date = (1..=12usize).any(|month| {
            self.months & (1 << month) != 0
                && (1..=MAX_DAYS[month]).any(|day| self.days_of_month & (1 << day) != 0)
        });
        if empty || !(some_date || weekday_rescues) {
            return Err(CronError(format!(
                "cron expression \"{shown}\" can never fire (no month has such a day)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn shortcuts_expand_to_their_fields() {
        assert_eq!(
            CronSpec::parse_vixie("@daily").unwrap(),
            CronSpec::parse_vixie("0 0 * * *").unwrap()
        );
        assert_eq!(
            CronSpec::parse_vixie("@ANNUALLY").unwrap(),
            CronSpec::parse_vixie("0 0 1 1 *").unwrap()
        );
        let cron: Cron = "  @hourly ".parse().unwrap();
        assert_eq!(cron.text, "@hourly");
        assert_eq!(cron.to_string(), "@hourly");
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
    fn messages_name_the_field() {
        assert_eq!(
            CronSpec::parse_vixie("61 * * * *").unwrap_err().0,
            "minute field \"61\": 61 is outside 0-59"
        );
        assert_eq!(
            CronSpec::parse_vixie("0 0 30 2 *").unwrap_err().0,
            "cron expression \"0 0 30 2 *\" can never fire (no month has such a day)"
        );
    }
}
