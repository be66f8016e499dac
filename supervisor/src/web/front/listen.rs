//! The front's listening sockets: binding each `[web].listen` address (`host:port` or
//! `unix:/path`, replacing a stale socket file but never a live socket or another file), and
//! adopting a socket inherited from the supervisor an upgrade replaces. Accepting on them is
//! `accept`'s.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use proxy_conf::Listen;
use tokio::net::{TcpListener, TcpSocket, UnixListener};

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// `host:port`.
    Tcp(TcpListener),
    /// `unix:/path`; the path is removed on shutdown.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// The address as `host:port` (with the real port when 0 was asked) or `unix:/path`.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |address| address.to_string()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    /// Takes over a listening socket inherited from the supervisor this one replaces, for the
    /// `[web].listen` entry `configured`. The socket keeps its address and its queue of pending
    /// connections; a Unix socket's file is never unlinked or re-bound (the old process still
    /// accepts on it until the hand-over). Fails when the descriptor is not a listening socket
    /// of the kind `configured` names.
    pub fn adopt(configured: &Listen, fd: OwnedFd) -> io::Result<Listener> {
        match configured {
            Listen::Unix(path) => {
                let listener = std::os::unix::net::UnixListener::from(fd);
                listener.local_addr()?;
                listener.set_nonblocking(true)?;
                Ok(Listener::Unix(
                    UnixListener::from_std(listener)?,
                    path.clone(),
                ))
            }
            Listen::Tcp(_) => {
                let listener = std::net::TcpListener::from(fd);
                listener.local_addr()?;
                listener.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(listener)?))
            }
        }
    }

    pub(super) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(listener) => listener.as_fd(),
            Listener::Unix(listener, _) => listener.as_fd(),
        }
    }
}

/// A listen address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct BindError {
    /// The address from `[web].listen`.
    pub address: Listen,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// Binds every address, or fails naming the first that cannot be bound.
pub fn bind(addresses: &[Listen], backlog: u32) -> Result<Vec<Listener>, BindError> {
    addresses
        .iter()
        .map(|address| {
            bind_one(address, backlog).map_err(|source| BindError {
                address: address.clone(),
                source,
            })
        })
        .collect()
}

fn bind_one(address: &Listen, backlog: u32) -> io::Result<Listener> {
    match address {
        Listen::Unix(path) => bind_unix(path, backlog),
        Listen::Tcp(address) => {
            let socket = if address.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_nodelay(true)?;
            socket.bind(*address)?;
            Ok(Listener::Tcp(socket.listen(backlog)?))
        }
    }
}

fn bind_unix(path: &Path, backlog: u32) -> io::Result<Listener> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // A socket file left by a previous run is replaced; a live socket is not stolen and
        // a path that is not a socket is never deleted.
        if !metadata.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is listening on it",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    // std binds with a backlog of 128; listen(2) again to apply the configured one.
    let raw = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // SAFETY: `raw` is the descriptor of the listener we own; listen(2) only changes its backlog.
    if unsafe { libc::listen(raw, i32::try_from(backlog).unwrap_or(i32::MAX)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    Ok(Listener::Unix(
        UnixListener::from_std(listener)?,
        path.to_path_buf(),
    ))
}
