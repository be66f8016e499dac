//! Secrets named once in `sauna.toml` (`[redis]`/`[postgres]` `password_env`/`password_file`)
//! reach every consumer: beat publishes to a `requirepass` Redis, a real Celery worker finds the
//! broker through `[redis].url_env`, the queue sampler reads lengths, a program and the web
//! workers see `CELERY_BROKER_URL` and `DATABASE_URL` — and the value never shows in the log,
//! `status`, `/metrics` or a child's command line. A refused login says "authentication failed"
//! in `check --live`, the log and `status`; a missing secret stops `check` and `run` with exit 2
//! at the key that names it.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::util::redis::RedisServer;
use crate::util::{Sandbox, free_port, http_get, output_text, python, wait_until};

/// A password with every character a URL must escape, so the percent-encoding is exercised by
/// kombu, redis-py and redis-rs decoding it.
const PASSWORD: &str = "p@ss:w/rd#%?& ~+";

/// The same, as it appears in a URL's user info.
const PASSWORD_ENCODED: &str = "p%40ss%3Aw%2Frd%23%25%3F%26%20~%2B";

const TASKS_PY: &str = r#"
import json, os
from celery import Celery

app = Celery("tasks", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

@app.task(name="tasks.record")
def record(*args, **kwargs):
    with open(os.environ["RECORD"], "a") as out:
        out.write(json.dumps({"args": args}) + "\n")
"#;

const ENV_DUMP_PY: &str = r#"
import json, os, time
names = ["CELERY_BROKER_URL", "DATABASE_URL"]
with open("program-env.json.tmp", "w") as out:
    json.dump({name: os.environ.get(name) for name in names}, out)
os.rename("program-env.json.tmp", "program-env.json")
time.sleep(3600)
"#;

const APP_PY: &str = r#"
import os

def application(environ, start_response):
    body = "\n".join(os.environ.get(name, "-") for name in ("CELERY_BROKER_URL", "DATABASE_URL"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
"#;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every process below `root` (children, grandchildren, …), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents: BTreeMap<u32, u32> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // The command name in field 2 may hold spaces and parentheses: the ppid follows the last ')'.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.insert(pid, ppid);
        }
    }
    let mut found = vec![root];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, ppid)| **ppid == parent)
                .map(|(pid, _)| *pid),
        );
        index += 1;
    }
    found.remove(0);
    found
}

fn assert_secret_absent(what: &str, haystack: &str) {
    for needle in [PASSWORD, PASSWORD_ENCODED] {
        assert!(
            !haystack.contains(needle),
            "the password leaked into {what}:\n{haystack}"
        );
    }
}

fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn a_password_named_once_reaches_beat_celery_the_sampler_programs_and_workers_but_no_log() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start_with_password(&sandbox.path("redis"), PASSWORD);
    sandbox.write("tasks.py", TASKS_PY);
    sandbox.write("env_dump.py", ENV_DUMP_PY);
    sandbox.write("app.py", APP_PY);
    sandbox.write("db.password", &format!("{PASSWORD}\n"));
    let record = sandbox.path("record.jsonl");
    let (web_port, metrics_port) = (free_port(), free_port());
    sandbox.write_config(&format!(
        r#"[app]
python = "{python}"
directory = "{root}"
wsgi = "app:application"

[web]
listen = ["127.0.0.1:{web_port}"]
workers = 1

[programs.celery]
command = ["python", "-m", "celery", "-A", "tasks", "worker", "-P", "solo", "-Q", "celery",
           "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "info"]
env = {{ RECORD = "{record}" }}

[programs.env_dump]
command = ["python", "env_dump.py"]

[beat]
broker = "redis://127.0.0.1:{redis_port}/0"

[beat.jobs.rec]
task = "tasks.record"
every = "1s"
args = ["through a password"]

[metrics]
listen = "127.0.0.1:{metrics_port}"
queues = ["parked"]
sample_interval = "200ms"

[redis]
password_env = "SAUNA_TEST_REDIS_PASSWORD"
url_env = "CELERY_BROKER_URL"

[postgres]
database = "shop"
user = "shop_app"
port = 5433
password_file = "db.password"
url_env = "DATABASE_URL"
"#,
        python = python().display(),
        root = sandbox.root().display(),
        record = record.display(),
        redis_port = redis.port(),
    ));
    let running = sandbox.start_with(|command| {
        command.env("SAUNA_TEST_REDIS_PASSWORD", PASSWORD);
    });

    // Beat logged in and published; Celery, which only has CELERY_BROKER_URL, ran the task.
    wait_until(
        Duration::from_secs(60),
        "the Celery worker to run a task beat published",
        || {
            std::fs::read_to_string(&record)
                .ok()?
                .contains("through a password")
                .then_some(())
        },
    );
    let expected_broker = format!("redis://:{PASSWORD_ENCODED}@127.0.0.1:{}/0", redis.port());
    let expected_database = format!("postgres://shop_app:{PASSWORD_ENCODED}@127.0.0.1:5433/shop");

    // A program and the web workers see both URLs.
    let program_env: Value = wait_until(Duration::from_secs(20), "the program's env dump", || {
        serde_json::from_str(&std::fs::read_to_string(sandbox.path("program-env.json")).ok()?).ok()
    });
    assert_eq!(program_env["CELERY_BROKER_URL"], expected_broker.as_str());
    assert_eq!(program_env["DATABASE_URL"], expected_database.as_str());
    let web_env = wait_until(Duration::from_secs(20), "the web worker's answer", || {
        http_get(format!("127.0.0.1:{web_port}"), "/")
    });
    assert_eq!(web_env, format!("{expected_broker}\n{expected_database}"));

    // The sampler logs in too: a message parked on a queue nobody consumes is counted.
    let _: i64 = redis::cmd("LPUSH")
        .arg("parked")
        .arg("{}")
        .query(&mut redis.connection())
        .expect("LPUSH");
    let scrape = wait_until(
        Duration::from_secs(20),
        "the parked message to be counted",
        || {
            let body = http_get(format!("127.0.0.1:{metrics_port}"), "/metrics")?;
            (sample(&body, "sauna_celery_queue_length{queue=\"parked\"}") == Some(1.0))
                .then_some(body)
        },
    );

    let status = running.status_json();
    assert_eq!(status["beat"]["redis_up"], true, "{status}");
    assert_eq!(status["beat"]["last_error"], Value::Null, "{status}");

    // The value shows nowhere: not in the log, status, metrics or any child's command line.
    let status_text = text(&sandbox.run(&["status"]).stdout);
    assert!(status_text.contains("BEAT"), "{status_text}");
    assert_secret_absent("status --json", &status.to_string());
    assert_secret_absent("status", &status_text);
    assert_secret_absent("/metrics", &scrape);
    let children = descendants(running.pid());
    assert!(children.len() >= 3, "workers and programs: {children:?}");
    for pid in children.into_iter().chain([running.pid()]) {
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            assert_secret_absent(&format!("/proc/{pid}/cmdline"), &text(&cmdline));
        }
    }
    let log = running.log();
    assert!(log.contains("beat: published"), "{log}");
    assert_secret_absent("the supervisor's log", &log);
    assert!(running.stop().success());
}

#[test]
fn a_refused_login_says_authentication_failed_in_check_the_log_and_status() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start_with_password(&sandbox.path("redis"), PASSWORD);
    let wrong = "not-the-password";
    let config = |redis_section: &str| {
        format!(
            "[beat]\nbroker = \"redis://127.0.0.1:{}/0\"\n[beat.jobs.rec]\ntask = \"t\"\nevery = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\nqueues = [\"celery\"]\nsample_interval = \"100ms\"\n{redis_section}",
            redis.port(),
            free_port(),
        )
    };
    sandbox.write_config(&config(
        "[redis]\npassword_env = \"SAUNA_TEST_REDIS_PASSWORD\"\n",
    ));
    let check_live = |password: &str| -> Output {
        sandbox
            .command(&["check", "--live"])
            .env("SAUNA_TEST_REDIS_PASSWORD", password)
            .output()
            .expect("run check --live")
    };

    // The right password: the live server agrees (the test Redis has AOF and noeviction).
    let agreed = check_live(PASSWORD);
    assert_eq!(agreed.status.code(), Some(0), "{}", output_text(&agreed));
    // A wrong one: exit 2, and why.
    let refused = check_live(wrong);
    assert_eq!(refused.status.code(), Some(2), "{}", output_text(&refused));
    let stdout = text(&refused.stdout);
    assert!(
        stdout.contains(&format!(
            "(127.0.0.1:{}): authentication failed (WRONGPASS",
            redis.port()
        )),
        "{stdout}"
    );
    assert!(!stdout.contains(wrong), "{stdout}");
    // None where one is required.
    sandbox.write("nopass.toml", &config("[redis]\n"));
    let missing = sandbox.run(&["check", "--live", "-c", "nopass.toml"]);
    assert_eq!(missing.status.code(), Some(2), "{}", output_text(&missing));
    assert!(
        text(&missing.stdout).contains("authentication failed (NOAUTH"),
        "{}",
        output_text(&missing)
    );

    // The supervisor runs, but beat and the sampler say why they cannot work — once each.
    let running = sandbox.start_with(|command| {
        command.env("SAUNA_TEST_REDIS_PASSWORD", wrong);
    });
    let status = running.wait_for(
        Duration::from_secs(20),
        "beat's login to be refused",
        |status| {
            status["beat"]["last_error"]
                .as_str()
                .is_some_and(|error| error.contains("authentication failed"))
        },
    );
    assert_eq!(status["beat"]["redis_up"], false, "{status}");
    running.wait_for_log("cannot read Celery queue lengths", Duration::from_secs(20));
    // Long enough for several failed samples and many beat retries.
    std::thread::sleep(Duration::from_secs(2));
    let log = running.log();
    assert_eq!(
        log.matches("beat: Redis refused the login").count(),
        1,
        "{log}"
    );
    let sampler_lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("cannot read Celery queue lengths"))
        .filter(|line| line.contains("authentication failed (WRONGPASS"))
        .collect();
    assert_eq!(sampler_lines.len(), 1, "{log}");
    let status_text = text(&sandbox.run(&["status"]).stdout);
    assert!(
        status_text.contains("last error (")
            && status_text.contains("Redis at redis://127.0.0.1:")
            && status_text.contains("authentication failed"),
        "{status_text}"
    );
    assert!(
        !log.contains(wrong) && !status_text.contains(wrong),
        "{log}"
    );
    assert!(running.stop().success());
}

#[test]
fn a_missing_secret_stops_check_and_run_at_the_key_that_names_it() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        r#"[programs.sleeper]
command = ["sleep", "60"]

[beat]
broker = "redis://127.0.0.1:6379/0"

[redis]
password_env = "SAUNA_TEST_UNSET_PASSWORD"

[postgres]
password_file = "missing/db.password"
"#,
    );
    let file = sandbox.path("sauna.toml").display().to_string();
    let expected = [
        format!(
            "{file}:8:16: redis.password_env: SAUNA_TEST_UNSET_PASSWORD is not set in the supervisor's environment"
        ),
        format!(
            "{file}:11:17: postgres.password_file: cannot read {}: ",
            sandbox.path("missing/db.password").display()
        ),
    ];
    let check = sandbox.run(&["check"]);
    assert_eq!(check.status.code(), Some(2), "{}", output_text(&check));
    let lines: Vec<String> = text(&check.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{}", output_text(&check));
    for (line, start) in lines.iter().zip(&expected) {
        assert!(line.starts_with(start.as_str()), "{line}\nexpected {start}");
    }

    // `run` refuses to start with the same diagnostics, before any role (the control socket
    // never appears).
    let run = sandbox
        .command(&["run"])
        .output()
        .expect("run sauna-supervisor run");
    assert_eq!(run.status.code(), Some(2), "{}", output_text(&run));
    let stderr = text(&run.stderr);
    for start in &expected {
        assert!(stderr.contains(start.as_str()), "{stderr}");
    }
    assert!(!sandbox.control_socket().exists());

    // A URL variable also written by hand is one source too many.
    sandbox.write_config(
        "[app]\nenv = { CELERY_BROKER_URL = \"redis://127.0.0.1:6379/0\" }\n[beat]\n[redis]\nurl_env = \"CELERY_BROKER_URL\"\n",
    );
    let twice = sandbox.run(&["check"]);
    assert_eq!(twice.status.code(), Some(2), "{}", output_text(&twice));
    assert!(
        text(&twice.stdout).starts_with(&format!(
            "{file}:2:9: app.env.CELERY_BROKER_URL: CELERY_BROKER_URL is set twice: [redis].url_env already sets it"
        )),
        "{}",
        output_text(&twice)
    );
}

#[test]
fn each_reload_reads_the_password_again() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start_with_password(&sandbox.path("redis"), PASSWORD);
    let password_file = sandbox.write("redis.password", &format!("{PASSWORD}\n"));
    sandbox.write_config(&format!(
        "[beat]\nbroker = \"redis://127.0.0.1:{}/0\"\n[beat.jobs.rec]\ntask = \"t\"\nevery = \"1s\"\n[redis]\npassword_file = \"redis.password\"\n",
        redis.port()
    ));
    let running = sandbox.start();
    let redis_up = |up: bool| {
        move |status: &Value| {
            status["beat"]["redis_up"] == up
                && status["beat"]["jobs"][0]["published"].as_u64().is_some()
        }
    };
    running.wait_for(Duration::from_secs(20), "beat to log in", redis_up(true));

    // A file that has gone refuses the reload at its key; the running generation keeps its login.
    std::fs::remove_file(&password_file).expect("remove the password file");
    let refused = sandbox.run(&["reload"]);
    assert_eq!(refused.status.code(), Some(2), "{}", output_text(&refused));
    assert!(
        output_text(&refused).contains("redis.password_file: cannot read"),
        "{}",
        output_text(&refused)
    );
    assert_eq!(running.status_json()["generation"], 1);

    // A changed password is used from the reload on: here a wrong one, then the right one again.
    sandbox.write("redis.password", "changed\n");
    let reload = sandbox.run(&["reload"]);
    assert!(reload.status.success(), "{}", output_text(&reload));
    let status = running.wait_for(
        Duration::from_secs(20),
        "beat to use the new, wrong password",
        |status| {
            status["beat"]["last_error"]
                .as_str()
                .is_some_and(|error| error.contains("authentication failed (WRONGPASS"))
        },
    );
    assert_eq!(status["generation"], 2);
    sandbox.write("redis.password", PASSWORD);
    let reload = sandbox.run(&["reload"]);
    assert!(reload.status.success(), "{}", output_text(&reload));
    let status = running.wait_for(
        Duration::from_secs(20),
        "beat to log in again",
        redis_up(true),
    );
    assert_eq!(status["beat"]["last_error"], Value::Null);
    assert_secret_absent("the supervisor's log", &running.log());
    assert!(running.stop().success());
}
