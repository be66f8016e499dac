//! The reload's warm-up request: `GET [web].warmup` sent through the canary exactly as a client's
//! request would reach it, and what it answered.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::http::{Request, header};

use super::Front;
use super::body::RequestBody;
use super::environ::{self, Connection};
use super::exchange::{Event, Exchange, ExchangeError, ResponseBody};
use super::respond::build_response;
use crate::web::worker::frame::RequestFrame;

/// How a warm-up request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmUpAnswer {
    /// The response status.
    pub status: u16,
    /// The first bytes of the body (up to `WARM_UP_BODY_HEAD`), lossily decoded.
    pub body_head: String,
}

/// How much of a warm-up response body is kept for the operator.
const WARM_UP_BODY_HEAD: usize = 2048;

/// Sends `GET path` to the worker holding `lease` (a reload's canary) exactly as a client's
/// request would reach it — same environ, same frames — and collects its status and the head of
/// its body. Fails with what went wrong when there is no complete answer within `timeout`.
pub async fn warm_up(
    front: &Front,
    lease: crate::web::dispatch::Lease,
    path: &str,
    timeout: Duration,
) -> Result<WarmUpAnswer, String> {
    let config = front.config();
    let request = Request::builder()
        .method("GET")
        .uri(path)
        .header(header::HOST, "localhost")
        .header(header::USER_AGENT, "sauna-supervisor warm-up")
        .body(())
        .map_err(|error| format!("[web].warmup {path:?} is not a request path: {error}"))?;
    let (parts, ()) = request.into_parts();
    let mut request = RequestFrame::new(512);
    let connection = Connection {
        peer: None,
        local: None,
    };
    environ::write_environ(request.environ(), &parts, &connection, 0, &config.environ)
        .map_err(|error| format!("[web].warmup {path:?}: {error}"))?;
    let request_frame = request.inline_body(&[], false);
    let mut exchange = Exchange::new(
        lease,
        request_frame,
        RequestBody::Memory(Bytes::new()),
        0,
        timeout,
        Arc::from(format!("GET {path} (warm-up)")),
    );
    let describe = |error: ExchangeError| match error {
        ExchangeError::Timeout => format!("GET {path} got no answer within {timeout:?}"),
        other => format!("GET {path} failed: {other}"),
    };
    let (head, mut body, mut end) = match exchange.next_event().await.map_err(describe)? {
        Event::Head { head, chunk, end } => (head, BytesMut::from(&chunk[..]), end),
        Event::Chunk(_) | Event::End => {
            return Err(format!(
                "GET {path}: the worker sent a body before the head"
            ));
        }
    };
    while !end {
        match exchange.next_event().await.map_err(describe)? {
            Event::Chunk(chunk) => {
                if body.len() < WARM_UP_BODY_HEAD {
                    body.extend_from_slice(&chunk);
                }
            }
            Event::End => end = true,
            Event::Head { .. } => {
                return Err(format!("GET {path}: the worker sent a second head"));
            }
        }
    }
    let status = build_response(&head, ResponseBody::Full(None))
        .map_err(|message| format!("GET {path}: invalid response: {message}"))?
        .status()
        .as_u16();
    body.truncate(WARM_UP_BODY_HEAD);
    Ok(WarmUpAnswer {
        status,
        body_head: String::from_utf8_lossy(&body).into_owned(),
    })
}
