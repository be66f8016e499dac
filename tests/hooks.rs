//! Deploy hooks (`[hooks]`) through the real binary, with a release layout deploy tools use
//! (`releases/vN` behind a `current` symlink): `before_start` runs once, in order, before the
//! first worker starts, and while it runs `status` shows it and `reload` is refused; each
//! `reload` runs `before_reload` in the new release with the app's interpreter, environment and
//! secrets, streaming its output to the `reload` client and the log; `upgrade` runs no hook. A
//! failing or hanging hook refuses the reload with its last lines while the old workers and
//! programs keep running (`sauna_reloads_total{outcome="hook_failed"}`), a hanging one is killed
//! with the children of its process group, a `stop` ends a running hook instead of waiting for
//! it, and a failing `before_start` stops `run` with exit 1 leaving nothing behind.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{self, Running, Sandbox, alive, http_get, output_text, python, wait_until};

/// Written into each release: records what a hook sees, one JSON line per run, then prints.
const HOOK_PY: &str = r#"
import json, os, sys, time

def fd_target(fd):
    try:
        return os.readlink("/proc/self/fd/" + fd)
    except OSError:
        return ""

fds = {fd: fd_target(fd) for fd in os.listdir("/proc/self/fd")}
record = {
    "arg": sys.argv[1],
    "hook": os.environ.get("SAUNA_HOOK"),
    "executable": sys.executable,
    "prefix": sys.prefix,
    "cwd": os.getcwd(),
    "release": open("RELEASE").read().strip(),
    "setting": os.environ.get("APP_SETTING"),
    "broker_url": os.environ.get("CELERY_BROKER_URL"),
    "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
    "notify_socket": os.environ.get("NOTIFY_SOCKET"),
    "stdin": fds.get("0"),
    "own_group": os.getpgid(0) == os.getpid(),
    "inherited_sockets": [t for fd, t in fds.items() if int(fd) > 2 and t.startswith("socket:")],
    "at": time.time_ns(),
}
with open(os.environ["HOOK_LOG"], "a") as out:
    out.write(json.dumps(record) + "\n")
print("hook %s ran in %s" % (sys.argv[1], record["release"]))
print("and wrote to stderr too", file=sys.stderr)
"#;

/// Each release's WSGI app: records when a worker imported it, answers its release and
/// interpreter.
const APP_PY: &str = r#"
import os, sys, time
RELEASE = open(os.path.join(os.path.dirname(__file__), "RELEASE")).read().strip()
with open(os.environ["IMPORT_LOG"], "a") as out:
    out.write("%d %s\n" % (time.time_ns(), RELEASE))

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%s %s %s" % (RELEASE, sys.executable, sys.prefix)).encode()]
"#;

/// A "migration" that prints 30 numbered lines and fails unless `migration-fixed` exists next
/// to the config.
const MIGRATE_PY: &str = r#"
import os, sys
for i in range(1, 31):
    print("migration line %d" % i)
if not os.path.exists(os.path.join(os.environ["SANDBOX"], "migration-fixed")):
    print("django.db.utils.ProgrammingError: column does not exist", file=sys.stderr)
    sys.exit(3)
"#;

/// A sandbox with releases v1 and v2, `current` → v1, and a config running them.
struct Stack {
    sandbox: Sandbox,
    port: u16,
    metrics_port: u16,
}

/// The Redis password the config names through `password_env`; no Redis runs: the hooks only
/// need the URL handed out through `url_env`.
const PASSWORD: &str = "hook-secret";

impl Stack {
    /// `hooks` is the body of `[hooks]`.
    fn new(hooks: &str) -> Stack {
        let sandbox = Sandbox::new();
        for release in ["v1", "v2"] {
            sandbox.write(&format!("releases/{release}/RELEASE"), release);
            sandbox.write(&format!("releases/{release}/app.py"), APP_PY);
            sandbox.write(&format!("releases/{release}/hook.py"), HOOK_PY);
            sandbox.write(&format!("releases/{release}/migrate.py"), MIGRATE_PY);
        }
        let stack = Stack {
            port: util::free_port(),
            metrics_port: util::free_port(),
            sandbox,
        };
        stack.switch("v1");
        let root = stack.sandbox.root().display().to_string();
        stack.sandbox.write_config(&format!(
            r#"[app]
python = "{python}"
directory = "current"
wsgi = "app:application"
env = {{ APP_SETTING = "from-app-env", HOOK_LOG = "{root}/hooks.jsonl", IMPORT_LOG = "{root}/imports.log", SANDBOX = "{root}" }}

[web]
listen = ["127.0.0.1:{port}"]
workers = 2
reload_timeout = "20s"
graceful_timeout = "5s"

[programs.sidecar]
command = ["sh", "-c", "echo $$ >> {root}/sidecar.log; exec sleep 3600"]
ready_after = "1s"

[redis]
broker = "redis://127.0.0.1:1/3"
password_env = "HOOK_TEST_REDIS_PASSWORD"
url_env = "CELERY_BROKER_URL"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[hooks]
{hooks}
"#,
            python = python().display(),
            port = stack.port,
            metrics_port = stack.metrics_port,
        ));
        stack
    }

    /// `run` with the Redis password in its environment; returns once `status` answers.
    fn start(&self) -> Running {
        self.sandbox.start_with(|command| {
            command.env("HOOK_TEST_REDIS_PASSWORD", PASSWORD);
        })
    }

    /// `run` to its end (for a start that must fail), killed if it takes over a minute.
    fn run_to_end(&self) -> Output {
        let mut command = self.sandbox.command(&["run"]);
        command
            .env("HOOK_TEST_REDIS_PASSWORD", PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn run");
        let began = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            if began.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("run did not end within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("run's output")
    }

    /// Points `current` at `releases/NAME`, atomically.
    fn switch(&self, name: &str) {
        let staged = self.sandbox.path("current.new");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(self.sandbox.path(&format!("releases/{name}")), &staged)
            .expect("symlink");
        std::fs::rename(&staged, self.sandbox.path("current")).expect("switch current");
    }

    fn release_dir(&self, name: &str) -> String {
        std::fs::canonicalize(self.sandbox.path(&format!("releases/{name}")))
            .expect("release dir")
            .display()
            .to_string()
    }

    /// `reload`, returning its exit code and everything it printed.
    fn reload(&self) -> (i32, String) {
        let output = self.sandbox.run(&["reload"]);
        (output.status.code().unwrap_or(-1), text(&output))
    }

    /// What the hooks recorded, in order.
    fn hook_runs(&self) -> Vec<Value> {
        std::fs::read_to_string(self.sandbox.path("hooks.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a hook's JSON line"))
            .collect()
    }

    /// When workers imported the app, in nanoseconds since the epoch, with the release.
    fn imports(&self) -> Vec<(u128, String)> {
        std::fs::read_to_string(self.sandbox.path("imports.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (at, release) = line.split_once(' ')?;
                Some((at.parse().ok()?, release.to_owned()))
            })
            .collect()
    }

    /// The body of `GET /`: `RELEASE EXECUTABLE PREFIX`.
    fn get(&self) -> String {
        http_get(("127.0.0.1", self.port), "/").expect("the app answers")
    }

    fn scrape(&self) -> String {
        http_get(("127.0.0.1", self.metrics_port), "/metrics").expect("/metrics answers")
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// The pids of the ready web workers, sorted, once `count` are ready.
fn ready_workers(running: &Running, count: usize) -> Vec<u64> {
    let status = running.wait_for(Duration::from_secs(40), "the web workers ready", |status| {
        status["pool"]["workers"].as_array().is_some_and(|workers| {
            workers.iter().filter(|w| w["state"] == "ready").count() == count
        })
    });
    let mut pids: Vec<u64> = status["pool"]["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|worker| worker["pid"].as_u64())
        .collect();
    pids.sort_unstable();
    pids
}

/// The pid of the running `sidecar` program.
fn sidecar_pid(running: &Running) -> u64 {
    let status = running.wait_for(Duration::from_secs(30), "the sidecar running", |status| {
        status["programs"][0]["instances"][0]["state"] == "running"
    });
    status["programs"][0]["instances"][0]["pid"]
        .as_u64()
        .expect("sidecar pid")
}

/// Stops whichever supervisor serves the sandbox's control socket (after an upgrade the
/// successor is not the test's child).
struct StopOnDrop<'a>(&'a Sandbox);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["stop"]);
    }
}

#[test]
fn hooks_run_in_order_in_the_new_release_with_the_apps_python_and_environment() {
    let stack = Stack::new(
        r#"before_start = [["python", "hook.py", "start-1"], ["python", "hook.py", "start-2"]]
before_reload = [["python", "hook.py", "reload-1"], ["sh", "-c", "echo second-hook-stdout; echo second-hook-stderr >&2"]]"#,
    );
    let running = stack.start();
    let _stop = StopOnDrop(&stack.sandbox);
    ready_workers(&running, 2);

    // before_start: once, in order, before the first worker imported the app, in release v1.
    let runs = stack.hook_runs();
    let args: Vec<&str> = runs.iter().filter_map(|run| run["arg"].as_str()).collect();
    assert_eq!(args, ["start-1", "start-2"], "{runs:?}");
    let first_import = stack
        .imports()
        .iter()
        .map(|(at, _)| *at)
        .min()
        .expect("a worker imported the app");
    let last_hook = runs
        .iter()
        .filter_map(|run| run["at"].as_u64())
        .max()
        .expect("hook times");
    assert!(
        u128::from(last_hook) < first_import,
        "before_start ran after a worker started: {runs:?} {:?}",
        stack.imports()
    );
    let body = stack.get();
    let mut words = body.split(' ');
    let (release, executable, prefix) = (words.next(), words.next(), words.next());
    assert_eq!(release, Some("v1"));
    for run in &runs {
        assert_eq!(run["hook"], "before_start");
        assert_eq!(run["release"], "v1");
        assert_eq!(run["cwd"], stack.release_dir("v1").as_str());
        assert_eq!(
            run["executable"].as_str(),
            executable,
            "the workers' interpreter"
        );
        assert_eq!(run["prefix"].as_str(), prefix, "the workers' venv");
        assert_eq!(run["setting"], "from-app-env");
        assert_eq!(
            run["broker_url"],
            format!("redis://:{PASSWORD}@127.0.0.1:1/3").as_str(),
            "the url_env secret"
        );
        assert_eq!(run["unbuffered"], "1");
        assert_eq!(run["notify_socket"], Value::Null);
        assert_eq!(run["stdin"], "/dev/null");
        assert_eq!(run["own_group"], true);
        assert_eq!(
            run["inherited_sockets"],
            serde_json::json!([]),
            "no listening or control socket leaks into a hook"
        );
    }
    let log = running.log();
    assert!(log.contains("hook start-1 ran in v1"), "{log}");
    assert!(
        log.contains("hook before_start[0]"),
        "the log tags the hook:\n{log}"
    );

    // A deploy: v2 behind `current`, then reload. before_reload sees v2, before any v2 worker.
    stack.switch("v2");
    let (code, printed) = stack.reload();
    assert_eq!(code, 0, "{printed}\nlog:\n{}", running.log());
    let runs = stack.hook_runs();
    assert_eq!(runs.len(), 3, "{runs:?}");
    let reload_run = &runs[2];
    assert_eq!(reload_run["arg"], "reload-1");
    assert_eq!(reload_run["hook"], "before_reload");
    assert_eq!(reload_run["release"], "v2");
    assert_eq!(reload_run["cwd"], stack.release_dir("v2").as_str());
    let first_v2_import = stack
        .imports()
        .iter()
        .filter(|(_, release)| release == "v2")
        .map(|(at, _)| *at)
        .min()
        .expect("a v2 worker");
    assert!(u128::from(reload_run["at"].as_u64().expect("at")) < first_v2_import);
    // Streamed to the reload client, in order, with both output streams.
    for (earlier, later) in [
        ("[hooks].before_reload[0] (1/2)", "hook reload-1 ran in v2"),
        ("hook reload-1 ran in v2", "[hooks].before_reload[1] (2/2)"),
        ("[hooks].before_reload[1] (2/2)", "second-hook-stdout"),
        ("[hooks].before_reload[1] (2/2)", "second-hook-stderr"),
        ("second-hook-stderr", "generation 2 is serving"),
    ] {
        let (Some(a), Some(b)) = (printed.find(earlier), printed.find(later)) else {
            panic!("reload printed neither {earlier:?} nor {later:?}:\n{printed}");
        };
        assert!(
            a < b,
            "{earlier:?} should come before {later:?}:\n{printed}"
        );
    }
    let log = running.log();
    assert!(log.contains("second-hook-stderr"), "{log}");
    assert!(log.contains("hook before_reload[1]"), "{log}");
    assert!(stack.get().starts_with("v2 "));

    // `upgrade` changes the binary, not the release: no hook runs.
    let upgrade = stack.sandbox.run(&["upgrade"]);
    assert!(upgrade.status.success(), "{}", output_text(&upgrade));
    assert!(stack.get().starts_with("v2 "));
    assert_eq!(stack.hook_runs().len(), 3, "a hook ran for upgrade");
}

#[test]
fn a_failing_before_reload_refuses_the_reload_and_the_old_generation_keeps_serving() {
    let stack = Stack::new(
        r#"before_reload = [["python", "migrate.py"], ["sh", "-c", "touch never-run"]]"#,
    );
    let running = stack.start();
    let workers = ready_workers(&running, 2);
    let sidecar = sidecar_pid(&running);

    stack.switch("v2");
    let (code, printed) = stack.reload();
    assert_eq!(code, 1, "{printed}");
    assert!(
        printed.contains(
            "refused by [hooks].before_reload, nothing changed, generation 1 kept: [hooks].before_reload[0] `python migrate.py` exited with status 3"
        ),
        "{printed}"
    );
    // The last 20 of its 31 lines, stdout and stderr in the order written, after the streamed
    // ones.
    let tail_start = printed
        .find("the last 20 line(s) before_reload[0] printed:\n")
        .unwrap_or_else(|| panic!("no tail in {printed}"));
    let tail: Vec<&str> = printed[tail_start..].lines().skip(1).collect();
    let mut expected: Vec<String> = (12..=30).map(|i| format!("migration line {i}")).collect();
    expected.push("django.db.utils.ProgrammingError: column does not exist".to_owned());
    assert_eq!(tail, expected, "{printed}");
    let never_run = stack.sandbox.path("releases/v2/never-run");
    assert!(!never_run.exists(), "the list stops at the failure");

    // Nothing changed: the same workers serve v1, the program was not rolled, no v2 import.
    assert_eq!(ready_workers(&running, 2), workers);
    assert!(stack.get().starts_with("v1 "));
    assert_eq!(sidecar_pid(&running), sidecar);
    assert!(alive(sidecar));
    assert!(
        stack.imports().iter().all(|(_, release)| release == "v1"),
        "a v2 worker started: {:?}",
        stack.imports()
    );
    let status = running.status_json();
    assert_eq!(status["generation"], 1);
    assert_eq!(status["phase"], "running");
    assert_eq!(status["figures"]["reloads"]["hook_failed"], 1);
    let scrape = stack.scrape();
    assert_eq!(
        sample(&scrape, "sauna_reloads_total{outcome=\"hook_failed\"}"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "sauna_reloads_total{outcome=\"rolled_back\"}"),
        Some(0.0)
    );
    let log = running.log();
    assert!(log.contains("migration line 30"), "{log}");

    // The migration fixed, the same deploy goes through.
    stack.sandbox.write("migration-fixed", "");
    let (code, printed) = stack.reload();
    assert_eq!(code, 0, "{printed}");
    assert!(stack.get().starts_with("v2 "));
    assert!(never_run.exists(), "the second command ran this time");
    assert_eq!(running.status_json()["generation"], 2);
    running.stop();
}

#[test]
fn a_hook_past_hook_timeout_is_killed_with_its_group_and_the_reload_refused() {
    // The shell and its background sleep ignore TERM: only the KILL of the whole group ends
    // them. The sleep's pid is written first, so the test can look for it afterwards.
    let stack = Stack::new(
        r#"before_reload = [["sh", "-c", "trap '' TERM; sleep 60 & echo $! > sleep.pid; echo waiting for a lock; wait"]]
hook_timeout = "2s""#,
    );
    let running = stack.start();
    let workers = ready_workers(&running, 2);
    let sidecar = sidecar_pid(&running);

    let reload = {
        let mut command: Command = stack.sandbox.command(&["reload"]);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command.spawn().expect("spawn reload")
    };
    let began = Instant::now();
    // While it runs, status says the reload is in its hook.
    let status = running.wait_for(Duration::from_secs(10), "the hook in status", |status| {
        status["hook"]["hook"] == "before_reload"
    });
    assert_eq!(status["phase"], "reloading");
    assert_eq!(status["hook"]["index"], 0);
    assert!(
        status["hook"]["command"]
            .as_str()
            .is_some_and(|command| command.starts_with("sh -c \"trap")),
        "{status}"
    );
    let human = stack.sandbox.run(&["status"]);
    assert!(
        text(&human).contains("hook before_reload[0] (1/1): sh -c"),
        "{}",
        text(&human)
    );
    let sleep: u64 = wait_until(Duration::from_secs(10), "sleep.pid", || {
        std::fs::read_to_string(stack.sandbox.path("current/sleep.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
    });
    assert!(alive(sleep));

    let output = reload.wait_with_output().expect("reload's output");
    let elapsed = began.elapsed();
    let printed = text(&output);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("timed out after 2s; its process group was killed"),
        "{printed}"
    );
    assert!(
        printed.contains("waiting for a lock"),
        "the last lines: {printed}"
    );
    // 2 s of timeout and 5 s between TERM and KILL, with room for a loaded machine.
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    assert!(!alive(sleep), "the hook's background sleep outlived it");

    assert_eq!(ready_workers(&running, 2), workers);
    assert_eq!(sidecar_pid(&running), sidecar);
    assert!(stack.get().starts_with("v1 "));
    let status = running.status_json();
    assert!(status.get("hook").is_none(), "{status}");
    assert_eq!(status["figures"]["reloads"]["hook_failed"], 1);
    running.stop();
}

#[test]
fn a_failing_before_start_stops_run_with_exit_1_and_leaves_nothing_behind() {
    let stack =
        Stack::new(r#"before_start = [["python", "migrate.py"], ["sh", "-c", "touch never-run"]]"#);
    let control = stack.sandbox.control_socket();
    let output = stack.run_to_end();
    let printed = text(&output);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains(
            "sauna-supervisor: [hooks].before_start[0] `python migrate.py` exited with status 3; nothing was started"
        ),
        "{printed}"
    );
    assert!(
        printed.contains("the last 20 line(s) before_start[0] printed:"),
        "{printed}"
    );
    assert!(
        printed.contains("ProgrammingError: column does not exist"),
        "{printed}"
    );
    assert!(!stack.sandbox.path("releases/v1/never-run").exists());
    // No worker imported the app, the program never ran, every port and the socket are free.
    assert!(stack.imports().is_empty(), "{:?}", stack.imports());
    assert!(
        !stack.sandbox.path("sidecar.log").exists(),
        "the program started"
    );
    for port in [stack.port, stack.metrics_port] {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|error| panic!("port {port} still taken: {error}"));
    }
    assert!(!control.exists(), "the control socket was left behind");
}

#[test]
fn while_before_start_runs_status_answers_reload_waits_and_stop_ends_it() {
    // The hook waits for a file; while it does, the supervisor answers.
    let wait_for_go: &str = r#"before_start = [["python", "hook.py", "start"], ["sh", "-c", "echo $$ > hook.pid; while [ ! -e ../../go ]; do sleep 0.1; done"]]"#;
    let stack = Stack::new(wait_for_go);
    let running = stack.start();
    let status = running.wait_for(
        Duration::from_secs(20),
        "the second hook running",
        |status| status["hook"]["index"] == 1,
    );
    assert_eq!(status["phase"], "starting");
    assert_eq!(status["hook"]["hook"], "before_start");
    assert_eq!(status["hook"]["commands"], 2);
    assert!(
        status["pool"].is_null(),
        "the pool started during before_start: {status}"
    );
    let refused = stack.sandbox.run(&["reload"]);
    assert_eq!(refused.status.code(), Some(1), "{}", output_text(&refused));
    assert!(
        text(&refused).contains("[hooks].before_start is running"),
        "{}",
        text(&refused)
    );
    // Released: the roles start after it.
    stack.sandbox.write("go", "");
    ready_workers(&running, 2);
    assert_eq!(stack.hook_runs().len(), 1);
    running.stop();

    // `stop` during before_start ends the hook's process group and exits 0; nothing starts.
    let stack = Stack::new(wait_for_go);
    let mut running = stack.start();
    let hook_pid: u64 = wait_until(Duration::from_secs(20), "hook.pid", || {
        std::fs::read_to_string(stack.sandbox.path("current/hook.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
    });
    let stop = stack.sandbox.run(&["stop"]);
    assert!(stop.status.success(), "{}", output_text(&stop));
    let exit = running.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{}", running.log());
    assert!(!alive(hook_pid), "the hook outlived the stop");
    assert!(stack.imports().is_empty());
    assert!(!stack.sandbox.path("sidecar.log").exists());
}

#[test]
fn a_stop_during_before_reload_ends_the_hook_instead_of_waiting_for_it() {
    let stack = Stack::new(r#"before_reload = [["sh", "-c", "echo $$ > hook.pid; sleep 600"]]"#);
    let mut running = stack.start();
    let workers = ready_workers(&running, 2);
    let reload = {
        let mut command: Command = stack.sandbox.command(&["reload"]);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command.spawn().expect("spawn reload")
    };
    let hook_pid: u64 = wait_until(Duration::from_secs(20), "hook.pid", || {
        std::fs::read_to_string(stack.sandbox.path("current/hook.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
    });
    let began = Instant::now();
    let stop = stack.sandbox.run(&["stop"]);
    assert!(stop.status.success(), "{}", output_text(&stop));
    let exit = running.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{}", running.log());
    // TERM ends `sh` and its sleep at once; nothing waited for hook_timeout (10 minutes).
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
    assert!(!alive(hook_pid), "the hook outlived the supervisor");
    for pid in workers {
        assert!(!alive(pid), "worker {pid} outlived the supervisor");
    }
    let output = reload.wait_with_output().expect("reload's output");
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    assert!(
        text(&output).contains("was stopped: the supervisor is stopping"),
        "{}",
        output_text(&output)
    );
}
