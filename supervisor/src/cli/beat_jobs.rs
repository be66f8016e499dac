//! `sauna-supervisor beat add|remove|pause|resume|list|import`: runtime jobs from the command
//! line. Each command reads sauna.toml (with its `[redis]` secrets) for the broker and the
//! `sauna.toml` job names, and talks to Redis directly, so it works on any host with the config
//! and whether or not a supervisor runs. The layout and the rules are `crate::beat::runtime`'s;
//! this module reads flags, validates before writing and prints.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use proxy_conf::{BeatConfig, Loaded};
use serde::Serialize;
use serde_json::Value;

use super::{BeatAddArgs, BeatImportArgs, CommandError, ConfigArg};
use crate::beat::jobs::config_job;
use crate::beat::runtime::{JobDoc, Store, StoreError};
use crate::beat::schedule::Schedule;

/// How long connecting and each Redis reply may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

fn runtime() -> Result<tokio::runtime::Runtime, CommandError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| CommandError::Other(anyhow::anyhow!("cannot start a runtime: {error}")))
}

/// The loaded config and its `[beat]`.
fn load(config: &ConfigArg) -> Result<(Loaded, BeatConfig), CommandError> {
    let path = crate::config::config_path(config.config.as_deref());
    let loaded = crate::config::load_with_secrets(&path)?;
    let Some(beat) = loaded.config.beat.clone() else {
        return Err(CommandError::Usage(format!(
            "{} has no [beat] section; runtime jobs live on beat's broker",
            loaded.path.display()
        )));
    };
    Ok((loaded, beat))
}

async fn connect(loaded: &Loaded, beat: &BeatConfig) -> Result<Store, CommandError> {
    Store::connect(
        &beat.broker,
        loaded.secrets.redis_password.as_ref(),
        &beat.key_prefix,
        REDIS_TIMEOUT,
    )
    .await
    .map_err(store_error)
}

fn store_error(error: StoreError) -> CommandError {
    match error {
        StoreError::TomlJob(_) => CommandError::Usage(error.to_string()),
        other => CommandError::Other(other.into()),
    }
}

/// Parses a `--args`/`--kwargs` value.
fn json_flag(flag: &str, text: &Option<String>) -> Result<Option<Value>, CommandError> {
    text.as_deref()
        .map(|text| {
            serde_json::from_str(text)
                .map_err(|error| CommandError::Usage(format!("{flag} {text:?}: not JSON: {error}")))
        })
        .transpose()
}

/// The document `beat add` stores.
fn document(args: &BeatAddArgs) -> Result<JobDoc, CommandError> {
    Ok(JobDoc {
        task: args.task.clone(),
        cron: args.cron.clone(),
        every: args.every.clone(),
        timezone: args.timezone.clone(),
        args: json_flag("--args", &args.args)?,
        kwargs: json_flag("--kwargs", &args.kwargs)?,
        queue: args.queue.clone(),
        priority: args.priority,
        expires: args.expires.clone(),
        catch_up: args.catch_up.clone(),
        catch_up_window: args.catch_up_window.clone(),
        one_off: args.one_off,
        celery_crontab: false,
    })
}

/// Refuses `name` when sauna.toml defines it (the leader also publishes the names of the Celery
/// app's jobs, which the write script refuses).
fn refuse_toml_name(beat: &BeatConfig, name: &str) -> Result<(), CommandError> {
    if beat.jobs.contains_key(name) {
        return Err(CommandError::Usage(
            StoreError::TomlJob(name.to_owned()).to_string(),
        ));
    }
    Ok(())
}

/// `beat add`: validates with the rules of `[beat.jobs.NAME]`, then stores (adds or replaces).
pub fn add_command(args: &BeatAddArgs) -> Result<(), CommandError> {
    let doc = document(args)?;
    let (loaded, beat) = load(&args.config)?;
    doc.validate(&args.name, beat.timezone)
        .map_err(|problems| CommandError::Usage(format!("beat add {}: {problems}", args.name)))?;
    refuse_toml_name(&beat, &args.name)?;
    runtime()?.block_on(async {
        let mut store = connect(&loaded, &beat).await?;
        let created = store.put(&args.name, &doc).await.map_err(store_error)?;
        let verb = if created { "added" } else { "replaced" };
        println!("{verb} runtime job \"{}\"", args.name);
        Ok(())
    })
}

/// `beat remove`.
pub fn remove_command(config: &ConfigArg, name: &str) -> Result<(), CommandError> {
    let (loaded, beat) = load(config)?;
    refuse_toml_name(&beat, name)?;
    runtime()?.block_on(async {
        let mut store = connect(&loaded, &beat).await?;
        store.remove(name).await.map_err(store_error)?;
        println!("removed runtime job \"{name}\"");
        Ok(())
    })
}

/// `beat pause` / `beat resume`.
pub fn pause_command(config: &ConfigArg, name: &str, pause: bool) -> Result<(), CommandError> {
    let (loaded, beat) = load(config)?;
    refuse_toml_name(&beat, name)?;
    runtime()?.block_on(async {
        let mut store = connect(&loaded, &beat).await?;
        let changed = store.set_paused(name, pause).await.map_err(store_error)?;
        let state = if pause { "paused" } else { "resumed" };
        if changed {
            println!("{state} runtime job \"{name}\"");
        } else {
            println!("runtime job \"{name}\" was already {state}");
        }
        Ok(())
    })
}

/// One line of `beat list`.
#[derive(Debug, Serialize)]
struct Listed {
    name: String,
    /// `toml` or `runtime`.
    source: &'static str,
    /// `active`, `paused` or `invalid`.
    state: &'static str,
    schedule: Option<String>,
    task: Option<String>,
    next_run: Option<String>,
    last_run: Option<String>,
    /// Why an invalid job does not run.
    error: Option<String>,
}

fn show(schedule: &Schedule, time: DateTime<Utc>) -> String {
    match schedule {
        Schedule::Cron { tz, .. } => time
            .with_timezone(tz)
            .to_rfc3339_opts(SecondsFormat::AutoSi, false),
        Schedule::Every { .. } => time.to_rfc3339_opts(SecondsFormat::AutoSi, false),
    }
}

/// `beat list`: every job, sauna.toml's and Redis's, with its next and last run.
pub fn list_command(config: &ConfigArg, json: bool) -> Result<(), CommandError> {
    let (loaded, beat) = load(config)?;
    let now = Utc::now();
    let (stored, toml_last) = runtime()?.block_on(async {
        let mut store = connect(&loaded, &beat).await?;
        let stored = store.all().await.map_err(store_error)?;
        let names: Vec<String> = beat.jobs.keys().cloned().collect();
        let toml_last = store.last_slots(&names).await.map_err(store_error)?;
        Ok::<_, CommandError>((stored, toml_last))
    })?;
    let mut listed = Vec::with_capacity(beat.jobs.len() + stored.len());
    for ((name, config), last) in beat.jobs.iter().zip(toml_last) {
        let job = config_job(name, config);
        listed.push(Listed {
            name: name.clone(),
            source: "toml",
            state: "active",
            next_run: job.schedule.next_after(now).map(|t| show(&job.schedule, t)),
            last_run: last
                .and_then(DateTime::from_timestamp_millis)
                .map(|t| show(&job.schedule, t)),
            schedule: Some(job.schedule.to_string()),
            task: Some(job.task),
            error: None,
        });
    }
    for job in stored {
        let judged =
            JobDoc::parse(&job.document).and_then(|doc| doc.into_job(&job.name, beat.timezone));
        let judged = match judged {
            Ok(_) if beat.jobs.contains_key(&job.name) => {
                Err("a sauna.toml job has this name; the runtime job is ignored".to_owned())
            }
            other => other,
        };
        let entry = match judged {
            Ok(runtime) => {
                let schedule = &runtime.job.schedule;
                Listed {
                    name: job.name,
                    source: "runtime",
                    state: if job.paused { "paused" } else { "active" },
                    next_run: (!job.paused)
                        .then(|| schedule.next_after(now))
                        .flatten()
                        .map(|t| show(schedule, t)),
                    last_run: job
                        .last
                        .and_then(DateTime::from_timestamp_millis)
                        .map(|t| show(schedule, t)),
                    schedule: Some(schedule.to_string()),
                    task: Some(runtime.job.task),
                    error: None,
                }
            }
            Err(reason) => Listed {
                name: job.name,
                source: "runtime",
                state: "invalid",
                schedule: None,
                task: None,
                next_run: None,
                last_run: None,
                error: Some(reason),
            },
        };
        listed.push(entry);
    }
    // Runtime jobs come sorted from the store; the few TOML ones are merged in.
    listed.sort_by(|a, b| a.name.cmp(&b.name).then(a.source.cmp(b.source)));
    use std::io::Write as _;
    // Written as it is formatted, through one buffer: 100 000 jobs make some 20 MB of text.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let written = if json {
        serde_json::to_writer_pretty(&mut out, &listed)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
    } else {
        write_table(&mut out, &listed)
    };
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = written.and_then(|()| out.flush());
    Ok(())
}

/// `beat list`'s table: one line per job, columns padded to their widest cell.
fn write_table(out: &mut impl std::io::Write, listed: &[Listed]) -> std::io::Result<()> {
    const HEADER: [&str; 7] = [
        "NAME", "SOURCE", "STATE", "SCHEDULE", "TASK", "NEXT", "LAST",
    ];
    let mut widths = HEADER.map(str::len);
    for job in listed {
        for (width, cell) in widths.iter_mut().zip(cells(job)) {
            *width = (*width).max(cell.width());
        }
    }
    let mut line = |row: [Cell; 7]| -> std::io::Result<()> {
        for (index, cell) in row.iter().enumerate() {
            if index > 0 {
                out.write_all(b"  ")?;
            }
            cell.write(out)?;
            if index < row.len() - 1 {
                for _ in cell.width()..widths[index] {
                    out.write_all(b" ")?;
                }
            }
        }
        out.write_all(b"\n")
    };
    line(HEADER.map(Cell::Text))?;
    for job in listed {
        line(cells(job))?;
    }
    Ok(())
}

/// One cell of the table, borrowed from its job.
#[derive(Clone, Copy)]
enum Cell<'a> {
    Text(&'a str),
    Error(&'a str),
}

impl Cell<'_> {
    fn width(&self) -> usize {
        match self {
            Cell::Text(text) => chars(text),
            Cell::Error(error) => "error: ".len() + chars(error),
        }
    }

    fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        match self {
            Cell::Text(text) => out.write_all(text.as_bytes()),
            Cell::Error(error) => {
                out.write_all(b"error: ")?;
                out.write_all(error.as_bytes())
            }
        }
    }
}

/// Characters in `text` (its byte length when ASCII, as names and times nearly always are).
fn chars(text: &str) -> usize {
    if text.is_ascii() {
        text.len()
    } else {
        text.chars().count()
    }
}

fn or_dash(value: &Option<String>) -> Cell<'_> {
    Cell::Text(value.as_deref().unwrap_or("-"))
}

fn cells(job: &Listed) -> [Cell<'_>; 7] {
    [
        Cell::Text(&job.name),
        Cell::Text(job.source),
        Cell::Text(job.state),
        or_dash(&job.schedule),
        or_dash(&job.task),
        or_dash(&job.next_run),
        match &job.error {
            Some(error) => Cell::Error(error),
            None => or_dash(&job.last_run),
        },
    ]
}

/// `beat import --django-celery-beat URL`.
pub fn import_command(args: &BeatImportArgs) -> Result<(), CommandError> {
    let (loaded, beat) = load(&args.config)?;
    let rows = crate::beat::django_import::read(&args.django_celery_beat)
        .map_err(|error| CommandError::Other(error.into()))?;
    let total = rows.len();
    let mut refused = Vec::new();
    let mut accepted = Vec::new();
    for row in rows {
        let name = row.name.clone();
        match row
            .into_document()
            .and_then(|doc| doc.validate(&name, beat.timezone).map(|_| doc))
        {
            Ok(_) if beat.jobs.contains_key(&name) => {
                refused.push((name, "a sauna.toml job has this name".to_owned()))
            }
            Ok(doc) => accepted.push((name, doc)),
            Err(reason) => refused.push((name, reason)),
        }
    }
    if !args.dry_run {
        runtime()?.block_on(async {
            let mut store = connect(&loaded, &beat).await?;
            let mut kept = Vec::with_capacity(accepted.len());
            for (name, doc) in accepted.drain(..) {
                match store.put(&name, &doc).await {
                    Ok(_) => kept.push((name, doc)),
                    Err(error @ StoreError::TomlJob(_)) => refused.push((name, error.to_string())),
                    Err(error) => return Err(store_error(error)),
                }
            }
            accepted = kept;
            Ok::<_, CommandError>(())
        })?;
    }
    let verb = if args.dry_run {
        "would import"
    } else {
        "imported"
    };
    for (name, doc) in &accepted {
        let schedule = doc
            .cron
            .as_ref()
            .map(|cron| format!("cron \"{cron}\""))
            .or_else(|| doc.every.as_ref().map(|every| format!("every {every}")))
            .unwrap_or_default();
        println!("{verb} \"{name}\": {schedule} → {}", doc.task);
    }
    for (name, reason) in &refused {
        println!("not imported \"{name}\": {reason}");
    }
    println!(
        "{} of {total} enabled periodic task(s) {verb}, {} not",
        accepted.len(),
        refused.len()
    );
    if refused.is_empty() {
        Ok(())
    } else {
        Err(CommandError::Other(anyhow::anyhow!(
            "beat import: {} periodic task(s) cannot be expressed as runtime jobs (listed above); the rest were {verb}",
            refused.len()
        )))
    }
}
