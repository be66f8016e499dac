//! Ending a child's whole process group, for children that must leave nothing behind: a deploy
//! hook that timed out, or one that exited and left a background process in its group, and an
//! upgrade's successor that failed (a wrapper script and the supervisor it runs without `exec`).
//!
//! Every child leads its own group (`spawn`), so the group is the child plus everything it
//! forked that did not move away with `setsid`. A shell running `sleep 60 &` keeps that sleep in
//! its group: killing only the leader would orphan it to PID 1 and leave its end of the output
//! pipe open. So the whole group gets TERM first (a migration can roll its transaction back),
//! then KILL once `grace` has passed with anything still alive. A process that left the group
//! escapes this, as it escapes any supervisor short of a cgroup (systemd's `KillMode=`).
//!
//! Group membership is read from `/proc` (`procfs::group_alive`), which ignores zombies: a
//! zombie member is already dead and waits only for its parent to reap it.

use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::time::Instant;

use super::procfs;
use super::spawn::signal_group;

/// How often a group is checked for members while it is given time to exit.
const CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// How long members are given to die after KILL. KILL cannot be caught, but a member is only
/// gone once the kernel has run its exit; callers (and `upgrade`, which checks that no member
/// still holds a socket) expect an empty group when these functions return.
const KILL_SETTLE: Duration = Duration::from_secs(2);

/// Ends the group `child` leads (`pgid`, its pid at spawn): TERM to every member, KILL to what is
/// left after `grace`. Returns the leader's exit status once the group is empty.
pub async fn terminate(
    child: &mut Child,
    pgid: u32,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + grace;
    signal(pgid, Signal::SIGTERM);
    let status = tokio::time::timeout_at(deadline, child.wait()).await;
    let emptied = status.is_ok() && wait_until_empty(pgid, deadline).await;
    if !emptied {
        kill(pgid).await;
    }
    match status {
        Ok(status) => status,
        Err(_) => child.wait().await,
    }
}

/// After the leader of group `pgid` has exited: ends whatever is left in the group the same way
/// (TERM, then KILL after `grace`), returning once it is empty. Returns whether anything was left.
pub async fn clear(pgid: u32, grace: Duration) -> bool {
    if !procfs::group_alive(pgid) {
        return false;
    }
    signal(pgid, Signal::SIGTERM);
    if !wait_until_empty(pgid, Instant::now() + grace).await {
        kill(pgid).await;
    }
    true
}

/// KILL to every member of `pgid`, then waits (bounded) until the kernel has ended them.
async fn kill(pgid: u32) {
    signal(pgid, Signal::SIGKILL);
    if !wait_until_empty(pgid, Instant::now() + KILL_SETTLE).await {
        tracing::warn!("process group {pgid} still has members {KILL_SETTLE:?} after KILL");
    }
}

/// Waits until group `pgid` has no live member or `deadline` passes; true when it is empty.
async fn wait_until_empty(pgid: u32, deadline: Instant) -> bool {
    loop {
        if !procfs::group_alive(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}

fn signal(pgid: u32, signal: Signal) {
    if let Err(error) = signal_group(pgid, signal) {
        tracing::warn!("cannot send {signal} to process group {pgid}: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::spawn::{ChildSpec, spawn};
    use crate::test_support::runtime;

    /// Starts `sh -c script`; the script prints the pid of a background `sleep` first.
    async fn shell_with_a_background_sleep(script: &str) -> (Child, u32, u32) {
        use tokio::io::AsyncBufReadExt;
        let mut child = spawn(ChildSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..ChildSpec::default()
        })
        .unwrap();
        let pid = child.id().unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).await.unwrap();
        (child, pid, line.trim().parse().unwrap())
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|text| procfs::parse_stat(&text))
            .is_some_and(|stat| stat.state != 'Z')
    }

    #[test]
    fn terminate_ends_the_leader_and_its_background_children() {
        runtime().block_on(async {
            let (mut child, pgid, sleep) =
                shell_with_a_background_sleep("sleep 60 & echo $!; sleep 60").await;
            assert!(alive(sleep));
            let status = terminate(&mut child, pgid, Duration::from_secs(2))
                .await
                .unwrap();
            assert!(!status.success());
            assert!(!procfs::group_alive(pgid), "the group is empty");
            assert!(!alive(sleep), "the background sleep is gone");
        });
    }

    #[test]
    fn clear_ends_what_an_exited_leader_left_behind() {
        runtime().block_on(async {
            let (mut child, pgid, sleep) =
                shell_with_a_background_sleep("sleep 60 & echo $!").await;
            assert!(child.wait().await.unwrap().success());
            assert!(alive(sleep), "the leader exited, its sleep still runs");
            assert!(
                clear(pgid, Duration::from_secs(2)).await,
                "something was left"
            );
            assert!(!alive(sleep));
            assert!(
                !clear(pgid, Duration::from_secs(2)).await,
                "nothing is left now"
            );
        });
    }
}
