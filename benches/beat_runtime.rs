//! Beat with 100 000 runtime jobs (issue 16, point 2), the real `sauna-supervisor` binary against
//! a real `redis-server`:
//! - 5 000 jobs `* * * * *`, 45 000 daily cron jobs spread over the day, 50 000 `every` jobs of
//!   2–120 minutes (epoch-aligned, so they fall due on minute boundaries too): several thousand
//!   publishes at every minute boundary;
//! - **load**: from `run` to "runtime jobs loaded";
//! - **publish lag** at a minute boundary: the instant a consumer took the message from the queue
//!   (`BLMPOP`, as a worker waits on it) − its slot, p50/p99/max — what landed in Redis and
//!   when, whatever the message says (beat builds a slot's messages ahead of it);
//! - **a change near the boundary**: 1 000 of the every-minute jobs get new arguments 1 s before
//!   a boundary; each must publish that slot once, with the new arguments;
//! - **idle CPU** of the leader between boundaries (utime + stime from /proc), and its **RSS**;
//! - **`beat list`** of all 100 000 jobs, wall time.
//!
//! The results are printed next to what django-celery-beat's issue tracker reports at this scale,
//! with the load average: on a shared host the figures move with it.
//! Run with `cargo bench --bench beat_runtime` (needs `redis-server`).

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Timelike as _, Utc};
use sauna_supervisor::beat::runtime::{CHANGES_MAXLEN, JobDoc, PUT_LUA};

mod beat_support;
use beat_support::{RedisServer, free_port};

const JOBS_EVERY_MINUTE: usize = 5_000;
const JOBS_DAILY: usize = 45_000;
const JOBS_INTERVAL: usize = 50_000;
const CHANGED: usize = 1_000;

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn doc(task: &str, cron: Option<String>, every: Option<String>, args: serde_json::Value) -> JobDoc {
    JobDoc {
        task: task.to_owned(),
        cron,
        every,
        args: Some(args),
        kwargs: Some(serde_json::json!({"tenant": 1})),
        queue: Some("bench".to_owned()),
        expires: Some("1h".to_owned()),
        ..JobDoc::default()
    }
}

/// Stores `jobs` through the write script, pipelined.
fn put_all(connection: &mut redis::Connection, jobs: &[(String, JobDoc)]) {
    let hash: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(PUT_LUA)
        .query(connection)
        .expect("SCRIPT LOAD");
    for chunk in jobs.chunks(2_000) {
        let mut pipe = redis::pipe();
        for (name, doc) in chunk {
            pipe.cmd("EVALSHA")
                .arg(&hash)
                .arg(5)
                .arg(&[
                    "sauna:beat:jobs",
                    "sauna:beat:since",
                    "sauna:beat:changes",
                    "sauna:beat:static",
                    "sauna:beat:paused",
                ])
                .arg(name)
                .arg(doc.to_json())
                .arg(CHANGES_MAXLEN)
                .ignore();
        }
        let () = pipe.query(connection).expect("store jobs");
    }
}

fn jobs() -> Vec<(String, JobDoc)> {
    let mut jobs = Vec::with_capacity(JOBS_EVERY_MINUTE + JOBS_DAILY + JOBS_INTERVAL);
    for index in 0..JOBS_EVERY_MINUTE {
        jobs.push((
            format!("minutely-{index:05}"),
            doc(
                "reports.minutely",
                Some("* * * * *".to_owned()),
                None,
                serde_json::json!([index]),
            ),
        ));
    }
    for index in 0..JOBS_DAILY {
        let minute_of_day = index * 1440 / JOBS_DAILY;
        let cron = format!("{} {} * * *", minute_of_day % 60, minute_of_day / 60);
        jobs.push((
            format!("daily-{index:05}"),
            doc(
                "reports.daily",
                Some(cron),
                None,
                serde_json::json!([index]),
            ),
        ));
    }
    for index in 0..JOBS_INTERVAL {
        let minutes = 2 + index % 119;
        jobs.push((
            format!("interval-{index:05}"),
            doc(
                "feeds.poll",
                None,
                Some(format!("{minutes}m")),
                serde_json::json!([index]),
            ),
        ));
    }
    jobs
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|line| {
            line.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

struct Published {
    job: String,
    slot: DateTime<Utc>,
    lag_ms: f64,
    args: serde_json::Value,
}

/// `text`, a message taken from the queue at `taken`.
fn parse(text: &str, taken: DateTime<Utc>) -> Option<Published> {
    let message: serde_json::Value = serde_json::from_str(text).ok()?;
    let slot = DateTime::parse_from_rfc3339(message["headers"]["sauna_beat_slot"].as_str()?)
        .ok()?
        .with_timezone(&Utc);
    let body = base64::engine::general_purpose::STANDARD
        .decode(message["body"].as_str()?)
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some(Published {
        job: message["headers"]["sauna_beat_job"].as_str()?.to_owned(),
        slot,
        lag_ms: (taken - slot).num_microseconds()? as f64 / 1000.0,
        args: body[0].clone(),
    })
}

/// Empties the bench queue.
fn drain(connection: &mut redis::Connection) {
    let () = redis::cmd("DEL")
        .arg("bench")
        .query(connection)
        .expect("DEL");
}

/// Takes every message from the bench queue as it lands, oldest first, as a Celery worker
/// waits on its queue, until `until`; each is stamped with the instant it was taken.
fn consume(url: String, until: DateTime<Utc>) -> std::thread::JoinHandle<Vec<Published>> {
    let taking = beat_support::take_until(url, "bench", until);
    std::thread::spawn(move || {
        let taken = taking.join().expect("consumer");
        taken
            .iter()
            .flat_map(|(at, messages)| messages.iter().filter_map(|text| parse(text, *at)))
            .collect()
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".to_owned())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Sleeps until `at`.
fn sleep_until(at: DateTime<Utc>) {
    if let Ok(wait) = (at - Utc::now()).to_std() {
        std::thread::sleep(wait);
    }
}

fn next_boundary(after: DateTime<Utc>) -> DateTime<Utc> {
    let minute = after
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .expect("minute");
    minute + chrono::Duration::minutes(1)
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let load_before = load_average();
    let redis = RedisServer::start();
    let url = redis.url();
    let mut connection = redis::Client::open(url.as_str())
        .and_then(|client| client.get_connection())
        .expect("connect");
    let jobs = jobs();
    let stored_at = Instant::now();
    put_all(&mut connection, &jobs);
    println!(
        "stored {} runtime jobs through the write script in {:.1} s",
        jobs.len(),
        stored_at.elapsed().as_secs_f64()
    );

    let config = dir.path().join("sauna.toml");
    std::fs::write(
        &config,
        format!(
            "[beat]\nbroker = \"{url}\"\nlock_ttl = \"3s\"\n[control]\nsocket = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
            dir.path().join("control.sock").display(),
            free_port()
        ),
    )
    .expect("sauna.toml");
    let binary = env!("CARGO_BIN_EXE_sauna-supervisor");
    let log = dir.path().join("supervisor.log");
    let started = Instant::now();
    let supervisor = Guard(
        Command::new(binary)
            .args(["run", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start sauna-supervisor"),
    );
    let pid = supervisor.0.id();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("runtime jobs loaded")
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "runtime jobs never loaded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let load = started.elapsed();

    // The first full boundary after loading: lag of everything due then.
    let boundary = next_boundary(Utc::now() + chrono::Duration::seconds(2));
    sleep_until(boundary + chrono::Duration::seconds(5));
    drain(&mut connection);
    // Measure the next boundary from a clean queue, then idle CPU until just before the one after.
    let boundary = next_boundary(Utc::now());
    let published = consume(url.clone(), boundary + chrono::Duration::seconds(8))
        .join()
        .expect("consumer");
    let mut lags: Vec<f64> = published
        .iter()
        .filter(|p| p.slot == boundary)
        .map(|p| p.lag_ms)
        .collect();
    lags.sort_by(f64::total_cmp);

    let (cpu_start, wall_start) = (cpu_seconds(pid), Instant::now());
    sleep_until(next_boundary(boundary) - chrono::Duration::seconds(2));
    let idle_cpu = (cpu_seconds(pid) - cpu_start) / wall_start.elapsed().as_secs_f64() * 100.0;

    // 1 000 every-minute jobs change their arguments 1 s before the boundary.
    let changed: Vec<(String, JobDoc)> = jobs[..CHANGED]
        .iter()
        .map(|(name, doc)| {
            let mut doc = doc.clone();
            doc.args = Some(serde_json::json!(["changed"]));
            (name.clone(), doc)
        })
        .collect();
    let change_boundary = next_boundary(Utc::now());
    sleep_until(change_boundary - chrono::Duration::seconds(1));
    drain(&mut connection);
    let consumer = consume(url.clone(), change_boundary + chrono::Duration::seconds(8));
    let change_started = Instant::now();
    put_all(&mut connection, &changed);
    let change_took = change_started.elapsed();
    let after_change: Vec<Published> = consumer
        .join()
        .expect("consumer")
        .into_iter()
        .filter(|p| p.slot == change_boundary && p.job.starts_with("minutely-"))
        .collect();
    let changed_names: std::collections::HashSet<&str> =
        changed.iter().map(|(name, _)| name.as_str()).collect();
    let mut per_job: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for message in &after_change {
        *per_job.entry(message.job.as_str()).or_default() += 1;
    }
    let doubled = per_job.values().filter(|count| **count > 1).count();
    let missing = JOBS_EVERY_MINUTE - per_job.len();
    let new_args = after_change
        .iter()
        .filter(|p| {
            changed_names.contains(p.job.as_str()) && p.args == serde_json::json!(["changed"])
        })
        .count();
    let mut change_lags: Vec<f64> = after_change.iter().map(|p| p.lag_ms).collect();
    change_lags.sort_by(f64::total_cmp);

    let rss = status_kib(pid, "VmRSS:");
    let peak = status_kib(pid, "VmHWM:");
    let list_started = Instant::now();
    let list = Command::new(binary)
        .args(["beat", "list", "--json", "-c"])
        .arg(&config)
        .output()
        .expect("beat list");
    let list_took = list_started.elapsed();
    assert!(
        list.status.success(),
        "beat list: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    let listed = serde_json::from_slice::<Vec<serde_json::Value>>(&list.stdout)
        .map(|entries| entries.len())
        .unwrap_or(0);
    let table_started = Instant::now();
    let table = Command::new(binary)
        .args(["beat", "list", "-c"])
        .arg(&config)
        .output()
        .expect("beat list");
    let table_took = table_started.elapsed();
    drop(supervisor);
    // What the leader said about each pass, for reading the numbers above.
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    for line in log_text.lines().filter(|line| {
        line.contains("WARN")
            || line.contains("runtime job tasks")
            || line.contains("loaded")
            || line.contains("lock")
    }) {
        println!("log: {line}");
    }

    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\n100 000 runtime jobs ({JOBS_EVERY_MINUTE} every minute, {JOBS_DAILY} daily cron, {JOBS_INTERVAL} every 2–120 min), release build\nload average before / after: {load_before} / {}; lag = taken from the queue by a consumer − slot\n",
        load_average()
    );
    let rows = [
        (
            "load all jobs at start",
            format!("{:.2} s", load.as_secs_f64()),
            "—",
            "#454: 56k tasks stuck on \"Schedule changed\"",
        ),
        (
            "publishes at the boundary",
            format!("{}", lags.len()),
            "—",
            "#675: 10k tasks, hours without sending",
        ),
        (
            "publish lag p50 / p99 / max",
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                quantile(&lags, 0.5),
                quantile(&lags, 0.99),
                quantile(&lags, 1.0)
            ),
            "p99 < 100 ms",
            "#786: 100k+ tasks run hours late; #650: 1k schedules take 12–18 s to publish",
        ),
        (
            "1 000 changes 1 s before a boundary",
            format!(
                "stored in {:.0} ms; {new_args}/{CHANGED} with new args, {missing} missed, {doubled} doubled, p99 {:.1} ms",
                change_took.as_secs_f64() * 1000.0,
                quantile(&change_lags, 0.99)
            ),
            "0 missed, 0 doubled",
            "#35: a change near a minute boundary skips tasks",
        ),
        ("leader idle CPU", format!("{idle_cpu:.2} %"), "< 2 %", "—"),
        (
            "supervisor RSS (peak)",
            format!(
                "{:.1} MiB ({:.1} MiB)",
                rss as f64 / 1024.0,
                peak as f64 / 1024.0
            ),
            "< 100 MiB",
            "—",
        ),
        (
            "beat list --json / table",
            format!(
                "{:.2} s / {:.2} s ({listed} jobs, {} lines)",
                list_took.as_secs_f64(),
                table_took.as_secs_f64(),
                table.stdout.iter().filter(|b| **b == b'\n').count()
            ),
            "< 1 s",
            "—",
        ),
    ];
    let _ = writeln!(
        out,
        "{:<38} {:<60} {:<22} django-celery-beat",
        "measure", "sauna-supervisor", "target"
    );
    for (measure, ours, target, theirs) in rows {
        let _ = writeln!(out, "{measure:<38} {ours:<60} {target:<22} {theirs}");
    }
}
