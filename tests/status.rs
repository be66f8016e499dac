//! `status`, `stop` and `reload` for people, through the real binary: without a config file they
//! find the supervisor on the default control socket (`$RUNTIME_DIRECTORY/control.sock`), from
//! any directory; with one that leaves the socket to its default, a shell without
//! `$RUNTIME_DIRECTORY` still finds a supervisor started by the systemd unit on
//! `/run/sauna/control.sock`, but only when it runs that same file. `status` exits 3 when none
//! runs; its text has a unit on every figure, the last error of a failing program and of beat,
//! and ends with a newline.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::util::{Sandbox, binary, free_port, output_text, wait_until};

/// `sauna-supervisor ARGS` run in `cwd` with no config named: no `-c`, no `$SAUNA_CONFIG`,
/// and `$RUNTIME_DIRECTORY` as given (removed when `None`).
fn without_config(cwd: &Path, runtime_directory: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .current_dir(cwd)
        .env_remove("SAUNA_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    match runtime_directory {
        Some(dir) => command.env("RUNTIME_DIRECTORY", dir),
        None => command.env_remove("RUNTIME_DIRECTORY"),
    };
    command.output().expect("run sauna-supervisor")
}

/// A stack with a program that keeps failing, one whose RSS is sampled, and beat publishing to
/// a Redis nobody runs; no `[control]` section, so the socket is the default one.
fn failing_stack() -> String {
    format!(
        r#"
[programs.mailer]
command = ["sh", "-c", "echo 'ModuleNotFoundError: No module named mailer' >&2; exit 3"]
crash_limit = 2

[programs.steady]
command = ["sleep", "300"]
max_rss = "1GiB"

[beat]
broker = "redis://127.0.0.1:{redis}/0"

[beat.jobs.tick]
task = "app.tick"
every = "30s"

[metrics]
listen = "127.0.0.1:{metrics}"
sample_interval = "200ms"
"#,
        redis = free_port(),
        metrics = free_port(),
    )
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn status_without_a_config_finds_the_supervisor_through_the_runtime_directory() {
    let sandbox = Sandbox::new();
    sandbox.write("sauna.toml", &failing_stack());
    // The harness finds the supervisor next to its config (.sauna/control.sock); the commands
    // below, run from elsewhere with no config at all, only through $RUNTIME_DIRECTORY.
    let runtime = sandbox.path(".sauna");
    let mut running = sandbox.start_with(|command| {
        command.env("RUNTIME_DIRECTORY", &runtime);
    });
    running.wait_for(
        Duration::from_secs(30),
        "mailer fatal, steady sampled",
        |status| {
            let programs = status["programs"].as_array().cloned().unwrap_or_default();
            let program = |name: &str| {
                programs
                    .iter()
                    .find(|program| program["name"] == name)
                    .cloned()
                    .unwrap_or_default()
            };
            program("mailer")["state"] == "fatal"
                && program("steady")["instances"][0]["rss_bytes"]
                    .as_u64()
                    .is_some()
                && status["beat"]["last_error"].is_string()
        },
    );
    let elsewhere = tempfile::tempdir().expect("a directory without sauna.toml");

    let json = without_config(elsewhere.path(), Some(&runtime), &["status", "--json"]);
    assert!(json.status.success(), "{}", output_text(&json));
    let status: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(status["pid"], running.pid());
    // The fields scripts depend on are still there.
    for key in [
        "pid",
        "version",
        "phase",
        "generation",
        "uptime_seconds",
        "config",
    ] {
        assert!(!status[key].is_null(), "{key} missing: {status}");
    }
    let mailer = &status["programs"][0]["instances"][0];
    assert_eq!(
        mailer["last_output"], "ModuleNotFoundError: No module named mailer",
        "{status}"
    );

    let output = without_config(elsewhere.path(), Some(&runtime), &["status"]);
    assert!(output.status.success(), "{}", output_text(&output));
    let text = stdout(&output);
    assert!(
        text.ends_with('\n') && !text.ends_with("\n\n"),
        "one final newline: {text:?}"
    );
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!("pid {}", running.pid()))
            && first.contains(&sandbox.path("sauna.toml").display().to_string()),
        "{text}"
    );
    let up = first
        .split(" · ")
        .find_map(|part| part.strip_prefix("up "))
        .unwrap_or_else(|| panic!("no uptime in {first:?}"));
    assert!(
        up.ends_with('s') || up.ends_with('m'),
        "uptime {up:?} has its unit"
    );
    let row = |name: &str| -> String {
        text.lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in\n{text}"))
            .to_owned()
    };
    let mailer = row("mailer");
    assert!(
        mailer.contains("crash loop: exited with status 3 2 times in")
            && mailer.contains("giving up (")
            && mailer.contains(" ago): ModuleNotFoundError: No module named mailer"),
        "the failing program's last error, when, and what it printed:\n{text}"
    );
    let steady = row("steady");
    assert!(steady.contains(" MiB"), "RSS in MiB:\n{text}");
    let uptime = steady
        .split_whitespace()
        .nth(5)
        .unwrap_or_else(|| panic!("no uptime column in {steady:?}"));
    assert!(
        uptime.ends_with('s')
            && uptime[..uptime.len() - 1]
                .chars()
                .all(|c| c.is_ascii_digit() || c == 'm'),
        "uptime {uptime:?} in s:\n{text}"
    );
    assert!(
        text.contains("Redis down")
            && text.contains("last error (")
            && text.contains("Redis at redis://127.0.0.1:")
            && text.contains("Connection refused"),
        "beat's last error:\n{text}"
    );

    // `reload` finds it the same way; with no file of its own to check, the supervisor's check
    // of its file decides: every problem printed, exit 2, nothing changed.
    let config = std::fs::read_to_string(sandbox.path("sauna.toml")).expect("sauna.toml");
    sandbox.write(
        "sauna.toml",
        &format!("{config}\n[programs.broken]\ncommand = 3\n"),
    );
    let reload = without_config(elsewhere.path(), Some(&runtime), &["reload"]);
    assert_eq!(reload.status.code(), Some(2), "{}", output_text(&reload));
    assert!(
        String::from_utf8_lossy(&reload.stderr).contains("sauna.toml:"),
        "the diagnostics: {}",
        output_text(&reload)
    );
    let after = without_config(elsewhere.path(), Some(&runtime), &["status", "--json"]);
    let after: serde_json::Value = serde_json::from_slice(&after.stdout).expect("JSON");
    assert_eq!(after["generation"], 1, "nothing changed: {after}");

    // `stop` finds it the same way and waits until it has exited.
    let stop = without_config(elsewhere.path(), Some(&runtime), &["stop"]);
    assert!(stop.status.success(), "{}", output_text(&stop));
    assert!(running.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn status_exits_3_when_no_supervisor_runs_on_the_default_socket() {
    let runtime = tempfile::tempdir().expect("an empty runtime directory");
    let elsewhere = tempfile::tempdir().expect("a directory without sauna.toml");
    let socket = runtime.path().join("control.sock");

    let status = without_config(elsewhere.path(), Some(runtime.path()), &["status"]);
    assert_eq!(status.status.code(), Some(3), "{}", output_text(&status));
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        stderr.contains(&format!(
            "no sauna-supervisor is running on {}",
            socket.display()
        )),
        "{stderr}"
    );
    assert!(status.stdout.is_empty(), "{}", output_text(&status));
    let json = without_config(
        elsewhere.path(),
        Some(runtime.path()),
        &["status", "--json"],
    );
    assert_eq!(json.status.code(), Some(3), "{}", output_text(&json));

    let reload = without_config(elsewhere.path(), Some(runtime.path()), &["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", output_text(&reload));
    assert!(
        String::from_utf8_lossy(&reload.stderr).contains("nothing to reload"),
        "{}",
        output_text(&reload)
    );
    let stop = without_config(elsewhere.path(), Some(runtime.path()), &["stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", output_text(&stop));
    assert!(
        String::from_utf8_lossy(&stop.stderr).contains("nothing to stop"),
        "{}",
        output_text(&stop)
    );
    // A config named but missing is still a usage error, not "nothing runs".
    let named = Command::new(binary())
        .args(["status", "-c", "missing.toml"])
        .current_dir(elsewhere.path())
        .output()
        .expect("run sauna-supervisor");
    assert_eq!(named.status.code(), Some(2), "{}", output_text(&named));
}

/// The systemd case: the unit `emit systemd` writes gives the supervisor
/// `RUNTIME_DIRECTORY=/run/sauna`, an operator's shell has none. Needs root for /run (CI is).
#[test]
fn a_shell_without_runtime_directory_finds_the_units_supervisor_only_for_its_own_config() {
    let run_dir = Path::new("/run").join("sauna");
    let socket = run_dir.join("control.sock");
    assert!(
        !socket.exists(),
        "{} exists: another sauna-supervisor (a real one?) runs on this machine; this test needs \
         that path to itself",
        socket.display()
    );
    let created = !run_dir.exists();
    let sandbox = Sandbox::new();
    sandbox.write(
        "sauna.toml",
        &format!(
            "[programs.idle]\ncommand = [\"sleep\", \"300\"]\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    );
    // The harness itself (SAUNA_CONFIG, no $RUNTIME_DIRECTORY) must find it on /run/sauna.
    let running = sandbox.start_with(|command| {
        command.env("RUNTIME_DIRECTORY", &run_dir);
    });
    assert!(socket.exists());
    let status = sandbox.run(&["status"]);
    assert!(status.status.success(), "{}", output_text(&status));
    assert!(stdout(&status).contains(&format!("pid {}", running.pid())));

    // Another app's config that also leaves the socket to its default: not this supervisor.
    let other = Sandbox::new();
    other.write(
        "sauna.toml",
        "[programs.idle]\ncommand = [\"sleep\", \"300\"]\n",
    );
    let mut command = Command::new(binary());
    let status = command
        .args(["status"])
        .current_dir(other.root())
        .env_remove("SAUNA_CONFIG")
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .expect("run sauna-supervisor");
    assert_eq!(status.status.code(), Some(3), "{}", output_text(&status));
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        stderr.contains(&format!("the one on {} runs", socket.display())),
        "{stderr}"
    );
    let stop = Command::new(binary())
        .args(["stop"])
        .current_dir(other.root())
        .env_remove("SAUNA_CONFIG")
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .expect("run sauna-supervisor");
    assert!(stop.status.success(), "{}", output_text(&stop));
    assert_eq!(
        running.status_json()["phase"],
        "running",
        "another app's stop left it alone"
    );

    // Its own config, from its own directory: found, and stopped.
    assert!(running.stop().success());
    wait_until(Duration::from_secs(5), "the socket removed", || {
        (!socket.exists()).then_some(())
    });
    if created {
        let _ = std::fs::remove_dir(&run_dir);
    }
}
