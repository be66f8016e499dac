//! Making a listening socket for an address: binding it ([`bind`], TCP here and Unix in `unix`),
//! or adopting the descriptor of the same address inherited from the supervisor an upgrade
//! replaces ([`adopt`]), and the [`Listener`] that either gives. Every socket is close-on-exec
//! and non-blocking, so no worker or program inherits it and tokio can drive it.
//!
//! The errors say what failed without the address ([`SocketError`]); [`BindError`] adds it, and
//! the control socket turns the kinds into its own (`AlreadyRunning`, `NotASocket`, …).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname, getsockopt};
use proxy_conf::Listen;
use proxy_conf::listen::MAX_UNIX_SOCKET_PATH;
use tokio::net::{TcpListener, TcpSocket, UnixListener};

use super::table::Role;
use super::unix::bind_unix;

/// How to bind a socket.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Whose socket it is; named when a stale socket file is replaced.
    pub role: Role,
    /// Connections the kernel queues before they are accepted (capped by
    /// `net.core.somaxconn`).
    pub backlog: u32,
    /// Unix sockets: the socket file's permission bits, in force from the moment the file
    /// exists; `None` leaves them to the umask.
    pub mode: Option<u32>,
    /// Unix sockets: missing parent directories are created with this mode; with `None`, a
    /// missing directory fails the bind.
    pub directory_mode: Option<u32>,
}

impl Options {
    /// `backlog` for `role`'s sockets, with the file mode left to the umask and no directory
    /// created.
    pub fn new(role: Role, backlog: u32) -> Options {
        Options {
            role,
            backlog,
            mode: None,
            directory_mode: None,
        }
    }
}

/// A listening socket of either kind.
#[derive(Debug)]
pub enum Listener {
    /// `host:port`.
    Tcp(TcpListener),
    /// `unix:/path`; the path is the one configured.
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
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(listener) => listener.as_fd(),
            Listener::Unix(listener, _) => listener.as_fd(),
        }
    }
}

/// The step of binding or adopting that the operating system refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Looking at what is already at a Unix socket's path.
    Inspect,
    /// Connecting to an existing socket file to learn whether anyone listens on it.
    Probe,
    /// Removing a socket file nobody listens on.
    RemoveStale,
    /// Making a path into a socket address.
    Address,
    /// Creating the socket or setting its options.
    Create,
    /// Setting a Unix socket's mode before `bind`.
    SetMode,
    /// `bind(2)`.
    Bind,
    /// Looking at the socket file `bind` created.
    InspectNew,
    /// Tightening the socket file's mode after `bind`.
    RestrictMode,
    /// `listen(2)`.
    Listen,
    /// Registering the socket with the tokio runtime.
    Register,
    /// Checking and taking over an inherited descriptor.
    Adopt,
}

/// Why a socket could not be bound or adopted; the caller names the address.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The Unix socket path holds something else; it is left untouched.
    #[error("the path exists and is not a socket")]
    NotASocket,
    /// A live process listens on the Unix socket path (or bound it first).
    #[error("another process is listening on it{}", pid_text(*pid))]
    InUse {
        /// Its pid, when the kernel told us.
        pid: Option<i32>,
    },
    /// The path does not fit in a Unix socket address.
    #[error(
        "the path is {bytes} bytes long, and a Unix socket path can have at most {MAX_UNIX_SOCKET_PATH}"
    )]
    PathTooLong {
        /// The path's length.
        bytes: usize,
    },
    /// A missing parent directory could not be created.
    #[error("cannot create the directory {}: {error}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// An operating system call failed.
    #[error("{error}")]
    Os {
        /// Which.
        step: Step,
        /// The OS error.
        error: io::Error,
    },
}

fn pid_text(pid: Option<i32>) -> String {
    pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

/// An address could not be bound or adopted.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {error}")]
pub struct BindError {
    /// The address as configured.
    pub address: Listen,
    /// Why.
    pub error: SocketError,
}

/// Binds `address`. Must be called inside a tokio runtime.
pub fn bind(address: &Listen, options: &Options) -> Result<Listener, SocketError> {
    match address {
        Listen::Tcp(socket_address) => bind_tcp(*socket_address, options).map(Listener::Tcp),
        Listen::Unix(path) => {
            bind_unix(path, options).map(|listener| Listener::Unix(listener, path.clone()))
        }
    }
}

/// Binds every address, or fails naming the first that cannot be bound (those bound before it
/// are closed again). Must be called inside a tokio runtime.
pub fn bind_all(addresses: &[Listen], options: &Options) -> Result<Vec<Listener>, BindError> {
    addresses
        .iter()
        .map(|address| {
            bind(address, options).map_err(|error| BindError {
                address: address.clone(),
                error,
            })
        })
        .collect()
}

/// Binds a TCP socket with `SO_REUSEADDR` (a restart does not wait out `TIME_WAIT`) and
/// `TCP_NODELAY` (inherited by accepted connections). Must be called inside a tokio runtime.
pub fn bind_tcp(address: SocketAddr, options: &Options) -> Result<TcpListener, SocketError> {
    let os = |step| move |error| SocketError::Os { step, error };
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(os(Step::Create))?;
    socket.set_reuseaddr(true).map_err(os(Step::Create))?;
    socket.set_nodelay(true).map_err(os(Step::Create))?;
    socket.bind(address).map_err(os(Step::Bind))?;
    socket.listen(options.backlog).map_err(os(Step::Listen))
}

/// Takes over `fd`, inherited for `address` from the supervisor this one replaces. The socket
/// keeps its address and its queue of pending connections; a Unix socket's file is never
/// unlinked or re-bound (the old process still accepts on it until the hand-over). Fails when
/// the descriptor is not a listening socket of the kind `address` names. Must be called inside
/// a tokio runtime.
pub fn adopt(address: &Listen, fd: OwnedFd) -> Result<Listener, SocketError> {
    match address {
        Listen::Tcp(_) => adopt_tcp(fd).map(Listener::Tcp),
        Listen::Unix(path) => adopt_unix(fd).map(|listener| Listener::Unix(listener, path.clone())),
    }
}

/// [`adopt`] for a TCP address.
pub fn adopt_tcp(fd: OwnedFd) -> Result<TcpListener, SocketError> {
    check_inherited(&fd, Kind::Tcp)?;
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true).map_err(adopt_error)?;
    TcpListener::from_std(listener).map_err(|error| SocketError::Os {
        step: Step::Register,
        error,
    })
}

/// [`adopt`] for a Unix socket path.
pub fn adopt_unix(fd: OwnedFd) -> Result<UnixListener, SocketError> {
    check_inherited(&fd, Kind::Unix)?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(adopt_error)?;
    UnixListener::from_std(listener).map_err(|error| SocketError::Os {
        step: Step::Register,
        error,
    })
}

fn adopt_error(error: io::Error) -> SocketError {
    SocketError::Os {
        step: Step::Adopt,
        error,
    }
}

/// The kinds of socket an address can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Unix,
}

/// Refuses a descriptor that is not a listening socket of `kind`: adopting anything else would
/// fail later, on the first accept, far from the cause.
fn check_inherited(fd: &OwnedFd, kind: Kind) -> Result<(), SocketError> {
    let local: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|errno| adopt_error(errno.into()))?;
    let found = match local.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Some(Kind::Tcp),
        Some(AddressFamily::Unix) => Some(Kind::Unix),
        _ => None,
    };
    let listening = getsockopt(fd, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|errno| adopt_error(errno.into()))?;
    if found != Some(kind) || !listening {
        let expected = match kind {
            Kind::Tcp => "TCP",
            Kind::Unix => "Unix",
        };
        return Err(adopt_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the inherited descriptor is not a listening {expected} socket"),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn close_on_exec(fd: BorrowedFd<'_>) -> bool {
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        flags & libc::FD_CLOEXEC != 0
    }

    #[tokio::test]
    async fn tcp_binds_close_on_exec_with_reuseaddr_and_a_real_port() {
        let options = Options::new(Role::Web, 16);
        let listener = bind(
            &Listen::Tcp("127.0.0.1:0".parse().expect("address")),
            &options,
        )
        .expect("bind");
        assert!(close_on_exec(listener.as_fd()));
        assert!(
            getsockopt(&listener.as_fd(), nix::sys::socket::sockopt::ReuseAddr).expect("option")
        );
        assert!(
            !listener.address().ends_with(":0"),
            "{}",
            listener.address()
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_an_os_error_at_bind() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = Listen::Tcp(taken.local_addr().expect("address"));
        let error = bind_all(std::slice::from_ref(&address), &Options::new(Role::Web, 16))
            .expect_err("taken");
        assert!(
            matches!(
                error.error,
                SocketError::Os {
                    step: Step::Bind,
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "cannot listen on {address}: {}",
                io::Error::from_raw_os_error(libc::EADDRINUSE)
            )
        );
    }

    #[tokio::test]
    async fn unix_binds_close_on_exec_with_the_configured_backlog() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("app.sock");
        let listener = bind_unix(&path, &Options::new(Role::Web, 2)).expect("bind");
        assert!(close_on_exec(listener.as_fd()));
        // A backlog of 2 queues a few connections (the kernel allows backlog + 1), then a
        // non-blocking connect finds the queue full.
        let mut clients = Vec::new();
        let full = loop {
            let client = nix::sys::socket::socket(
                AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                None,
            )
            .expect("socket");
            let address = nix::sys::socket::UnixAddr::new(&path).expect("address");
            match nix::sys::socket::connect(client.as_raw_fd(), &address) {
                Ok(()) => clients.push(client),
                Err(nix::errno::Errno::EAGAIN) => break clients.len(),
                Err(errno) => panic!("connect: {errno}"),
            }
            assert!(clients.len() < 100, "the backlog was not applied");
        };
        assert!((2..=4).contains(&full), "{full} connections queued");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("app.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("a socket nobody listens on"));
        let options = Options::new(Role::Web, 16);
        let live = bind_unix(&path, &options).expect("the stale socket is replaced");
        let error = bind_unix(&path, &options).expect_err("a live socket is not stolen");
        let ours = i32::try_from(std::process::id()).expect("pid");
        assert!(
            matches!(error, SocketError::InUse { pid: Some(pid) } if pid == ours),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("another process is listening on it (pid {ours})")
        );
        drop(live);
    }

    #[tokio::test]
    async fn a_path_that_is_not_a_socket_is_never_deleted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("precious.txt");
        std::fs::write(&path, "keep me").expect("write");
        let error =
            bind(&Listen::Unix(path.clone()), &Options::new(Role::Web, 16)).expect_err("refused");
        assert!(matches!(error, SocketError::NotASocket), "{error:?}");
        assert_eq!(error.to_string(), "the path exists and is not a socket");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "keep me");
    }

    #[tokio::test]
    async fn a_private_socket_gets_its_mode_and_directories() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run").join("sauna").join("control.sock");
        let options = Options {
            mode: Some(0o600),
            directory_mode: Some(0o700),
            ..Options::new(Role::Control, 8)
        };
        let _listener = bind_unix(&path, &options).expect("bind");
        let mode = |path: &std::path::Path| {
            std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(&path), 0o600);
        let parent = path.parent().expect("parent");
        assert_eq!(mode(parent), 0o700);
        assert_eq!(mode(parent.parent().expect("grandparent")), 0o700);
    }

    #[tokio::test]
    async fn without_a_directory_mode_a_missing_directory_fails() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing").join("app.sock");
        let error = bind_unix(&path, &Options::new(Role::Web, 8)).expect_err("no directory");
        assert!(
            matches!(
                &error,
                SocketError::Os {
                    step: Step::Bind,
                    error
                } if error.raw_os_error() == Some(libc::ENOENT)
            ),
            "{error:?}"
        );
        assert!(!path.parent().expect("parent").exists());
    }

    #[tokio::test]
    async fn a_too_long_path_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x".repeat(120)).join("app.sock");
        let options = Options {
            directory_mode: Some(0o700),
            ..Options::new(Role::Control, 8)
        };
        let error = bind_unix(&path, &options).expect_err("too long");
        assert!(
            matches!(error, SocketError::PathTooLong { .. }),
            "{error:?}"
        );
        assert!(!path.parent().expect("parent").exists());
    }

    #[tokio::test]
    async fn adopting_keeps_the_socket_and_its_queued_connections() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("app.sock");
        let bound = bind_unix(&path, &Options::new(Role::Web, 16)).expect("bind");
        let waiting = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let fd = bound.as_fd().try_clone_to_owned().expect("dup");
        drop(bound);
        let adopted = adopt(&Listen::Unix(path.clone()), fd).expect("adopt");
        assert_eq!(adopted.address(), format!("unix:{}", path.display()));
        let Listener::Unix(listener, _) = adopted else {
            panic!("a Unix listener");
        };
        let (stream, _) = listener.accept().await.expect("the queued connection");
        std::io::Write::write_all(&mut &waiting, b"x").expect("write");
        stream.readable().await.expect("readable");
        let mut byte = [0u8; 1];
        assert_eq!(stream.try_read(&mut byte).expect("read"), 1);
        assert_eq!(&byte, b"x", "the connection queued before the hand-over");
        assert!(path.exists(), "adopting never unlinks the file");
    }

    #[tokio::test]
    async fn adopting_refuses_the_wrong_kind_or_a_socket_that_does_not_listen() {
        let tcp = bind_tcp(
            "127.0.0.1:0".parse().expect("address"),
            &Options::new(Role::Web, 16),
        )
        .expect("bind");
        let fd = tcp.as_fd().try_clone_to_owned().expect("dup");
        let error = adopt(&Listen::Unix("/run/x.sock".into()), fd).expect_err("not Unix");
        assert_eq!(
            error.to_string(),
            "the inherited descriptor is not a listening Unix socket"
        );

        let (connected, _) = std::os::unix::net::UnixStream::pair().expect("pair");
        let error = adopt_unix(OwnedFd::from(connected)).expect_err("not listening");
        assert!(
            matches!(
                error,
                SocketError::Os {
                    step: Step::Adopt,
                    ..
                }
            ),
            "{error:?}"
        );

        let fd = tcp.as_fd().try_clone_to_owned().expect("dup");
        let adopted = adopt_tcp(fd).expect("a TCP listener adopts");
        assert_eq!(
            adopted.local_addr().expect("address"),
            tcp.local_addr().expect("address")
        );
    }
}
