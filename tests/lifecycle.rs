//! The supervisor's own lifecycle through the real binary: one instance per control socket, stale
//! sockets replaced, the control socket's permissions, signals, and the sd_notify sequence.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{Sandbox, require_tool, wait_until};

const IDLE_CONFIG: &str = "[programs.idle]\ncommand = [\"sleep\", \"300\"]\n";

#[test]
fn a_second_run_on_the_same_socket_is_refused_and_the_first_keeps_running() {
    let sandbox = Sandbox::new();
    sandbox.write_config(IDLE_CONFIG);
    let running = sandbox.start();
    let second = sandbox.run(&["run"]);
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another sauna-supervisor is already running")
            && stderr.contains(&format!("pid {}", running.pid())),
        "{stderr}"
    );
    assert_eq!(running.status_json()["pid"], running.pid());
    assert!(running.stop().success());
}

#[test]
fn a_socket_left_by_a_killed_supervisor_is_replaced() {
    let sandbox = Sandbox::new();
    sandbox.write_config(IDLE_CONFIG);
    let mut first = sandbox.start();
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    assert!(
        sandbox.control_socket().exists(),
        "SIGKILL leaves the socket behind"
    );
    let status = sandbox.run(&["status"]);
    assert_eq!(
        status.status.code(),
        Some(3),
        "status exits 3 when none runs"
    );

    let second = sandbox.start();
    second.wait_for_log("stale", Duration::from_secs(5));
    assert!(second.stop().success());
}

#[test]
fn the_control_socket_is_private_and_refuses_other_users() {
    let setpriv = require_tool("setpriv", "apt-get install -y util-linux");
    assert!(
        nix_is_root(),
        "this test checks that another uid is refused and must run as root (CI does)"
    );
    let sandbox = Sandbox::new();
    sandbox.write_config(IDLE_CONFIG);
    let running = sandbox.start();
    let mode = std::fs::metadata(sandbox.control_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    // Let "nobody" reach the sandbox and the binary, so that only the socket's own protection
    // is tested.
    std::fs::set_permissions(sandbox.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(crate::util::binary())
        .args(["status", "--json", "-c"])
        .arg(sandbox.path("sauna.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success(), "nobody must not read the status");
    assert!(
        output.stdout.is_empty(),
        "nothing leaked: {:?}",
        output.stdout
    );
    assert_eq!(running.status_json()["phase"], "running");
    assert!(running.stop().success());
}

#[test]
fn term_stops_gracefully_with_exit_status_zero() {
    let sandbox = Sandbox::new();
    sandbox.write_config(IDLE_CONFIG);
    let mut running = sandbox.start();
    running.signal("TERM");
    assert!(running.wait_exit(Duration::from_secs(30)).success());
    assert!(
        !sandbox.control_socket().exists(),
        "the socket is removed at exit"
    );
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Collects datagrams until `until` has arrived (or the deadline passes).
fn receive_until(socket: &UnixDatagram, until: &str, timeout: Duration) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buffer) {
            let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
            let done = message.contains(until);
            messages.push(message);
            if done {
                break;
            }
        }
    }
    messages
}

fn assert_notify_sequence(notify_socket_env: &str, receiver: &UnixDatagram, sandbox: &Sandbox) {
    let running = sandbox.start_with(|command| {
        command.env("NOTIFY_SOCKET", notify_socket_env);
    });
    let mut messages = receive_until(receiver, "READY=1", Duration::from_secs(10));
    running.signal("HUP");
    messages.extend(receive_until(receiver, "READY=1", Duration::from_secs(10)));
    let mut running = running;
    running.signal("TERM");
    messages.extend(receive_until(
        receiver,
        "STOPPING=1",
        Duration::from_secs(10),
    ));
    assert!(running.wait_exit(Duration::from_secs(30)).success());

    let states: Vec<&str> = messages
        .iter()
        .flat_map(|message| message.lines())
        .filter(|line| {
            ["READY=1", "RELOADING=1", "STOPPING=1"].contains(line)
                || line.starts_with("MONOTONIC_USEC=")
        })
        .map(|line| {
            if line.starts_with("MONOTONIC_USEC=") {
                "MONOTONIC_USEC"
            } else {
                line
            }
        })
        .collect();
    assert_eq!(
        states,
        [
            "READY=1",
            "RELOADING=1",
            "MONOTONIC_USEC",
            "READY=1",
            "STOPPING=1"
        ],
        "datagrams: {messages:?}"
    );
    let reloading = messages
        .iter()
        .find(|message| message.contains("RELOADING=1"))
        .unwrap();
    assert!(
        reloading.contains("MONOTONIC_USEC="),
        "RELOADING=1 and MONOTONIC_USEC travel in one datagram: {reloading:?}"
    );
    assert!(
        messages
            .iter()
            .any(|message| message.starts_with("STATUS=")),
        "STATUS= lines are sent: {messages:?}"
    );
}

#[test]
fn sd_notify_sequence_on_a_path_socket() {
    let sandbox = Sandbox::new();
    sandbox.write_config(IDLE_CONFIG);
    let path = sandbox.path("notify.sock");
    let receiver = UnixDatagram::bind(&path).unwrap();
    assert_notify_sequence(path.to_str().unwrap(), &receiver, &sandbox);
}

#[test]
fn sd_notify_sequence_on_an_abstract_socket() {
    let sandbox = Sandbox::new();
    sandbox.write_config(IDLE_CONFIG);
    let name = format!("sauna-test-notify-{}", std::process::id());
    let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let receiver = UnixDatagram::bind_addr(&address).unwrap();
    assert_notify_sequence(&format!("@{name}"), &receiver, &sandbox);
}

#[test]
fn children_do_not_inherit_the_systemd_variables() {
    let sandbox = Sandbox::new();
    let dump = sandbox.path("env.txt");
    sandbox.write_config(&format!(
        "[programs.dump]\ncommand = [\"sh\", \"-c\", \"env > {}; exec sleep 300\"]\n",
        dump.display()
    ));
    let notify = sandbox.path("notify.sock");
    let _receiver = UnixDatagram::bind(&notify).unwrap();
    let running = sandbox.start_with(|command| {
        command
            .env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "30000000");
    });
    let env = wait_until(Duration::from_secs(10), "the program's env dump", || {
        std::fs::read_to_string(&dump)
            .ok()
            .filter(|text| text.contains("PATH="))
    });
    assert!(!env.contains("NOTIFY_SOCKET"), "{env}");
    assert!(!env.contains("WATCHDOG_USEC"), "{env}");
    assert!(running.stop().success());
}

#[test]
fn run_watch_reloads_when_an_app_file_changes() {
    let sandbox = Sandbox::new();
    sandbox.write("app/tasks.py", "X = 1\n");
    sandbox.write_config(&format!("[app]\ndirectory = \"app\"\n\n{IDLE_CONFIG}"));
    let running = sandbox.start_with(|command| {
        command.arg("--watch");
    });
    // Not a .py or .ini file: no reload.
    sandbox.write("app/notes.txt", "hello\n");
    sandbox.write("app/tasks.py", "X = 2\n");
    let status = running.wait_for(Duration::from_secs(10), "generation 2", |status| {
        status["generation"] == 2
    });
    assert_eq!(status["phase"], "running");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        running.status_json()["generation"],
        2,
        "one change, one reload: {}",
        running.log()
    );
    assert!(running.log().contains("--watch"), "{}", running.log());
    assert!(running.stop().success());
}
