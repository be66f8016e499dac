//! `sauna-supervisor beat next`: prints upcoming fire times, for an ad-hoc `--cron`/`--every`
//! or for every configured job (with the Celery app's schedule imported). What the times are is
//! `crate::beat::next`'s; this module reads the flags and the config.

use std::path::Path;

use chrono::{DateTime, Utc};
use proxy_conf::parse_time_zone;

use super::{BeatNextArgs, CommandError};
use crate::beat::jobs::build_jobs;
use crate::beat::next::{fire_times, jobs_fire_times};
use crate::beat::schedule::Schedule;

/// Runs `beat next`; invalid expressions, zones or instants are a [`CommandError::Usage`] with
/// the reason (exit 2).
pub fn next_command(args: &BeatNextArgs) -> Result<(), CommandError> {
    let text = run(args).map_err(|message| CommandError::Usage(format!("beat next: {message}")))?;
    print!("{text}");
    Ok(())
}

fn run(args: &BeatNextArgs) -> Result<String, String> {
    let after = match &args.after {
        Some(text) => DateTime::parse_from_rfc3339(text)
            .map_err(|error| {
                format!("--after \"{text}\": {error} (expected RFC 3339, e.g. 2026-03-29T00:00:00+03:00)")
            })?
            .with_timezone(&Utc),
        None => Utc::now(),
    };
    let tz = match &args.timezone {
        Some(name) => Some(parse_time_zone(name).map_err(|error| format!("--timezone: {error}"))?),
        None => None,
    };
    if let Some(expr) = &args.cron {
        let tz = tz.unwrap_or(chrono_tz::UTC);
        let schedule = Schedule::cron(expr, tz).map_err(|error| format!("--cron: {error}"))?;
        return Ok(fire_times(&schedule, tz, after, args.count));
    }
    if let Some(every) = args.every {
        let schedule = Schedule::every(every.get()).map_err(|error| format!("--every: {error}"))?;
        return Ok(fire_times(
            &schedule,
            tz.unwrap_or(chrono_tz::UTC),
            after,
            args.count,
        ));
    }
    let loaded = args.config.load().map_err(|error| format!("{error:#}"))?;
    let Some(beat) = &loaded.config.beat else {
        return Err(format!(
            "{} has no [beat] section; pass --cron EXPR or --every DURATION",
            loaded.path.display()
        ));
    };
    let base_dir = loaded.path.parent().unwrap_or(Path::new("."));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start a runtime: {error}"))?;
    let jobs = runtime
        .block_on(build_jobs(beat, &loaded.config.app, base_dir))
        .map_err(|error| error.to_string())?;
    Ok(jobs_fire_times(&jobs, tz, after, args.count))
}
