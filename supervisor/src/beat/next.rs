//! `sauna-supervisor beat next`: prints upcoming fire times, for an ad-hoc `--cron`/`--every`
//! or for every configured job (with the Celery app's schedule imported). One RFC 3339 timestamp
//! with its offset per line, in the schedule's time zone. It only computes; nothing is published.

use std::path::Path;
use std::process::ExitCode;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;

use super::jobs::build_jobs;
use super::schedule::{Schedule, parse_tz};
use crate::cli::{BeatNextArgs, EXIT_USAGE};

/// Runs `beat next`; invalid expressions, zones or instants exit 2 with the reason.
pub fn next_command(args: &BeatNextArgs) -> anyhow::Result<ExitCode> {
    match run(args) {
        Ok(text) => {
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(message) => {
            eprintln!("sauna-supervisor: beat next: {message}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
    }
}

fn fire_times(schedule: &Schedule, tz: Tz, after: DateTime<Utc>, count: usize) -> String {
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
        Some(name) => Some(parse_tz(name).map_err(|error| format!("--timezone: {error}"))?),
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
    let loaded = crate::config::load(&args.config).map_err(|error| format!("{error:#}"))?;
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
        out.push_str(&fire_times(&job.schedule, zone, after, args.count));
    }
    Ok(out)
}
