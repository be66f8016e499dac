//! Spawning child processes (program instances and web workers) the one safe way, and forwarding
//! what they print into the supervisor's log.
//!
//! Every child is started with `tokio::process` and:
//! - **its own process group** (`process_group(0)`), so a stop signal reaches the child and every
//!   grandchild it forked (Celery's prefork pool) with one `kill(-pgid, sig)`, and a Ctrl-C on the
//!   supervisor's terminal does not hit the children behind the supervisor's back;
//! - **`PR_SET_PDEATHSIG(SIGKILL)`**, so a supervisor killed with SIGKILL takes the child along
//!   (grandchildren are the group reaper's job, see `reaper`; every new group is reported to it). The
//!   kernel ties this to the *thread* that forked: children are spawned from runtime worker
//!   threads, which live as long as the supervisor, never from short-lived blocking threads. The
//!   supervisor may die between `fork` and `prctl`; the child compares `getppid()` with the pid
//!   recorded before the fork and exits at once if they differ;
//! - **resource limits** set between `fork` and `exec` (setrlimit only, which is async-signal-safe);
//! - **no accidental privileges**: a `user`/`group` is resolved before the fork and applied by the
//!   standard library (which also drops supplementary groups); `$NOTIFY_SOCKET` and the watchdog
//!   variables are removed so a child cannot speak to systemd for us; only stdin (null),
//!   stdout/stderr (pipes) and explicitly passed fds are inherited (Rust opens everything else
//!   close-on-exec, and an upgrade's successor sets the flag again on the sockets and channel it
//!   inherited as soon as it adopts them, so no worker, program or hook gets a listening socket,
//!   the control socket or the hand-over channel).
//!
//! It deliberately does not reap children: each `Child` is awaited by its owner, and there is no
//! global `waitpid(-1)`, which would steal exit statuses from `tokio::process`.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Group, Pid, User};
use proxy_conf::Rlimits;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

/// Longest piece of output logged as one line; longer runs without a newline are split here so a
/// child that never prints a newline cannot grow the supervisor's memory.
const MAX_LINE: usize = 16 * 1024;

/// Environment variables that belong to the supervisor's conversation with systemd.
const SUPERVISOR_ONLY_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Everything needed to start one child.
#[derive(Debug, Default)]
pub struct ChildSpec {
    /// The command and its arguments; `argv[0]` is looked up on `PATH`.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Variables added to (or replacing) the supervisor's environment.
    pub env: BTreeMap<String, String>,
    /// User to run as; only honoured when the supervisor runs as root.
    pub user: Option<String>,
    /// Group to run as; defaults to the user's primary group.
    pub group: Option<String>,
    /// Resource limits applied before `exec`.
    pub rlimits: Rlimits,
    /// Descriptors the child inherits: `(our fd, the number it gets in the child)`.
    pub pass_fds: Vec<(OwnedFd, RawFd)>,
    /// stderr goes into stdout's pipe, as `2>&1` does, so that the two stay in the order they
    /// were written (a failing deploy hook's error after the output that led to it, instead of
    /// wherever two separate readers happen to see it); the child's `stderr` is then `None`.
    pub merge_stderr: bool,
}

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `argv` was empty.
    #[error("empty command")]
    EmptyCommand,
    /// The user does not exist.
    #[error("unknown user \"{0}\"")]
    UnknownUser(String),
    /// The group does not exist.
    #[error("unknown group \"{0}\"")]
    UnknownGroup(String),
    /// Looking up a user or group failed.
    #[error("cannot look up user or group: {0}")]
    Lookup(#[source] nix::Error),
    /// Preparing a passed descriptor failed.
    #[error("cannot prepare an inherited descriptor: {0}")]
    PassFd(#[source] nix::Error),
    /// The pipe for the child's output could not be made.
    #[error("cannot create the output pipe: {0}")]
    Pipe(#[source] std::io::Error),
    /// `fork`/`exec` failed, e.g. the command does not exist.
    #[error("cannot start `{command}`: {source}")]
    Exec {
        /// The command.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Starts the child described by `spec` with stdout and stderr piped.
pub fn spawn(spec: ChildSpec) -> Result<Child, SpawnError> {
    let (program, args) = spec.argv.split_first().ok_or(SpawnError::EmptyCommand)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    for name in SUPERVISOR_ONLY_ENV {
        command.env_remove(name);
    }
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    // Both ends close-on-exec; the child gets the write end as fds 1 and 2 only. `command` holds our copies of it until this function returns, after
    // which the reader sees end-of-file once the child's side is closed.
    let merged_output = if spec.merge_stderr {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|errno| SpawnError::Pipe(errno.into()))?;
        let write_again = write.try_clone().map_err(SpawnError::Pipe)?;
        command
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(write_again));
        Some(read)
    } else {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        None
    };
    apply_identity(&mut command, spec.user.as_deref(), spec.group.as_deref())?;

    let limits = rlimit_table(&spec.rlimits);
    let targets: Vec<RawFd> = spec.pass_fds.iter().map(|(_, target)| *target).collect();
    let mut passed: Vec<(OwnedFd, RawFd)> = Vec::with_capacity(spec.pass_fds.len());
    for (fd, target) in spec.pass_fds {
        passed.push((move_clear_of(fd, &targets)?, target));
    }
    let moves: Vec<(RawFd, RawFd)> = passed
        .iter()
        .map(|(fd, target)| (fd.as_raw_fd(), *target))
        .collect();
    let parent = std::process::id();

    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // functions may be called. It calls prctl, getppid, setrlimit, dup2, fcntl and _exit, all
    // plain system calls, and touches only data captured by value before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            for (resource, value) in &limits {
                setrlimit(*resource, *value, *value).map_err(std::io::Error::from)?;
            }
            for (fd, target) in &moves {
                if libc::dup2(*fd, *target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 clears close-on-exec on the new number only when the numbers differ.
                if fd == target && libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| SpawnError::Exec {
        command: program.clone(),
        source,
    })?;
    if let Some(read) = merged_output {
        let stdout = std::process::ChildStdout::from(read);
        child.stdout =
            Some(tokio::process::ChildStdout::from_std(stdout).map_err(SpawnError::Pipe)?);
    }
    // The parent's copies of passed descriptors close here, when `passed` is dropped.
    drop(passed);
    if let Some(pid) = child.id() {
        super::reaper::track(pid);
    }
    Ok(child)
}

/// Sends `signal` to the process group led by `pid`; a group that is already gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) -> nix::Result<()> {
    gone_is_fine(killpg(child_pid(pid)?, signal))
}

/// Sends `signal` to the one process `pid`; a process that is already gone is not an error.
pub fn signal_process(pid: u32, signal: Signal) -> nix::Result<()> {
    gone_is_fine(nix::sys::signal::kill(child_pid(pid)?, signal))
}

/// `pid` as a child's pid. 0 and 1 are refused: `kill(0)` and `killpg(0)` mean the caller's
/// own process group — the supervisor itself — and 1 is init; neither is ever our child, so a
/// pid left at its default must never turn into a signal to ourselves.
fn child_pid(pid: u32) -> nix::Result<Pid> {
    match i32::try_from(pid) {
        Ok(raw) if raw > 1 => Ok(Pid::from_raw(raw)),
        _ => Err(nix::Error::ESRCH),
    }
}

fn gone_is_fine(result: nix::Result<()>) -> nix::Result<()> {
    match result {
        Err(nix::Error::ESRCH) | Ok(()) => Ok(()),
        Err(other) => Err(other),
    }
}

/// Forwards the child's stdout and stderr to the log, one event per line, tagged with `label`
/// (a program or worker name) and the child's pid. Returns when both streams are closed.
pub fn capture_output(child: &mut Child, label: String) -> tokio::task::JoinHandle<()> {
    capture_output_with_tail(child, label, None)
}

/// Like [`capture_output`], and also keeps the last lines in `tail`, so whoever reports the
/// child's death can quote what it printed last (a reload's rollback message).
pub fn capture_output_with_tail(
    child: &mut Child,
    label: String,
    tail: Option<OutputTail>,
) -> tokio::task::JoinHandle<()> {
    capture_output_each(child, label, move |line| {
        if let Some(tail) = &tail {
            tail.push(line);
        }
    })
}

/// Like [`capture_output`], and also hands every line to `on_line` as soon as it is read (a
/// deploy hook streams its output to the `reload` client while it runs).
pub fn capture_output_each(
    child: &mut Child,
    label: String,
    on_line: impl Fn(&str) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let pid = child.id().unwrap_or_default();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let on_line: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(on_line);
    tokio::spawn(async move {
        let out = forward_lines(stdout, label.clone(), pid, "stdout", Arc::clone(&on_line));
        let err = forward_lines(stderr, label, pid, "stderr", on_line);
        tokio::join!(out, err);
    })
}

/// Like [`capture_output`] for a process this supervisor did not spawn itself (a worker forked
/// by a preloaded template): `stdout` and `stderr` are the read ends of the pipes made for it.
pub fn capture_pipes(
    stdout: OwnedFd,
    stderr: OwnedFd,
    label: String,
    pid: u32,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::net::unix::pipe::Receiver;
    let stdout = Receiver::from_owned_fd(stdout)?;
    let stderr = Receiver::from_owned_fd(stderr)?;
    let on_line: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(|_: &str| {});
    Ok(tokio::spawn(async move {
        let out = forward_lines(
            Some(stdout),
            label.clone(),
            pid,
            "stdout",
            Arc::clone(&on_line),
        );
        let err = forward_lines(Some(stderr), label, pid, "stderr", on_line);
        tokio::join!(out, err);
    }))
}

/// The last few lines a child printed (stdout and stderr interleaved as read). Shared only
/// between the task that reads the child's pipes and the one that reports its exit.
#[derive(Debug, Clone)]
pub struct OutputTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    keep: usize,
}

impl OutputTail {
    /// A tail that keeps the last `keep` lines.
    pub fn new(keep: usize) -> OutputTail {
        OutputTail {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(keep))),
            keep,
        }
    }

    fn push(&self, line: &str) {
        // A poisoned lock only means a reader panicked mid-push; the lines are still usable.
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == self.keep {
            lines.pop_front();
        }
        if self.keep > 0 {
            lines.push_back(line.to_owned());
        }
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().cloned().collect()
    }
}

async fn forward_lines<R: AsyncRead + Unpin>(
    stream: Option<R>,
    label: String,
    pid: u32,
    stream_name: &'static str,
    on_line: Arc<dyn Fn(&str) + Send + Sync>,
) {
    let Some(mut stream) = stream else { return };
    let mut pending: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 8192];
    let emit = |line: &[u8]| on_line(&emit_line(&label, pid, stream_name, line));
    loop {
        let read = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..read]);
        let mut start = 0;
        while let Some(newline) = pending[start..].iter().position(|&b| b == b'\n') {
            emit(&pending[start..start + newline]);
            start += newline + 1;
        }
        pending.drain(..start);
        while pending.len() >= MAX_LINE {
            emit(&pending[..MAX_LINE]);
            pending.drain(..MAX_LINE);
        }
    }
    if !pending.is_empty() {
        emit(&pending);
    }
}

/// Logs one line and returns it as text.
fn emit_line(label: &str, pid: u32, stream: &'static str, line: &[u8]) -> String {
    let line = String::from_utf8_lossy(line);
    let line = line.strip_suffix('\r').unwrap_or(&line);
    tracing::info!(target: "sauna::output", source = label, pid, stream, "{line}");
    line.to_owned()
}

fn apply_identity(
    command: &mut Command,
    user: Option<&str>,
    group: Option<&str>,
) -> Result<(), SpawnError> {
    if user.is_none() && group.is_none() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        tracing::warn!(
            user = user.unwrap_or(""),
            group = group.unwrap_or(""),
            "not running as root: user/group switch ignored, the child runs as the supervisor's user"
        );
        return Ok(());
    }
    let mut gid = None;
    if let Some(name) = user {
        let found = User::from_name(name)
            .map_err(SpawnError::Lookup)?
            .ok_or_else(|| SpawnError::UnknownUser(name.to_owned()))?;
        command
            .uid(found.uid.as_raw())
            .env("USER", &found.name)
            .env("LOGNAME", &found.name)
            .env("HOME", &found.dir);
        gid = Some(found.gid.as_raw());
    }
    if let Some(name) = group {
        let found = Group::from_name(name)
            .map_err(SpawnError::Lookup)?
            .ok_or_else(|| SpawnError::UnknownGroup(name.to_owned()))?;
        gid = Some(found.gid.as_raw());
    }
    if let Some(gid) = gid {
        command.gid(gid);
    }
    Ok(())
}

fn rlimit_table(limits: &Rlimits) -> Vec<(Resource, u64)> {
    let mut table = Vec::new();
    if let Some(nofile) = limits.nofile {
        table.push((Resource::RLIMIT_NOFILE, nofile));
    }
    if let Some(core) = limits.core {
        table.push((Resource::RLIMIT_CORE, core.bytes()));
    }
    if let Some(address_space) = limits.address_space {
        table.push((Resource::RLIMIT_AS, address_space.bytes()));
    }
    table
}

/// Returns `fd` renumbered above every target number, so that `dup2` onto one target in the
/// child can never overwrite another passed descriptor that happens to sit on that number.
fn move_clear_of(fd: OwnedFd, targets: &[RawFd]) -> Result<OwnedFd, SpawnError> {
    if !targets.contains(&fd.as_raw_fd()) {
        return Ok(fd);
    }
    let floor = targets.iter().copied().max().unwrap_or(2) + 1;
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))
        .map_err(SpawnError::PassFd)?;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::runtime;
    use std::os::unix::net::UnixStream;

    #[test]
    fn child_gets_its_own_group_limits_and_passed_fd() {
        runtime().block_on(async {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let spec = ChildSpec {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo pgid=$(ps -o pgid= $$ | tr -d ' ') pid=$$; ulimit -n; echo hi >&5".into(),
                ],
                rlimits: Rlimits {
                    nofile: Some(77),
                    ..Rlimits::default()
                },
                pass_fds: vec![(OwnedFd::from(theirs), 5)],
                ..ChildSpec::default()
            };
            let child = spawn(spec).unwrap();
            let output = child.wait_with_output().await.unwrap();
            let text = String::from_utf8(output.stdout).unwrap();
            let mut lines = text.lines();
            let first = lines.next().unwrap();
            let (pgid, pid) = first
                .strip_prefix("pgid=")
                .and_then(|rest| rest.split_once(" pid="))
                .unwrap();
            assert_eq!(pgid, pid, "child leads its own process group");
            assert_eq!(lines.next(), Some("77"));
            let mut received = String::new();
            std::io::Read::read_to_string(&mut &ours, &mut received).unwrap();
            assert_eq!(received, "hi\n");
        });
    }

    #[test]
    fn merged_output_keeps_the_order_it_was_written_in() {
        let text = runtime().block_on(async {
            let child = spawn(ChildSpec {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "for i in 1 2 3; do echo out $i; echo err $i >&2; done".into(),
                ],
                merge_stderr: true,
                ..ChildSpec::default()
            })
            .unwrap();
            assert!(child.stderr.is_none());
            String::from_utf8(child.wait_with_output().await.unwrap().stdout).unwrap()
        });
        assert_eq!(text, "out 1\nerr 1\nout 2\nerr 2\nout 3\nerr 3\n");
    }

    #[test]
    fn a_default_pid_never_signals_our_own_group_or_init() {
        // killpg(0)/kill(0) would reach the supervisor itself; SIGCONT keeps the test harmless
        // even if the guard were missing, so the check is on the refusal.
        for pid in [0, 1] {
            assert_eq!(signal_group(pid, Signal::SIGCONT), Err(nix::Error::ESRCH));
            assert_eq!(signal_process(pid, Signal::SIGCONT), Err(nix::Error::ESRCH));
        }
    }

    #[test]
    fn a_missing_command_is_reported_by_name() {
        let error = runtime()
            .block_on(async {
                spawn(ChildSpec {
                    argv: vec!["/nonexistent/celery".into()],
                    ..ChildSpec::default()
                })
            })
            .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/celery"), "{error}");
    }
}
