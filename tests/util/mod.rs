//! The integration-test harness: a sandbox directory per test, the real `sauna-supervisor`
//! binary started in it behind a kill-on-drop guard, and helpers that wait on observable state
//! (`status --json`, log lines, files) instead of sleeping.

#![allow(dead_code)] // each test module uses a different part of the harness

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub mod fuzz;
pub mod netns;
pub mod nginx;
pub mod postgres;
pub mod redis;

/// The binary under test: a hard link to the one cargo built, made once per test process.
/// Even a `cargo build` that finds nothing to do links its output again (remove, then link),
/// and the wheel test runs one while other tests start the binary: through our own link they
/// never meet the moment the path is missing.
pub fn binary() -> PathBuf {
    static LINKED: OnceLock<PathBuf> = OnceLock::new();
    LINKED.get_or_init(link_built_binary).clone()
}

/// The binary where cargo built it, in `target/<profile>/`.
pub fn built_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sauna-supervisor"))
}

/// Links the built binary into `target/<profile>/test-binaries/<our pid>/`, after removing the
/// links of test processes that are gone (each would keep an old build's file alive).
fn link_built_binary() -> PathBuf {
    let built = built_binary();
    let Some(profile_dir) = built.parent() else {
        return built;
    };
    let links = profile_dir.join("test-binaries");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            let owner_alive = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
                .is_some_and(alive);
            if !owner_alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let ours = links.join(std::process::id().to_string());
    let linked = ours.join("sauna-supervisor");
    let _ = std::fs::remove_dir_all(&ours);
    std::fs::create_dir_all(&ours).expect("create the test binary's directory");
    // The first call may itself meet a relink: try again for a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::hard_link(&built, &linked) {
            Ok(()) => return linked,
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("link {} to {}: {error}", built.display(), linked.display()),
        }
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the supervisor crate sits inside the repository")
        .to_path_buf()
}

/// The test venv's Python (created by `scripts/test.sh`), or `$SAUNA_TEST_PYTHON`.
pub fn python() -> PathBuf {
    let path = std::env::var_os("SAUNA_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no test Python at {}: run `scripts/test.sh` (it creates .venv with tests/requirements.txt), or set SAUNA_TEST_PYTHON",
        path.display()
    );
    path
}

/// Finds `tool` on PATH (or in `extra_dirs`), failing the test with the install command if absent.
pub fn require_tool(tool: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
    {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{tool}` is not installed: run `{install}` (or `scripts/test.sh`, which installs everything the tests need)"
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// Polls `probe` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A temporary directory holding one test's config, app files, sockets and logs.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// A fresh empty sandbox.
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("sauna-test-")
            .tempdir()
            .expect("create a temp dir");
        Sandbox { dir }
    }

    /// The sandbox directory.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the sandbox.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Writes a file (creating parent directories) and returns its path.
    pub fn write(&self, relative: &str, contents: &str) -> PathBuf {
        let path = self.path(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dirs");
        }
        std::fs::write(&path, contents).expect("write sandbox file");
        path
    }

    /// The control socket every sandbox config uses.
    pub fn control_socket(&self) -> PathBuf {
        self.path("run/control.sock")
    }

    /// Writes `sauna.toml`; a `[control]` section pointing into the sandbox and a `[metrics]`
    /// section on a free port are added when the text has none, so tests never collide.
    pub fn write_config(&self, toml: &str) -> PathBuf {
        let mut text = toml.to_owned();
        if !text.contains("[control]") {
            text.push_str(&format!(
                "\n[control]\nsocket = \"{}\"\n",
                self.control_socket().display()
            ));
        }
        if !text.contains("[metrics]") {
            text.push_str(&format!(
                "\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
                free_port()
            ));
        }
        self.write("sauna.toml", &text)
    }

    /// The binary with `args`, run in the sandbox with its config.
    pub fn command(&self, args: &[&str]) -> Command {
        self.configure(Command::new(binary()), args)
    }

    /// `command` (the binary, or a wrapper that runs it) with `args`, in the sandbox with its
    /// config.
    fn configure(&self, mut command: Command, args: &[&str]) -> Command {
        command
            .args(args)
            .current_dir(self.root())
            .env("SAUNA_CONFIG", self.path("sauna.toml"))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        command
    }

    /// Runs the binary to completion and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap_or_else(|error| {
            panic!(
                "run sauna-supervisor {args:?}: {error} (binary {} exists: {}, sandbox {} exists: {})",
                binary().display(),
                binary().exists(),
                self.root().display(),
                self.root().exists()
            )
        })
    }

    /// Starts `sauna-supervisor run` and waits until `status --json` answers.
    pub fn start(&self) -> Running {
        self.start_with(|_| {})
    }

    /// Like [`Sandbox::start`], with a chance to adjust the command (environment, flags).
    pub fn start_with(&self, adjust: impl FnOnce(&mut Command)) -> Running {
        let mut command = self.command(&["run", "--log-level", "debug"]);
        adjust(&mut command);
        self.spawn(command)
    }

    /// Like [`Sandbox::start`], inside network namespace `namespace` (`ip netns exec`, which
    /// execs the binary: the pid is the supervisor's). `status` still answers from here: the
    /// control socket is a file.
    pub fn start_in_namespace(&self, namespace: &str) -> Running {
        let wrapper = netns::Star::exec(namespace, binary());
        self.spawn(self.configure(wrapper, &["run", "--log-level", "debug"]))
    }

    fn spawn(&self, mut command: Command) -> Running {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn sauna-supervisor run");
        let log = Arc::new(Mutex::new(String::new()));
        let readers = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|mut stream| {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let mut buffer = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    if std::env::var_os("SAUNA_TEST_ECHO").is_some() {
                        eprint!("{text}");
                    }
                    log.lock().expect("log lock").push_str(&text);
                }
            })
        })
        .collect();
        let running = Running {
            child: Some(child),
            log,
            readers,
            sandbox_root: self.root().to_path_buf(),
        };
        running.wait_for_answer(Duration::from_secs(30));
        running
    }
}

/// A `sauna-supervisor run` started by a test; killed (with its group) when dropped.
pub struct Running {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
    sandbox_root: PathBuf,
}

impl Running {
    /// The supervisor's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Everything the supervisor printed so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_until(timeout, &format!("log line containing {needle:?}"), || {
            self.log().contains(needle).then_some(())
        });
    }

    fn status_command(&self) -> Command {
        let mut command = Command::new(binary());
        command
            .args(["status", "--json"])
            .current_dir(&self.sandbox_root)
            .env("SAUNA_CONFIG", self.sandbox_root.join("sauna.toml"))
            .stdin(Stdio::null());
        command
    }

    /// `status --json` now, or `None` when it does not answer.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let output = self.status_command().output().ok()?;
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// `status --json` now; panics with what went wrong and the log when it does not answer.
    pub fn status_json(&self) -> serde_json::Value {
        let output = match self.status_command().output() {
            Ok(output) => output,
            Err(error) => panic!(
                "status --json could not run ({error}; binary {} exists: {}, sandbox {} exists: {}); log:\n{}",
                binary().display(),
                binary().exists(),
                self.sandbox_root.display(),
                self.sandbox_root.exists(),
                self.log()
            ),
        };
        match serde_json::from_slice(&output.stdout) {
            Ok(status) if output.status.success() => status,
            _ => panic!(
                "status --json did not answer ({}): {}; log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                self.log()
            ),
        }
    }

    /// Waits until `predicate` holds for `status --json`, and returns that status.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.try_status();
            if let Some(status) = &status {
                if predicate(status) {
                    return status.clone();
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nlast status: {}\nlog:\n{}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for_answer(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.try_status().is_none() {
            if let Some(child) = &self.child {
                let mut probe = Command::new("kill");
                probe.args(["-0", &child.id().to_string()]);
                if !probe.status().map(|s| s.success()).unwrap_or(false) {
                    panic!(
                        "sauna-supervisor exited during start-up; log:\n{}",
                        self.log()
                    );
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "sauna-supervisor did not answer status within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal (e.g. `"TERM"`) to the supervisor.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the supervisor to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("supervisor still owned");
        let status = wait_until(timeout, "sauna-supervisor to exit", || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// Graceful stop through `sauna-supervisor stop`; returns the supervisor's exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut command = Command::new(binary());
        command
            .arg("stop")
            .current_dir(&self.sandbox_root)
            .env("SAUNA_CONFIG", self.sandbox_root.join("sauna.toml"));
        let stop = command.output().expect("run sauna-supervisor stop");
        assert!(
            stop.status.success(),
            "stop failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&stop.stderr),
            self.log()
        );
        self.wait_exit(Duration::from_secs(60))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // The children die with it through PR_SET_PDEATHSIG.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `command` to completion (failing the test when it cannot start) and returns its output.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

/// Fails the test with the output when `output` is not a success.
#[track_caller]
pub fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether the tests run as root (CI does): servers that refuse root (PostgreSQL) then run as
/// their own user.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A server process started by a test (nginx, PostgreSQL, redis-server with an emitted file):
/// TERM on drop, then KILL if it lingers.
pub struct Daemon {
    name: &'static str,
    child: Child,
}

impl Daemon {
    /// Starts `command` with its output discarded.
    pub fn spawn(name: &'static str, command: &mut Command) -> Daemon {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon { name, child }
    }

    /// The name it was started under.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Fails the test when the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early with {status}", self.name);
        }
    }

    /// Waits until `port` on 127.0.0.1 accepts connections, failing as soon as the process exits.
    pub fn wait_for_port(&mut self, port: u16) {
        wait_until(
            Duration::from_secs(20),
            &format!("{} on port {port}", self.name),
            || {
                self.assert_running();
                std::net::TcpStream::connect(("127.0.0.1", port)).ok()
            },
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl -sS -i` with `args` (10 s at most), failing the test when curl fails; the response's
/// head and body with `\n` line ends.
pub fn curl(args: &[&str]) -> String {
    let curl = require_tool("curl", "apt-get install -y curl");
    let output = run(Command::new(curl)
        .args(["-sS", "--max-time", "10", "-i"])
        .args(args));
    assert_success(&output, &format!("curl {args:?}"));
    String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n")
}

/// The body of a [`curl`] response.
pub fn body(response: &str) -> &str {
    response.split_once("\n\n").map_or("", |(_, body)| body)
}

/// A finished command's exit status, stdout and stderr, for assertion messages.
pub fn output_text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The body of a 200 answer to a plain HTTP/1.1 `GET path` at `address`; `None` for any other
/// answer or a connection that fails.
pub fn http_get(address: impl std::net::ToSocketAddrs, path: &str) -> Option<String> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: impl std::fmt::Display) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
