//! Upgrading sauna-supervisor itself without refusing a connection: the running supervisor (the
//! *old* one) starts a new binary (the *successor*), which inherits every listening socket —
//! web (TCP and Unix), metrics, control — plus one end of a socketpair, the *hand-over channel*.
//!
//! The sequence, with the channel's messages ([`Message`], one JSON object per line):
//!
//! 1. The old process spawns the successor with its own arguments (so `run -c …` re-reads the
//!    config), `$SAUNA_UPGRADE_FDS` describing the inherited descriptors ([`Description`]: the
//!    channel and the rows of the `listeners` fd table) and systemd's `$NOTIFY_SOCKET` and
//!    `$WATCHDOG_USEC`. Only those descriptors lose close-on-exec, in the forked child. The
//!    successor leads a process group of its own, so that everything it forks without moving
//!    away — a wrapper script that runs the real binary without `exec`, and that binary — can
//!    be stopped as a whole; it gets no `PR_SET_PDEATHSIG` and is not reported to the group
//!    reaper, since it must outlive the old process.
//! 2. The successor ([`Inherited::take_from_env`] in `run`) adopts the sockets whose address is
//!    still in its config, closes the others and binds new addresses, starts its web pool and the
//!    `reload = "rolling"` programs, and serves metrics at once. Its web front accepts only once
//!    every worker is ready, so until then each connection goes to the old front, which accepts
//!    from the same sockets. It reports `ready` (with its own pid, which a wrapper script's is
//!    not), or `failed` with the reason (the config's diagnostics, an app's traceback) and exits.
//!    Until it is ready it has no signal handlers, so a TERM ends it at once.
//! 3. On `ready`, the old process tells systemd `MAINPID=<successor>`, says `main_pid` (the
//!    successor pings the watchdog and serves the control socket from now on, a reload waiting
//!    for step 4), stops accepting, lets its open connections make one more request (answered
//!    with `Connection: close`), stops its roles without unlinking any socket file, says
//!    `released` and exits 0.
//! 4. On `released`, and only then, the successor starts the remaining programs (two copies of
//!    a `restart` program, a server on a fixed port say, must never run at once) and beat, and
//!    sends `READY=1`. End-of-file without `released` means the old process gave up on it (a
//!    missed deadline) or died mid-hand-over: the successor cannot know which, so it stops its
//!    roles without unlinking any socket file and exits non-zero ([`Word::Gone`]). Two
//!    supervisors serving one port is worse than none: under systemd the service restarts.
//!
//! A successor that exits, fails or misses the deadline before `ready` is stopped as a whole
//! group (TERM, then KILL after [`STOP_GRACE`]; its own children die with it through their
//! `PR_SET_PDEATHSIG` and its reaper), and before `upgrade` answers the old process checks that
//! no process but itself still holds one of the sockets it handed over, killing any that does.
//! The old process then goes on as if nothing happened. A successor that dies after `ready` but
//! before `released` is noticed at the end of the hand-over ([`Successor::is_gone`]); the old
//! process then starts its roles again on its own copies of the sockets (`handover`).
//!
//! This module owns the wire format, spawning the successor and watching it until it is ready
//! ([`UpgradeRun`]), and the successor's side of the inheritance. The table of sockets handed
//! over, and binding or adopting them, are `listeners`'. When to upgrade, and the order in which
//! roles stop and start, belong to the main loop (`supervisor`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use proxy_conf::Listen;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::control::Responder;
use crate::listeners::{self, BindError, FdTable, Listener, Role, Row};
use crate::process::{group, procfs, spawn};

/// The environment variable that describes the inherited descriptors to a successor.
pub const ENV: &str = "SAUNA_UPGRADE_FDS";

/// How long a successor that failed gets between SIGTERM and SIGKILL. Short: it serves nothing
/// the old process does not serve too, and has no handler for TERM until it is ready.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// How long processes found still holding a handed-over socket get to die after SIGKILL.
const HOLDERS_SETTLE: Duration = Duration::from_secs(2);

/// Longest line accepted on the channel (a traceback fits comfortably).
const MAX_LINE: usize = 1024 * 1024;

/// What `$SAUNA_UPGRADE_FDS` holds, as JSON: the channel's descriptor and the listening sockets'
/// fd table, one [`Row`] per socket by role and address. Both sides are the same binary's
/// version, or at least agree on this format: a successor that cannot read it fails to start
/// and the old supervisor goes on.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// The successor's end of the hand-over channel.
    pub channel: RawFd,
    /// Every inherited listening socket.
    #[serde(default)]
    pub sockets: Vec<Row>,
}

impl Description {
    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.channel];
        fds.extend(self.sockets.iter().map(|row| row.fd));
        fds
    }
}

/// One line on the hand-over channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Message {
    /// Successor → old: a step of its start, for the `upgrade` client.
    Progress {
        /// One line.
        message: String,
    },
    /// Successor → old: serving; the old process may hand over.
    Ready {
        /// The successor's pid.
        pid: u32,
    },
    /// Successor → old: it cannot start, and exits.
    Failed {
        /// What failed: the config's diagnostics, an app's traceback.
        message: String,
    },
    /// Old → successor: systemd now tracks the successor as the main process.
    MainPid,
    /// Old → successor: the old roles have stopped; start the rest and take the control socket.
    Released,
}

/// What the successor hears from the old supervisor while it takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Word {
    /// [`Message::MainPid`]: serve the control socket.
    MainPid,
    /// [`Message::Released`]: the old roles have stopped; take over.
    Released,
    /// The channel closed without `released`: the old process gave up on this one or died
    /// mid-hand-over. Abort.
    Gone,
}

impl Message {
    fn line(&self) -> Vec<u8> {
        // Serializing a plain enum of strings and integers cannot fail.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// An upgrade in progress: the successor is starting.
pub struct UpgradeRun {
    task: JoinHandle<Result<Successor, Failure>>,
    progress: mpsc::UnboundedReceiver<String>,
    /// The `upgrade` client waiting for the outcome (none for SIGUSR2).
    pub waiter: Option<Responder>,
    /// The successor's pid (the leader of its process group).
    pub pid: u32,
    /// The inodes of the sockets handed over.
    inodes: BTreeSet<u64>,
}

/// What a run reports to the main loop.
pub enum UpgradeEvent {
    /// A step, for the waiting client and the log.
    Progress(String),
    /// The successor is ready, or it failed and is gone.
    Finished(Box<Result<Successor, Failure>>),
}

/// Why an upgrade failed; the old supervisor keeps running untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// One line: what failed.
    pub message: String,
    /// More text: the successor's diagnostics or traceback.
    pub detail: Option<String>,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            detail: None,
        }
    }
}

/// A successor that reported ready.
pub struct Successor {
    /// The pid of the process that said `ready` (a wrapper script's child, say).
    pub pid: u32,
    /// The leader of its process group: the child the old process started.
    leader: u32,
    /// The inodes of the sockets handed over.
    inodes: BTreeSet<u64>,
    writer: OwnedWriteHalf,
    /// Read only to notice end-of-file.
    reader: OwnedReadHalf,
}

impl Successor {
    /// Whether the successor is gone: its process has exited, or its end of the channel is
    /// closed. A wrapper script can keep the channel open after the real successor died, so
    /// the process is checked too.
    pub fn is_gone(&self) -> bool {
        let exited = procfs::stat(self.pid).is_none_or(|process| process.state == 'Z');
        let mut byte = [0u8; 64];
        let closed = loop {
            match self.reader.try_read(&mut byte) {
                Ok(0) => break true,
                // A stray line after `ready` is ignored, as during the start.
                Ok(_) => continue,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        exited || closed
    }

    /// After it died mid-hand-over: ends what is left of its group (a wrapper script still
    /// holding the sockets, say) and anything else holding a socket handed over to it. Returns
    /// what could not be ended.
    pub async fn end(&self) -> Option<String> {
        group::clear(self.leader, STOP_GRACE).await;
        end_holders(&self.inodes).await
    }

    /// Tells the successor something; false (and logged) when it cannot be reached.
    pub async fn tell(&mut self, message: Message) -> bool {
        match self.writer.write_all(&message.line()).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    pid = self.pid,
                    "upgrade: cannot reach the new supervisor: {error}"
                );
                false
            }
        }
    }
}

impl UpgradeRun {
    /// Spawns `binary` with this process's arguments, handing it the listening sockets of
    /// `sockets` (duplicates gathered by the main loop), `env` (systemd's variables) and a
    /// hand-over channel, and watches it until it is ready, failed or late (`timeout`). The
    /// caller sets [`UpgradeRun::waiter`].
    pub fn start(
        binary: &Path,
        sockets: FdTable,
        env: &[(&'static str, OsString)],
        timeout: Duration,
    ) -> Result<UpgradeRun, Failure> {
        let (ours, theirs) = StdUnixStream::pair().map_err(|error| {
            Failure::new(format!("cannot create the hand-over channel: {error}"))
        })?;
        let description = Description {
            channel: theirs.as_raw_fd(),
            sockets: sockets.rows(),
        };
        let fds = description.fds();
        let inodes = fds
            .iter()
            .map(|&fd| {
                // SAFETY: every number is open for as long as `theirs` and `sockets` live, which
                // is past this statement.
                procfs::socket_inode(&unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
            })
            .collect::<std::io::Result<BTreeSet<u64>>>()
            .map_err(|error| Failure::new(format!("cannot identify the sockets: {error}")))?;
        let json = serde_json::to_string(&description)
            .map_err(|error| Failure::new(format!("cannot describe the sockets: {error}")))?;
        let mut command = tokio::process::Command::new(binary);
        command
            .args(std::env::args_os().skip(1))
            .env(ENV, json)
            .envs(env.iter().map(|(name, value)| (name, value)))
            // Its own group: on failure it is stopped with everything it forked.
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: between fork and exec only fcntl(2) runs, which is async-signal-safe; it
        // touches the child's copies of descriptors this process owns until after the spawn.
        // Every descriptor is close-on-exec here (Rust and tokio open them so); clearing the flag
        // in the child alone means no other child spawned meanwhile can inherit them.
        unsafe {
            command.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|error| Failure::new(format!("cannot start {}: {error}", binary.display())))?;
        // The child has its copies; closing ours makes its exit visible as end-of-file.
        drop(theirs);
        drop(sockets);
        let pid = child.id().unwrap_or_default();
        ours.set_nonblocking(true)
            .map_err(|error| Failure::new(format!("hand-over channel: {error}")))?;
        let channel = UnixStream::from_std(ours)
            .map_err(|error| Failure::new(format!("hand-over channel: {error}")))?;
        let (progress_sender, progress) = mpsc::unbounded_channel();
        let binary = binary.to_owned();
        let watched = Watched {
            child,
            pid,
            inodes: inodes.clone(),
        };
        let task = tokio::spawn(async move {
            watch(watched, channel, &binary, timeout, progress_sender).await
        });
        Ok(UpgradeRun {
            task,
            progress,
            waiter: None,
            pid,
            inodes,
        })
    }

    /// The old supervisor stops while the successor is still starting: kill the successor's
    /// whole group at once (its workers follow through `PR_SET_PDEATHSIG`, its programs' groups
    /// through its reaper) and whatever else holds a socket handed over to it, so that no
    /// half-started copy outlives us or keeps a port bound, and tell the waiting client.
    pub async fn abandon(self) {
        self.task.abort();
        group::clear(self.pid, Duration::ZERO).await;
        if let Some(left) = end_holders(&self.inodes).await {
            tracing::warn!(pid = self.pid, "upgrade: {left}");
        }
        if let Some(waiter) = self.waiter {
            waiter.error(
                crate::control::ErrorKind::Failed,
                format!(
                    "the running supervisor is stopping; the new one (pid {}) was killed",
                    self.pid
                ),
                None,
            );
        }
    }

    /// The run's next event, for the main loop's `select!`; progress lines come first.
    pub async fn next_event(&mut self) -> UpgradeEvent {
        tokio::select! {
            biased;
            Some(line) = self.progress.recv() => UpgradeEvent::Progress(line),
            finished = &mut self.task => UpgradeEvent::Finished(Box::new(finished.unwrap_or_else(
                |error| Err(Failure::new(format!("the upgrade task failed: {error}"))),
            ))),
        }
    }
}

/// The successor as the old process started it: the child (a wrapper script, perhaps), which
/// leads the successor's process group, and the inodes of every socket handed over.
struct Watched {
    child: Child,
    pid: u32,
    inodes: BTreeSet<u64>,
}

/// Reads the successor's messages until `ready`; on anything else stops it.
async fn watch(
    mut watched: Watched,
    channel: UnixStream,
    binary: &Path,
    timeout: Duration,
    progress: mpsc::UnboundedSender<String>,
) -> Result<Successor, Failure> {
    let pid = watched.pid;
    let (reader, writer) = channel.into_split();
    let mut reader = BufReader::new(reader);
    let child = &mut watched.child;
    let outcome = tokio::time::timeout(timeout, async {
        let mut line = String::new();
        loop {
            line.clear();
            let read = (&mut reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await;
            match read {
                Ok(0) | Err(_) => {
                    // End-of-file: the successor exited (or closed the channel) before ready.
                    let status = child.wait().await;
                    return Err(Failure::new(match status {
                        Ok(status) => format!(
                            "the new supervisor (pid {pid}, {}) exited before it was ready: {status}",
                            binary.display()
                        ),
                        Err(error) => format!(
                            "the new supervisor (pid {pid}) closed the hand-over channel: {error}"
                        ),
                    }));
                }
                Ok(_) => {}
            }
            match serde_json::from_str::<Message>(line.trim_end()) {
                Ok(Message::Progress { message }) => {
                    let _ = progress.send(format!("new supervisor (pid {pid}): {message}"));
                }
                Ok(Message::Ready { pid: ready }) => return Ok(ready),
                Ok(Message::Failed { message }) => {
                    return Err(Failure {
                        message: format!("the new supervisor (pid {pid}) cannot start"),
                        detail: Some(message),
                    });
                }
                Ok(other) => {
                    tracing::debug!(pid, "upgrade: unexpected message from the new supervisor: {other:?}");
                }
                Err(error) => {
                    return Err(Failure::new(format!(
                        "the new supervisor (pid {pid}) sent {:?} on the hand-over channel ({error}); \
                         is {} a sauna-supervisor of a compatible version?",
                        line.trim_end(),
                        binary.display()
                    )));
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(Failure::new(format!(
            "the new supervisor (pid {pid}) was not ready within {timeout:?}"
        )))
    });
    match outcome {
        // The child handle is dropped: it is never killed from here on, and should the successor
        // exit while we still run, tokio reaps it.
        Ok(ready) => Ok(Successor {
            pid: own_pid(ready, pid),
            leader: pid,
            inodes: watched.inodes,
            writer,
            reader: reader.into_inner(),
        }),
        Err(mut failure) => {
            // Our end of the channel closes first: a successor that gets ready meanwhile reads
            // end-of-file without `released`, and aborts instead of taking over.
            drop((reader, writer));
            if let Some(left) = stop(&mut watched).await {
                failure.message.push_str(&format!("; {left}"));
            }
            Err(failure)
        }
    }
}

/// The pid the successor reported in `ready`, if it is in the group we started (a wrapper
/// script's child); else the child we started.
fn own_pid(reported: u32, leader: u32) -> u32 {
    match procfs::stat(reported) {
        Some(process) if process.pgrp == leader && process.state != 'Z' => reported,
        _ => leader,
    }
}

/// Ends the successor's whole group — TERM, then KILL after [`STOP_GRACE`] — and then whatever
/// else still holds a socket handed over to it (something that left the group). Returns what
/// could not be ended, for the failure message; `None` when nothing of the successor is left.
async fn stop(watched: &mut Watched) -> Option<String> {
    let pid = watched.pid;
    match group::terminate(&mut watched.child, pid, STOP_GRACE).await {
        Ok(status) => tracing::info!(
            pid,
            "upgrade: the new supervisor's group has ended ({status})"
        ),
        Err(error) => tracing::warn!(pid, "upgrade: cannot wait for the new supervisor: {error}"),
    }
    end_holders(&watched.inodes).await
}

/// Kills every process but this one that holds one of the sockets `inodes` (handed over to a
/// successor that is gone: whatever holds one now escaped its group) and waits until they are
/// gone. Returns what is left after [`HOLDERS_SETTLE`], for the failure message.
async fn end_holders(inodes: &BTreeSet<u64>) -> Option<String> {
    let me = std::process::id();
    let holders = procfs::socket_holders(inodes, me);
    if holders.is_empty() {
        return None;
    }
    for (holder, _) in &holders {
        tracing::warn!(
            pid = holder,
            "upgrade: a process outside the new supervisor's group still holds a socket handed \
             over to it; killing it"
        );
        let _ = spawn::signal_process(*holder, nix::sys::signal::Signal::SIGKILL);
    }
    let deadline = tokio::time::Instant::now() + HOLDERS_SETTLE;
    loop {
        let left = procfs::socket_holders(inodes, me);
        if left.is_empty() {
            return None;
        }
        if tokio::time::Instant::now() >= deadline {
            let pids: Vec<String> = left.iter().map(|(pid, _)| pid.to_string()).collect();
            return Some(format!(
                "pid(s) {} still hold a socket handed over to it",
                pids.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The successor's view: what it inherited, and its end of the channel.
#[derive(Debug)]
pub struct Inherited {
    /// The old supervisor's listening sockets, by role and address; each role takes its own.
    sockets: FdTable,
    channel: StdUnixStream,
}

impl Inherited {
    /// Reads and removes `$SAUNA_UPGRADE_FDS`; `None` for an ordinary start. Every inherited
    /// descriptor is made close-on-exec again at once, so no worker or program inherits it.
    ///
    /// # Safety
    ///
    /// Must be called while the process has exactly one thread (see `Notifier::from_env_take`:
    /// the environment is changed), and at most once (the descriptors are taken over).
    pub unsafe fn take_from_env() -> Result<Option<Inherited>, String> {
        let Some(value) = std::env::var_os(ENV) else {
            return Ok(None);
        };
        // SAFETY: single-threaded, as the caller guarantees.
        unsafe { std::env::remove_var(ENV) };
        let description: Description = value
            .to_str()
            .and_then(|text| serde_json::from_str(text).ok())
            .ok_or_else(|| {
                format!(
                    "${ENV} is not a description of inherited sockets: {}",
                    value.to_string_lossy()
                )
            })?;
        let fds = description.fds();
        if let Some(fd) = fds
            .iter()
            .enumerate()
            .find_map(|(index, fd)| fds[..index].contains(fd).then_some(*fd))
        {
            return Err(format!("${ENV} names descriptor {fd} twice"));
        }
        let not_inherited = |error: listeners::ClaimError| {
            format!(
                "${ENV} names descriptor {}, which was not inherited",
                error.fd
            )
        };
        // SAFETY: the old supervisor handed these descriptors to this process alone, each is
        // named once (checked above), and this function runs at most once.
        let channel =
            unsafe { listeners::claim_inherited(description.channel) }.map_err(not_inherited)?;
        // SAFETY: as above.
        let sockets = unsafe { FdTable::from_rows(description.sockets) }.map_err(not_inherited)?;
        Ok(Some(Inherited {
            sockets,
            channel: StdUnixStream::from(channel),
        }))
    }

    /// The inherited listening sockets, for each role to take its own from.
    pub fn sockets(&mut self) -> &mut FdTable {
        &mut self.sockets
    }

    /// Tells the old supervisor something.
    pub fn tell(&self, message: &Message) {
        tell(&self.channel, message);
    }

    /// A second handle on the channel: for the main loop to wait for `released` on, and for
    /// `run` to report a failure with after this value is gone.
    pub fn channel(&self) -> std::io::Result<StdUnixStream> {
        self.channel.try_clone()
    }

    /// The web listeners for `listen` (one per `[web].listen` entry, in order): the inherited
    /// one where the address is the same, else a new one bound with `backlog`. Inherited sockets
    /// whose address left the config are closed.
    pub fn web_listeners(
        &mut self,
        listen: &[Listen],
        backlog: u32,
    ) -> Result<Vec<Listener>, BindError> {
        let listeners = self
            .sockets
            .open_all(listen, &listeners::Options::new(Role::Web, backlog));
        for (address, _) in self.sockets.take_role(Role::Web) {
            tracing::info!(
                "upgrade: {address} is no longer in [web].listen; closing the inherited socket"
            );
        }
        listeners
    }
}

/// Writes `message` to the old supervisor (a few bytes on a socket; never blocks for long).
pub fn tell(channel: &StdUnixStream, message: &Message) {
    if let Err(error) = (&*channel).write_all(&message.line()) {
        tracing::warn!("upgrade: cannot reach the old supervisor: {error}");
    }
}

/// The successor's wait for the old supervisor, in the main loop's `select!`.
pub struct Predecessor {
    lines: tokio::io::Lines<BufReader<UnixStream>>,
}

impl Predecessor {
    /// Listens on `channel` (from [`Inherited::channel`]).
    pub fn new(channel: StdUnixStream) -> std::io::Result<Predecessor> {
        channel.set_nonblocking(true)?;
        Ok(Predecessor {
            lines: BufReader::new(UnixStream::from_std(channel)?).lines(),
        })
    }

    /// The old supervisor's next word. End-of-file (or a broken channel) without `released` is
    /// [`Word::Gone`]: never a go, since the old process may still serve. Cancel-safe.
    pub async fn next(&mut self) -> Word {
        loop {
            match self.lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<Message>(&line) {
                    Ok(Message::MainPid) => return Word::MainPid,
                    Ok(Message::Released) => return Word::Released,
                    other => {
                        tracing::debug!("upgrade: unexpected hand-over line {line:?}: {other:?}");
                    }
                },
                Ok(None) | Err(_) => return Word::Gone,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::runtime;

    /// Runs `script` as a successor that never gets ready, handing it one listening socket;
    /// returns the failure and the socket's inode once the run has ended.
    fn failed_successor(script: &str) -> (Failure, u64, std::net::TcpListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("successor.sh");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = procfs::socket_inode(&listener).unwrap();
        let mut sockets = FdTable::default();
        sockets.insert(
            Role::Web,
            Listen::Tcp(listener.local_addr().unwrap()),
            std::os::fd::OwnedFd::from(listener.try_clone().unwrap()),
        );
        let failure = runtime().block_on(async {
            let mut run =
                UpgradeRun::start(&path, sockets, &[], Duration::from_millis(500)).unwrap();
            loop {
                match run.next_event().await {
                    UpgradeEvent::Progress(_) => {}
                    UpgradeEvent::Finished(finished) => match *finished {
                        Ok(_) => panic!("the script said ready"),
                        Err(failure) => break failure,
                    },
                }
            }
        });
        (failure, inode, listener)
    }

    #[test]
    fn a_late_successor_goes_with_its_whole_group_and_every_copy_of_the_sockets() {
        // A wrapper without `exec`, its foreground child and a background one that leaves the
        // group (as a daemonizing script would): all hold the inherited socket.
        let (failure, inode, _listener) =
            failed_successor("#!/bin/sh\nsetsid sleep 60 &\nsleep 60\n");
        assert!(
            failure.message.contains("was not ready within"),
            "{failure}"
        );
        assert!(
            !failure.message.contains("still hold"),
            "every holder was ended: {failure}"
        );
        let holders = procfs::socket_holders(&BTreeSet::from([inode]), std::process::id());
        assert!(holders.is_empty(), "{holders:?}");
    }

    #[test]
    fn the_description_round_trips_and_lists_every_descriptor() {
        let description = Description {
            channel: 7,
            sockets: vec![
                Row {
                    role: Role::Control,
                    address: Listen::Unix("/run/sauna/control.sock".into()),
                    fd: 8,
                },
                Row {
                    role: Role::Metrics,
                    address: Listen::Tcp("127.0.0.1:9100".parse().expect("address")),
                    fd: 9,
                },
                Row {
                    role: Role::Web,
                    address: Listen::Tcp("0.0.0.0:8000".parse().expect("address")),
                    fd: 10,
                },
                Row {
                    role: Role::Web,
                    address: Listen::Unix("/run/app; odd=name.sock".into()),
                    fd: 11,
                },
            ],
        };
        let text = serde_json::to_string(&description).expect("serialize");
        let back: Description = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, description);
        assert_eq!(back.fds(), [7, 8, 9, 10, 11]);
        let minimal: Description = serde_json::from_str(r#"{"channel":3}"#).expect("parse");
        assert_eq!(minimal.fds(), [3]);
    }

    #[test]
    fn messages_are_one_json_line_each() {
        let messages = [
            Message::Progress {
                message: "web pool ready".to_owned(),
            },
            Message::Ready { pid: 42 },
            Message::Failed {
                message: "sauna.toml:3:1: bad\nsecond line".to_owned(),
            },
            Message::MainPid,
            Message::Released,
        ];
        for message in messages {
            let line = message.line();
            assert_eq!(line.iter().filter(|byte| **byte == b'\n').count(), 1);
            assert_eq!(line.last(), Some(&b'\n'));
            let back: Message = serde_json::from_slice(&line).expect("parse");
            assert_eq!(back, message);
        }
        assert_eq!(
            String::from_utf8(Message::Released.line()).expect("UTF-8"),
            "{\"msg\":\"released\"}\n"
        );
    }
}
