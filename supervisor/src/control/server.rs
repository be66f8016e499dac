//! The listening side of the control socket. [`ControlServer::accept`] (awaited in the main
//! loop's `select!`) admits connections and returns the requests of those it let in;
//! [`ControlServer::shutdown`] stops listening and lets the last answers out. Making the socket
//! file safely is `socket`'s job; serving one admitted connection is `connection`'s.
//!
//! Who may connect is decided twice. The socket file is 0600, so the kernel refuses `connect`
//! to other users before we see them; and every accepted connection's `SO_PEERCRED` must be root
//! or our own effective uid, which still holds if someone loosens the file's mode by hand.
//! Refused peers get one `error` line and are logged with their uid and pid.

mod connection;
mod socket;

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::UCred;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::protocol::{ErrorKind, ResponseBody};
use crate::listeners::AcceptBackoff;
pub use connection::{ControlRequest, Responder};
use connection::{MAX_REQUEST_BYTES, REQUEST_TIMEOUT, serve, write_line};

/// The bound control socket.
pub struct ControlServer {
    listener: UnixListener,
    /// The accept loop's pause when the process is out of descriptors.
    backoff: AcceptBackoff,
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

impl ControlServer {
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
                (stream, _) = self.backoff.accept(|| self.listener.accept()) => self.admit(stream),
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
}

fn pid_text(credentials: &UCred) -> String {
    credentials
        .pid()
        .map_or_else(|| String::from("unknown"), |pid| pid.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Output;

    use serde_json::json;
    use tokio::time::timeout;

    use super::*;
    use crate::control::ControlError;
    use crate::control::client::request;
    use crate::control::protocol::{Request, Response};
    use crate::supervisor::lifecycle::StopMode;

    pub(super) const WAIT: Duration = Duration::from_secs(10);

    /// A socket path in a fresh temp dir, below a directory that does not exist yet.
    pub(super) fn socket_path() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run").join("sauna").join("control.sock");
        (dir, path)
    }

    /// Sends `request` from a blocking client thread and collects every response line.
    pub(super) fn ask(path: &Path, request: Request) -> tokio::task::JoinHandle<Vec<Response>> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            request_lines(&path, &request).unwrap_or_else(|error| panic!("{error}"))
        })
    }

    pub(super) fn request_lines(path: &Path, req: &Request) -> Result<Vec<Response>, ControlError> {
        request(path, req, Some(WAIT))?.collect()
    }

    pub(super) async fn next_request(server: &mut ControlServer) -> ControlRequest {
        timeout(WAIT, server.accept())
            .await
            .expect("a request within 10 s")
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

    #[tokio::test]
    async fn another_user_is_refused_by_peer_credentials_and_logged() {
        let logs = crate::test_support::Captured::default();
        let _guard = tracing::subscriber::set_default(logs.subscriber());

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
        let logs = logs.text();
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
