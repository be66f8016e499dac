//! The control socket: how `sauna-supervisor status`, `stop` and `reload` talk to the running
//! supervisor. A Unix stream socket, mode 0600 from the moment it exists, in a directory created
//! 0700 when missing; each connection's peer credentials (`SO_PEERCRED`) must be root or the
//! supervisor's own user; one JSON request line per connection, answered by one or more JSON
//! lines ([`protocol`]).
//!
//! [`server`] owns the listening side: binding it through `listeners` (refusing when another
//! supervisor answers on the path, replacing a socket left by a crash), admitting connections and
//! handing requests to the main loop as [`ControlRequest`]s. [`client`] is the blocking side the CLI uses. What a request
//! does — building the status, stopping, reloading — belongs to the main loop, not here.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{Replies, request};
pub use protocol::{ErrorKind, Request, Response, ResponseBody};
pub use server::{ControlRequest, ControlServer, Responder};

/// Longest path a Unix socket address can hold (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why the control socket could not be bound or a request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `bind`: a live supervisor answers on the path.
    #[error(
        "another sauna-supervisor is already running on {} ({}): stop it first, or set \
         [control].socket to another path", path.display(), pid_text(*pid)
    )]
    AlreadyRunning {
        /// The socket.
        path: PathBuf,
        /// The process listening there, when the kernel told us.
        pid: Option<i32>,
    },
    /// A client: nobody listens on the path (no socket, or one left by a crash). `status` exits 3.
    #[error(
        "no sauna-supervisor is running on {}{}", path.display(),
        if *stale { " (the socket is left over from one that did not stop cleanly)" } else { "" }
    )]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// The socket file exists but nothing listens on it.
        stale: bool,
    },
    /// `bind`: the path exists and is not a socket; it is left untouched.
    #[error(
        "{} exists and is not a socket: move it away, or set [control].socket to another path",
        path.display()
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The path does not fit in a Unix socket address.
    #[error(
        "control socket path {} is too long ({} bytes, at most {MAX_SOCKET_PATH}): set \
         [control].socket to a shorter path", path.display(), path.as_os_str().len()
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// An operating system call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "cannot connect to the control socket".
        action: &'static str,
        /// The socket or its directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A client: no line arrived within the timeout.
    #[error("the supervisor on {} did not answer within {after:?}", path.display())]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The timeout.
        after: Duration,
    },
    /// A client: the supervisor sent something that is not a response line.
    #[error("the supervisor on {} sent an unreadable line: {message}", path.display())]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong with it.
        message: String,
    },
    /// A client: the connection ended before the final line (the supervisor exited or crashed).
    #[error("the supervisor on {} closed the connection before its final answer", path.display())]
    Closed {
        /// The socket.
        path: PathBuf,
    },
}

fn pid_text(pid: Option<i32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => String::from("pid unknown"),
    }
}
