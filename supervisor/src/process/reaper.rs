//! The group reaper: a tiny process forked at start-up whose only job is to SIGKILL whatever is
//! left in the children's process groups once the supervisor is gone — however it went.
//!
//! `PR_SET_PDEATHSIG` (see `spawn`) kills each *direct* child when the supervisor dies, but not a
//! grandchild: a program started as `sh -c "worker & …"`, or a Celery master whose prefork
//! children outlive it, would leave orphans re-parented to PID 1 after a `kill -9` of the
//! supervisor or an OOM kill. Nothing inside a SIGKILLed process can act, so a second process
//! must: the supervisor tells the reaper each new process group over a pipe; the reaper sees
//! end-of-file on that pipe when the supervisor exits for any reason (the kernel closes the
//! write end), then SIGKILLs every member of the groups it was told about, and exits. After a
//! clean stop the groups are already empty and nothing is killed.
//!
//! Forgetting is done by the reaper itself: whenever it learns a new group, it drops the groups
//! that no longer have a single process. An empty process group can never gain a member again,
//! and its number can only come back as a new group led by a new process, so pruning empty
//! groups is exact — and it is what keeps a recycled pid from being mistaken for ours.
//!
//! The pipe's write end is close-on-exec, so children never hold it open (which would hide the
//! supervisor's death), and the reaper sits in its own process group ignoring terminal and stop
//! signals, so a Ctrl-C aimed at the supervisor does not take the reaper with it.
//!
//! The reaper is forked, not executed, so close-on-exec does not apply to it: it would keep a
//! copy of every descriptor the supervisor had at that instant — in an upgrade's successor, the
//! inherited listening sockets, control socket and hand-over channel, which would stay bound
//! for as long as the reaper lives. It closes everything but its pipe and stdio first thing.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal, killpg, signal};
use nix::unistd::{ForkResult, Pid, fork, pipe2, setpgid};

use super::procfs::read_processes;

/// The write end of the pipe to the reaper, set once at start-up.
static REAPER: OnceLock<File> = OnceLock::new();

/// How long the reaper keeps killing a group whose members are still forking.
const KILL_PERSISTENCE: Duration = Duration::from_secs(2);

/// Forks the reaper. Without it (an error here), children still die through
/// `PR_SET_PDEATHSIG`; only grandchildren could be orphaned, so the caller logs and goes on.
///
/// # Safety
///
/// Must be called while the process has exactly one thread (before the async runtime is built):
/// the forked child runs ordinary Rust code, which is only sound after `fork` when no other
/// thread could have held a lock at that instant.
pub unsafe fn install() -> nix::Result<()> {
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: single-threaded, as the caller guarantees.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(write_end);
            reaper_main(read_end)
        }
        ForkResult::Parent { .. } => {
            drop(read_end);
            let _ = REAPER.set(File::from(write_end));
            Ok(())
        }
    }
}

/// Tells the reaper about a new process group led by `pgid`.
pub fn track(pgid: u32) {
    if let Some(mut pipe) = REAPER.get() {
        // One short line is below PIPE_BUF, so the write is atomic and never interleaves.
        if let Err(error) = writeln!(pipe, "{pgid}") {
            tracing::warn!("the group reaper is gone ({error}); grandchildren may outlive a crash");
        }
    }
}

fn reaper_main(pipe: OwnedFd) -> ! {
    close_all_but(pipe.as_raw_fd());
    let _ = setpgid(Pid::from_raw(0), Pid::from_raw(0));
    for ignored in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code; this process is single-threaded.
        let _ = unsafe { signal(ignored, SigHandler::SigIgn) };
    }
    // SAFETY: the name is a NUL-terminated static string; PR_SET_NAME only copies it.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"sauna-reaper".as_ptr(), 0, 0, 0) };

    let mut groups = BTreeSet::new();
    for line in BufReader::new(File::from(pipe)).lines() {
        let Ok(line) = line else { break };
        if let Ok(pgid) = line.trim().parse::<u32>() {
            groups.insert(pgid);
            prune_empty(&mut groups);
        }
    }
    kill_groups(&groups);
    // SAFETY: _exit ends this process without running the parent's atexit handlers or
    // flushing its copied stdio buffers, which belong to the supervisor.
    unsafe { libc::_exit(0) }
}

/// Closes every descriptor above stdio except `keep`.
fn close_all_but(keep: RawFd) {
    let open: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    // The directory's own descriptor is in the list but already closed: EBADF, harmless.
    for fd in open.into_iter().filter(|fd| *fd > 2 && *fd != keep) {
        // SAFETY: this forked process never returns to the code that owned these descriptors
        // (`reaper_main` ends in `_exit`), so closing them under that code cannot double-close.
        unsafe { libc::close(fd) };
    }
}

fn prune_empty(groups: &mut BTreeSet<u32>) {
    let processes = read_processes(Path::new("/proc"));
    groups.retain(|pgid| processes.iter().any(|process| process.pgrp == *pgid));
}

fn kill_groups(groups: &BTreeSet<u32>) {
    let deadline = Instant::now() + KILL_PERSISTENCE;
    loop {
        let processes = read_processes(Path::new("/proc"));
        let alive: BTreeSet<u32> = processes
            .iter()
            .filter(|process| process.state != 'Z' && groups.contains(&process.pgrp))
            .map(|process| process.pgrp)
            .collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pgid in alive {
            // Only groups `track` was told about are here: led by a child, so never 0 or 1
            // (which `killpg` would take as our own group or init's).
            match i32::try_from(pgid) {
                Ok(raw) if raw > 1 => {
                    let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
