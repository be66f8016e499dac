//! Upcoming fire times, as `sauna-supervisor beat next` prints them: of one schedule, or of every
//! configured job. One RFC 3339 timestamp with its offset per line, in the schedule's time zone.
//! It only computes; nothing is published.

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;

use super::jobs::Job;
use super::schedule::Schedule;

/// The next `count` fire times of `schedule` after `after`, one line each, shown in `tz`.
pub fn fire_times(schedule: &Schedule, tz: Tz, after: DateTime<Utc>, count: usize) -> String {
    let mut out = String::new();
    let mut cursor = after;
    for _ in 0..count {
        match schedule.next_after(cursor) {
            Some(next) => {
                out.push_str(
                    &next
                        .with_timezone(&tz)
                        .to_rfc3339_opts(SecondsFormat::AutoSi, false),
                );
                out.push('\n');
                cursor = next;
            }
            None => break,
        }
    }
    out
}

/// The next `count` fire times of each job after `after`, under a `# name: schedule → task` line;
/// an interval has no zone of its own and is shown in `tz` (UTC when none).
pub fn jobs_fire_times(jobs: &[Job], tz: Option<Tz>, after: DateTime<Utc>, count: usize) -> String {
    let mut out = String::new();
    for (index, job) in jobs.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "# {}: {} → {}\n",
            job.name, job.schedule, job.task
        ));
        let zone = match &job.schedule {
            Schedule::Cron { tz, .. } => *tz,
            Schedule::Every { .. } => tz.unwrap_or(chrono_tz::UTC),
        };
        out.push_str(&fire_times(&job.schedule, zone, after, count));
    }
    out
}
