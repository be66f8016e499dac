//! Successors that go wrong at the worst moment: a wrapper script without `exec` that hangs, a
//! wrapper whose real supervisor gets ready only after the deadline, a successor killed
//! mid-hand-over, and an old supervisor killed mid-hand-over. In each, afterwards exactly one
//! process holds the listening sockets (none after the last, and the port refuses cleanly), the
//! `reload = "restart"` program never ran twice, and no request failed while the old supervisor
//! served. And after an upgrade no helper of the new supervisor — its reaper, a deploy hook, a
//! program — holds any socket the supervisor holds (listening, control, hand-over channel).

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::time::Instant;

use super::*;

/// Marks the `sleep` of the hanging wrapper, to find it in the process list.
const HANG_MARKER: &str = "61.123457";

/// The app of the slow-wrapper test: its import takes 8 s while the file `slow` exists.
const SLOW_APP: &str = r#"
import os, time

if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow")):
    time.sleep(8)
"#;

/// Every pid in /proc.
fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The inodes of the sockets `pid` has open.
fn sockets_of(pid: u32) -> BTreeSet<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The inode of the TCP socket listening on `port`, from /proc/net/tcp; `None` when nothing
/// listens there.
fn listening_inode(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = format!(":{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address is field 1, st field 3 (0A = LISTEN), inode field 9.
        let listening = fields.get(1)?.ends_with(&port) && *fields.get(3)? == "0A";
        listening.then(|| fields.get(9)?.parse().ok()).flatten()
    })
}

/// The live processes that hold the socket listening on `port`.
fn port_holders(port: u16) -> BTreeSet<u32> {
    let Some(inode) = listening_inode(port) else {
        return BTreeSet::new();
    };
    pids()
        .into_iter()
        .filter(|pid| util::alive(pid) && sockets_of(*pid).contains(&inode))
        .collect()
}

/// Waits until `pid` alone holds the web port and the metrics port.
fn wait_for_sole_holder(stack: &Stack, pid: u32) {
    let ports = [stack.port, stack.metrics_port];
    util::wait_until(
        Duration::from_secs(20),
        &format!("pid {pid} to be the only holder of ports {ports:?}"),
        || {
            ports
                .iter()
                .all(|port| port_holders(*port) == BTreeSet::from([pid]))
                .then_some(())
        },
    );
}

/// The `sauna-supervisor run` processes of this stack (its reaper excluded).
fn supervisors(stack: &Stack) -> Vec<u32> {
    let binary = util::binary();
    let config = format!(
        "SAUNA_CONFIG={}",
        stack.sandbox.path("sauna.toml").display()
    );
    pids()
        .into_iter()
        .filter(|pid| {
            let read = |file: &str| {
                std::fs::read(format!("/proc/{pid}/{file}"))
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .unwrap_or_default()
            };
            util::alive(pid)
                && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == binary)
                && read("comm").trim() != "sauna-reaper"
                && read("cmdline").split('\0').nth(1) == Some("run")
                && read("environ")
                    .split('\0')
                    .any(|variable| variable == config)
        })
        .collect()
}

/// Connecting to the web front's Unix socket fails cleanly: refused, or no file at all — never
/// a connection that nobody answers.
fn assert_unix_refused(path: &std::path::Path) {
    match UnixStream::connect(path) {
        Ok(_) => panic!("something still listens on {}", path.display()),
        Err(error) => assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ),
            "{}: {error}",
            path.display()
        ),
    }
}

/// A process that is not the test's child, killed when the test ends however it ends.
struct Stray(u32);

impl Drop for Stray {
    fn drop(&mut self) {
        if util::alive(self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

fn kill(pid: u64, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

fn executable(sandbox: &Sandbox, name: &str, script: &str) -> String {
    let path = sandbox.write(name, script);
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path.to_str().expect("UTF-8 path").to_owned()
}

/// The app of the mid-hand-over tests: `/slow` takes 12 s, so that the old process is still
/// draining it when the test has seen the new one answer `status`, however slowly that one
/// started on a loaded machine.
fn slower_app() -> String {
    let app = APP.replace("time.monotonic() + 60", "time.monotonic() + 12");
    assert_ne!(app, APP, "the app's wait changed shape");
    app
}

/// Sends a slow request and waits until a worker has it: the supervisor that accepted it
/// drains for seconds once it hands over.
fn slow_request(stack: &Stack) -> TcpStream {
    let stream = TcpStream::connect(stack.address()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    (&stream)
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
    stream
}

/// `upgrade --binary <the real binary>` in a thread.
fn upgrade_in_background(stack: &Stack) -> thread::JoinHandle<Output> {
    let binary = util::binary();
    let mut command =
        stack
            .sandbox
            .command(&["upgrade", "--binary", binary.to_str().expect("UTF-8 path")]);
    thread::spawn(move || command.output().expect("run upgrade"))
}

/// Waits until `status` is answered by a process other than `old`, which then serves the
/// control socket: the old process has made it the main one and is draining.
fn wait_for_new_pid(stack: &Stack, old: u64) -> u64 {
    util::wait_until(
        Duration::from_secs(30),
        "status from the new process",
        || {
            let pid = stack.running().try_status()?["pid"].as_u64()?;
            (pid != old).then_some(pid)
        },
    )
}

/// `hang.sh` runs `sleep` without `exec`: at the deadline the whole group goes, the sleep with
/// the script, before `upgrade` answers; the old supervisor serves on, and once it is stopped
/// the port refuses connections and a new `run` can bind every socket.
#[test]
fn a_hanging_wrapper_without_exec_leaves_no_socket_behind() {
    let stack = Stack::start(|_| {});
    let old = stack.supervisor_pid();
    let load = Load::start(&stack.address(), 4);
    load.wait_for(50);
    let sleepers = SleeperWatch::start(&stack.marker);

    let hang = executable(
        &stack.sandbox,
        "hang.sh",
        &format!("#!/bin/sh\nsleep {HANG_MARKER}\n"),
    );
    let began = Instant::now();
    let output = stack.upgrade(&["--binary", &hang, "--timeout", "2s"]);
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("was not ready within 2s"), "{stderr}");
    assert!(stderr.contains("keeps serving"), "{stderr}");
    // Checked at once: `upgrade` answers only after the group is gone.
    assert_eq!(
        processes_with(HANG_MARKER),
        0,
        "the wrapper's sleep outlived the failed upgrade"
    );
    let old_pid = u32::try_from(old).expect("pid");
    for port in [stack.port, stack.metrics_port] {
        assert_eq!(port_holders(port), BTreeSet::from([old_pid]), "port {port}");
    }
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );

    load.wait_for(50);
    assert_no_failed_request(load, &stack);
    assert_eq!(stack.supervisor_pid(), old);
    assert_eq!(sleepers.finish(), 1);

    // Stopped, nothing listens: a connection is refused, and a new run binds every socket.
    let mut stack = stack;
    let running = stack.running.take().expect("running");
    assert!(running.stop().success());
    let refused = TcpStream::connect(stack.address()).expect_err("nothing may listen");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(port_holders(stack.metrics_port).is_empty());
    assert_unix_refused(&stack.sandbox.path("web.sock"));
    let again = stack.sandbox.start();
    assert_eq!(healthz(stack.metrics_port), 200);
    stack.running = Some(again);
}

/// A wrapper that runs the real binary without `exec`, and an app that imports slower than
/// `--timeout`: the real new supervisor goes with the wrapper at the deadline, never takes over
/// later, and the `restart` program never runs twice.
#[test]
fn a_slow_wrapper_without_exec_never_takes_over_late() {
    let app = format!("{SLOW_APP}\n{APP}");
    let stack = Stack::start_with(&app, "", |_| {});
    let old = stack.supervisor_pid();
    let load = Load::start(&stack.address(), 4);
    load.wait_for(50);
    let sleepers = SleeperWatch::start(&stack.marker);

    let binary = util::binary();
    let wrapper = executable(
        &stack.sandbox,
        "wrapper.sh",
        &format!(
            "#!/bin/sh\n# as packagers write them: no exec\n\"{}\" \"$@\"\n",
            binary.display()
        ),
    );
    stack.sandbox.write("slow", "");
    let output = stack.upgrade(&["--binary", &wrapper, "--timeout", "3s"]);
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("was not ready within 3s"), "{stderr}");
    let old_pid = u32::try_from(old).expect("pid");
    for port in [stack.port, stack.metrics_port] {
        assert_eq!(port_holders(port), BTreeSet::from([old_pid]), "port {port}");
    }
    // Past the point where the orphaned supervisor used to finish starting and take over.
    thread::sleep(Duration::from_secs(8));
    std::fs::remove_file(stack.sandbox.path("slow")).expect("remove the flag");
    assert_eq!(
        stack.supervisor_pid(),
        old,
        "status answered by another process"
    );
    wait_for_sole_holder(&stack, old_pid);
    assert_eq!(
        supervisors(&stack),
        [old_pid],
        "a second supervisor process runs"
    );
    load.wait_for(50);
    assert_no_failed_request(load, &stack);
    assert_eq!(
        sleepers.finish(),
        1,
        "two copies of a reload = \"restart\" program ran at once"
    );
}

/// The successor is SIGKILLed after it is ready, while the old process drains: it was never
/// released, so the old process starts its roles again on the sockets it kept and serves on.
#[test]
fn a_successor_killed_mid_hand_over_leaves_the_old_one_serving() {
    let stack = Stack::start_with(&slower_app(), "", |_| {});
    let old = stack.supervisor_pid();
    let sleepers = SleeperWatch::start(&stack.marker);
    let slow = slow_request(&stack);
    let upgrade = upgrade_in_background(&stack);
    let new = wait_for_new_pid(&stack, old);
    let _stray = Stray(u32::try_from(new).expect("pid"));
    kill(new, "KILL");

    // The request the old process accepted is answered while it drains.
    let (status, body) =
        read_response(&mut std::io::BufReader::new(slow)).expect("the slow request's answer");
    assert_eq!((status, body.as_str()), (200, "v1 0"));
    let output = upgrade.join().expect("upgrade thread");
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("(pid {new}) died during the hand-over")),
        "{stderr}\nlog:\n{}",
        stack.running().log()
    );
    assert_eq!(stack.supervisor_pid(), old);
    wait_for_sole_holder(&stack, u32::try_from(old).expect("pid"));
    let load = Load::start(&stack.address(), 4);
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
}

/// The old supervisor is SIGKILLed after it made the successor the main process, before it
/// released it: the successor never takes over; it stops and exits, and the port is refused
/// cleanly instead of being held by an orphan.
#[test]
fn an_old_supervisor_killed_mid_hand_over_leaves_nobody_serving() {
    let mut stack = Stack::start_with(&slower_app(), "", |_| {});
    let old = stack.supervisor_pid();
    let sleepers = SleeperWatch::start(&stack.marker);
    let _slow = slow_request(&stack);
    let upgrade = upgrade_in_background(&stack);
    let new = wait_for_new_pid(&stack, old);
    let _stray = Stray(u32::try_from(new).expect("pid"));
    kill(old, "KILL");
    let _ = upgrade.join().expect("upgrade thread");

    util::wait_until(
        Duration::from_secs(30),
        "the new supervisor to stop",
        || exited(new).then_some(()),
    );
    let mut running = stack.running.take().expect("running");
    running.wait_exit(Duration::from_secs(10));
    let log = running.log();
    assert!(
        log.contains("closed the hand-over channel without releasing"),
        "{log}"
    );
    util::wait_until(
        Duration::from_secs(10),
        "every holder of the ports gone",
        || {
            (port_holders(stack.port).is_empty() && port_holders(stack.metrics_port).is_empty())
                .then_some(())
        },
    );
    let refused = TcpStream::connect(stack.address()).expect_err("nothing may listen");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{log}"
    );
    assert_unix_refused(&stack.sandbox.path("web.sock"));
    util::wait_until(Duration::from_secs(10), "no sleeper left", || {
        (stack.sleepers() == 0).then_some(())
    });
    assert_eq!(
        sleepers.finish(),
        1,
        "the successor started the restart program"
    );
    // As systemd would: a new run binds every socket again.
    stack.running = Some(stack.sandbox.start());
    assert_eq!(healthz(stack.metrics_port), 200);
}

/// After an upgrade, neither the new supervisor's reaper, nor a program, nor a deploy hook holds
/// any socket the supervisor holds: not a listening socket, the control socket or the hand-over
/// channel.
#[test]
fn no_helper_of_the_new_supervisor_inherits_a_socket() {
    let hook = "[hooks]\nbefore_reload = [[\"sh\", \"-c\", \"echo $$ > hook.pid; \
                while [ ! -e hook.go ]; do sleep 0.05; done\"]]\n";
    let stack = Stack::start_with(APP, hook, |_| {});
    let binary = util::binary();
    let output = stack.upgrade(&["--binary", binary.to_str().expect("UTF-8 path")]);
    assert!(output.status.success(), "{}", output_text(&output));
    let new = u32::try_from(stack.supervisor_pid()).expect("pid");
    util::wait_until(Duration::from_secs(20), "the sleeper restarted", || {
        (stack.sleepers() == 1).then_some(())
    });

    let supervisor = sockets_of(new);
    let listening = listening_inode(stack.port).expect("the web port listens");
    assert!(supervisor.contains(&listening), "the check could not fail");
    let parent = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
    };
    let name = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let reaper = pids()
        .into_iter()
        .find(|pid| parent(*pid) == Some(new) && name(*pid).trim() == "sauna-reaper")
        .expect("the new supervisor's reaper");
    let program = pids()
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&stack.marker))
        })
        .expect("the sleeper program");

    let reload = {
        let mut command = stack.sandbox.command(&["reload"]);
        thread::spawn(move || command.output().expect("run reload"))
    };
    let hook_pid: u32 = util::wait_until(Duration::from_secs(30), "the hook's pid", || {
        std::fs::read_to_string(stack.sandbox.path("hook.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    for (helper, pid) in [("reaper", reaper), ("program", program), ("hook", hook_pid)] {
        let shared: Vec<u64> = sockets_of(pid).intersection(&supervisor).copied().collect();
        assert!(
            shared.is_empty(),
            "the {helper} (pid {pid}) holds the supervisor's sockets {shared:?}"
        );
    }
    stack.sandbox.write("hook.go", "");
    let reload = reload.join().expect("reload thread");
    assert!(reload.status.success(), "{}", output_text(&reload));
}
