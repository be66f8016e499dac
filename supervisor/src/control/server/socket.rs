//! The control socket file: binding it safely ([`ControlServer::bind`]: mode 0600 before the file
//! exists, a 0700 directory, refusing when another supervisor answers on the path and replacing a
//! socket left by a crash), adopting the one inherited in an `upgrade` ([`ControlServer::adopt`]),
//! and removing ours, and only ours, at exit.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, bind as bind_fd, getsockopt, listen, socket,
    sockopt::PeerCredentials,
};
use nix::sys::stat::{Mode, fchmod};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::ControlServer;
use crate::control::ControlError;
use crate::control::client::{connect, socket_address};

/// Mode of the socket file.
const SOCKET_MODE: u32 = 0o600;
/// Mode of a socket directory this module creates.
const DIRECTORY_MODE: u32 = 0o700;

/// Requests read but not yet taken by [`ControlServer::accept`].
const QUEUED_REQUESTS: usize = 64;

impl ControlServer {
    /// Binds the control socket at `path`, mode 0600, creating its directory (0700) if missing.
    ///
    /// If a socket already exists there: when a process answers on it, this fails with
    /// [`ControlError::AlreadyRunning`] naming its pid; when nobody does (a supervisor crashed
    /// and left it), it is removed and replaced, and that is logged. Anything else at the path is
    /// left alone ([`ControlError::NotASocket`]). Must be called inside a tokio runtime.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let io_error = |action| {
            move |source| ControlError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let address = socket_address(path)?;
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            if !parent.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(DIRECTORY_MODE)
                    .create(parent)
                    .map_err(|source| ControlError::Io {
                        action: "cannot create the control socket's directory",
                        path: parent.to_owned(),
                        source,
                    })?;
            }
        }
        remove_stale(path)?;

        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|errno| io_error("cannot create the control socket")(errno.into()))?;
        // Linux creates the socket file with the socket inode's mode (less the umask), so setting
        // it before `bind` means the file is never, even for an instant, open to other users.
        // Changing the umask instead would race with every other thread creating files.
        fchmod(&fd, Mode::from_bits_truncate(SOCKET_MODE))
            .map_err(|errno| io_error("cannot set the mode of the control socket")(errno.into()))?;
        match bind_fd(fd.as_raw_fd(), &address) {
            Ok(()) => {}
            // Another supervisor bound it between our check and our bind.
            Err(Errno::EADDRINUSE) => {
                return Err(ControlError::AlreadyRunning {
                    path: path.to_owned(),
                    pid: listening_pid(path),
                });
            }
            Err(errno) => return Err(io_error("cannot bind the control socket")(errno.into())),
        }
        let metadata = std::fs::symlink_metadata(path)
            .map_err(io_error("cannot inspect the new control socket"))?;
        if metadata.mode() & 0o077 != 0 {
            // Only reachable on a kernel that ignores the mode set above; tighten it at once.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
                .map_err(io_error("cannot restrict the mode of the control socket"))?;
        }
        listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
            .map_err(|errno| io_error("cannot listen on the control socket")(errno.into()))?;
        let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(fd)).map_err(
            io_error("cannot register the control socket with the runtime"),
        )?;
        let (requests_in, requests) = mpsc::channel(QUEUED_REQUESTS);
        info!(path = %path.display(), "control socket listening");
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            identity: (metadata.dev(), metadata.ino()),
            owns_file: true,
            our_uid: nix::unistd::geteuid().as_raw(),
            requests_in,
            requests,
            connections: JoinSet::new(),
        })
    }

    /// Takes over the control socket inherited from the supervisor this one replaces
    /// (`upgrade`): the same socket, file and queue of pending connections; nothing is unlinked
    /// or re-bound. Connections queue until [`ControlServer::accept`] is first awaited. The file
    /// is left alone at exit until [`ControlServer::set_owns_socket_file`] claims it. Must be
    /// called inside a tokio runtime.
    pub fn adopt(path: &Path, fd: std::os::fd::OwnedFd) -> Result<ControlServer, ControlError> {
        let io_error = |action| {
            move |source| ControlError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener
            .set_nonblocking(true)
            .map_err(io_error("cannot adopt the inherited control socket"))?;
        let metadata = std::fs::symlink_metadata(path)
            .map_err(io_error("cannot inspect the inherited control socket"))?;
        let listener = UnixListener::from_std(listener).map_err(io_error(
            "cannot register the control socket with the runtime",
        ))?;
        let (requests_in, requests) = mpsc::channel(QUEUED_REQUESTS);
        info!(path = %path.display(), "control socket adopted from the previous supervisor");
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            identity: (metadata.dev(), metadata.ino()),
            owns_file: false,
            our_uid: nix::unistd::geteuid().as_raw(),
            requests_in,
            requests,
            connections: JoinSet::new(),
        })
    }

    /// A duplicate of the listening socket, for a successor started by `upgrade` to inherit.
    pub fn duplicate_listener(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.listener.as_fd().try_clone_to_owned()
    }

    /// Whether shutting down or dropping this server removes the socket file: `false` once an
    /// upgrade's successor serves it, `true` in the successor once the old one released it.
    pub fn set_owns_socket_file(&mut self, owns: bool) {
        self.owns_file = owns;
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn remove_socket_file(&self) {
        let ours = self.owns_file
            && std::fs::symlink_metadata(&self.path)
                .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.identity);
        if ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), %error, "cannot remove the control socket");
            }
        }
    }
}

impl Drop for ControlServer {
    /// Removes the socket file, so that `status` says "not running" rather than finding a stale
    /// socket. Connection tasks end with the server (the `JoinSet` aborts them).
    fn drop(&mut self) {
        self.remove_socket_file();
    }
}

/// Removes a socket nobody listens on; refuses when someone does or the path is not a socket.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Io {
                action: "cannot inspect",
                path: path.to_owned(),
                source,
            });
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    match connect(path) {
        Ok(stream) => Err(ControlError::AlreadyRunning {
            path: path.to_owned(),
            pid: getsockopt(&stream, PeerCredentials)
                .ok()
                .map(|credentials| credentials.pid()),
        }),
        Err(ControlError::NotRunning { stale: true, .. }) => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ControlError::Io {
                        action: "cannot remove the stale control socket",
                        path: path.to_owned(),
                        source,
                    });
                }
            }
            info!(
                path = %path.display(),
                "removed a stale control socket left by a supervisor that did not stop cleanly"
            );
            Ok(())
        }
        // Removed by someone else since we looked.
        Err(ControlError::NotRunning { stale: false, .. }) => Ok(()),
        // A live listener whose queue is full is still a live supervisor.
        Err(ControlError::Io { source, .. }) if source.raw_os_error() == Some(libc::EAGAIN) => {
            Err(ControlError::AlreadyRunning {
                path: path.to_owned(),
                pid: None,
            })
        }
        Err(error) => Err(error),
    }
}

/// The pid of whoever listens on `path`, if it answers.
fn listening_pid(path: &Path) -> Option<i32> {
    let stream = connect(path).ok()?;
    getsockopt(&stream, PeerCredentials)
        .ok()
        .map(|credentials| credentials.pid())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;
    use crate::control::protocol::{PROTOCOL_VERSION, Request, Response, ResponseBody};
    use crate::control::server::ControlRequest;
    use crate::control::server::tests::{ask, next_request, request_lines, socket_path};
    use crate::supervisor::lifecycle::StopMode;

    #[tokio::test]
    async fn status_is_answered_with_our_pid_and_the_socket_is_private() {
        let (_dir, path) = socket_path();
        let mut server = ControlServer::bind(&path).expect("bind");
        assert_eq!(server.path(), path);

        let mode = |path: &Path| {
            std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(&path), 0o600, "socket mode");
        let parent = path.parent().expect("parent");
        assert_eq!(mode(parent), 0o700, "created directory mode");
        assert_eq!(mode(parent.parent().expect("grandparent")), 0o700);

        let client = ask(&path, Request::Status);
        let ControlRequest { request, reply } = next_request(&mut server).await;
        assert_eq!(request, Request::Status);
        reply.ok(json!({"phase": "running"}));
        let lines = client.await.expect("client thread");
        assert_eq!(
            lines,
            [Response {
                v: PROTOCOL_VERSION,
                pid: std::process::id(),
                body: ResponseBody::Ok {
                    data: json!({"phase": "running"})
                },
            }]
        );

        drop(server);
        assert!(
            !path.exists(),
            "the socket is removed when the server is dropped"
        );
        let error = request_lines(&path, &Request::Status).expect_err("nobody runs");
        assert!(
            matches!(error, ControlError::NotRunning { stale: false, .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_second_bind_is_refused_while_the_first_runs() {
        let (_dir, path) = socket_path();
        let mut first = ControlServer::bind(&path).expect("bind");
        let second = ControlServer::bind(&path).err().expect("refused");
        assert!(
            matches!(second, ControlError::AlreadyRunning { pid: Some(pid), .. }
                if pid == i32::try_from(std::process::id()).expect("pid")),
            "{second:?}"
        );
        let message = second.to_string();
        assert!(
            message.starts_with(&format!(
                "another sauna-supervisor is already running on {} (pid {})",
                path.display(),
                std::process::id()
            )),
            "{message}"
        );

        // The probe left the first server working and its socket in place.
        let client = ask(
            &path,
            Request::Stop {
                mode: StopMode::Fast,
            },
        );
        let ControlRequest { request, reply } = next_request(&mut first).await;
        assert_eq!(
            request,
            Request::Stop {
                mode: StopMode::Fast
            }
        );
        reply.ok(serde_json::Value::Null);
        assert_eq!(client.await.expect("client").len(), 1);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let (_dir, path) = socket_path();
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        // What a crashed supervisor leaves: a socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind a listener"));
        let error = request_lines(&path, &Request::Status).expect_err("stale");
        assert!(
            matches!(error, ControlError::NotRunning { stale: true, .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("did not stop cleanly"),
            "{error}"
        );

        let mut server = ControlServer::bind(&path).expect("replaces the stale socket");
        let client = ask(&path, Request::Status);
        next_request(&mut server).await.reply.ok(json!(1));
        assert_eq!(client.await.expect("client").len(), 1);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("control.sock");
        std::fs::write(&path, "precious").expect("write");
        let error = ControlServer::bind(&path).err().expect("refused");
        assert!(
            matches!(error, ControlError::NotASocket { .. }),
            "{error:?}"
        );
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "precious");
    }

    #[tokio::test]
    async fn a_too_long_path_is_explained() {
        let path = PathBuf::from(format!("/tmp/{}/control.sock", "x".repeat(120)));
        let error = ControlServer::bind(&path).err().expect("too long");
        assert!(error.to_string().contains("too long"), "{error}");
    }
}
