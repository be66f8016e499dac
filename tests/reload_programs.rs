//! `sauna-supervisor reload` and programs, through the real binary: a changed program is rolled
//! (the old instance gets TERM only after the new one survived `ready_after`), a new instance
//! that dies at once rolls back and makes `reload` exit 1, and a real Celery worker on a real
//! Redis, whose task module is edited in place without touching sauna.toml, is rolled onto the
//! new code by `reload` while tasks run, without losing or repeating one.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::redis::RedisServer;
use crate::util::{Running, Sandbox, alive, python, wait_until};

/// The instances of program `name` in a `status --json` document.
fn instances(status: &Value, name: &str) -> Vec<Value> {
    status["programs"]
        .as_array()
        .and_then(|programs| programs.iter().find(|program| program["name"] == name))
        .and_then(|program| program["instances"].as_array())
        .cloned()
        .unwrap_or_else(|| panic!("no program {name:?} in {status}"))
}

fn pid(instance: &Value) -> u32 {
    instance["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .unwrap_or_else(|| panic!("no pid in {instance}"))
}

/// Waits until program `name` has one running instance, and returns its pid.
fn running_pid(running: &Running, name: &str) -> u32 {
    let status = running.wait_for(Duration::from_secs(30), "the program running", |status| {
        instances(status, name)
            .first()
            .is_some_and(|instance| instance["state"] == "running")
    });
    pid(&instances(&status, name)[0])
}

/// A program that records, in the sandbox, when it started and when it got SIGTERM
/// (nanoseconds since the epoch), then runs until stopped.
fn recording_program(sandbox: &Sandbox, release: &str) -> String {
    let dir = sandbox.root().display();
    format!(
        r#"
[programs.worker]
command = ["sh", "-c", "date +%s%N > {dir}/start-$$; trap 'date +%s%N > {dir}/term-$$; exit 0' TERM; sleep 300 & wait"]
env = {{ RELEASE = "{release}" }}
ready_after = "1s"
stop_timeout = "10s"
"#
    )
}

fn recorded(sandbox: &Sandbox, what: &str, pid: u32) -> u128 {
    std::fs::read_to_string(sandbox.path(&format!("{what}-{pid}")))
        .unwrap_or_else(|error| panic!("{what}-{pid}: {error}"))
        .trim()
        .parse()
        .expect("nanoseconds")
}

fn reload(sandbox: &Sandbox) -> (i32, String) {
    let output = sandbox.run(&["reload"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn reload_rolls_a_changed_program_new_first() {
    let sandbox = Sandbox::new();
    sandbox.write_config(&recording_program(&sandbox, "1"));
    let running = sandbox.start();
    let old = running_pid(&running, "worker");

    sandbox.write_config(&recording_program(&sandbox, "2"));
    let (code, output) = reload(&sandbox);
    assert_eq!(code, 0, "{output}\nlog:\n{}", running.log());
    assert!(
        output.contains(&format!(
            "program \"worker\": new instance 0 up (pid {}",
            pid(&instances(&running.status_json(), "worker")[0])
        )) && output.contains(&format!("stopping the old one (pid {old})")),
        "{output}"
    );
    let status = running.status_json();
    let new = &instances(&status, "worker");
    assert_eq!(new.len(), 1, "{status}");
    assert_eq!(new[0]["generation"], 2, "{status}");
    let new_pid = pid(&new[0]);
    assert_ne!(new_pid, old);
    assert!(alive(new_pid));
    assert!(!alive(old), "reload returns once the old instance is gone");
    // TERM reached the old one only after the new one had run for ready_after.
    let started = new[0]["started_at"].as_f64().expect("started_at");
    let term = recorded(&sandbox, "term", old) as f64 / 1e9;
    assert!(
        term - started >= 1.0,
        "TERM {:.3} s after the new start",
        term - started
    );
    assert!(running.stop().success());
}

#[test]
fn a_new_instance_that_exits_at_once_rolls_back_and_reload_exits_1() {
    let sandbox = Sandbox::new();
    sandbox.write_config(&recording_program(&sandbox, "1"));
    let running = sandbox.start();
    let old = running_pid(&running, "worker");

    sandbox.write_config(
        r#"
[programs.worker]
command = ["sh", "-c", "echo 'ModuleNotFoundError: No module named myapp' >&2; exit 3"]
ready_after = "1s"
"#,
    );
    let (code, output) = reload(&sandbox);
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("program \"worker\""), "{output}");
    assert!(output.contains("exited with status 3"), "{output}");
    assert!(output.contains("No module named myapp"), "{output}");
    let status = running.status_json();
    let now = instances(&status, "worker");
    assert_eq!(now.len(), 1, "the new instance is gone: {status}");
    assert_eq!(
        (pid(&now[0]), now[0]["generation"].as_u64()),
        (old, Some(1))
    );
    assert_eq!(now[0]["state"], "running");
    assert!(alive(old));
    assert!(
        !sandbox.path(&format!("term-{old}")).exists(),
        "the old instance never got a signal"
    );
    assert!(running.stop().success());
}

/// The task module of the app; `{version}` is what the deploy changes in place.
fn tasks_py(version: &str) -> String {
    format!(
        r#"
import os, time
from celery import Celery

VERSION = "{version}"

app = Celery("tasks", broker=os.environ["BROKER"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
)

@app.task(name="tasks.work")
def work(n):
    time.sleep(1)
    with open(os.environ["DONE"], "a") as out:
        out.write(f"{{work.request.id}} {{VERSION}}\n")
"#
    )
}

/// Sends `count` tasks with ids `PREFIX0`, `PREFIX1`, … one every `gap` seconds, by name, so it
/// does not depend on the task module's version.
const PRODUCER_PY: &str = r#"
import os, sys, time
from celery import Celery
app = Celery("producer", broker=os.environ["BROKER"])
prefix, count, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for n in range(count):
    app.send_task("tasks.work", args=[n], task_id=f"{prefix}{n}")
    time.sleep(gap)
"#;

/// The same config before and after the deploy: only the code on disk changes.
fn celery_config(sandbox: &Sandbox, redis: &RedisServer) -> String {
    let python = python();
    // PYTHONDONTWRITEBYTECODE: a task module rewritten within the same second with the same
    // size would otherwise be loaded from its stale .pyc (CPython compares mtime and size).
    format!(
        r#"
[app]
directory = "{dir}"
python = "{python}"
env = {{ BROKER = "{broker}", DONE = "{done}", PYTHONDONTWRITEBYTECODE = "1" }}

[programs.celery]
command = ["python", "-m", "celery", "-A", "tasks", "worker", "-c", "2", "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "info"]
ready_after = "2s"
stop_timeout = "30s"
"#,
        dir = sandbox.root().display(),
        python = python.display(),
        broker = redis.url(0),
        done = sandbox.path("done.txt").display(),
    )
}

/// `(task id, version that ran it)` for every finished task.
fn done(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(id, version)| (id.to_owned(), version.to_owned()))
        .collect()
}

/// A producer, killed if the test fails before it is done.
struct Producer(Child);

impl Producer {
    fn start(sandbox: &Sandbox, redis: &RedisServer, prefix: &str, count: usize) -> Producer {
        Producer(
            Command::new(python())
                .args(["producer.py", prefix, &count.to_string(), "0.25"])
                .current_dir(sandbox.root())
                .env("BROKER", redis.url(0))
                .stdin(Stdio::null())
                .spawn()
                .expect("start the producer"),
        )
    }

    fn finish(mut self) {
        let status = self.0.wait().expect("producer");
        assert!(status.success(), "the producer failed");
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The issue this guards against: a release deployed in place (new code in the same
/// directory, sauna.toml untouched) followed by `reload` left the Celery worker on the old
/// code, because nothing in its config had changed.
#[test]
fn an_in_place_deploy_rolls_the_celery_worker_onto_the_new_code_without_losing_a_task() {
    let sandbox = Sandbox::new();
    let redis = RedisServer::start(&sandbox.path("redis"));
    sandbox.write("tasks.py", &tasks_py("1"));
    sandbox.write("producer.py", PRODUCER_PY);
    sandbox.write_config(&celery_config(&sandbox, &redis));
    let running = sandbox.start();
    let old = running_pid(&running, "celery");
    running.wait_for_log("ready.", Duration::from_secs(60));

    // Tasks published right before and during the reload: the old worker is busy with some,
    // more wait in the queue while the new worker starts and the old one shuts down warm.
    const BEFORE: usize = 16;
    let producer = Producer::start(&sandbox, &redis, "t", BEFORE);
    let done_path = sandbox.path("done.txt");
    wait_until(Duration::from_secs(60), "a first task done", || {
        (!done(&done_path).is_empty()).then_some(())
    });
    sandbox.write("tasks.py", &tasks_py("2"));
    let (code, output) = reload(&sandbox);
    assert_eq!(code, 0, "{output}\nlog:\n{}", running.log());
    assert!(
        output.contains("programs: \"celery\" rolled"),
        "reload says what it did with the program: {output}"
    );
    assert!(!alive(old), "reload returns once the old worker is gone");
    producer.finish();

    // Published once the reload is done: only the new code can run them.
    const AFTER: usize = 4;
    Producer::start(&sandbox, &redis, "after", AFTER).finish();

    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let finished = loop {
        let finished = done(&done_path);
        if finished.len() >= BEFORE + AFTER {
            break finished;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every task was done within 90 s: {finished:?}\nreload said:\n{output}\nlog:\n{}",
            running.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Nothing more arrives: no task ran twice.
    std::thread::sleep(Duration::from_secs(3));
    let finished = {
        let again = done(&done_path);
        assert_eq!(again.len(), finished.len(), "late duplicates: {again:?}");
        again
    };
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for (id, _) in &finished {
        *per_id.entry(id.clone()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = (0..BEFORE)
        .map(|n| (format!("t{n}"), 1))
        .chain((0..AFTER).map(|n| (format!("after{n}"), 1)))
        .collect();
    assert_eq!(
        per_id,
        expected,
        "every task exactly once\nlog:\n{}",
        running.log()
    );
    let version_of = |prefix: &str| -> Vec<&str> {
        finished
            .iter()
            .filter(|(id, _)| id.starts_with(prefix))
            .map(|(_, version)| version.as_str())
            .collect()
    };
    assert!(
        version_of("t").contains(&"1"),
        "the old worker ran tasks until it was replaced: {finished:?}"
    );
    assert!(
        version_of("after").iter().all(|version| *version == "2"),
        "every task after the reload ran the new code: {finished:?}"
    );
    assert!(
        !running.log().contains("WorkerLostError"),
        "a task was killed mid-run\n{}",
        running.log()
    );
    let status = running.status_json();
    assert_eq!(instances(&status, "celery")[0]["generation"], 2, "{status}");
    assert!(running.stop().success());
}
