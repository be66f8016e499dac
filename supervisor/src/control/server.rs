//! The listening side of the control socket. [`ControlServer::bind`] makes the socket safely;
//! [`ControlServer::accept`] (awaited in the main loop's `select!`) admits connections and
//! returns the requests of those it let in.
//!
//! Each admitted connection gets its own task that reads the request line, hands it over, and
//! writes the main loop's answers as they come through an unbounded channel: a client that reads
//! slowly, or not at all, delays only its own task, never the main loop.
//!
//! Who may connect is decided twice. The socket file is 0600, so the kernel refuses `connect`
//! to other users before we see them; and every accepted connection's `SO_PEERCRED` must be root
//! or our own effective uid, which still holds if someone loosens the file's mode by hand.
//! Refused peers get one `error` line and are logged with their uid and pid.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, bind as bind_fd, getsockopt, listen, socket,
    sockopt::PeerCredentials,
};
use nix::sys::stat::{Mode, fchmod};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedWriteHalf, UCred};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::ControlError;
use super::client::{connect, socket_address};
use super::protocol::{
    ErrorKind, PROTOCOL_VERSION, Request, Response, ResponseBody, parse_request,
};

/// Mode of the socket file.
const SOCKET_MODE: u32 = 0o600;
/// Mode of a socket directory this module creates.
const DIRECTORY_MODE: u32 = 0o700;
/// A request line longer than this is refused.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// A client that connects but sends no complete request line within this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests read but not yet taken by [`ControlServer::accept`].
const QUEUED_REQUESTS: usize = 64;

/// The bound control socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created, so that dropping the server removes our
    /// socket and never a newer supervisor's that replaced it.
    identity: (u64, u64),
    /// Whether shutting down or dropping removes the socket file: not for a socket adopted in an
    /// upgrade until the old supervisor has released it (a successor that fails must leave the
    /// file to the old one), nor once it was handed to a successor.
    owns_file: bool,
    our_uid: u32,
    requests_in: mpsc::Sender<ControlRequest>,
    requests: mpsc::Receiver<ControlRequest>,
    connections: JoinSet<()>,
}

/// A request from an admitted client, and the way to answer it.
#[derive(Debug)]
pub struct ControlRequest {
    /// What the client asks.
    pub request: Request,
    /// Sends the answer; dropping it unanswered tells the client the request was dropped.
    pub reply: Responder,
}

/// Sends response lines to one client. [`Responder::progress`] any number of times, then exactly
/// one [`Responder::ok`] or [`Responder::error`], which consume it. Sending never blocks and
/// never fails: when the client has gone, lines are dropped.
#[derive(Debug)]
pub struct Responder {
    lines: mpsc::UnboundedSender<ResponseBody>,
}

impl Responder {
    /// Sends a progress line (not final).
    pub fn progress(&self, message: impl Into<String>) {
        self.send(ResponseBody::Progress {
            message: message.into(),
        });
    }

    /// Sends the final success line with `data` (`Value::Null` when there is nothing to say).
    pub fn ok(self, data: serde_json::Value) {
        self.send(ResponseBody::Ok { data });
    }

    /// Sends the final failure line: `message` says what failed and what to do, `detail` is
    /// printed after it (an application traceback, say).
    pub fn error(self, kind: ErrorKind, message: impl Into<String>, detail: Option<String>) {
        self.send(ResponseBody::Error {
            error: kind,
            message: message.into(),
            detail,
        });
    }

    fn send(&self, body: ResponseBody) {
        // An error only means the connection task has ended: the client left.
        let _ = self.lines.send(body);
    }
}

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

    /// Waits for the next request from an admitted client.
    ///
    /// Cancel-safe, for use in a `select!`: connections accepted meanwhile keep being served by
    /// their own tasks, and a request read but not returned stays queued for the next call.
    pub async fn accept(&mut self) -> ControlRequest {
        loop {
            tokio::select! {
                // Never `None`: `self.requests_in` keeps the channel open.
                Some(request) = self.requests.recv() => return request,
                Some(_) = self.connections.join_next(), if !self.connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => self.admit(stream),
                    Err(error) => {
                        // EMFILE and friends: the listener stays readable, so pause instead of
                        // spinning until a descriptor is free.
                        warn!(path = %self.path.display(), %error, "control socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Stops listening, removes the socket file, and gives connections up to `grace` to write
    /// their last lines (the `stop` client waits for its answer before the process exits).
    pub async fn shutdown(mut self, grace: Duration) {
        self.remove_socket_file();
        let connections = std::mem::take(&mut self.connections);
        drop(self);
        let drain = async {
            let mut connections = connections;
            while connections.join_next().await.is_some() {}
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            debug!("control socket: clients still connected at exit were dropped");
        }
    }

    /// Checks the peer and starts serving the connection, or refuses it.
    fn admit(&mut self, stream: tokio::net::UnixStream) {
        let credentials = match stream.peer_cred() {
            Ok(credentials) => credentials,
            Err(error) => {
                warn!(%error, "control socket: cannot read the peer's credentials; refused");
                return;
            }
        };
        if credentials.uid() == 0 || credentials.uid() == self.our_uid {
            let requests = self.requests_in.clone();
            self.connections.spawn(serve(stream, credentials, requests));
        } else {
            warn!(
                uid = credentials.uid(),
                pid = credentials.pid(),
                "control socket: refused a connection from uid {} (pid {}): only root and uid {} \
                 may control this supervisor",
                credentials.uid(),
                pid_text(&credentials),
                self.our_uid,
            );
            let message = format!(
                "permission denied: uid {} may not control this supervisor (run as root or uid {})",
                credentials.uid(),
                self.our_uid
            );
            self.connections.spawn(async move {
                let (reader, mut writer) = stream.into_split();
                // Take the request line before answering: closing on a client that is still
                // writing would fail its write (EPIPE) and hide the refusal from it.
                let mut ignored = String::new();
                let mut reader = BufReader::new(reader.take(MAX_REQUEST_BYTES));
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut ignored)).await;
                let refusal = ResponseBody::Error {
                    error: ErrorKind::Refused,
                    message,
                    detail: None,
                };
                let _ = write_line(&mut writer, refusal).await;
            });
        }
    }

    fn remove_socket_file(&self) {
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

fn pid_text(credentials: &UCred) -> String {
    credentials
        .pid()
        .map_or_else(|| String::from("unknown"), |pid| pid.to_string())
}

/// Serves one admitted connection: reads the request, hands it to the main loop, writes answers.
async fn serve(
    stream: tokio::net::UnixStream,
    peer: UCred,
    requests: mpsc::Sender<ControlRequest>,
) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader.take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Err(format!(
            "no request line within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(Err(error)) => Err(format!("cannot read the request: {error}")),
        // The client connected and left (a liveness probe such as `bind`'s): nothing to answer.
        Ok(Ok(0)) => return,
        Ok(Ok(_)) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST_BYTES => Err(
            format!("the request is longer than {MAX_REQUEST_BYTES} bytes"),
        ),
        Ok(Ok(_)) => parse_request(line.trim_end()),
    };
    let request = match request {
        Ok(request) => request,
        Err(message) => {
            debug!(uid = peer.uid(), pid = peer.pid(), %message, "control socket: bad request");
            let body = ResponseBody::Error {
                error: ErrorKind::BadRequest,
                message,
                detail: None,
            };
            let _ = write_line(&mut writer, body).await;
            return;
        }
    };
    debug!(
        uid = peer.uid(),
        pid = peer.pid(),
        ?request,
        "control request"
    );
    let (lines_in, mut lines) = mpsc::unbounded_channel();
    let handed_over = requests
        .send(ControlRequest {
            request,
            reply: Responder { lines: lines_in },
        })
        .await;
    if handed_over.is_err() {
        let body = ResponseBody::Error {
            error: ErrorKind::Unavailable,
            message: String::from("the supervisor is shutting down"),
            detail: None,
        };
        let _ = write_line(&mut writer, body).await;
        return;
    }
    loop {
        let body = lines.recv().await.unwrap_or_else(|| ResponseBody::Error {
            error: ErrorKind::Unavailable,
            message: String::from("the supervisor dropped the request without answering"),
            detail: None,
        });
        let last = body.is_final();
        if let Err(error) = write_line(&mut writer, body).await {
            debug!(%error, "control socket: client left before the answer was written");
            return;
        }
        if last {
            return;
        }
    }
}

/// Writes one response line.
async fn write_line(writer: &mut OwnedWriteHalf, body: ResponseBody) -> io::Result<()> {
    let response = Response {
        v: PROTOCOL_VERSION,
        pid: std::process::id(),
        body,
    };
    let mut line = serde_json::to_vec(&response).map_err(io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, Write};
    use std::process::Output;
    use std::sync::{Arc, Mutex};

    use serde_json::json;
    use tokio::time::timeout;

    use super::*;
    use crate::control::client::request;
    use crate::supervisor::lifecycle::StopMode;

    const WAIT: Duration = Duration::from_secs(10);

    /// A socket path in a fresh temp dir, below a directory that does not exist yet.
    fn socket_path() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run").join("sauna").join("control.sock");
        (dir, path)
    }

    /// Sends `request` from a blocking client thread and collects every response line.
    fn ask(path: &Path, request: Request) -> tokio::task::JoinHandle<Vec<Response>> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            request_lines(&path, &request).unwrap_or_else(|error| panic!("{error}"))
        })
    }

    fn request_lines(path: &Path, req: &Request) -> Result<Vec<Response>, ControlError> {
        request(path, req, Some(WAIT))?.collect()
    }

    async fn next_request(server: &mut ControlServer) -> ControlRequest {
        timeout(WAIT, server.accept())
            .await
            .expect("a request within 10 s")
    }

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
    async fn reload_streams_progress_then_the_result() {
        let (_dir, path) = socket_path();
        let mut server = ControlServer::bind(&path).expect("bind");
        let client = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                let mut progress = Vec::new();
                let reload = Request::Reload {
                    timeout_secs: Some(60),
                };
                let last = request(&path, &reload, Some(WAIT))
                    .and_then(|replies| replies.wait(|line| progress.push(line.to_owned())))
                    .unwrap_or_else(|error| panic!("{error}"));
                (progress, last)
            }
        });
        let ControlRequest { request, reply } = next_request(&mut server).await;
        assert_eq!(
            request,
            Request::Reload {
                timeout_secs: Some(60)
            }
        );
        reply.progress("generation 2: starting 4 workers");
        reply.progress("generation 2: 4/4 workers ready");
        reply.error(
            ErrorKind::Failed,
            "rolled back",
            Some("Traceback ...".into()),
        );
        let (progress, last) = client.await.expect("client thread");
        assert_eq!(
            progress,
            [
                "generation 2: starting 4 workers",
                "generation 2: 4/4 workers ready"
            ]
        );
        assert_eq!(
            last.body,
            ResponseBody::Error {
                error: ErrorKind::Failed,
                message: "rolled back".into(),
                detail: Some("Traceback ...".into())
            }
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

    #[tokio::test]
    async fn bad_requests_get_an_error_line_and_never_reach_the_main_loop() {
        let (_dir, path) = socket_path();
        let mut server = ControlServer::bind(&path).expect("bind");
        let client = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
                stream.write_all(b"{\"cmd\":\"dance\"}\n").expect("write");
                let mut line = String::new();
                std::io::BufReader::new(stream)
                    .read_line(&mut line)
                    .expect("read");
                serde_json::from_str::<Response>(&line).expect("a response line")
            }
        });
        let answer = tokio::select! {
            request = server.accept() => panic!("bad request handed over: {request:?}"),
            answer = client => answer.expect("client thread"),
        };
        assert!(
            matches!(&answer.body, ResponseBody::Error { error: ErrorKind::BadRequest, message, .. }
                if message.contains("dance")),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn a_client_gives_up_after_its_timeout() {
        let (_dir, path) = socket_path();
        let mut server = ControlServer::bind(&path).expect("bind");
        let client = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                request(&path, &Request::Status, Some(Duration::from_millis(200)))
                    .expect("connect")
                    .wait(|_| {})
            }
        });
        // Hold the request unanswered until the client has given up.
        let _unanswered = next_request(&mut server).await;
        let error = client.await.expect("client thread").expect_err("timed out");
        assert!(matches!(error, ControlError::Timeout { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn a_dropped_responder_tells_the_client() {
        let (_dir, path) = socket_path();
        let mut server = ControlServer::bind(&path).expect("bind");
        let client = ask(&path, Request::Status);
        drop(next_request(&mut server).await);
        let lines = client.await.expect("client thread");
        assert!(
            matches!(
                &lines[..],
                [Response {
                    body: ResponseBody::Error {
                        error: ErrorKind::Unavailable,
                        ..
                    },
                    ..
                }]
            ),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_delivers_the_last_answer_and_removes_the_socket() {
        let (_dir, path) = socket_path();
        let mut server = ControlServer::bind(&path).expect("bind");
        let client = ask(
            &path,
            Request::Stop {
                mode: StopMode::Graceful,
            },
        );
        let stop = next_request(&mut server).await;
        stop.reply.ok(serde_json::Value::Null);
        server.shutdown(WAIT).await;
        assert!(!path.exists());
        let lines = client.await.expect("client thread");
        assert!(matches!(
            &lines[..],
            [Response {
                body: ResponseBody::Ok { .. },
                ..
            }]
        ));
    }

    /// Runs a Python client as uid/gid 65534 (nobody) that sends a status request to `path` and
    /// prints what happened; `server` keeps accepting meanwhile, and must not hand a request over.
    async fn as_nobody(server: &mut ControlServer, path: &Path) -> String {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test starts a client as another user and must run as root (it does in CI and \
             on the development machines): run `cargo test` as root"
        );
        for (tool, package) in [
            ("/usr/bin/setpriv", "util-linux"),
            ("/usr/bin/python3", "python3"),
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: apt-get install -y {package}"
            );
        }
        const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as error:
    print("connect failed:", error.strerror)
    sys.exit(0)
s.sendall(b'{"cmd":"status"}\n')
print("answer:", s.makefile().readline().strip())
"#;
        let child = tokio::process::Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", CLIENT])
            .arg(path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output();
        let output: Output = tokio::select! {
            request = server.accept() => panic!("a request from uid 65534 was handed over: {request:?}"),
            output = timeout(WAIT, child) => output.expect("client within 10 s").expect("run setpriv"),
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "client failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Makes the temp dirs above `path` traversable by other users, as /run is.
    fn open_directories(dir: &tempfile::TempDir, path: &Path) {
        let mut current = path.parent();
        while let Some(directory) = current.filter(|d| d.starts_with(dir.path())) {
            std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            current = directory.parent();
        }
    }

    #[tokio::test]
    async fn another_user_cannot_connect_through_the_socket_mode() {
        let (dir, path) = socket_path();
        let mut server = ControlServer::bind(&path).expect("bind");
        open_directories(&dir, &path);
        let stdout = as_nobody(&mut server, &path).await;
        assert_eq!(stdout.trim(), "connect failed: Permission denied");
    }

    /// Collects formatted log lines for one test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn another_user_is_refused_by_peer_credentials_and_logged() {
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let logs = logs.clone();
                move || logs.clone()
            })
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let (dir, path) = socket_path();
        let mut server = ControlServer::bind(&path).expect("bind");
        open_directories(&dir, &path);
        // Open the file itself, so only the SO_PEERCRED check stands in the way.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let stdout = as_nobody(&mut server, &path).await;
        let answer: Response = serde_json::from_str(
            stdout
                .trim()
                .strip_prefix("answer: ")
                .unwrap_or_else(|| panic!("no answer: {stdout}")),
        )
        .expect("a response line");
        assert!(
            matches!(&answer.body, ResponseBody::Error { error: ErrorKind::Refused, message, .. }
                if message.contains("uid 65534")),
            "{answer:?}"
        );
        let logs = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("UTF-8");
        assert!(
            logs.contains("refused a connection from uid 65534 (pid "),
            "{logs}"
        );

        // Root still gets through.
        let client = ask(&path, Request::Status);
        next_request(&mut server).await.reply.ok(json!({}));
        assert_eq!(client.await.expect("client").len(), 1);
    }
}
