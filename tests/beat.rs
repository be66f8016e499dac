//! Beat: `beat next` golden files, and the beat actor against a real `redis-server` on a free
//! port and a real Celery worker from the test venv — messages executed with the right
//! arguments, expired ones discarded, priority keys, an imported Celery `beat_schedule`, several
//! publishers on one Redis (every slot exactly once), leader takeover, a Redis outage (with the
//! leader stopped or alive) and a restart of every supervisor under each catch-up policy, and a
//! network partition (`partition`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sauna_supervisor::beat::{self, BeatHandle};
use sauna_supervisor::metrics::Metrics;
use serde_json::Value;

use crate::util::redis::RedisServer;
use crate::util::{Sandbox, python, repo_root};

// partition: three supervisors and Redis in network namespaces, the leader's link cut.
mod partition;

// ---------------------------------------------------------------------------------------------
// `beat next` golden files

/// (golden file stem, arguments after `beat next`)
const GOLDEN: &[(&str, &[&str])] = &[
    (
        "names",
        &[
            "--cron",
            "0 9 * jan,JUL mon-fri",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "6",
        ],
    ),
    (
        "steps",
        &[
            "--cron",
            "*/20 8-18/5 * * *",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "9",
        ],
    ),
    (
        "lists",
        &[
            "--cron",
            "5,35 1,13 * * *",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "5",
        ],
    ),
    (
        "both_day_fields",
        &[
            "--cron",
            "0 0 1,15 * fri",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "8",
        ],
    ),
    (
        "sunday_7",
        &[
            "--cron",
            "0 12 * * 7",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "3",
        ],
    ),
    (
        "shortcut_weekly",
        &[
            "--cron",
            "@weekly",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "3",
        ],
    ),
    (
        "shortcut_monthly",
        &[
            "--cron",
            "@monthly",
            "--timezone",
            "Europe/Helsinki",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "3",
        ],
    ),
    (
        "shortcut_yearly",
        &[
            "--cron",
            "@yearly",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "3",
        ],
    ),
    (
        "shortcut_hourly",
        &[
            "--cron",
            "@hourly",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "3",
        ],
    ),
    (
        "leap_year",
        &[
            "--cron",
            "0 0 29 2 *",
            "--after",
            "2026-01-01T00:00:00Z",
            "--count",
            "3",
        ],
    ),
    (
        "helsinki_spring_daily",
        &[
            "--cron",
            "30 3 * * *",
            "--timezone",
            "Europe/Helsinki",
            "--after",
            "2026-03-27T12:00:00Z",
            "--count",
            "4",
        ],
    ),
    (
        "helsinki_fall_daily",
        &[
            "--cron",
            "30 3 * * *",
            "--timezone",
            "Europe/Helsinki",
            "--after",
            "2026-10-23T12:00:00Z",
            "--count",
            "4",
        ],
    ),
    (
        "helsinki_fall_hourly",
        &[
            "--cron",
            "15 * * * *",
            "--timezone",
            "Europe/Helsinki",
            "--after",
            "2026-10-24T22:30:00Z",
            "--count",
            "6",
        ],
    ),
    (
        "new_york_spring_daily",
        &[
            "--cron",
            "30 2 * * *",
            "--timezone",
            "America/New_York",
            "--after",
            "2026-03-06T12:00:00Z",
            "--count",
            "4",
        ],
    ),
    (
        "new_york_spring_hourly",
        &[
            "--cron",
            "0 * * * *",
            "--timezone",
            "America/New_York",
            "--after",
            "2026-03-08T04:30:00Z",
            "--count",
            "5",
        ],
    ),
    (
        "new_york_fall_daily",
        &[
            "--cron",
            "30 1 * * *",
            "--timezone",
            "America/New_York",
            "--after",
            "2026-10-30T12:00:00Z",
            "--count",
            "4",
        ],
    ),
    (
        "new_york_fall_hourly",
        &[
            "--cron",
            "0 * * * *",
            "--timezone",
            "America/New_York",
            "--after",
            "2026-11-01T03:30:00Z",
            "--count",
            "5",
        ],
    ),
    (
        "every",
        &[
            "--every",
            "90m",
            "--timezone",
            "America/New_York",
            "--after",
            "2026-03-08T04:00:00Z",
            "--count",
            "4",
        ],
    ),
];

#[test]
fn beat_next_matches_golden_files() {
    let sandbox = Sandbox::new();
    let update = std::env::var_os("SAUNA_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for (name, args) in GOLDEN {
        let mut full = vec!["beat", "next"];
        full.extend_from_slice(args);
        let output = sandbox.run(&full);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "beat next {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = repo_root().join(format!("tests/golden/beat_next_{name}.txt"));
        let text = format!("# beat next {}\n{stdout}", shell_words(args));
        if update {
            std::fs::write(&path, &text).expect("write golden file");
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        if expected != text {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- got\n{text}",
                path.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(SAUNA_UPDATE_GOLDEN=1 rewrites them)",
        failures.join("\n")
    );
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|arg| {
            if arg.contains(' ') || arg.contains('*') {
                format!("'{arg}'")
            } else {
                (*arg).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn beat_next_refuses_bad_input_with_exit_2() {
    let sandbox = Sandbox::new();
    for (args, needle) in [
        (&["--cron", "0 0 30 2 *"][..], "can never fire"),
        (&["--cron", "* * * *"][..], "expected 5"),
        (
            &["--cron", "@daily", "--timezone", "Mars/Base"][..],
            "unknown time zone",
        ),
        (
            &["--cron", "@daily", "--after", "yesterday"][..],
            "RFC 3339",
        ),
    ] {
        let mut full = vec!["beat", "next"];
        full.extend_from_slice(args);
        let output = sandbox.run(&full);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn beat_next_lists_configured_jobs() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        r#"
[beat]
timezone = "Europe/Helsinki"
[beat.jobs.nightly]
task = "tasks.nightly"
cron = "30 3 * * *"
[beat.jobs.often]
task = "tasks.often"
every = "10m"
"#,
    );
    let output = sandbox.run(&[
        "beat",
        "next",
        "--after",
        "2026-03-28T12:00:00Z",
        "--count",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout,
        "# nightly: cron \"30 3 * * *\" (Europe/Helsinki) → tasks.nightly\n\
         2026-03-29T04:00:00+03:00\n2026-03-30T03:30:00+03:00\n\n\
         # often: every 10m → tasks.often\n\
         2026-03-28T12:10:00+00:00\n2026-03-28T12:20:00+00:00\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Real Redis and Celery

const TASKS_PY: &str = r#"
import json, os
from celery import Celery

app = Celery("tasks", broker=os.environ["BROKER"])
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

@app.task(name="tasks.record")
def record(*args, **kwargs):
    with open(os.environ["RECORD"], "a") as out:
        out.write(json.dumps({
            "args": args,
            "kwargs": kwargs,
            "id": record.request.id,
            # The headers beat adds and Celery's own origin, as the worker saw them.
            "slot": getattr(record.request, "sauna_beat_slot", None),
            "origin": record.request.origin,
        }) + "\n")
"#;

/// A Celery worker (solo pool) consuming `celery` and `hi`, recording every task it runs.
pub(crate) struct CeleryWorker {
    child: Child,
    record: PathBuf,
    log: PathBuf,
}

impl CeleryWorker {
    pub(crate) fn start(sandbox: &Sandbox, broker: &str) -> CeleryWorker {
        sandbox.write("tasks.py", TASKS_PY);
        let record = sandbox.path("record.jsonl");
        let log = sandbox.path("worker.log");
        let log_file = std::fs::File::create(&log).expect("worker log");
        let child = Command::new(python())
            .args([
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "-P",
                "solo",
                "-Q",
                "celery,hi",
            ])
            .args([
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "info",
            ])
            .current_dir(sandbox.root())
            .env("BROKER", broker)
            .env("RECORD", &record)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start the celery worker");
        let worker = CeleryWorker { child, record, log };
        crate::util::wait_until(
            Duration::from_secs(60),
            "the celery worker to be ready",
            || worker.log().contains("ready.").then_some(()),
        );
        worker
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn beat_config(text: &str) -> proxy_conf::Config {
    proxy_conf::load_str(text, "sauna.toml")
        .unwrap_or_else(|error| panic!("test config: {error}\n{text}"))
}

async fn start_beat(config: &proxy_conf::Config, base_dir: &Path) -> BeatHandle {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    beat::start(
        config.beat.as_ref().expect("[beat]"),
        None,
        &config.app,
        base_dir,
        metrics,
    )
    .await
    .expect("beat starts")
}

async fn wait_async<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message as found in a queue list: its slot header and its publish instant (from `expires`
/// minus the job's 1 h expiry).
#[derive(Debug, Clone)]
struct Queued {
    job: String,
    /// `pid@host` of the supervisor that published it.
    origin: String,
    slot: DateTime<Utc>,
    published: Option<DateTime<Utc>>,
}

fn queued(redis: &RedisServer, key: &str) -> Vec<Queued> {
    let mut connection = redis.connection();
    let mut raw: Vec<String> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query(&mut connection)
        .expect("LRANGE");
    raw.reverse(); // LPUSH: newest first
    raw.iter()
        .map(|text| {
            let message: Value = serde_json::from_str(text).expect("queued JSON");
            let headers = &message["headers"];
            let time = |value: &Value| {
                value.as_str().map(|text| {
                    DateTime::parse_from_rfc3339(text)
                        .expect("rfc3339")
                        .with_timezone(&Utc)
                })
            };
            Queued {
                job: headers["sauna_beat_job"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                origin: headers["origin"].as_str().unwrap_or_default().to_owned(),
                slot: time(&headers["sauna_beat_slot"]).expect("slot header"),
                published: time(&headers["expires"])
                    .map(|expires| expires - chrono::Duration::hours(1)),
            }
        })
        .collect()
}

/// How many of `messages` are for slots strictly between `from` and `to`.
fn in_span(messages: &[Queued], from: DateTime<Utc>, to: DateTime<Utc>) -> usize {
    messages
        .iter()
        .filter(|m| m.slot > from && m.slot < to)
        .count()
}

/// How many of `messages` were published more than 1.5 s after their slot: catch-up publishes,
/// never on-time ones (on time is at most 1 s late).
fn late(messages: &[Queued]) -> usize {
    messages
        .iter()
        .filter(|m| {
            m.published
                .is_some_and(|published| published - m.slot > chrono::Duration::milliseconds(1500))
        })
        .count()
}

/// Panics unless `slots` are strictly increasing by exactly `step`.
fn assert_consecutive(slots: &[DateTime<Utc>], step: chrono::Duration, what: &str) {
    for pair in slots.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            step,
            "{what}: slots not consecutive or duplicated: {slots:?}"
        );
    }
}

#[tokio::test]
async fn worker_runs_published_jobs_with_args_kwargs_and_priority() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let worker = CeleryWorker::start(&sandbox, &redis.url(0));
    let config = beat_config(&format!(
        r#"
[beat]
broker = "{}"
lock_ttl = "2s"
[beat.jobs.rec]
task = "tasks.record"
every = "1s"
args = [1, "é", [true]]
kwargs = {{ k = {{ n = 2 }}, s = "x" }}
[beat.jobs.pri]
task = "tasks.record"
every = "1s"
queue = "hi"
priority = 7
args = ["pri"]
"#,
        redis.url(0)
    ));
    let handle = start_beat(&config, sandbox.root()).await;
    let records = wait_async(
        Duration::from_secs(20),
        "both jobs executed by the worker",
        || {
            let records = worker.records();
            let rec = records.iter().any(|r| {
                r["args"] == serde_json::json!([1, "é", [true]])
                    && r["kwargs"] == serde_json::json!({"k": {"n": 2}, "s": "x"})
            });
            let pri = records
                .iter()
                .any(|r| r["args"] == serde_json::json!(["pri"]));
            (rec && pri).then_some(records)
        },
    )
    .await;
    let status = handle.status().await.expect("status");
    assert!(status.leader);
    let rec = status
        .jobs
        .iter()
        .find(|job| job.name == "rec")
        .expect("rec in status");
    assert!(
        rec.next_run.is_some() && rec.last_run.is_some() && rec.last_task_id.is_some(),
        "{rec:?}"
    );
    let ids: std::collections::BTreeSet<&str> =
        records.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(
        ids.len(),
        records.len(),
        "every publish has a fresh task id"
    );
    handle.shutdown().await;

    // A message whose `expires` is in the past is discarded by the worker, not run.
    let args = serde_json::json!(["expired"]);
    let arguments = beat::message::Arguments::new(&args, &serde_json::json!({}));
    let message = beat::message::TaskMessage {
        task: "tasks.record",
        id: "00000000-0000-4000-8000-00000000dead",
        delivery_tag: "00000000-0000-4000-8000-00000000beef",
        arguments: &arguments,
        queue: "celery",
        priority: None,
        expires: Some(Utc::now() - chrono::Duration::seconds(10)),
        origin: "1@test",
        slot: None,
    };
    let mut connection = redis.connection();
    let _: i64 = redis::cmd("LPUSH")
        .arg(message.queue_key())
        .arg(message.envelope())
        .query(&mut connection)
        .expect("LPUSH");
    wait_async(
        Duration::from_secs(20),
        "the worker to discard the expired task",
        || {
            let log = worker.log();
            (log.contains("00000000-0000-4000-8000-00000000dead")
                && log.to_lowercase().contains("discard"))
            .then_some(())
        },
    )
    .await;
    assert!(
        !worker.records().iter().any(|r| r["args"] == args),
        "expired task ran:\n{}",
        worker.log()
    );
}

#[tokio::test]
async fn priorities_land_on_the_keys_kombu_reads_and_metrics_are_recorded() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let mut text = format!("[beat]\nbroker = \"{}\"\nlock_ttl = \"2s\"\n", redis.url(0));
    for priority in [0, 4, 7, 9] {
        text.push_str(&format!("[beat.jobs.p{priority}]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"pq\"\npriority = {priority}\n"));
    }
    let config = beat_config(&text);
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let handle = beat::start(
        config.beat.as_ref().expect("beat"),
        None,
        &config.app,
        sandbox.root(),
        Arc::clone(&metrics),
    )
    .await
    .expect("beat starts");
    wait_async(
        Duration::from_secs(10),
        "a message on every priority key",
        || {
            ["pq", "pq\x06\x163", "pq\x06\x166", "pq\x06\x169"]
                .iter()
                .all(|key| !queued(&redis, key).is_empty())
                .then_some(())
        },
    )
    .await;
    let text = metrics.render().expect("render");
    for needle in [
        "sauna_beat_published_total{job=\"p0\"} ",
        "sauna_beat_next_run_timestamp_seconds{job=\"p9\"} ",
        "sauna_beat_lag_seconds_count ",
        "sauna_beat_leader 1",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    handle.shutdown().await;
    let text = metrics.render().expect("render");
    assert!(text.contains("sauna_beat_leader 0"), "{text}");
    for (key, job) in [
        ("pq", "p0"),
        ("pq\x06\x163", "p4"),
        ("pq\x06\x166", "p7"),
        ("pq\x06\x169", "p9"),
    ] {
        assert!(
            queued(&redis, key).iter().all(|message| message.job == job),
            "{key:?}"
        );
    }
}

#[tokio::test]
async fn reload_switches_schedules_without_doubling_or_losing_a_slot() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let text = |jobs: &str| {
        format!(
            "[beat]\nbroker = \"{}\"\nlock_ttl = \"2s\"\n{jobs}",
            redis.url(0)
        )
    };
    let before = beat_config(&text(
        "[beat.jobs.a]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"qa\"\n\
         [beat.jobs.gone]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"qgone\"\n",
    ));
    let handle = start_beat(&before, sandbox.root()).await;
    wait_async(Duration::from_secs(10), "3 slots of a", || {
        (queued(&redis, "qa").len() >= 3).then_some(())
    })
    .await;
    let after = beat_config(&text(
        "[beat.jobs.a]\ntask = \"t\"\nevery = \"2s\"\nqueue = \"qa\"\n\
         [beat.jobs.new]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"qnew\"\n",
    ));
    let reloaded_at = Utc::now();
    handle
        .reload(
            after.beat.as_ref().expect("beat"),
            None,
            &after.app,
            sandbox.root(),
        )
        .await
        .expect("reload applies");
    let gone_count = queued(&redis, "qgone").len();
    wait_async(
        Duration::from_secs(10),
        "a on its new schedule, and the new job",
        || {
            let late = queued(&redis, "qa")
                .iter()
                .filter(|m| m.slot > reloaded_at)
                .count();
            (late >= 2 && !queued(&redis, "qnew").is_empty()).then_some(())
        },
    )
    .await;
    // A config whose mistake only shows when beat applies it (a Celery app that does not
    // import) is refused and the running schedule kept. Mistakes in the file itself never
    // get this far: the file does not load.
    let impossible = proxy_conf::load_str(
        &text("[beat.jobs.a]\ntask = \"t\"\ncron = \"0 0 30 2 *\"\n"),
        "sauna.toml",
    )
    .expect_err("impossible cron refused when the file loads");
    assert!(
        impossible.to_string().contains("beat.jobs.a.cron"),
        "{impossible}"
    );
    let broken = beat_config(&format!(
        "[app]\npython = \"{}\"\n{}",
        crate::util::python().display(),
        text(
            "celery_app = \"no_such_module_for_sauna:app\"\n[beat.jobs.a]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"qa\"\n"
        )
    ));
    let error = handle
        .reload(
            broken.beat.as_ref().expect("beat"),
            None,
            &broken.app,
            sandbox.root(),
        )
        .await
        .expect_err("an app that does not import is refused");
    assert!(
        error.to_string().contains("no_such_module_for_sauna"),
        "{error}"
    );
    let status = handle.status().await.expect("status");
    let names: Vec<&str> = status.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names, ["a", "new"]);
    handle.shutdown().await;

    let slots: Vec<_> = queued(&redis, "qa").into_iter().map(|m| m.slot).collect();
    assert!(
        slots.windows(2).all(|pair| pair[1] > pair[0]),
        "no slot twice: {slots:?}"
    );
    let (old, new): (Vec<_>, Vec<_>) = slots.iter().partition(|slot| **slot <= reloaded_at);
    assert_consecutive(&old, chrono::Duration::seconds(1), "before the reload");
    assert_consecutive(&new, chrono::Duration::seconds(2), "after the reload");
    let gap = new[0] - old[old.len() - 1];
    assert!(
        gap <= chrono::Duration::seconds(2),
        "nothing lost at the switch: {slots:?}"
    );
    assert!(
        queued(&redis, "qgone").len() <= gone_count + 1,
        "removed job stopped"
    );
}

#[tokio::test]
async fn the_publish_script_fences_a_paused_leader_and_never_repeats_a_slot() {
    use beat::publisher::{Broker, Published};
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let ttl = Duration::from_secs(5);
    let broker =
        |()| Broker::new(&redis.url(0), None, "fence:", Duration::from_secs(1)).expect("broker");
    let (mut old, mut new) = (broker(()), broker(()));
    assert_eq!(old.acquire("a:1:old", ttl).await.expect("acquire"), None);
    let refused = new
        .acquire("b:2:new", ttl)
        .await
        .expect("acquire")
        .expect("held by old");
    assert_eq!(refused.name.as_deref(), Some("a:1"));
    async fn publish(broker: &mut Broker, token: Option<&str>, slot: i64) -> Published {
        let message = format!("{{\"slot\": {slot}}}");
        broker
            .publish(token, "job", slot, "fenced", &message)
            .await
            .expect("publish")
    }
    assert_eq!(
        publish(&mut old, Some("a:1:old"), 1000).await,
        Published::Sent
    );
    // The old leader pauses past its TTL; the lock expires and the new one takes it.
    let mut connection = redis.connection();
    let _: i64 = redis::cmd("DEL")
        .arg("fence:lock")
        .query(&mut connection)
        .expect("DEL");
    assert_eq!(new.acquire("b:2:new", ttl).await.expect("acquire"), None);
    assert_eq!(new.last_slots(&["job"]).await.expect("HMGET"), [Some(1000)]);
    assert_eq!(
        publish(&mut new, Some("b:2:new"), 2000).await,
        Published::Sent
    );
    // The old leader wakes up: refused by the fence, whatever the slot.
    assert_eq!(
        publish(&mut old, Some("a:1:old"), 2000).await,
        Published::NotLeader
    );
    assert_eq!(
        publish(&mut old, Some("a:1:old"), 3000).await,
        Published::NotLeader
    );
    assert!(!old.renew("a:1:old", ttl).await.expect("renew"));
    // Unfenced publishers (leader_lock = false) are kept apart by the slot check alone.
    assert_eq!(publish(&mut old, None, 2000).await, Published::AlreadySent);
    assert_eq!(publish(&mut old, None, 1500).await, Published::AlreadySent);
    let queued: Vec<String> = redis::cmd("LRANGE")
        .arg("fenced")
        .arg(0)
        .arg(-1)
        .query(&mut connection)
        .expect("LRANGE");
    assert_eq!(queued, ["{\"slot\": 2000}", "{\"slot\": 1000}"]);
    new.release("b:2:new").await.expect("release");
    let lock: Option<String> = redis::cmd("GET")
        .arg("fence:lock")
        .query(&mut connection)
        .expect("GET");
    assert_eq!(lock, None);
}

const CELERY_APP_PY: &str = r#"
import os
from celery import Celery
from celery.schedules import crontab

app = Celery("celeryapp", broker=os.environ.get("BROKER", "redis://"))
app.conf.timezone = "Europe/Helsinki"
app.conf.beat_schedule = {
    "imported-every": {"task": "tasks.record", "schedule": 1.0, "args": ("imported",),
                       "kwargs": {"via": "celery_app"}, "options": {"queue": "celery"}},
    "imported-cron": {"task": "tasks.record", "args": ("cron",),
                      "schedule": crontab(minute=0, hour=0, day_of_month="1", day_of_week="mon")},
}
"#;

#[test]
fn celery_app_beat_schedule_is_imported_and_run() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let worker = CeleryWorker::start(&sandbox, &redis.url(0));
    sandbox.write("celeryapp.py", CELERY_APP_PY);
    let config = |app: &str| {
        format!(
            "[app]\npython = \"{}\"\ndirectory = \"{}\"\n[beat]\nbroker = \"{}\"\nlock_ttl = \"2s\"\ncelery_app = \"{app}\"\n",
            python().display(),
            sandbox.root().display(),
            redis.url(0)
        )
    };
    sandbox.write_config(&config("celeryapp:app"));
    let running = sandbox.start();
    let status = running.status_json();
    let cron = job_status(&status, "imported-cron").expect("imported-cron in status");
    // Celery ANDs the day fields: the next Monday that is a 1st, midnight Helsinki time.
    let next = DateTime::parse_from_rfc3339(cron["next_run"].as_str().expect("next run"))
        .expect("rfc3339");
    assert_eq!(
        next.format("%d %H:%M %a").to_string(),
        "01 00:00 Mon",
        "{cron}"
    );
    crate::util::wait_until(Duration::from_secs(20), "the imported job executed", || {
        worker
            .records()
            .iter()
            .any(|r| {
                r["args"] == serde_json::json!(["imported"])
                    && r["kwargs"] == serde_json::json!({"via": "celery_app"})
            })
            .then_some(())
    });
    assert!(running.stop().success());

    // Schedules we cannot honour are errors naming each entry, and the supervisor does not
    // start. (`solar.__new__` avoids needing the `ephem` package just to build one.)
    sandbox.write(
        "oddapp.py",
        "from celery import Celery\nfrom celery.schedules import schedule, solar\n\
         class Custom(schedule):\n    pass\n\
         app = Celery('odd')\napp.conf.beat_schedule = {\n\
         'sunrise-job': {'task': 't', 'schedule': solar.__new__(solar)},\n\
         'custom-job': {'task': 't', 'schedule': Custom(5)},\n}\n",
    );
    sandbox.write_config(&config("oddapp:app"));
    let output = sandbox.run(&["run"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("\"sunrise-job\": solar"), "{stderr}");
    assert!(
        stderr.contains("\"custom-job\": custom schedule class oddapp.Custom"),
        "{stderr}"
    );
    // `beat next -c` imports the same schedule.
    sandbox.write_config(&config("celeryapp:app"));
    let output = sandbox.run(&["beat", "next", "--count", "1"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("# imported-cron: cron \"0 0 1 * mon\" (Europe/Helsinki)"),
        "{stdout}"
    );
}

#[test]
fn supervisors_without_the_lock_still_publish_every_slot_once() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let supervisors: Vec<_> = (0..3)
        .map(|_| {
            let dir = Sandbox::new();
            dir.write_config(&format!(
                // catch_up = "all": a loaded machine may stall all three past the half-second
                // on-time tolerance, and what is tested here is that none publishes twice.
                "[beat]\nbroker = \"{}\"\nleader_lock = false\n[beat.jobs.tick]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"nolock\"\ncatch_up = \"all\"\ncatch_up_window = \"60s\"\n",
                redis.url(0)
            ));
            let running = dir.start();
            (dir, running)
        })
        .collect();
    let slots = crate::util::wait_until(Duration::from_secs(20), "6 slots", || {
        let slots: Vec<_> = queued(&redis, "nolock")
            .into_iter()
            .map(|m| m.slot)
            .collect();
        (slots.len() >= 6).then_some(slots)
    });
    for (_, running) in supervisors {
        assert!(running.stop().success());
    }
    assert_consecutive(
        &slots,
        chrono::Duration::seconds(1),
        "three unlocked publishers",
    );
}

#[test]
fn redis_outage_follows_each_catch_up_policy() {
    let sandbox = Sandbox::new();
    let mut redis = RedisServer::start(&sandbox.path("redis"));
    let mut text = format!("[beat]\nbroker = \"{}\"\nlock_ttl = \"2s\"\n", redis.url(0));
    for (name, policy) in [
        ("skip", "catch_up = \"skip\""),
        ("once", "catch_up = \"once\""),
        ("all", "catch_up = \"all\"\ncatch_up_window = \"60s\""),
    ] {
        text.push_str(&format!("[beat.jobs.{name}]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"q-{name}\"\nexpires = \"1h\"\n{policy}\n"));
    }
    sandbox.write_config(&text);
    let running = sandbox.start();
    crate::util::wait_until(Duration::from_secs(10), "2 slots each", || {
        ["q-skip", "q-once", "q-all"]
            .iter()
            .all(|key| queued(&redis, key).len() >= 2)
            .then_some(())
    });
    redis.stop();
    let down = Utc::now();
    running.wait_for(Duration::from_secs(5), "beat to notice", |status| {
        status["beat"]["redis_up"] == false
    });
    std::thread::sleep(Duration::from_secs(10));
    redis.spawn();
    let up = Utc::now();
    crate::util::wait_until(Duration::from_secs(15), "publishing to resume", || {
        ["q-skip", "q-once", "q-all"]
            .iter()
            .all(|key| {
                queued(&redis, key)
                    .iter()
                    .any(|message| message.slot > up + chrono::Duration::seconds(1))
            })
            .then_some(())
    });
    let log = running.log();
    assert!(running.stop().success());
    // One line per state change, not one per retry. A loaded machine may stall Redis past the
    // publish timeout once more right after it comes back: that is a second change, so the
    // lines alternate rather than number exactly one each.
    let changes: Vec<bool> = log
        .lines()
        .filter_map(|line| {
            if line.contains("cannot reach Redis") {
                Some(false)
            } else if line.contains("Redis is reachable again") {
                Some(true)
            } else {
                None
            }
        })
        .collect();
    assert!(
        changes.len() >= 2
            && changes.len() % 2 == 0
            && changes
                .iter()
                .enumerate()
                .all(|(index, up)| *up == (index % 2 == 1)),
        "one line per state change, down then up:\n{log}"
    );
    assert!(
        log.contains("missed slot(s) not published"),
        "skipped slots are reported:\n{log}"
    );
    let in_outage = |messages: &[Queued]| in_span(messages, down, up);
    let all = queued(&redis, "q-all");
    let slots: Vec<_> = all.iter().map(|m| m.slot).collect();
    assert_consecutive(&slots, chrono::Duration::seconds(1), "catch_up = all");
    assert!(
        in_outage(&all) >= 8,
        "all: every missed slot published: {slots:?}"
    );
    let once = queued(&redis, "q-once");
    assert!(
        in_outage(&once) <= 1 && late(&once) <= 1,
        "once: at most one run for the outage: {once:?}"
    );
    let skip = queued(&redis, "q-skip");
    assert_eq!(late(&skip), 0, "skip: nothing published late: {skip:?}");
    assert!(in_outage(&skip) <= 1, "skip: {skip:?}");
    for messages in [&once, &skip] {
        let slots: Vec<_> = messages.iter().map(|m| m.slot).collect();
        assert!(
            slots.windows(2).all(|pair| pair[1] > pair[0]),
            "no slot twice: {slots:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Through the real binary

pub(crate) fn job_status<'a>(status: &'a Value, job: &str) -> Option<&'a Value> {
    status["beat"]["jobs"]
        .as_array()?
        .iter()
        .find(|entry| entry["name"] == job)
}

#[test]
fn supervisor_runs_beat_jobs_that_the_worker_executes() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let worker = CeleryWorker::start(&sandbox, &redis.url(0));
    sandbox.write_config(&format!(
        "[beat]\nbroker = \"{}\"\nlock_ttl = \"2s\"\n[beat.jobs.rec]\ntask = \"tasks.record\"\nevery = \"1s\"\nargs = [\"via-binary\"]\nkwargs = {{ n = 1 }}\n",
        redis.url(0)
    ));
    let running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(15), "a published task", |status| {
        job_status(status, "rec").is_some_and(|job| job["last_task_id"].is_string())
    });
    assert_eq!(status["beat"]["leader"], true);
    assert!(status["beat"]["lock_holder"].is_string());
    crate::util::wait_until(Duration::from_secs(20), "the worker to run it", || {
        worker
            .records()
            .iter()
            .any(|r| {
                r["args"] == serde_json::json!(["via-binary"])
                    && r["kwargs"] == serde_json::json!({"n": 1})
            })
            .then_some(())
    });
    let text = running.log();
    assert!(
        text.contains("beat: published") && text.contains("task_id"),
        "{text}"
    );
    assert!(running.stop().success());
    // A clean stop released the lock.
    let mut connection = redis.connection();
    let lock: Option<String> = redis::cmd("GET")
        .arg("sauna:beat:lock")
        .query(&mut connection)
        .expect("GET");
    assert_eq!(lock, None);
}

/// Several supervisors (separate processes, as on separate hosts) on one Redis.
fn start_supervisors(
    redis: &RedisServer,
    count: usize,
    ttl: &str,
    extra: &str,
) -> Vec<(Sandbox, crate::util::Running)> {
    (0..count)
        .map(|_| {
            let sandbox = Sandbox::new();
            sandbox.write_config(&format!(
                "[beat]\nbroker = \"{}\"\nlock_ttl = \"{ttl}\"\n[beat.jobs.tick]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"ticks\"\nexpires = \"1h\"\n{extra}",
                redis.url(0)
            ));
            let running = sandbox.start();
            (sandbox, running)
        })
        .collect()
}

fn is_leader(running: &crate::util::Running) -> bool {
    running
        .try_status()
        .is_some_and(|status| status["beat"]["leader"] == true)
}

/// Issue 15's scenario: three supervisors, `lock_ttl = "10s"`, one job per catch-up policy; Redis
/// goes away for 13 s and, when `stop_leader`, the leader is stopped (SIGTERM, so it cannot
/// release the lock) meanwhile. Whichever supervisor publishes afterwards, and whether or not the
/// old leader lives, the missed slots follow each job's policy alone: `skip` publishes none of
/// them, `once` one, `all` each exactly once — judged by what landed in Redis.
fn broker_outage_across_supervisors_follows_each_catch_up_policy(stop_leader: bool) {
    let sandbox = Sandbox::new();
    let mut redis = RedisServer::start(&sandbox.path("redis"));
    let jobs = policy_jobs();
    let mut supervisors: Vec<_> = (0..3)
        .map(|_| {
            let dir = Sandbox::new();
            dir.write_config(&format!(
                "[beat]\nbroker = \"{}\"\nlock_ttl = \"10s\"\n{jobs}",
                redis.url(0)
            ));
            let running = dir.start();
            (dir, running)
        })
        .collect();
    let leader = crate::util::wait_until(Duration::from_secs(20), "one leader", || {
        let leaders: Vec<usize> = (0..supervisors.len())
            .filter(|index| is_leader(&supervisors[*index].1))
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    });
    crate::util::wait_until(Duration::from_secs(15), "2 slots of each job", || {
        QUEUES
            .iter()
            .all(|key| queued(&redis, key).len() >= 2)
            .then_some(())
    });

    redis.stop();
    let down = Utc::now();
    supervisors[leader]
        .1
        .wait_for(Duration::from_secs(10), "the leader to notice", |status| {
            status["beat"]["redis_up"] == false
        });
    if stop_leader {
        let (_dir, mut stopped) = supervisors.remove(leader);
        stopped.signal("TERM");
        assert!(stopped.wait_exit(Duration::from_secs(30)).success());
    }
    // The outage of the report: 13 s, longer than the lock TTL.
    let outage = Duration::from_secs(13);
    let elapsed = (Utc::now() - down).to_std().unwrap_or_default();
    std::thread::sleep(outage.saturating_sub(elapsed));
    redis.spawn();
    let up = Utc::now();
    crate::util::wait_until(Duration::from_secs(20), "publishing to resume", || {
        QUEUES
            .iter()
            .all(|key| {
                queued(&redis, key)
                    .iter()
                    .any(|message| message.slot > up + chrono::Duration::seconds(2))
            })
            .then_some(())
    });
    for (_, running) in supervisors {
        assert!(running.stop().success());
    }

    assert_each_policy(&redis, down, up, 12);
}

/// One job per catch-up policy, every second, on queues `q-skip`, `q-once`, `q-all`.
const QUEUES: [&str; 3] = ["q-skip", "q-once", "q-all"];

fn policy_jobs() -> String {
    ["skip", "once", "all"]
        .map(|policy| {
            format!(
                "[beat.jobs.{policy}]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"q-{policy}\"\nexpires = \"1h\"\ncatch_up = \"{policy}\"\n"
            )
        })
        .concat()
}

/// What [`policy_jobs`] must have published around a gap from `down` to `up` in which nobody
/// could publish (at least `missed` slots): `skip` none of the missed slots, `once` at most one,
/// `all` each exactly once; no slot twice.
fn assert_each_policy(redis: &RedisServer, down: DateTime<Utc>, up: DateTime<Utc>, missed: usize) {
    let [skip, once, all] = QUEUES.map(|key| queued(redis, key));
    for (policy, messages) in [("skip", &skip), ("once", &once), ("all", &all)] {
        let slots: Vec<_> = messages.iter().map(|m| m.slot).collect();
        assert!(
            slots.windows(2).all(|pair| pair[1] > pair[0]),
            "{policy}: no slot twice: {slots:?}"
        );
    }
    assert_eq!(
        late(&skip),
        0,
        "skip: a missed slot was published: {skip:?}"
    );
    assert!(
        in_span(&skip, down, up) <= 1,
        "skip: slots of the gap published: {skip:?}"
    );
    assert!(
        late(&once) <= 1 && in_span(&once, down, up) <= 1,
        "once: more than one run for the gap: {once:?}"
    );
    let slots: Vec<_> = all.iter().map(|m| m.slot).collect();
    assert_consecutive(&slots, chrono::Duration::seconds(1), "catch_up = all");
    assert!(
        in_span(&all, down, up) >= missed,
        "all: every slot of the gap published: {slots:?}"
    );
}

#[test]
fn a_restart_of_every_supervisor_follows_each_catch_up_policy() {
    // Two supervisors stopped for a deploy and started again: the slots in between were missed
    // by everyone, and the new processes continue from the last slots in Redis.
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let config = format!(
        "[beat]\nbroker = \"{}\"\nlock_ttl = \"2s\"\n{}",
        redis.url(0),
        policy_jobs()
    );
    let dirs: Vec<Sandbox> = (0..2).map(|_| Sandbox::new()).collect();
    for dir in &dirs {
        dir.write_config(&config);
    }
    let first: Vec<_> = dirs.iter().map(Sandbox::start).collect();
    crate::util::wait_until(Duration::from_secs(15), "2 slots of each job", || {
        QUEUES
            .iter()
            .all(|key| queued(&redis, key).len() >= 2)
            .then_some(())
    });
    for running in first {
        assert!(running.stop().success());
    }
    let down = Utc::now();
    std::thread::sleep(Duration::from_secs(6));
    let second: Vec<_> = dirs.iter().map(Sandbox::start).collect();
    let up = Utc::now();
    crate::util::wait_until(Duration::from_secs(20), "publishing to resume", || {
        QUEUES
            .iter()
            .all(|key| {
                queued(&redis, key)
                    .iter()
                    .any(|message| message.slot > up + chrono::Duration::seconds(2))
            })
            .then_some(())
    });
    for running in second {
        assert!(running.stop().success());
    }
    assert_each_policy(&redis, down, up, 5);
}

#[test]
fn broker_outage_and_a_stopped_leader_follow_each_catch_up_policy() {
    broker_outage_across_supervisors_follows_each_catch_up_policy(true);
}

#[test]
fn broker_outage_with_the_leader_alive_follows_each_catch_up_policy() {
    broker_outage_across_supervisors_follows_each_catch_up_policy(false);
}

#[test]
fn three_supervisor_processes_publish_every_slot_once_and_survive_kill_9_of_the_leader() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let mut supervisors = start_supervisors(
        &redis,
        3,
        // A TTL of 4 s leaves at least two 1 s slots missed while the dead leader's lock lived.
        "4s",
        // Missed slots follow the policy alone: under "all" each is published, exactly once.
        "catch_up = \"all\"\n",
    );
    let leader = crate::util::wait_until(Duration::from_secs(10), "one leader", || {
        let leaders: Vec<usize> = (0..supervisors.len())
            .filter(|index| is_leader(&supervisors[*index].1))
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    });
    crate::util::wait_until(Duration::from_secs(15), "5 slots", || {
        (queued(&redis, "ticks").len() >= 5).then_some(())
    });

    let (_dir, mut killed) = supervisors.remove(leader);
    killed.signal("KILL");
    let at = Instant::now();
    killed.wait_exit(Duration::from_secs(10));
    let successor = crate::util::wait_until(Duration::from_secs(10), "a new leader", || {
        supervisors
            .iter()
            .position(|(_, running)| is_leader(running))
    });
    let takeover = at.elapsed();
    assert!(
        takeover <= Duration::from_millis(4500),
        "takeover took {takeover:?} with lock_ttl 4s"
    );
    let count = queued(&redis, "ticks").len();
    crate::util::wait_until(Duration::from_secs(15), "4 more slots", || {
        (queued(&redis, "ticks").len() >= count + 4).then_some(())
    });
    let successor_pid = supervisors[successor].1.pid();
    for (_, running) in supervisors {
        assert!(running.stop().success());
    }
    let messages = queued(&redis, "ticks");
    let slots: Vec<_> = messages.iter().map(|m| m.slot).collect();
    assert_consecutive(
        &slots,
        chrono::Duration::seconds(1),
        "three supervisors, leader killed",
    );
    assert!(successor_pid > 0);
}
