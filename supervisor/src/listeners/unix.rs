//! Binding a Unix stream socket at a path, with the rules for the socket file every role follows:
//! a socket file nobody listens on any more (left by a supervisor that was killed) is replaced,
//! and that is logged; a live socket is never stolen, even from a listener whose queue is full;
//! a path that is not a socket is never deleted. A private mode is applied to the socket before
//! `bind` creates the file, so the file is never open to other users, even for an instant.
//!
//! Removing the file at exit is the owner's business (the control socket removes only its own
//! inode; the front removes its files unless an upgrade handed them over).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, bind as bind_fd, connect, getsockopt, socket,
    sockopt::PeerCredentials,
};
use nix::sys::stat::{Mode, fchmod};
use proxy_conf::listen::MAX_UNIX_SOCKET_PATH;
use tokio::net::UnixListener;

use super::bind::{Options, SocketError, Step};

/// Binds a listening Unix stream socket at `path` (close-on-exec, non-blocking), following the
/// rules above and `options`. Must be called inside a tokio runtime.
pub fn bind_unix(path: &Path, options: &Options) -> Result<UnixListener, SocketError> {
    let os = |step| {
        move |errno: Errno| SocketError::Os {
            step,
            error: errno.into(),
        }
    };
    let address = socket_address(path)?;
    if let Some(mode) = options.directory_mode {
        create_parent(path, mode)?;
    }
    replace_stale(path, options)?;

    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(os(Step::Create))?;
    // Linux creates the socket file with the socket inode's mode (less the umask), so setting it
    // before `bind` means the file is never open wider. Changing the umask instead would race
    // with every other thread creating files.
    if let Some(mode) = options.mode {
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(os(Step::SetMode))?;
    }
    match bind_fd(fd.as_raw_fd(), &address) {
        Ok(()) => {}
        // Another process bound it between our check and our bind.
        Err(Errno::EADDRINUSE) => {
            return Err(SocketError::InUse {
                pid: listening_pid(path),
            });
        }
        Err(errno) => return Err(os(Step::Bind)(errno)),
    }
    if let Some(mode) = options.mode {
        restrict_mode(path, mode)?;
    }
    listen(&fd, options.backlog)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd)).map_err(|error| {
        SocketError::Os {
            step: Step::Register,
            error,
        }
    })
}

/// The socket address of `path`, or why it cannot be one.
fn socket_address(path: &Path) -> Result<UnixAddr, SocketError> {
    let bytes = path.as_os_str().len();
    if bytes > MAX_UNIX_SOCKET_PATH {
        return Err(SocketError::PathTooLong { bytes });
    }
    UnixAddr::new(path).map_err(|errno| SocketError::Os {
        step: Step::Address,
        error: errno.into(),
    })
}

/// Creates the missing directories above `path` with `mode`.
fn create_parent(path: &Path, mode: u32) -> Result<(), SocketError> {
    let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    else {
        return Ok(());
    };
    if parent.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(parent)
        .map_err(|error| SocketError::Directory {
            path: parent.to_owned(),
            error,
        })
}

/// Removes a socket file nobody listens on; refuses when someone does or the path is not a socket.
fn replace_stale(path: &Path, options: &Options) -> Result<(), SocketError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(SocketError::Os {
                step: Step::Inspect,
                error,
            });
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(SocketError::NotASocket);
    }
    match probe(path) {
        Probe::Live(pid) => Err(SocketError::InUse { pid }),
        Probe::Gone => Ok(()),
        Probe::Stale => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(SocketError::Os {
                        step: Step::RemoveStale,
                        error,
                    });
                }
            }
            tracing::info!(
                path = %path.display(),
                "removed a stale {} socket left by a supervisor that did not stop cleanly",
                options.role
            );
            Ok(())
        }
        Probe::Failed(errno) => Err(SocketError::Os {
            step: Step::Probe,
            error: errno.into(),
        }),
    }
}

/// What connecting to an existing socket file tells about it.
#[derive(Debug)]
enum Probe {
    /// Someone accepts on it (their pid, when the kernel says).
    Live(Option<i32>),
    /// Nobody listens on it: left by a process that did not remove it.
    Stale,
    /// It was removed since we looked.
    Gone,
    /// The connect failed otherwise (permission denied, say): nothing can be concluded.
    Failed(Errno),
}

/// Connects to `path` without blocking: a blocking Unix connect would wait for room in the queue
/// of a live listener that is not accepting, which must count as live rather than hang us.
fn probe(path: &Path) -> Probe {
    let Ok(address) = UnixAddr::new(path) else {
        return Probe::Failed(Errno::ENAMETOOLONG);
    };
    let fd = match socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) {
        Ok(fd) => fd,
        Err(errno) => return Probe::Failed(errno),
    };
    match connect(fd.as_raw_fd(), &address) {
        Ok(()) => Probe::Live(
            getsockopt(&fd, PeerCredentials)
                .ok()
                .map(|credentials| credentials.pid()),
        ),
        // A live listener whose queue is full.
        Err(Errno::EAGAIN) => Probe::Live(None),
        Err(Errno::ECONNREFUSED) => Probe::Stale,
        Err(Errno::ENOENT | Errno::ENOTDIR) => Probe::Gone,
        Err(errno) => Probe::Failed(errno),
    }
}

/// The pid of whoever listens on `path`, if it answers.
fn listening_pid(path: &Path) -> Option<i32> {
    match probe(path) {
        Probe::Live(pid) => pid,
        _ => None,
    }
}

/// Tightens the new file to `mode` should the kernel have ignored the mode set before `bind`.
fn restrict_mode(path: &Path, mode: u32) -> Result<(), SocketError> {
    let metadata = std::fs::symlink_metadata(path).map_err(|error| SocketError::Os {
        step: Step::InspectNew,
        error,
    })?;
    if metadata.mode() & 0o777 & !mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|error| {
            SocketError::Os {
                step: Step::RestrictMode,
                error,
            }
        })?;
    }
    Ok(())
}

/// listen(2) with `backlog` as given: the kernel caps it at `net.core.somaxconn`, which may be
/// above the compile-time `SOMAXCONN` that nix's `Backlog` insists on.
fn listen(fd: &OwnedFd, backlog: u32) -> Result<(), SocketError> {
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    // SAFETY: `fd` is a socket this function's caller owns; listen(2) only changes its state.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(SocketError::Os {
            step: Step::Listen,
            error: io::Error::last_os_error(),
        });
    }
    Ok(())
}
