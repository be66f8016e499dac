//! `sauna-supervisor check`: every problem of a config at once as `FILE:LINE:COL: message` on
//! stdout, a count on stderr and exit 2; a short success line and exit 0 for a valid file.

use std::path::Path;
use std::process::Output;

use crate::util::{Sandbox, repo_root};

/// Three mistakes of three kinds in three places: a value out of range, a duration without a
/// valid unit, and a misspelt key.
const THREE_MISTAKES: &str = r#"# A café's config with three mistakes.
[app]
wsgi = "myapp.wsgi:application"

[web]
listen = ["127.0.0.1:8000"]
workers = 0
timeout = "30 seconds"

[programs.celery]
command = ["celery", "-A", "myapp", "worker"]
stop_sginal = "TERM"
"#;

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Compares with a golden file; `SAUNA_BLESS=1` rewrites it after an intended change.
fn assert_golden(actual: &str, golden: &Path) {
    if std::env::var_os("SAUNA_BLESS").is_some() {
        std::fs::write(golden, actual).expect("write golden file");
    }
    let expected = std::fs::read_to_string(golden)
        .unwrap_or_else(|error| panic!("read {}: {error}", golden.display()));
    assert_eq!(
        actual,
        expected,
        "output differs from {} (run with SAUNA_BLESS=1 to accept it)",
        golden.display()
    );
}

#[test]
fn three_mistakes_are_all_reported_with_line_and_column() {
    let sandbox = Sandbox::new();
    sandbox.write("sauna.toml", THREE_MISTAKES);
    let output = sandbox.run(&["check", "-c", "sauna.toml"]);
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    assert_golden(
        &stdout(&output),
        &repo_root().join("tests/golden/check_three_mistakes.txt"),
    );
    assert_eq!(
        stderr(&output),
        "sauna-supervisor: 3 problem(s) in sauna.toml\n"
    );
}

#[test]
fn a_valid_file_exits_0_with_a_short_summary() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "sauna.toml",
        "[programs.sleeper]\ncommand = [\"sleep\", \"60\"]\n\n[beat]\n[beat.jobs.tick]\ntask = \"tasks.tick\"\nevery = \"30s\"\n",
    );
    // Without -c the file comes from $SAUNA_CONFIG, which the sandbox sets.
    let output = sandbox.run(&["check"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&output),
        stderr(&output)
    );
    let expected = format!(
        "{}: ok (1 program(s), beat: 1 job(s))\n",
        sandbox.path("sauna.toml").display()
    );
    assert_eq!(stdout(&output), expected);
}

#[test]
fn a_missing_file_exits_2_and_says_how_to_pass_one() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&["check", "-c", "nowhere/sauna.toml"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.starts_with("sauna-supervisor: cannot read config file nowhere/sauna.toml: "),
        "{message}"
    );
    assert!(
        message.contains("pass -c FILE or set SAUNA_CONFIG"),
        "{message}"
    );
}

#[test]
fn the_reference_example_passes_check() {
    let sandbox = Sandbox::new();
    let example = repo_root().join("examples/sauna.toml");
    // The secrets it names, as systemd's EnvironmentFile= would provide them.
    let output = sandbox
        .command(&["check", "-c", &example.display().to_string()])
        .env("REDIS_PASSWORD", "example")
        .env("MYAPP_DB_PASSWORD", "example")
        .output()
        .expect("run check");
    assert_eq!(
        output.status.code(),
        Some(0),
        "examples/sauna.toml must pass check:\n{}{}",
        stdout(&output),
        stderr(&output)
    );
}
