//! What `/proc` says about processes and the machine: one process's state and resident memory
//! (a web worker's RSS and PSS, whether a stopped supervisor is gone), the resident memory of a program
//! instance's whole process tree, whether its process group still has live members, the process
//! list the group reaper scans, which processes hold given sockets open (an upgrade checks that
//! a stopped successor left no copy of a listening socket behind), and the machine's total
//! memory (`emit`'s sizing).
//!
//! A Celery worker's memory lives mostly in its prefork children, so the leader's own RSS says
//! little: the tree is every process descending from the leader (by parent pid) plus every
//! process still in the leader's process group (a grandchild whose parent died was re-parented
//! away from the tree but stays in the group). Shared pages are counted once per process, as
//! `ps` and every peer do; the sum is an upper bound, which is what a limit should compare.
//!
//! This module only observes; deciding what a value means belongs to the actor.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// What one `/proc/PID/stat` line says about tree membership and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// The process id.
    pub pid: u32,
    /// Its parent.
    pub ppid: u32,
    /// Its process group.
    pub pgrp: u32,
    /// The state letter: `R`, `S`, `D`, `Z` (zombie), ….
    pub state: char,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

/// Parses the text of `/proc/PID/stat`. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted after the *last* `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, tail) = text.rsplit_once(')')?;
    let pid = head.split_once(' ')?.0.trim().parse().ok()?;
    // After the name: state(3) ppid(4) pgrp(5) … rss(24), so index 0 here is field 3.
    let fields: Vec<&str> = tail.split_whitespace().collect();
    Some(ProcStat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        rss_pages: fields.get(21)?.parse().ok()?,
    })
}

/// The pids of `root`'s tree among `processes`: `root`, its descendants, and members of the
/// process group `root` leads.
pub fn tree_members(processes: &[ProcStat], root: u32) -> BTreeSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for process in processes {
        children.entry(process.ppid).or_default().push(process.pid);
    }
    let mut members: BTreeSet<u32> = processes
        .iter()
        .filter(|process| process.pid == root || process.pgrp == root)
        .map(|process| process.pid)
        .collect();
    let mut pending: Vec<u32> = members.iter().copied().collect();
    while let Some(pid) = pending.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            if members.insert(*child) {
                pending.push(*child);
            }
        }
    }
    members
}

/// What `/proc/PID/stat` says about `pid`, or `None` when there is no such process (or it
/// vanished while being read). A zombie is still there, with state `Z`.
pub fn stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Resident memory in bytes of the single process `pid` (not its children), or `None` when it is
/// gone.
pub fn rss(pid: u32) -> Option<u64> {
    stat(pid).map(|process| process.rss_pages.saturating_mul(page_size()))
}

/// Proportional set size in bytes of `pid` (`Pss:` of `/proc/PID/smaps_rollup`): each shared
/// page counted as its share among the processes mapping it, so the PSS of workers forked from
/// one template add up to what they really cost, where their RSS counts the shared pages in
/// every one of them. `None` when the process is gone or the kernel has no `smaps_rollup`.
pub fn pss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss(&text)
}

/// The `Pss:` line of an `smaps_rollup` text, in bytes.
fn parse_pss(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Every process visible in `proc_root` (normally `/proc`); processes that vanish while being
/// read are skipped.
pub fn read_processes(proc_root: &Path) -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(is_pid))
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter_map(|text| parse_stat(&text))
        .collect()
}

fn is_pid(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_digit())
}

/// Total RSS in bytes of the tree rooted at each of `roots` (`None` where that root is gone),
/// from one scan of `/proc`.
pub fn trees_rss(roots: &[u32]) -> Vec<Option<u64>> {
    let processes = read_processes(Path::new("/proc"));
    roots
        .iter()
        .map(|&root| tree_rss(&processes, root))
        .collect()
}

/// Total RSS in bytes of the tree rooted at `root` among `processes`, or `None` when `root` is
/// not among them.
fn tree_rss(processes: &[ProcStat], root: u32) -> Option<u64> {
    let members = tree_members(processes, root);
    if members.is_empty() {
        return None;
    }
    let pages: u64 = processes
        .iter()
        .filter(|process| members.contains(&process.pid))
        .map(|process| process.rss_pages)
        .sum();
    Some(pages.saturating_mul(page_size()))
}

/// True while process group `pgid` has a member that is not a zombie. A zombie cannot be
/// signalled away and, when the supervisor is PID 1 of a container, may never be reaped, so it
/// must not keep a stop waiting.
pub fn group_alive(pgid: u32) -> bool {
    read_processes(Path::new("/proc"))
        .iter()
        .any(|process| process.pgrp == pgid && process.state != 'Z')
}

/// The inode that names socket `fd` in `/proc/PID/fd` (`socket:[INODE]`).
pub fn socket_inode(fd: &impl std::os::fd::AsFd) -> std::io::Result<u64> {
    let stat = nix::sys::stat::fstat(fd.as_fd())?;
    Ok(stat.st_ino)
}

/// The live processes other than `except` that have one of the sockets `inodes` open, each with
/// the inodes it holds. A process that vanishes while being read is skipped: it holds nothing.
pub fn socket_holders(inodes: &BTreeSet<u64>, except: u32) -> Vec<(u32, BTreeSet<u64>)> {
    read_processes(Path::new("/proc"))
        .into_iter()
        .filter(|process| process.pid != except && process.state != 'Z')
        .filter_map(|process| {
            let held = sockets_of(process.pid, inodes);
            (!held.is_empty()).then_some((process.pid, held))
        })
        .collect()
}

/// Which of `inodes` process `pid` has open.
pub fn sockets_of(pid: u32, inodes: &BTreeSet<u64>) -> BTreeSet<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|target| parse_socket_link(target.to_str()?))
        .filter(|inode| inodes.contains(inode))
        .collect()
}

fn parse_socket_link(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The machine's total memory in bytes, from the `MemTotal:` line of `/proc/meminfo`.
pub fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&text)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a constant of the running kernel; it has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_is_read_from_smaps_rollup() {
        let text = "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0   [rollup]\nRss:               24576 kB\nPss:                9217 kB\nPss_Dirty:          4000 kB\n";
        assert_eq!(parse_pss(text), Some(9217 * 1024));
        assert_eq!(parse_pss("Rss: 1 kB\n"), None);
        let own = pss(std::process::id()).expect("our own smaps_rollup");
        let rss = rss(std::process::id()).expect("our own stat");
        assert!(own > 0 && own <= rss + 4096, "pss {own} rss {rss}");
    }

    fn sample(pid: u32, ppid: u32, pgrp: u32, rss_pages: u64) -> ProcStat {
        ProcStat {
            pid,
            ppid,
            pgrp,
            state: 'S',
            rss_pages,
        }
    }

    #[test]
    fn parses_a_name_with_spaces_and_parentheses() {
        let text = "4242 (celery (worker) x) S 4200 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 12345 99999 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat(text), Some(sample(4242, 4200, 4242, 2560)));
        let zombie = text.replace(") S ", ") Z ");
        assert_eq!(parse_stat(&zombie).map(|stat| stat.state), Some('Z'));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn tree_has_descendants_and_group_members_but_not_strangers() {
        let processes = [
            sample(1, 0, 1, 1),
            sample(100, 1, 100, 10),   // the leader
            sample(101, 100, 100, 20), // prefork child
            sample(102, 101, 100, 30), // grandchild
            sample(103, 1, 100, 40),   // orphaned group member, re-parented to init
            sample(104, 103, 104, 50), // its child in a group of its own
            sample(200, 1, 200, 60),   // unrelated
        ];
        let members: Vec<u32> = tree_members(&processes, 100).into_iter().collect();
        assert_eq!(members, [100, 101, 102, 103, 104]);
        assert!(tree_members(&processes, 999).is_empty());
    }

    #[test]
    fn measures_this_test_process() {
        let rss = trees_rss(&[std::process::id()])[0].expect("this process exists");
        assert!(rss > 1 << 20, "{rss}");
        // Sampled apart from the tree (and other tests allocate meanwhile): only the order of
        // magnitude is comparable.
        let own = super::rss(std::process::id()).expect("this process exists");
        assert!(own > 1 << 20, "{own}");
        let me = stat(std::process::id()).expect("this process exists");
        assert_eq!(me.pid, std::process::id());
        assert_ne!(me.state, 'Z');
        let own_group = nix::unistd::getpgrp().as_raw().unsigned_abs();
        assert!(group_alive(own_group));
    }

    #[test]
    fn a_process_that_is_gone_has_no_stat() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("reap true");
        // Reaped, so the pid is free; reuse within this instant is practically impossible.
        assert_eq!(stat(pid), None);
        assert_eq!(rss(pid), None);
    }

    #[test]
    fn finds_who_holds_a_socket() {
        use std::os::fd::AsRawFd;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let inode = socket_inode(&theirs).expect("fstat");
        assert_ne!(inode, socket_inode(&ours).expect("fstat"));
        assert_eq!(parse_socket_link(&format!("socket:[{inode}]")), Some(inode));
        assert_eq!(parse_socket_link("pipe:[12]"), None);
        let inodes = BTreeSet::from([inode]);
        let me = std::process::id();
        assert_eq!(sockets_of(me, &inodes), inodes);
        assert!(socket_holders(&inodes, me).is_empty(), "only this process");
        // A child that inherits the descriptor is found; once it is gone, nobody is.
        let fd = theirs.as_raw_fd();
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        // SAFETY: fcntl only clears the flag on the child's copy, between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn sleep");
        let holders = socket_holders(&inodes, me);
        assert_eq!(holders, [(child.id(), inodes.clone())]);
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(socket_holders(&inodes, me).is_empty());
    }

    #[test]
    fn reads_mem_total_in_bytes() {
        let meminfo = "MemTotal:        8041232 kB\nMemFree:          123456 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(8_041_232 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots\n"), None);
        assert!(mem_total().is_some_and(|bytes| bytes > 1 << 20));
    }
}
