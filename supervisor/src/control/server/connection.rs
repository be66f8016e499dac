//! One admitted connection: reading its request line (at most [`MAX_REQUEST_BYTES`], within
//! [`REQUEST_TIMEOUT`]), handing it to the main loop as a [`ControlRequest`], and writing the
//! answers as they come — any number of progress lines, then one final line.
//!
//! Each connection runs in its own task and gets the main loop's answers through an unbounded
//! channel ([`Responder`]): a client that reads slowly, or not at all, delays only its own task,
//! never the main loop.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedWriteHalf, UCred};
use tokio::sync::mpsc;
use tracing::debug;

use crate::control::protocol::{
    ErrorKind, PROTOCOL_VERSION, Request, Response, ResponseBody, parse_request,
};

/// A request line longer than this is refused.
pub(super) const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// A client that connects but sends no complete request line within this long is dropped.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Serves one admitted connection: reads the request, hands it to the main loop, writes answers.
pub(super) async fn serve(
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
pub(super) async fn write_line(writer: &mut OwnedWriteHalf, body: ResponseBody) -> io::Result<()> {
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

    use super::*;
    use crate::control::ControlError;
    use crate::control::client::request;
    use crate::control::server::ControlServer;
    use crate::control::server::tests::{WAIT, ask, next_request, socket_path};

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
}
