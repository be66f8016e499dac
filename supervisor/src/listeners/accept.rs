//! The one accept loop: [`AcceptBackoff::accept`] waits for the next connection on any
//! listener, riding out the failures `accept(2)` reports.
//!
//! Two kinds of failure come out of `accept(2)`. Some concern only the connection being accepted
//! — the client reset it while it queued (`ECONNABORTED`), or a network error was pending on it
//! (Linux hands those to `accept`, and its manual says to retry them like `EAGAIN`); the next
//! connection is unaffected, so the loop goes straight on. The others concern the process: out
//! of descriptors (`EMFILE`, `ENFILE`) or kernel memory (`ENOBUFS`, `ENOMEM`). The listener stays
//! readable while the connection waits in the queue, so retrying at once would spin a core until
//! a descriptor is free; the loop pauses [`RETRY_PAUSE`] between attempts instead, says so once
//! per streak of failures, and says when accepting works again.
//!
//! Who accepts and what a connection is for stay with the callers: the web front, the control
//! socket and the metrics endpoint each keep their own listener and connection handling.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

/// The pause between attempts while the process is short of descriptors or memory: short enough
/// that accepting resumes soon after a descriptor frees up, long enough not to burn a core.
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The state of one listener's accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    /// Names the listener in the log lines ("web front on 127.0.0.1:8000", …).
    what: String,
    /// Since when, and how often, accepting has failed for lack of resources.
    streak: Option<Streak>,
    /// No attempt before this: the pause outlives a cancelled [`AcceptBackoff::accept`].
    retry_at: Option<tokio::time::Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Streak {
    since: Instant,
    failures: u64,
}

impl AcceptBackoff {
    /// The accept loop of the listener that `what` names in log lines.
    pub fn new(what: impl Into<String>) -> AcceptBackoff {
        AcceptBackoff {
            what: what.into(),
            streak: None,
            retry_at: None,
        }
    }

    /// Calls `accept` until it yields a connection; see the module header for what happens to
    /// the failures in between.
    ///
    /// Cancel-safe when `accept`'s future is (tokio's listeners' are), for use in a `select!`:
    /// nothing is lost, and a pause that was cut short is served at the next call.
    pub async fn accept<T, F, Fut>(&mut self, mut accept: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        loop {
            if let Some(retry_at) = self.retry_at {
                tokio::time::sleep_until(retry_at).await;
                self.retry_at = None;
            }
            match accept().await {
                Ok(connection) => {
                    if let Some(streak) = self.streak.take() {
                        tracing::info!(
                            "{}: accepting connections again, after {} failed attempts over {:.1?}",
                            self.what,
                            streak.failures,
                            streak.since.elapsed()
                        );
                    }
                    return connection;
                }
                Err(error) if only_this_connection(&error) => {
                    tracing::debug!(
                        "{}: a connection was lost before it was accepted: {error}",
                        self.what
                    );
                }
                Err(error) => {
                    match &mut self.streak {
                        Some(streak) => streak.failures += 1,
                        None => {
                            tracing::error!(
                                "{}: cannot accept connections: {error}; retrying every {RETRY_PAUSE:?} until it can",
                                self.what
                            );
                            self.streak = Some(Streak {
                                since: Instant::now(),
                                failures: 1,
                            });
                        }
                    }
                    self.retry_at = Some(tokio::time::Instant::now() + RETRY_PAUSE);
                }
            }
        }
    }
}

/// Whether `error` concerns only the connection being accepted, so the next one may be accepted
/// at once (accept(2), "Error handling"). Anything else pauses the loop.
fn only_this_connection(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::EINTR
        )
    )
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;

    #[test]
    fn resource_shortages_pause_and_lost_connections_do_not() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EBADF,
        ] {
            assert!(
                !only_this_connection(&io::Error::from_raw_os_error(errno)),
                "errno {errno}"
            );
        }
        for errno in [
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::EPERM,
            libc::ENETUNREACH,
        ] {
            assert!(
                only_this_connection(&io::Error::from_raw_os_error(errno)),
                "errno {errno}"
            );
        }
        assert!(!only_this_connection(&io::Error::other("no errno")));
    }

    /// Set in the child process that [`emfile_pauses_the_loop_until_a_descriptor_is_free`]
    /// starts: lowering the descriptor limit is process-wide, so it cannot happen beside the
    /// other tests.
    const CHILD: &str = "SAUNA_TEST_ACCEPT_EMFILE_CHILD";

    #[test]
    fn emfile_pauses_the_loop_until_a_descriptor_is_free() {
        if std::env::var_os(CHILD).is_some() {
            return run_out_of_descriptors();
        }
        let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "listeners::accept::tests::emfile_pauses_the_loop_until_a_descriptor_is_free",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "the child ran no test: {stdout}"
        );
    }

    /// In the child: fills the descriptor table, lets a client queue a connection, and checks
    /// that the loop pauses (a handful of attempts, not thousands), logs the failure once and
    /// accepts as soon as a descriptor is freed.
    fn run_out_of_descriptors() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let logs = crate::test_support::Captured::default();
        let _guard = tracing::subscriber::set_default(logs.subscriber());
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = listener.local_addr().expect("address");
            let open = std::fs::read_dir("/proc/self/fd").expect("/proc").count() as u64;
            let limit = open + 16;
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)
                .expect("lower RLIMIT_NOFILE");
            let mut filler: Vec<OwnedFd> = Vec::new();
            while let Ok(file) = std::fs::File::open("/dev/null") {
                filler.push(file.into());
            }
            // One descriptor for the client; then none is left for accept.
            filler.pop();
            let client = std::net::TcpStream::connect(address).expect("connect");

            let mut backoff = AcceptBackoff::new("test listener");
            let mut attempts = 0u32;
            let started = Instant::now();
            let free_one = async {
                tokio::time::sleep(Duration::from_millis(450)).await;
                filler.pop();
            };
            let accepting = backoff.accept(|| {
                attempts += 1;
                listener.accept()
            });
            let (accepted, ()) = tokio::join!(accepting, free_one);
            let (_, peer) = accepted;
            assert_eq!(peer, client.local_addr().expect("address"));
            let waited = started.elapsed();
            assert!(waited >= Duration::from_millis(450), "{waited:?}");
            assert!(
                (4..=8).contains(&attempts),
                "{attempts} attempts in {waited:?}: the loop must pause {RETRY_PAUSE:?} between them"
            );
        });
        let logs = logs.text();
        assert_eq!(
            logs.matches("test listener: cannot accept connections: ")
                .count(),
            1,
            "{logs}"
        );
        assert!(logs.contains("Too many open files"), "{logs}");
        assert!(
            logs.contains("test listener: accepting connections again, after "),
            "{logs}"
        );
    }
}
