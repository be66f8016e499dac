//! `[programs.NAME]` through the real binary: restarts, backoff into `fatal`, stopping whole
//! process groups in `priority` order, orphans after a SIGKILL of the supervisor, rlimits and
//! `max_rss`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{Sandbox, free_port, require_tool, wait_until};

/// The first instance of program `name` in a `status --json` document.
fn instance<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["programs"]
        .as_array()
        .and_then(|programs| programs.iter().find(|program| program["name"] == name))
        .map(|program| &program["instances"][0])
        .unwrap_or_else(|| panic!("no program {name:?} in {status}"))
}

fn pid_of(status: &Value, name: &str) -> Option<u32> {
    instance(status, name)["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
}

/// `(pid, ppid, pgrp, state)` of every process, from `/proc/PID/stat`.
fn processes() -> Vec<(u32, u32, u32, char)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields[0].chars().next().unwrap_or('?');
        found.push((
            pid,
            fields[1].parse().unwrap_or(0),
            fields[2].parse().unwrap_or(0),
            state,
        ));
    }
    found
}

/// Live (non-zombie) members of process group `pgid`.
fn group_members(pgid: u32) -> BTreeSet<u32> {
    processes()
        .into_iter()
        .filter(|&(_, _, pgrp, state)| pgrp == pgid && state != 'Z')
        .map(|(pid, ..)| pid)
        .collect()
}

fn alive(pid: u32) -> bool {
    processes()
        .iter()
        .any(|&(other, _, _, state)| other == pid && state != 'Z')
}

#[test]
fn a_program_killed_with_sigkill_is_back_with_a_new_pid_within_two_seconds() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        r#"
[programs.sleeper]
command = ["sh", "-c", "echo \"instance $SAUNA_INSTANCE of $SAUNA_PROGRAM up\"; exec sleep 300"]
instances = 2
ready_after = "0s"
"#,
    );
    let running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "sleeper running", |status| {
        instance(status, "sleeper")["state"] == "running"
    });
    let first = pid_of(&status, "sleeper").expect("a pid");
    running.wait_for_log("instance 1 of sleeper up", Duration::from_secs(5));

    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .expect("run kill");
    let status = running.wait_for(Duration::from_secs(2), "a new pid", |status| {
        pid_of(status, "sleeper").is_some_and(|pid| pid != first)
    });
    assert!(killed.elapsed() < Duration::from_secs(2));
    let sleeper = instance(&status, "sleeper");
    assert_eq!(sleeper["restarts"], 1, "{status}");
    assert_eq!(sleeper["last_exit"], "killed by signal SIGKILL", "{status}");
    assert!(running.stop().success());
}

#[test]
fn a_program_that_exits_at_once_backs_off_then_goes_fatal() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        r#"
[programs.crasher]
command = ["sh", "-c", "exit 1"]
crash_limit = 3
crash_window = "30s"
"#,
    );
    let running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "crasher fatal", |status| {
        instance(status, "crasher")["state"] == "fatal"
    });
    let crasher = instance(&status, "crasher");
    let exits: Vec<f64> = crasher["recent_exits"]
        .as_array()
        .expect("recent_exits")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(exits.len(), 3, "{status}");
    // Exits at 0, then after the 1 s and 2 s backoff delays (plus the time to start `sh`).
    let gaps = [exits[1] - exits[0], exits[2] - exits[1]];
    assert!((0.95..1.9).contains(&gaps[0]), "gaps {gaps:?}");
    assert!((1.95..2.9).contains(&gaps[1]), "gaps {gaps:?}");
    let reason = "exited with status 1 3 times in 30s; giving up";
    assert!(
        crasher["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains(reason)),
        "{status}"
    );
    assert_eq!(status["programs"][0]["fatal"], true, "{status}");
    running.wait_for_log(
        &format!("program \"crasher\": {reason}"),
        Duration::from_secs(1),
    );
    // Fatal stays down.
    std::thread::sleep(Duration::from_millis(1200));
    let status = running.status_json();
    assert_eq!(instance(&status, "crasher")["state"], "fatal");
    assert_eq!(instance(&status, "crasher")["restarts"], 2);
    assert!(running.stop().success());
}

#[test]
fn a_graceful_stop_ends_whole_process_groups_in_reverse_start_order() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        r#"
[programs.family]
command = ["sh", "-c", "sleep 300 & sleep 300 & wait"]

[programs.later]
command = ["sleep", "300"]
"#,
    );
    let mut running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "both started", |status| {
        pid_of(status, "family").is_some() && pid_of(status, "later").is_some()
    });
    let leader = pid_of(&status, "family").expect("a pid");
    let members = wait_until(Duration::from_secs(5), "two grandchildren", || {
        let members = group_members(leader);
        (members.len() >= 3).then_some(members)
    });
    let stopping = Instant::now();
    running.signal("TERM");
    assert!(running.wait_exit(Duration::from_secs(10)).success());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "TERM was enough"
    );
    for pid in members {
        assert!(!alive(pid), "pid {pid} of the group survived the stop");
    }
    let log = running.log();
    let position = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in log:\n{log}"))
    };
    assert!(
        position("program \"later\": sending SIGTERM")
            < position("program \"family\": sending SIGTERM"),
        "programs stop in reverse start order:\n{log}"
    );
}

#[test]
fn priority_orders_start_status_and_stop_against_name_order() {
    let sandbox = Sandbox::new();
    let events = sandbox.path("events");
    // The script is the program's main process (no wrapper shell), so it gets the stop signal.
    let script = sandbox.write(
        "record.sh",
        "trap 'echo \"stop $1\" >> \"$2\"; exit 0' TERM\necho \"start $1\" >> \"$2\"\nwhile :; do sleep 1 & wait $!; done\n",
    );
    let program = |name: &str, priority: i64| {
        format!(
            "[programs.{name}]\ncommand = [\"sh\", \"{}\", \"{name}\", \"{}\"]\npriority = {priority}\nready_after = \"0s\"\n",
            script.display(),
            events.display()
        )
    };
    // Name order is alpha, zulu; priority order the opposite: zulu is the broker here.
    sandbox.write_config(&format!("{}{}", program("alpha", 20), program("zulu", 10)));
    let running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "both recording", |status| {
        pid_of(status, "alpha").is_some()
            && pid_of(status, "zulu").is_some()
            && std::fs::read_to_string(&events).is_ok_and(|text| text.lines().count() == 2)
    });
    let names: Vec<&str> = status["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|program| program["name"].as_str())
        .collect();
    assert_eq!(names, ["zulu", "alpha"], "status lists start order");
    // Both are spawned within microseconds, so which shell writes first is up to the kernel;
    // the supervisor's log shows the order it spawned them in.
    let log = running.log();
    let position = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in log:\n{log}"))
    };
    assert!(
        position("program \"zulu\": started") < position("program \"alpha\": started"),
        "zulu (priority 10) starts first:\n{log}"
    );
    assert!(running.stop().success());
    // A graceful stop waits for each program to exit before it signals the next one.
    let text = std::fs::read_to_string(&events).expect("read the events file");
    let stops: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("stop"))
        .collect();
    assert_eq!(
        stops,
        ["stop alpha", "stop zulu"],
        "zulu (priority 10) stops last:\n{text}"
    );
}

#[test]
fn a_stop_lets_group_members_finish_after_their_leader_died() {
    let sandbox = Sandbox::new();
    // The outer shell dies on TERM at once; the worker it started finishes its work first, as
    // a Celery worker behind a non-exec shell wrapper does.
    sandbox.write_config(
        r#"
[programs.wrapped]
command = ["sh", "-c", "sh -c 'trap \"sleep 0.4; echo work finished; exit 0\" TERM; while :; do sleep 0.05; done' & wait"]
stop_timeout = "10s"
"#,
    );
    let mut running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "wrapped started", |status| {
        pid_of(status, "wrapped").is_some()
    });
    let leader = pid_of(&status, "wrapped").expect("a pid");
    wait_until(Duration::from_secs(5), "the worker", || {
        (group_members(leader).len() >= 2).then_some(())
    });
    let stopping = Instant::now();
    running.signal("TERM");
    assert!(running.wait_exit(Duration::from_secs(15)).success());
    let took = stopping.elapsed();
    let log = running.log();
    assert!(
        log.contains("work finished"),
        "the worker was cut short:\n{log}"
    );
    assert!(!log.contains("sending SIGKILL"), "{log}");
    assert!(
        took < Duration::from_secs(5),
        "stopped once the group was empty, took {took:?}"
    );
    assert!(group_members(leader).is_empty());
}

#[test]
fn a_child_ignoring_term_is_sigkilled_after_stop_timeout() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        r#"
[programs.stubborn]
command = ["sh", "-c", "trap '' TERM; sleep 300 & wait"]
stop_timeout = "700ms"
"#,
    );
    let mut running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "stubborn started", |status| {
        pid_of(status, "stubborn").is_some()
    });
    let leader = pid_of(&status, "stubborn").expect("a pid");
    let members = wait_until(Duration::from_secs(5), "the grandchild", || {
        let members = group_members(leader);
        (members.len() >= 2).then_some(members)
    });
    let stopping = Instant::now();
    running.signal("TERM");
    running.wait_for_log("sending SIGKILL to process group", Duration::from_secs(5));
    assert!(running.wait_exit(Duration::from_secs(5)).success());
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "stopped after {took:?}, before stop_timeout"
    );
    for pid in members {
        assert!(!alive(pid), "pid {pid} survived SIGKILL");
    }
}

#[test]
fn sigkill_of_the_supervisor_leaves_no_orphan() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        r#"
[programs.orphan-candidate]
command = ["sleep", "300"]
instances = 2
"#,
    );
    let mut running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "both started", |status| {
        status["programs"][0]["instances"]
            .as_array()
            .is_some_and(|instances| instances.iter().all(|instance| instance["pid"].is_u64()))
    });
    let pids: Vec<u32> = status["programs"][0]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|instance| instance["pid"].as_u64())
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect();
    running.signal("KILL");
    running.wait_exit(Duration::from_secs(5));
    // PR_SET_PDEATHSIG kills each leader, and with it its (one-process) group.
    wait_until(
        Duration::from_secs(5),
        "the programs to die with the supervisor",
        || {
            pids.iter()
                .all(|pid| !alive(*pid) && group_members(*pid).is_empty())
                .then_some(())
        },
    );
}

#[test]
fn sigkill_of_the_supervisor_leaves_no_grandchild_behind() {
    let sandbox = Sandbox::new();
    // The shell forks a background grandchild and is then the group's leader: PDEATHSIG kills
    // only the shell, so the grandchild is the group reaper's to kill.
    sandbox.write_config(
        r#"
[programs.wrapper]
command = ["sh", "-c", "sleep 311 & sleep 312; wait"]
"#,
    );
    let mut running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "wrapper started", |status| {
        pid_of(status, "wrapper").is_some()
    });
    let leader = pid_of(&status, "wrapper").expect("a pid");
    wait_until(Duration::from_secs(5), "both sleeps in the group", || {
        (group_members(leader).len() >= 3).then_some(())
    });
    running.signal("KILL");
    running.wait_exit(Duration::from_secs(5));
    wait_until(
        Duration::from_secs(5),
        "every member of the program's group to be gone",
        || group_members(leader).is_empty().then_some(()),
    );
}

#[test]
fn rlimits_and_identity_are_visible_in_proc() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        r#"
[programs.limited]
command = ["sleep", "300"]
user = "nobody"
directory = "/"
rlimits = { nofile = 321, core = "0", as = "2GiB" }
"#,
    );
    let running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(10), "limited started", |status| {
        pid_of(status, "limited").is_some()
    });
    let pid = pid_of(&status, "limited").expect("a pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let row = |name: &str| -> Vec<String> {
        limits
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} in {limits}"))[name.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("Max open files")[..2], ["321", "321"], "{limits}");
    assert_eq!(row("Max core file size")[..2], ["0", "0"], "{limits}");
    assert_eq!(
        row("Max address space")[..2],
        ["2147483648", "2147483648"],
        "{limits}"
    );
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let uid = proc_status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().next())
        .expect("a Uid line");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(uid, "65534", "runs as nobody:\n{proc_status}");
    } else {
        running.wait_for_log("user/group switch ignored", Duration::from_secs(1));
    }
    assert!(running.stop().success());
}

#[test]
fn python_cwd_and_env_come_from_app_unless_the_program_overrides_them() {
    let python = require_tool("python3", "apt-get install -y python3");
    let sandbox = Sandbox::new();
    std::fs::create_dir_all(sandbox.path("app")).expect("create app dir");
    // A wrapper as `[app].python`, given relative to the config file, proves where `python` went.
    let wrapper = sandbox.write(
        "venv/bin/python",
        &format!(
            "#!/bin/sh\necho via the app interpreter\nexec {} \"$@\"\n",
            python.display()
        ),
    );
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("make the wrapper executable");
    sandbox.write_config(
        r#"
[app]
directory = "app"
python = "venv/bin/python"
env = { FROM_APP = "app", OVERRIDDEN = "app" }

[programs.py]
command = ["python", "-c", "import os; print('cwd', os.getcwd(), os.environ['FROM_APP'], os.environ['OVERRIDDEN'])"]
env = { OVERRIDDEN = "program" }
restart = "never"
"#,
    );
    let running = sandbox.start();
    let app_dir = sandbox
        .path("app")
        .canonicalize()
        .expect("canonical app dir");
    running.wait_for_log(
        &format!("cwd {} app program", app_dir.display()),
        Duration::from_secs(10),
    );
    running.wait_for_log("via the app interpreter", Duration::from_secs(1));
    running.wait_for(Duration::from_secs(5), "py exited", |status| {
        instance(status, "py")["state"] == "exited"
    });
    assert!(running.stop().success());
}

#[test]
fn max_rss_restarts_a_program_whose_child_allocates() {
    require_tool("python3", "apt-get install -y python3");
    let sandbox = Sandbox::new();
    // The leader is a small shell; the memory is in its child, like Celery's prefork workers.
    sandbox.write_config(&format!(
        r#"
[programs.hog]
command = ["sh", "-c", "python3 -c 'import time; b = b\"x\" * (96 << 20); time.sleep(300)' & wait"]
max_rss = "48MiB"
max_rss_samples = 2

[metrics]
listen = "127.0.0.1:{}"
sample_interval = "100ms"
"#,
        free_port()
    ));
    let running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(15), "a max_rss restart", |status| {
        instance(status, "hog")["restarts"].as_u64() >= Some(1)
    });
    assert_eq!(
        instance(&status, "hog")["last_exit"],
        "killed by signal SIGTERM",
        "{status}"
    );
    running.wait_for_log(
        "is over max_rss 48MiB for 2 consecutive samples",
        Duration::from_secs(1),
    );
    assert!(running.stop().success());
}
