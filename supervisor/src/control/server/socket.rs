//! The control socket file: binding it safely ([`ControlServer::bind`], through `listeners`:
//! mode 0600 before the file exists, a 0700 directory, refusing when another supervisor answers
//! on the path and replacing a socket left by a crash), adopting the one inherited in an
//! `upgrade` ([`ControlServer::adopt`]), lending it to the next upgrade, and removing ours, and
//! only ours, at exit.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use proxy_conf::Listen;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::ControlServer;
use crate::control::ControlError;
use crate::listeners::{self, AcceptBackoff, FdTable, Role, SocketError, Step};

/// Mode of the socket file.
const SOCKET_MODE: u32 = 0o600;
/// Mode of a socket directory this module creates.
const DIRECTORY_MODE: u32 = 0o700;
/// Connections the kernel queues before they are accepted; a handful of CLI clients at most.
const BACKLOG: u32 = 64;

/// Requests read but not yet taken by [`ControlServer::accept`].
const QUEUED_REQUESTS: usize = 64;

impl ControlServer {
    /// The control socket at `path`: the one inherited in an upgrade when `inherited` holds it
    /// ([`ControlServer::adopt`]), else a new one ([`ControlServer::bind`]). An inherited control
    /// socket at another path stays in the table (and is closed with it).
    pub fn open(
        path: &Path,
        inherited: Option<&mut FdTable>,
    ) -> Result<ControlServer, ControlError> {
        let address = Listen::Unix(path.to_owned());
        match inherited.and_then(|table| table.take(Role::Control, &address)) {
            Some(fd) => ControlServer::adopt(path, fd),
            None => ControlServer::bind(path),
        }
    }

    /// Binds the control socket at `path`, mode 0600, creating its directory (0700) if missing.
    ///
    /// If a socket already exists there: when a process answers on it, this fails with
    /// [`ControlError::AlreadyRunning`] naming its pid; when nobody does (a supervisor crashed
    /// and left it), it is removed and replaced, and that is logged. Anything else at the path is
    /// left alone ([`ControlError::NotASocket`]). Must be called inside a tokio runtime.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let options = listeners::Options {
            mode: Some(SOCKET_MODE),
            directory_mode: Some(DIRECTORY_MODE),
            ..listeners::Options::new(Role::Control, BACKLOG)
        };
        let listener =
            listeners::bind_unix(path, &options).map_err(|error| control_error(path, error))?;
        let metadata = std::fs::symlink_metadata(path).map_err(|source| ControlError::Io {
            action: "cannot inspect the new control socket",
            path: path.to_owned(),
            source,
        })?;
        info!(path = %path.display(), "control socket listening");
        Ok(ControlServer::serving(listener, path, &metadata, true))
    }

    /// Takes over the control socket inherited from the supervisor this one replaces
    /// (`upgrade`): the same socket, file and queue of pending connections; nothing is unlinked
    /// or re-bound. Connections queue until [`ControlServer::accept`] is first awaited. The file
    /// is left alone at exit until [`ControlServer::set_owns_socket_file`] claims it. Must be
    /// called inside a tokio runtime.
    pub fn adopt(path: &Path, fd: OwnedFd) -> Result<ControlServer, ControlError> {
        let listener = listeners::adopt_unix(fd).map_err(|error| control_error(path, error))?;
        let metadata = std::fs::symlink_metadata(path).map_err(|source| ControlError::Io {
            action: "cannot inspect the inherited control socket",
            path: path.to_owned(),
            source,
        })?;
        info!(path = %path.display(), "control socket adopted from the previous supervisor");
        Ok(ControlServer::serving(listener, path, &metadata, false))
    }

    fn serving(
        listener: UnixListener,
        path: &Path,
        file: &std::fs::Metadata,
        owns_file: bool,
    ) -> ControlServer {
        let (requests_in, requests) = mpsc::channel(QUEUED_REQUESTS);
        ControlServer {
            listener,
            backoff: AcceptBackoff::new(format!("control socket {}", path.display())),
            path: path.to_owned(),
            identity: (file.dev(), file.ino()),
            owns_file,
            our_uid: nix::unistd::geteuid().as_raw(),
            requests_in,
            requests,
            connections: JoinSet::new(),
        }
    }

    /// Adds a duplicate of the listening socket to `table`, for a successor started by
    /// `upgrade` to inherit.
    pub fn duplicate_into(&self, table: &mut FdTable) -> io::Result<()> {
        let fd = self.listener.as_fd().try_clone_to_owned()?;
        table.insert(Role::Control, Listen::Unix(self.path.clone()), fd);
        Ok(())
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

/// The control socket's words for why `listeners` could not bind or adopt it.
fn control_error(path: &Path, error: SocketError) -> ControlError {
    let path = path.to_owned();
    match error {
        SocketError::NotASocket => ControlError::NotASocket { path },
        SocketError::InUse { pid } => ControlError::AlreadyRunning { path, pid },
        SocketError::PathTooLong { .. } => ControlError::PathTooLong { path },
        SocketError::Directory { path, error } => ControlError::Io {
            action: "cannot create the control socket's directory",
            path,
            source: error,
        },
        SocketError::Os { step, error } => ControlError::Io {
            action: match step {
                Step::Inspect => "cannot inspect",
                Step::Probe => "cannot connect to the control socket",
                Step::RemoveStale => "cannot remove the stale control socket",
                Step::Address => "invalid control socket path",
                Step::Create => "cannot create the control socket",
                Step::SetMode => "cannot set the mode of the control socket",
                Step::Bind => "cannot bind the control socket",
                Step::InspectNew => "cannot inspect the new control socket",
                Step::RestrictMode => "cannot restrict the mode of the control socket",
                Step::Listen => "cannot listen on the control socket",
                Step::Register => "cannot register the control socket with the runtime",
                Step::Adopt => "cannot adopt the inherited control socket",
            },
            path,
            source: error,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
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
