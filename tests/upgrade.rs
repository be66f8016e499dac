//! `sauna-supervisor upgrade` and SIGUSR2 through the real binary: under continuous load
//! (keep-alive and fresh connections, GET and POST with bodies) a new supervisor process takes
//! over every socket with no failed request, systemd hears `MAINPID=` of the new process, a
//! `reload = "restart"` program never runs twice, and a successor that cannot start (a binary
//! that exits, an invalid sauna.toml, an app that fails to import) changes nothing; while the old
//! process drains a slow request, `status` is already answered by the new one.

use std::io::{BufRead, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::reload::{Load, failures, read_response};
use crate::util::{self, Running, Sandbox, output_text};

// faults: successors that hang, start late, die mid-hand-over, or outlive a killed old process.
mod faults;

/// Answers `v1 <body length>`, as the reload tests' load generator expects. `/slow` answers
/// once the file `release` exists beside the app (at most 60 s): a test holds it for as long as
/// it needs, however slowly a loaded machine runs the steps in between.
const APP: &str = r#"
import os
import time

RELEASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "release")

def application(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        deadline = time.monotonic() + 60
        while not os.path.exists(RELEASE) and time.monotonic() < deadline:
            time.sleep(0.05)
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("v1 %d" % len(body)).encode()]
"#;

/// A running stack and the pids of the supervisors it went through; every supervisor still
/// alive is killed when dropped (a successor is not the test's child, so `Running` cannot).
struct Stack {
    sandbox: Sandbox,
    port: u16,
    metrics_port: u16,
    /// The token in the `sleeper` program's command line, to find its processes.
    marker: String,
    running: Option<Running>,
}

impl Stack {
    fn start(adjust: impl FnOnce(&mut std::process::Command)) -> Stack {
        Stack::start_with(APP, "", adjust)
    }

    /// A stack serving `app` (which must answer as [`APP`] does), with `extra` appended to
    /// sauna.toml.
    fn start_with(
        app: &str,
        extra: &str,
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> Stack {
        let sandbox = Sandbox::new();
        let port = util::free_port();
        let metrics_port = util::free_port();
        let marker = format!("sauna-upgrade-sleeper-{}", sandbox.root().display());
        sandbox.write("app.py", app);
        let python = util::python();
        sandbox.write_config(&format!(
            "[app]\npython = \"{python}\"\ndirectory = \".\"\nwsgi = \"app:application\"\n\n\
             [web]\nlisten = [\"127.0.0.1:{port}\", \"unix:{unix}\"]\nworkers = 2\nthreads = 2\n\
             reload_timeout = \"10s\"\ngraceful_timeout = \"10s\"\n\n\
             [programs.sleeper]\ncommand = [\"{python}\", \"-c\", \"import time; time.sleep(3600)\", \"{marker}\"]\n\
             reload = \"restart\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{extra}",
            python = python.display(),
            unix = sandbox.path("web.sock").display(),
        ));
        let running = sandbox.start_with(adjust);
        let stack = Stack {
            sandbox,
            port,
            metrics_port,
            marker,
            running: Some(running),
        };
        util::wait_until(Duration::from_secs(20), "the sleeper program", || {
            (stack.sleepers() == 1).then_some(())
        });
        stack
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn upgrade(&self, args: &[&str]) -> Output {
        let mut all = vec!["upgrade"];
        all.extend_from_slice(args);
        self.sandbox.run(&all)
    }

    /// How many processes run the `sleeper` program now.
    fn sleepers(&self) -> usize {
        processes_with(&self.marker)
    }

    /// The pid `status` reports (whichever supervisor serves the control socket).
    fn supervisor_pid(&self) -> u64 {
        self.running().status_json()["pid"]
            .as_u64()
            .expect("status pid")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Whoever serves now (the old or a successor) stops through the control socket.
        let _ = self.sandbox.run(&["stop"]);
        drop(self.running.take());
    }
}

/// Processes whose command line contains `marker` (zombies excluded).
fn processes_with(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            entry.file_name().to_string_lossy().parse::<u32>().is_ok()
                && std::fs::read(entry.path().join("cmdline"))
                    .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
        })
        .count()
}

/// Stops the load and fails with examples and the log if any request failed.
fn assert_no_failed_request(load: Load, stack: &Stack) {
    let seen = load.finish();
    let failed = failures(&seen);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}\nlog:\n{}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)],
        stack.running().log()
    );
}

/// The environment of the process whose command line contains `marker`, one `NAME=value` a line.
fn environ_with(marker: &str) -> String {
    let entries = std::fs::read_dir("/proc").expect("read /proc");
    for entry in entries.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            let environ = std::fs::read(entry.path().join("environ")).expect("read environ");
            return String::from_utf8_lossy(&environ).replace('\0', "\n");
        }
    }
    panic!("no process with {marker} in its command line");
}

/// True once `pid` has exited (gone, or a zombie its parent has not reaped yet).
fn exited(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// `GET path` over the web front's Unix socket; the status code.
fn get_unix(path: &Path) -> u16 {
    let mut stream = UnixStream::connect(path).expect("connect to the unix socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer on {}: {answer:?}", path.display()))
}

/// `GET /healthz` on the metrics endpoint; the status code.
fn healthz(port: u16) -> u16 {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    writer
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("send");
    read_response(&mut std::io::BufReader::new(stream))
        .expect("metrics answer")
        .0
}

/// Collects every sd_notify datagram sent to a socket in the sandbox.
struct NotifyRecorder {
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NotifyRecorder {
    fn bind(path: &Path) -> NotifyRecorder {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (messages, stop) = (Arc::clone(&messages), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(length) = socket.recv(&mut buffer) {
                        let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
                        messages.lock().expect("messages").push(text);
                    }
                }
            })
        };
        NotifyRecorder {
            messages,
            stop,
            thread: Some(thread),
        }
    }

    fn messages(&self) -> Vec<String> {
        self.messages.lock().expect("messages").clone()
    }
}

impl Drop for NotifyRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Watches the `sleeper` program's processes in the background; the most seen at once.
struct SleeperWatch {
    most: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SleeperWatch {
    fn start(marker: &str) -> SleeperWatch {
        let most = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (most, stop, marker) = (Arc::clone(&most), Arc::clone(&stop), marker.to_owned());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    most.fetch_max(processes_with(&marker), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(5));
                }
            })
        };
        SleeperWatch {
            most,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.most.load(Ordering::Relaxed)
    }
}

/// Under load: `upgrade --binary <the binary>` exits 0 with no failed request; afterwards a new
/// pid answers `status`, the old one is gone, the Unix socket and metrics answer, the
/// `reload = "restart"` program ran exactly once at every instant, and systemd was told
/// `MAINPID=` of the new process before it said `READY=1`.
#[test]
fn upgrade_under_load_hands_every_socket_over_without_a_failed_request() {
    let notify_dir = tempfile::tempdir().expect("temp dir");
    let notify_path = notify_dir.path().join("notify.sock");
    let recorder = NotifyRecorder::bind(&notify_path);
    let stack = Stack::start(|command| {
        command.env("NOTIFY_SOCKET", &notify_path);
    });
    let old = stack.supervisor_pid();
    assert_eq!(u64::from(stack.running().pid()), old);
    let load = Load::start(&stack.address(), 6);
    load.wait_for(100);
    let sleepers = SleeperWatch::start(&stack.marker);

    let binary = util::binary();
    let output = stack.upgrade(&["--binary", binary.to_str().expect("UTF-8 path")]);
    assert!(
        output.status.success(),
        "{}\nlog:\n{}",
        output_text(&output),
        stack.running().log()
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("pid {old} handed over to pid")),
        "{stderr}"
    );
    // `upgrade` returns once the old process has exited.
    assert!(exited(old), "pid {old} still runs after upgrade returned");

    let new = stack.supervisor_pid();
    assert_ne!(new, old, "status still answered by the old supervisor");
    assert!(stderr.contains(&format!("to pid {new}")), "{stderr}");
    load.wait_for(100);
    assert_no_failed_request(load, &stack);

    assert_eq!(get_unix(&stack.sandbox.path("web.sock")), 200);
    assert_eq!(healthz(stack.metrics_port), 200);
    util::wait_until(Duration::from_secs(20), "the sleeper restarted", || {
        (stack.sleepers() == 1).then_some(())
    });
    assert_eq!(
        sleepers.finish(),
        1,
        "two copies of a reload = \"restart\" program ran at once"
    );
    // The successor's children see neither the hand-over nor systemd's variables.
    let environ = environ_with(&stack.marker);
    for variable in ["SAUNA_UPGRADE_FDS=", "NOTIFY_SOCKET=", "WATCHDOG_"] {
        assert!(!environ.contains(variable), "{variable} in {environ}");
    }

    let messages = recorder.messages();
    let main_pid = messages
        .iter()
        .position(|message| message.starts_with(&format!("MAINPID={new}\n")))
        .unwrap_or_else(|| panic!("no MAINPID={new} among {messages:?}"));
    assert!(
        messages[main_pid..]
            .iter()
            .any(|message| message == "READY=1"),
        "the new supervisor never said READY=1 after MAINPID: {messages:?}"
    );
    assert!(
        !messages[main_pid..]
            .iter()
            .any(|message| message.contains("STOPPING=1")),
        "the old supervisor said STOPPING=1 after handing over: {messages:?}"
    );
}

/// A successor that cannot start — a binary that exits 1, one that never gets ready, an invalid
/// sauna.toml, an app whose import raises — makes `upgrade` exit 1 with the reason, while the running supervisor keeps
/// serving every request and socket.
#[test]
fn a_failing_successor_changes_nothing() {
    let stack = Stack::start(|_| {});
    let old = stack.supervisor_pid();
    let load = Load::start(&stack.address(), 4);
    load.wait_for(50);

    let output = stack.upgrade(&["--binary", "/bin/false"]);
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("exited before it was ready"), "{stderr}");
    assert!(stderr.contains("keeps serving"), "{stderr}");
    load.wait_for(50);

    // A binary that never gets ready is stopped at the deadline.
    let hanging = stack.sandbox.write("hang.sh", "#!/bin/sh\nexec sleep 60\n");
    std::fs::set_permissions(
        &hanging,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let output = stack.upgrade(&[
        "--binary",
        hanging.to_str().expect("UTF-8 path"),
        "--timeout",
        "1s",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("was not ready within 1s"), "{stderr}");
    load.wait_for(50);

    // The new process re-reads sauna.toml; the client finds the control socket through a copy.
    let config = stack.sandbox.path("sauna.toml");
    let good = std::fs::read_to_string(&config).expect("read config");
    let copy = stack.sandbox.write("good.toml", &good);
    std::fs::write(&config, format!("{good}\n[web.bogus]\n")).expect("break the config");
    let output = stack.upgrade(&["-c", copy.to_str().expect("UTF-8 path")]);
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot start"), "{stderr}");
    assert!(stderr.contains("sauna.toml:"), "no diagnostics: {stderr}");
    std::fs::write(&config, &good).expect("restore the config");
    load.wait_for(50);

    let app = stack.sandbox.path("app.py");
    std::fs::write(&app, format!("raise RuntimeError('broken release')\n{APP}")).expect("break");
    let output = stack.upgrade(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("RuntimeError: broken release"), "{stderr}");
    std::fs::write(&app, APP).expect("restore the app");
    load.wait_for(50);

    assert_no_failed_request(load, &stack);
    assert_eq!(stack.supervisor_pid(), old);
    assert_eq!(get_unix(&stack.sandbox.path("web.sock")), 200);
    assert_eq!(healthz(stack.metrics_port), 200);
    assert_eq!(stack.sleepers(), 1);
    // No successor or worker of one is left behind.
    let status = stack.running().status_json();
    assert_eq!(
        status["pool"]["workers"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
}

/// SIGUSR2 upgrades to the supervisor's own binary, as `upgrade` without `--binary` does.
#[test]
fn sigusr2_upgrades_to_the_same_binary() {
    let stack = Stack::start(|_| {});
    let old = stack.supervisor_pid();
    stack.running().signal("USR2");
    util::wait_until(Duration::from_secs(30), "a new supervisor pid", || {
        stack
            .running()
            .try_status()
            .and_then(|status| status["pid"].as_u64())
            .filter(|pid| *pid != old)
    });
    util::wait_until(
        Duration::from_secs(30),
        "the old supervisor to exit",
        || exited(old).then_some(()),
    );
    let stream = std::net::TcpStream::connect(stack.address()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    (&stream)
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("send");
    let (status, body) =
        read_response(&mut std::io::BufReader::new(stream)).expect("an answer from the new one");
    assert_eq!((status, body.as_str()), (200, "v1 0"));
    util::wait_until(Duration::from_secs(20), "the sleeper restarted", || {
        (stack.sleepers() == 1).then_some(())
    });
}

#[test]
fn the_new_process_answers_status_while_the_old_one_drains() {
    let stack = Stack::start(|_| {});
    let old = stack.supervisor_pid();
    // A request that keeps the old process draining for seconds after it has handed over.
    let stream = std::net::TcpStream::connect(stack.address()).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    writer
        .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("send");
    util::wait_until(
        Duration::from_secs(10),
        "the slow request in a worker",
        || {
            (stack.running().status_json()["figures"]["in_flight"].as_u64() == Some(1))
                .then_some(())
        },
    );

    let binary = util::binary();
    let upgrade = {
        let mut command =
            stack
                .sandbox
                .command(&["upgrade", "--binary", binary.to_str().expect("UTF-8 path")]);
        thread::spawn(move || command.output().expect("run upgrade"))
    };
    // While the slow request holds the old process, `status` already answers from the new one.
    let new = util::wait_until(
        Duration::from_secs(20),
        "status from the new process",
        || {
            let pid = stack.running().try_status()?["pid"].as_u64()?;
            (pid != old).then_some(pid)
        },
    );
    assert!(
        !exited(old),
        "the old process should still be draining the slow request"
    );
    // A reload sent now waits for the hand-over (programs and beat start only then), then runs.
    let mut reload = stack
        .sandbox
        .command(&["reload"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run reload");
    let mut stderr = std::io::BufReader::new(reload.stderr.take().expect("reload's stderr"));
    let mut said = String::new();
    while !said.contains("still taking over") {
        if stderr.read_line(&mut said).expect("read reload's stderr") == 0 {
            break;
        }
    }
    assert!(said.contains("still taking over"), "reload said: {said}");
    std::fs::write(stack.sandbox.path("release"), "").expect("release the slow request");
    stderr
        .read_to_string(&mut said)
        .expect("read reload's stderr");
    let reload = reload.wait().expect("wait for reload");
    assert!(reload.success(), "reload said: {said}");
    let (status, body) =
        read_response(&mut std::io::BufReader::new(stream)).expect("the slow request's answer");
    assert_eq!((status, body.as_str()), (200, "v1 0"));
    let output = upgrade.join().expect("upgrade thread");
    assert!(output.status.success(), "{}", output_text(&output));
    assert_eq!(stack.supervisor_pid(), new);
}
