//! The Python wheel: `scripts/build-wheel.sh` (maturin, `bindings = "bin"`) packs the binary
//! under test, pip installs it into a fresh venv that has never seen this repository, and the
//! `sauna-supervisor` it puts into that venv's `bin/` runs there.
//!
//! The wheel is built with the Cargo profile of the binary under test (`dev` under `cargo test`),
//! so maturin's `cargo rustc` finds everything fresh in `target/` and only packs: no second build,
//! least of all a release one.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{Sandbox, built_binary, python, repo_root};

/// Kept in step with scripts/build-wheel.sh and tests/requirements.txt.
const MATURIN_INSTALL: &str = ".venv/bin/python -m pip install 'maturin>=1.9,<2'";

/// maturin: `$MATURIN`, else the test venv's (scripts/setup.sh installs it from
/// tests/requirements.txt), else PATH. Absent, the test fails with the install command: the build
/// script would install it by itself, but a test must not reach the network to do so.
fn maturin() -> PathBuf {
    let missing = |looked_at: &str| -> ! {
        panic!(
            "`maturin` is not installed ({looked_at}): run `{MATURIN_INSTALL}` (or `scripts/test.sh`, which installs everything the tests need)"
        )
    };
    if let Some(path) = std::env::var_os("MATURIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            missing(&format!("$MATURIN is {}", path.display()));
        }
        return path;
    }
    let in_venv = repo_root().join(".venv/bin/maturin");
    if in_venv.is_file() {
        return in_venv;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("maturin"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| missing(&format!("not in {} nor on PATH", in_venv.display())))
}

/// The Cargo profile that built the binary under test, from the directory it sits in
/// (`target/debug` is the `dev` profile's).
fn profile_of_binary() -> String {
    let directory = built_binary()
        .parent()
        .and_then(Path::file_name)
        .map(|name| name.to_string_lossy().into_owned())
        .expect("the binary under test sits in target/<profile>/");
    if directory == "debug" {
        "dev".to_owned()
    } else {
        directory
    }
}

/// Runs `command` in its own process group with stdout and stderr in files of `sandbox` (no pipe
/// to fill up), killing the whole group after `timeout` — maturin runs cargo, which would wait
/// forever on a locked build directory. Returns stdout; fails the test with both streams unless
/// the command exits 0.
fn run_bounded(sandbox: &Sandbox, what: &str, command: &mut Command, timeout: Duration) -> String {
    let stdout_path = sandbox.path(&format!("{what}.stdout"));
    let stderr_path = sandbox.path(&format!("{what}.stderr"));
    command
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("create a stdout file"))
        .stderr(File::create(&stderr_path).expect("create a stderr file"))
        .process_group(0);
    let started = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("{what}: cannot start {command:?}: {error}"));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    match status {
        Some(status) if status.success() => {
            eprintln!("{what}: {:.1?}", started.elapsed());
            stdout
        }
        Some(status) => panic!("{what} failed ({status}):\n{stdout}\n{stderr}"),
        None => panic!("{what} did not finish within {timeout:?}:\n{stdout}\n{stderr}"),
    }
}

#[test]
fn the_wheel_installs_a_working_binary_into_a_fresh_venv() {
    let maturin = maturin();
    let sandbox = Sandbox::new();
    let version = env!("CARGO_PKG_VERSION");

    let built = run_bounded(
        &sandbox,
        "build-wheel",
        Command::new(repo_root().join("scripts/build-wheel.sh"))
            .args(["--profile", &profile_of_binary(), "--out"])
            .arg(sandbox.path("wheels"))
            .env("MATURIN", &maturin),
        Duration::from_secs(600),
    );
    // Recompiling here would mean maturin's cargo call no longer matches the one `cargo test`
    // just made (features, flags): a second build per run, and a relink of the binary that the
    // other tests are running at the same moment.
    let build_log = std::fs::read_to_string(sandbox.path("build-wheel.stderr")).unwrap_or_default();
    assert!(
        !build_log.contains("Compiling "),
        "maturin recompiled what `cargo test` had built:\n{build_log}"
    );
    let wheel = PathBuf::from(built.lines().last().unwrap_or_default());
    let name = wheel
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        wheel.is_file(),
        "build-wheel.sh printed {built:?}, which is not a wheel"
    );
    // The version is the Cargo workspace's; the platform tag the manylinux policy the binary
    // meets — never the plain `linux` tag, which pip on another distribution would refuse.
    let prefix = format!("sauna_supervisor-{version}-py3-none-manylinux_");
    let suffix = format!("_{}.whl", std::env::consts::ARCH);
    assert!(
        name.starts_with(&prefix) && name.ends_with(&suffix),
        "wheel {name} is not {prefix}*{suffix}"
    );

    // A venv of its own, as an app's would be, with the wheel installed from the file alone.
    let venv = sandbox.path("venv");
    run_bounded(
        &sandbox,
        "venv",
        Command::new(python()).args(["-m", "venv"]).arg(&venv),
        Duration::from_secs(120),
    );
    run_bounded(
        &sandbox,
        "pip-install",
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--no-index",
                "--disable-pip-version-check",
            ])
            .arg(&wheel)
            .env("PIP_CONFIG_FILE", "/dev/null"),
        Duration::from_secs(120),
    );
    let shown = run_bounded(
        &sandbox,
        "pip-show",
        Command::new(venv.join("bin/python")).args([
            "-m",
            "pip",
            "show",
            "--disable-pip-version-check",
            "sauna-supervisor",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        shown
            .lines()
            .any(|line| line == format!("Version: {version}")),
        "pip show sauna-supervisor:\n{shown}"
    );

    let installed = venv.join("bin/sauna-supervisor");
    let mode = std::fs::metadata(&installed)
        .unwrap_or_else(|error| panic!("{}: {error}", installed.display()))
        .permissions()
        .mode();
    assert!(
        mode & 0o111 != 0,
        "{} is not executable",
        installed.display()
    );
    let printed = run_bounded(
        &sandbox,
        "version",
        Command::new(&installed).arg("--version"),
        Duration::from_secs(30),
    );
    assert_eq!(printed, format!("sauna-supervisor {version}\n"));

    // `check` of a small app that runs on the venv's own Python.
    sandbox.write(
        "app/app.py",
        "def application(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n",
    );
    sandbox.write(
        "app/sauna.toml",
        &format!(
            "[app]\ndirectory = \".\"\npython = \"{}\"\nwsgi = \"app:application\"\n\n[web]\nlisten = [\"127.0.0.1:8000\"]\nworkers = 2\n",
            venv.join("bin/python").display()
        ),
    );
    run_bounded(
        &sandbox,
        "check",
        Command::new(&installed)
            .args(["check", "-c", "sauna.toml"])
            .current_dir(sandbox.path("app")),
        Duration::from_secs(30),
    );
}
