//! Runtime jobs (issue 16): jobs stored in Redis by `beat add`/`remove`/`pause`/`resume`, by
//! python/sauna_beat.py and by `beat import --django-celery-beat`, run by the real supervisor's
//! leader from their next slot without a reload and executed by a real Celery worker. Invalid
//! jobs and sauna.toml names are refused before anything is stored; a change a second before a
//! minute boundary applies to that boundary's slot, once.

use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Timelike as _, Utc};
use serde_json::{Value, json};

use crate::beat::CeleryWorker;
use crate::util::redis::RedisServer;
use crate::util::{Sandbox, output_text, python, repo_root, wait_until};

/// A message in a queue list: its job, slot and arguments.
#[derive(Debug, Clone)]
struct Message {
    job: String,
    slot: DateTime<Utc>,
    args: Value,
    kwargs: Value,
}

/// Every message in queue list `key`, oldest first.
fn messages(redis: &RedisServer, key: &str) -> Vec<Message> {
    let mut connection = redis.connection();
    let mut raw: Vec<String> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query(&mut connection)
        .expect("LRANGE");
    raw.reverse();
    raw.iter()
        .map(|text| {
            let message: Value = serde_json::from_str(text).expect("queued JSON");
            let body = base64::engine::general_purpose::STANDARD
                .decode(message["body"].as_str().expect("body"))
                .expect("base64 body");
            let body: Value = serde_json::from_slice(&body).expect("body JSON");
            let headers = &message["headers"];
            Message {
                job: headers["sauna_beat_job"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                slot: DateTime::parse_from_rfc3339(
                    headers["sauna_beat_slot"].as_str().expect("slot"),
                )
                .expect("rfc3339")
                .with_timezone(&Utc),
                args: body[0].clone(),
                kwargs: body[1].clone(),
            }
        })
        .collect()
}

fn config(redis: &RedisServer, extra: &str) -> String {
    format!(
        "[beat]\nbroker = \"{}\"\nlock_ttl = \"2s\"\n[beat.jobs.nightly]\ntask = \"tasks.record\"\ncron = \"0 3 * * *\"\n{extra}",
        redis.url(0)
    )
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_ok(output: &Output, what: &str) {
    assert!(output.status.success(), "{what}: {}", output_text(output));
}

/// `beat list --json` as a name → entry map.
fn list(sandbox: &Sandbox) -> serde_json::Map<String, Value> {
    let output = sandbox.run(&["beat", "list", "--json"]);
    assert_ok(&output, "beat list --json");
    let entries: Vec<Value> = serde_json::from_str(&stdout(&output)).expect("list JSON");
    entries
        .into_iter()
        .map(|entry| (entry["name"].as_str().unwrap_or_default().to_owned(), entry))
        .collect()
}

fn records_with(worker: &CeleryWorker, args: &Value) -> usize {
    worker
        .records()
        .iter()
        .filter(|r| &r["args"] == args)
        .count()
}

/// Runs python/sauna_beat.py code against `redis` (`beat` is a `sauna_beat.Beat`).
fn python_helper(redis: &RedisServer, code: &str) -> Output {
    let script = format!(
        "import redis, sauna_beat\nbeat = sauna_beat.Beat(redis.Redis.from_url({:?}))\n{code}",
        redis.url(0)
    );
    Command::new(python())
        .args(["-c", &script])
        .env("PYTHONPATH", repo_root().join("python"))
        .output()
        .expect("run python")
}

fn stored_names(redis: &RedisServer) -> Vec<String> {
    let mut connection = redis.connection();
    let mut names: Vec<String> = redis::cmd("HKEYS")
        .arg("sauna:beat:jobs")
        .query(&mut connection)
        .expect("HKEYS");
    names.sort();
    names
}

#[test]
fn cli_jobs_run_on_a_real_worker_and_follow_add_pause_resume_remove() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let worker = CeleryWorker::start(&sandbox, &redis.url(0));
    sandbox.write_config(&config(&redis, ""));
    let running = sandbox.start();
    // Added while the supervisor runs: no reload.
    let add = sandbox.run(&[
        "beat",
        "add",
        "tenant-7",
        "--task",
        "tasks.record",
        "--every",
        "1s",
        "--args",
        "[\"tenant\", 7]",
        "--kwargs",
        "{\"report\": \"daily\"}",
        "--queue",
        "hi",
        "--priority",
        "5",
        "--expires",
        "1h",
    ]);
    assert_ok(&add, "beat add");
    assert!(
        stdout(&add).contains("added runtime job \"tenant-7\""),
        "{}",
        stdout(&add)
    );
    let args = json!(["tenant", 7]);
    wait_until(
        Duration::from_secs(20),
        "the worker to run tenant-7",
        || {
            worker
                .records()
                .iter()
                .any(|r| r["args"] == args && r["kwargs"] == json!({"report": "daily"}))
                .then_some(())
        },
    );
    let entry = &list(&sandbox)["tenant-7"];
    assert_eq!(entry["source"], "runtime");
    assert_eq!(entry["state"], "active");
    assert_eq!(entry["schedule"], "every 1s");
    assert!(
        entry["next_run"].is_string() && entry["last_run"].is_string(),
        "{entry}"
    );
    assert_eq!(list(&sandbox)["nightly"]["source"], "toml");
    let status = running.status_json();
    assert_eq!(status["beat"]["runtime_jobs"], 1, "{status}");

    // Paused: nothing more runs; resumed: it runs again.
    assert_ok(&sandbox.run(&["beat", "pause", "tenant-7"]), "beat pause");
    std::thread::sleep(Duration::from_millis(1500));
    let paused_at = records_with(&worker, &args);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(records_with(&worker, &args), paused_at, "a paused job ran");
    let entry = &list(&sandbox)["tenant-7"];
    assert_eq!(entry["state"], "paused");
    assert!(entry["next_run"].is_null());
    assert_ok(&sandbox.run(&["beat", "resume", "tenant-7"]), "beat resume");
    wait_until(
        Duration::from_secs(10),
        "tenant-7 to run after resume",
        || (records_with(&worker, &args) > paused_at + 1).then_some(()),
    );

    // Replaced in place (same name): the new arguments from the next slot on.
    let replace = sandbox.run(&[
        "beat",
        "add",
        "tenant-7",
        "--task",
        "tasks.record",
        "--every",
        "1s",
        "--args",
        "[\"v2\"]",
    ]);
    assert!(
        stdout(&replace).contains("replaced"),
        "{}",
        output_text(&replace)
    );
    wait_until(Duration::from_secs(10), "the replaced job to run", || {
        (records_with(&worker, &json!(["v2"])) > 0).then_some(())
    });

    // Removed: it stops, and it is gone from the list.
    assert_ok(&sandbox.run(&["beat", "remove", "tenant-7"]), "beat remove");
    std::thread::sleep(Duration::from_millis(1500));
    let removed_at = records_with(&worker, &json!(["v2"]));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        records_with(&worker, &json!(["v2"])),
        removed_at,
        "a removed job ran"
    );
    assert!(!list(&sandbox).contains_key("tenant-7"));
    let again = sandbox.run(&["beat", "remove", "tenant-7"]);
    assert_eq!(again.status.code(), Some(1), "{}", output_text(&again));
    assert!(stderr(&again).contains("no runtime job named \"tenant-7\""));
    let table = stdout(&sandbox.run(&["beat", "list"]));
    assert!(
        table.starts_with("NAME") && table.contains("nightly"),
        "{table}"
    );

    // A one-off job publishes once and pauses itself.
    assert_ok(
        &sandbox.run(&[
            "beat",
            "add",
            "once",
            "--task",
            "tasks.record",
            "--every",
            "1s",
            "--args",
            "[\"once\"]",
            "--one-off",
        ]),
        "beat add --one-off",
    );
    wait_until(Duration::from_secs(10), "the one-off job to pause", || {
        (list(&sandbox)["once"]["state"] == "paused").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    wait_until(Duration::from_secs(10), "the one-off task to run", || {
        (records_with(&worker, &json!(["once"])) == 1).then_some(())
    });
    assert!(running.stop().success());
}

#[test]
fn invalid_jobs_and_toml_names_are_refused_and_never_stored() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    sandbox.write_config(&config(&redis, ""));
    let refused: [(&[&str], &str); 8] = [
        (&["--cron", "0 0 30 2 *"], "can never fire"),
        (&["--cron", "* * *"], "expected 5"),
        (&["--every", "0s"], "longer than 0s"),
        (
            &["--every", "1m", "--timezone", "Mars/Base"],
            "unknown time zone",
        ),
        (
            &["--every", "1m", "--args", "{\"a\": 1}"],
            "args: must be a JSON array",
        ),
        (&["--every", "1m", "--kwargs", "not json"], "not JSON"),
        (
            &["--every", "1m", "--priority", "12"],
            "priority: 12 is out of range",
        ),
        (
            &["--every", "1m", "--catch-up", "sometimes"],
            "catch_up: \"sometimes\"",
        ),
    ];
    for (args, needle) in refused {
        let mut full = vec!["beat", "add", "bad", "--task", "tasks.record"];
        full.extend_from_slice(args);
        let output = sandbox.run(&full);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            output_text(&output)
        );
        assert!(
            stderr(&output).contains(needle),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let toml = sandbox.run(&["beat", "add", "nightly", "--task", "t", "--every", "1m"]);
    assert_eq!(toml.status.code(), Some(2), "{}", output_text(&toml));
    assert!(
        stderr(&toml).contains("defined in sauna.toml"),
        "{}",
        stderr(&toml)
    );
    // The Python helper refuses the same, before writing.
    let python = python_helper(
        &redis,
        "for bad in [dict(cron='0 0 30 2 *'), dict(every='soon'), dict(every=60, timezone='Mars/Base'),\n\
         \x20           dict(every=60, args={'a': 1}), dict(every=60, priority=12), dict()]:\n\
         \x20   try:\n\
         \x20       beat.add('bad', task='tasks.record', **bad)\n\
         \x20       print('stored', bad)\n\
         \x20   except sauna_beat.InvalidJob as error:\n\
         \x20       print('refused:', error)\n",
    );
    let text = stdout(&python);
    assert!(python.status.success(), "{}", output_text(&python));
    assert!(!text.contains("stored"), "{text}");
    assert_eq!(text.matches("refused:").count(), 6, "{text}");
    assert!(
        stored_names(&redis).is_empty(),
        "{:?}",
        stored_names(&redis)
    );

    // Once a leader has run, the helper refuses sauna.toml's names too.
    let running = sandbox.start();
    wait_until(
        Duration::from_secs(10),
        "the leader to publish the TOML names",
        || {
            let mut connection = redis.connection();
            let member: bool = redis::cmd("SISMEMBER")
                .arg("sauna:beat:static")
                .arg("nightly")
                .query(&mut connection)
                .ok()?;
            member.then_some(())
        },
    );
    let python = python_helper(
        &redis,
        "try:\n    beat.add('nightly', task='t', every=60)\nexcept sauna_beat.TomlJobName as error:\n    print('refused:', error)\n",
    );
    assert!(
        stdout(&python).contains("refused:"),
        "{}",
        output_text(&python)
    );
    assert!(stored_names(&redis).is_empty());

    // A document written past the checks is skipped by the leader and shown as invalid.
    let mut connection = redis.connection();
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg("sauna:beat:jobs")
        .arg("forged")
        .arg("{\"task\":\"t\",\"every\":\"soon\"}")
        .cmd("XADD")
        .arg("sauna:beat:changes")
        .arg("*")
        .arg("name")
        .arg("forged")
        .query(&mut connection)
        .expect("forge");
    let status = running.wait_for(
        Duration::from_secs(10),
        "the forged job refused",
        |status| status["beat"]["runtime_invalid"]["forged"].is_string(),
    );
    assert_eq!(status["beat"]["runtime_jobs"], 0);
    let entry = &list(&sandbox)["forged"];
    assert_eq!(entry["state"], "invalid");
    assert!(
        entry["error"]
            .as_str()
            .unwrap_or_default()
            .contains("every: invalid duration"),
        "{entry}"
    );
    assert!(running.log().contains("runtime job refused"));
    assert!(running.stop().success());
}

#[test]
fn python_helper_jobs_run_on_a_real_worker_and_change_without_a_reload() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let worker = CeleryWorker::start(&sandbox, &redis.url(0));
    sandbox.write_config(&config(&redis, ""));
    let running = sandbox.start();
    let add = python_helper(
        &redis,
        "print(beat.add('py-job', task='tasks.record', every=1, args=['py', 1], kwargs={'k': [1, 2]}, queue='hi', priority=0))",
    );
    assert_eq!(stdout(&add).trim(), "True", "{}", output_text(&add));
    wait_until(Duration::from_secs(20), "the worker to run py-job", || {
        worker
            .records()
            .iter()
            .any(|r| r["args"] == json!(["py", 1]) && r["kwargs"] == json!({"k": [1, 2]}))
            .then_some(())
    });
    let change = python_helper(
        &redis,
        "print(beat.add('py-job', task='tasks.record', cron='* * * * *', args=['changed']))\nprint(beat.get('py-job'))",
    );
    assert!(
        stdout(&change).starts_with("False"),
        "{}",
        output_text(&change)
    );
    let entry = &list(&sandbox)["py-job"];
    assert_eq!(entry["schedule"], "cron \"* * * * *\" (UTC)");
    std::thread::sleep(Duration::from_secs(2));
    let before = records_with(&worker, &json!(["py", 1]));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        records_with(&worker, &json!(["py", 1])),
        before,
        "the old schedule still runs"
    );
    let remove = python_helper(&redis, "beat.remove('py-job')\nprint(beat.names())");
    assert_eq!(stdout(&remove).trim(), "[]", "{}", output_text(&remove));
    running.wait_for(
        Duration::from_secs(5),
        "the job gone from the leader",
        |status| status["beat"]["runtime_jobs"] == 0,
    );
    assert!(running.stop().success());
}

/// A config reload that puts TOML jobs ahead of the runtime ones in the leader's table (and
/// one of them shadowing a runtime job) keeps the others running from their cursors: removing
/// one afterwards stops that one and no other, and no slot goes out twice.
#[test]
fn a_config_reload_keeps_runtime_jobs_running_and_a_new_toml_job_shadows_one() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    sandbox.write_config(&config(&redis, ""));
    for name in ["rt-a", "rt-b", "rt-c"] {
        let output = sandbox.run(&[
            "beat",
            "add",
            name,
            "--task",
            "tasks.record",
            "--every",
            "1s",
            "--queue",
            "rt",
        ]);
        assert_ok(&output, "beat add");
    }
    let running = sandbox.start();
    running.wait_for(
        Duration::from_secs(10),
        "the three runtime jobs loaded",
        |status| status["beat"]["runtime_jobs"] == 3,
    );
    wait_until(
        Duration::from_secs(10),
        "every runtime job to publish",
        || {
            let published = messages(&redis, "rt");
            ["rt-a", "rt-b", "rt-c"]
                .iter()
                .all(|name| published.iter().any(|m| m.job == *name))
                .then_some(())
        },
    );

    sandbox.write_config(&config(
        &redis,
        "[beat.jobs.rt-b]\ntask = \"tasks.record\"\nevery = \"1h\"\n[beat.jobs.hourly]\ntask = \"tasks.record\"\nevery = \"1h\"\n",
    ));
    assert_ok(&sandbox.run(&["reload"]), "reload");
    running.wait_for(
        Duration::from_secs(10),
        "rt-b refused for the new TOML job's name",
        |status| {
            status["beat"]["runtime_jobs"] == 2
                && status["beat"]["runtime_invalid"]["rt-b"].is_string()
        },
    );
    let shadowed_at = Utc::now();
    assert_ok(&sandbox.run(&["beat", "remove", "rt-a"]), "beat remove");
    let removed_at = Utc::now();
    running.wait_for(Duration::from_secs(5), "rt-a gone", |status| {
        status["beat"]["runtime_jobs"] == 1
    });
    wait_until(Duration::from_secs(10), "rt-c to go on publishing", || {
        (messages(&redis, "rt")
            .iter()
            .filter(|m| m.job == "rt-c" && m.slot > removed_at)
            .count()
            >= 2)
            .then_some(())
    });
    assert!(running.stop().success());

    let published = messages(&redis, "rt");
    let late: Vec<&Message> = published
        .iter()
        .filter(|m| {
            (m.job == "rt-a" && m.slot > removed_at) || (m.job == "rt-b" && m.slot > shadowed_at)
        })
        .collect();
    assert!(
        late.is_empty(),
        "published after removal or shadowing: {late:?}"
    );
    for name in ["rt-a", "rt-b", "rt-c"] {
        let mut slots: Vec<DateTime<Utc>> = published
            .iter()
            .filter(|m| m.job == name)
            .map(|m| m.slot)
            .collect();
        let count = slots.len();
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), count, "{name}: a slot went out twice");
    }
}

/// Sleeps until the wall clock is `second`.`millis` into a minute that leaves at least that much.
fn wait_for_second(second: u32, millis: u32) -> DateTime<Utc> {
    loop {
        let now = Utc::now();
        let into = now.second() * 1000 + now.nanosecond() / 1_000_000;
        let target = second * 1000 + millis;
        if into <= target {
            std::thread::sleep(Duration::from_millis(u64::from(target - into)));
            return Utc::now();
        }
        std::thread::sleep(Duration::from_millis(u64::from(60_000 - into)));
    }
}

#[test]
fn changes_just_before_a_minute_boundary_apply_to_its_slot_exactly_once() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    sandbox.write_config(&config(&redis, ""));
    let running = sandbox.start();
    let add = |name: &str, cron: &str, args: &str| {
        sandbox.run(&[
            "beat",
            "add",
            name,
            "--task",
            "tasks.record",
            "--cron",
            cron,
            "--queue",
            "edge",
            "--args",
            args,
        ])
    };
    assert_ok(
        &add("args-change", "* * * * *", "[\"old\"]"),
        "add args-change",
    );
    assert_ok(
        &add("schedule-change", "0 0 1 1 *", "[\"yearly\"]"),
        "add schedule-change",
    );
    assert_ok(&add("going", "* * * * *", "[\"going\"]"), "add going");
    // Let the leader load them, then change everything in the last 1.5 s of a minute.
    running.wait_for(Duration::from_secs(10), "3 runtime jobs", |status| {
        status["beat"]["runtime_jobs"] == 3
    });
    let early = wait_for_second(57, 500);
    assert_ok(&add("args-change", "* * * * *", "[\"new\"]"), "change args");
    assert_ok(
        &add("schedule-change", "* * * * *", "[\"every-minute\"]"),
        "change schedule",
    );
    assert_ok(&sandbox.run(&["beat", "remove", "going"]), "remove going");
    wait_for_second(58, 800);
    let python = python_helper(
        &redis,
        "beat.add('late-add', task='tasks.record', cron='* * * * *', queue='edge', args=['late'])",
    );
    assert_ok(&python, "python add");
    let boundary = (early + chrono::Duration::seconds(3))
        .with_second(0)
        .and_then(|time| time.with_nanosecond(0))
        .expect("boundary");
    // Every change must have been stored (Redis's clock) before the boundary for the test to
    // say anything; on a machine too loaded for that, it says so instead of passing.
    let mut connection = redis.connection();
    let since: Vec<Option<i64>> = redis::cmd("HMGET")
        .arg("sauna:beat:since")
        .arg(&["args-change", "schedule-change", "late-add"])
        .query(&mut connection)
        .expect("HMGET since");
    for stored in &since {
        let stored = stored.expect("since of a stored job");
        assert!(
            stored < boundary.timestamp_millis(),
            "a change was stored at {stored} ms, after the boundary {boundary}: the machine was too slow to test this"
        );
    }
    wait_until(Duration::from_secs(10), "the boundary's slots", || {
        (messages(&redis, "edge")
            .iter()
            .filter(|m| m.slot == boundary)
            .count()
            >= 3)
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let at_boundary: Vec<Message> = messages(&redis, "edge")
        .into_iter()
        .filter(|m| m.slot == boundary)
        .collect();
    let of = |job: &str| -> Vec<&Message> { at_boundary.iter().filter(|m| m.job == job).collect() };
    assert_eq!(of("args-change").len(), 1, "{at_boundary:?}");
    assert_eq!(of("args-change")[0].args, json!(["new"]));
    assert_eq!(of("schedule-change").len(), 1, "{at_boundary:?}");
    assert_eq!(of("schedule-change")[0].args, json!(["every-minute"]));
    assert_eq!(of("late-add").len(), 1, "{at_boundary:?}");
    assert_eq!(of("late-add")[0].kwargs, json!({}));
    assert!(
        of("going").is_empty(),
        "a removed job published: {at_boundary:?}"
    );
    // Nothing doubled anywhere in the queue.
    let all = messages(&redis, "edge");
    let mut keys: Vec<(String, DateTime<Utc>)> =
        all.iter().map(|m| (m.job.clone(), m.slot)).collect();
    keys.sort();
    let count = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), count, "a slot was published twice: {all:?}");
    assert!(running.stop().success());
}

/// A Django settings module with django_celery_beat on the PostgreSQL database `url`.
const DJANGO_SETTINGS: &str = r#"
import os
SECRET_KEY = "test"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django_celery_beat"]
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "HOST": "127.0.0.1",
    "PORT": os.environ["PGPORT"], "NAME": "dj", "USER": os.environ["PGUSER"]}}
"#;

/// Rows made through django_celery_beat's own models: what an app's admin would have saved.
const DJANGO_ROWS: &str = r#"
import datetime, json
import django
django.setup()
from django.utils import timezone
from django_celery_beat.models import (ClockedSchedule, CrontabSchedule, IntervalSchedule,
    PeriodicTask, SolarSchedule)
every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
PeriodicTask.objects.create(name="interval-job", task="tasks.record", interval=every_second,
    args=json.dumps(["from-django", 1]), kwargs=json.dumps({"tenant": 9}), queue="hi",
    expire_seconds=3600)
PeriodicTask.objects.create(name="one-off-job", task="tasks.record", interval=every_second,
    args=json.dumps(["one-off"]), one_off=True)
weekdays = CrontabSchedule.objects.create(minute="0,30", hour="8", day_of_week="1-5",
    day_of_month="*", month_of_year="*", timezone="Europe/Helsinki")
PeriodicTask.objects.create(name="crontab-job", task="tasks.record", crontab=weekdays)
PeriodicTask.objects.create(name="disabled-job", task="tasks.record", interval=every_second,
    enabled=False)
sunset = SolarSchedule.objects.create(event="sunset", latitude=60.17, longitude=24.94)
PeriodicTask.objects.create(name="solar-job", task="tasks.record", solar=sunset)
clocked = ClockedSchedule.objects.create(clocked_time=timezone.now() + datetime.timedelta(days=1))
PeriodicTask.objects.create(name="clocked-job", task="tasks.record", clocked=clocked, one_off=True)
print("rows", PeriodicTask.objects.count())
"#;

#[test]
fn django_celery_beat_rows_are_imported_and_run_by_a_real_worker() {
    use crate::util::postgres::{Cluster, give_to_pg_user, os_user};
    let sandbox = Sandbox::new();
    if crate::util::is_root() {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(sandbox.root(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let port = crate::util::free_port();
    let admin = os_user();
    let cluster = Cluster::init(
        &sandbox.path("pg"),
        &["-U", &admin, "--auth-local=peer", "--auth-host=trust"],
    );
    let conf = cluster.data().join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).expect("postgresql.conf");
    text.push_str(&format!(
        "\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
    ));
    std::fs::write(&conf, text).expect("postgresql.conf");
    give_to_pg_user(&cluster.data());
    let _server = cluster.start(port);
    let created = crate::util::run(cluster.admin_psql(port).args(["-c", "CREATE DATABASE dj"]));
    crate::util::assert_success(&created, "CREATE DATABASE");

    sandbox.write("djsettings.py", DJANGO_SETTINGS);
    let django = |args: &[&str]| {
        crate::util::run(
            Command::new(python())
                .args(args)
                .current_dir(sandbox.root())
                .env("DJANGO_SETTINGS_MODULE", "djsettings")
                .env("PYTHONPATH", sandbox.root())
                .env("PGPORT", port.to_string())
                .env("PGUSER", &admin),
        )
    };
    let migrate = django(&["-m", "django", "migrate", "--noinput"]);
    assert!(
        migrate.status.success(),
        "django_celery_beat's migrations (pip install -r tests/requirements.txt): {}",
        output_text(&migrate)
    );
    let rows = django(&["-c", DJANGO_ROWS]);
    assert!(rows.status.success(), "{}", output_text(&rows));

    let redis = RedisServer::start(&sandbox.path("redis"));
    let worker = CeleryWorker::start(&sandbox, &redis.url(0));
    sandbox.write_config(&config(&redis, ""));
    let url = format!("postgres://{admin}@127.0.0.1:{port}/dj");
    let dry = sandbox.run(&["beat", "import", "--django-celery-beat", &url, "--dry-run"]);
    assert!(
        stdout(&dry).contains("would import \"interval-job\""),
        "{}",
        output_text(&dry)
    );
    assert!(stored_names(&redis).is_empty(), "a dry run wrote");

    let import = sandbox.run(&["beat", "import", "--django-celery-beat", &url]);
    let out = stdout(&import);
    // Solar and clocked rows cannot be expressed: reported, not guessed, and the exit status says so.
    assert_eq!(import.status.code(), Some(1), "{}", output_text(&import));
    assert!(
        out.contains("not imported \"solar-job\": solar schedule (sunset)"),
        "{out}"
    );
    assert!(
        out.contains("not imported \"clocked-job\": clocked schedule"),
        "{out}"
    );
    assert!(
        out.contains("3 of 5 enabled periodic task(s) imported, 2 not"),
        "{out}"
    );
    assert!(!out.contains("disabled-job"), "{out}");
    assert_eq!(
        stored_names(&redis),
        ["crontab-job", "interval-job", "one-off-job"]
    );
    let listed = list(&sandbox);
    assert_eq!(
        listed["crontab-job"]["schedule"],
        "cron \"0,30 8 * * 1-5\" (Europe/Helsinki)"
    );
    let next = listed["crontab-job"]["next_run"]
        .as_str()
        .expect("next run")
        .to_owned();
    assert!(
        next.contains("T08:00:00") || next.contains("T08:30:00"),
        "{next}"
    );

    let running = sandbox.start();
    wait_until(Duration::from_secs(20), "the imported jobs to run", || {
        let records = worker.records();
        let interval = records
            .iter()
            .any(|r| r["args"] == json!(["from-django", 1]) && r["kwargs"] == json!({"tenant": 9}));
        let once = records.iter().any(|r| r["args"] == json!(["one-off"]));
        (interval && once).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        records_with(&worker, &json!(["one-off"])),
        1,
        "a one-off job ran twice"
    );
    assert_eq!(list(&sandbox)["one-off-job"]["state"], "paused");
    assert!(running.stop().success());
}

#[tokio::test]
async fn the_batch_publish_is_fenced_and_never_repeats_a_slot() {
    use sauna_supervisor::beat::publisher::{Broker, Outgoing, Published};
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    let ttl = Duration::from_secs(5);
    let mut old =
        Broker::new(&redis.url(0), None, "fence:", Duration::from_secs(1)).expect("broker");
    let mut new =
        Broker::new(&redis.url(0), None, "fence:", Duration::from_secs(1)).expect("broker");
    assert_eq!(old.acquire("a:1:old", ttl).await.expect("acquire"), None);
    let batch = |slots: &[i64]| -> Vec<Outgoing> {
        slots
            .iter()
            .enumerate()
            .map(|(index, slot)| Outgoing {
                job: format!("job{}", index % 2).into(),
                slot_ms: *slot,
                queue_key: if index % 2 == 0 { "even" } else { "odd" }.to_owned(),
                message: format!("{{\"slot\": {slot}}}"),
            })
            .collect()
    };
    async fn send(
        broker: &mut Broker,
        token: Option<&str>,
        batch: Vec<Outgoing>,
    ) -> Vec<Published> {
        let task = broker.start_publish(token, batch).await.expect("start");
        broker.finish_publish(task.await).expect("finish")
    }
    use Published::{AlreadySent, NotLeader, Sent};
    // job0 gets 1000 and 2000, job1 1000 and then an older slot, refused.
    assert_eq!(
        send(&mut old, Some("a:1:old"), batch(&[1000, 1000, 2000, 500])).await,
        [Sent, Sent, Sent, AlreadySent]
    );
    // Another token: nothing is pushed, every message says why.
    assert_eq!(
        send(&mut new, Some("b:2:new"), batch(&[3000, 3000])).await,
        [NotLeader, NotLeader]
    );
    // The same and older slots are never pushed again, by anyone.
    assert_eq!(
        send(&mut old, Some("a:1:old"), batch(&[1000, 1000])).await,
        [AlreadySent, AlreadySent]
    );
    assert_eq!(
        send(&mut new, None, batch(&[3000, 500])).await,
        [Sent, AlreadySent]
    );
    let mut connection = redis.connection();
    let (even, odd): (Vec<String>, Vec<String>) = redis::pipe()
        .cmd("LRANGE")
        .arg("even")
        .arg(0)
        .arg(-1)
        .cmd("LRANGE")
        .arg("odd")
        .arg(0)
        .arg(-1)
        .query(&mut connection)
        .expect("LRANGE");
    assert_eq!(
        even,
        ["{\"slot\": 3000}", "{\"slot\": 2000}", "{\"slot\": 1000}"]
    );
    assert_eq!(odd, ["{\"slot\": 1000}"]);
}
