//! One request from its head to its response: refusing what is unsafe to pass on (`CONNECT`,
//! a repeated or malformed `Host`, unknown transfer codings, bodies over `max_body`), receiving
//! the body, building the request frame with the environ, waiting for a worker slot (503 with
//! `Retry-After` when the queue is full or too slow), and turning the worker's answer into the
//! response (502 when the worker dies or answers nonsense — a complete body that contradicts the
//! app's own `Content-Length` included —, 504 on timeout), with the access log and request
//! metrics recorded on completion.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};

use super::Front;
use super::body::{self, BodyError, RequestBody};
use super::environ::{self, Connection};
use super::exchange::{Completion, Event, Exchange, ExchangeError, ResponseBody, Streaming};
use crate::web::dispatch::Rejected;
use crate::web::worker::frame::RequestFrame;

/// Bodies up to this size travel inside the request frame; larger ones are pulled by the worker.
const INLINE_BODY: u64 = 256 * 1024;

fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Full(Some(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(super) async fn handle(
    front: Arc<Front>,
    connection: Arc<Connection>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let accepted = Instant::now();
    let completion = Completion {
        metrics: Arc::clone(&front.metrics),
        access_log: front.config().access_log,
        method: request.method().as_str().to_owned(),
        path: request
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned(),
        status: 0,
        accepted,
        queue_wait: None,
        worker: None,
    };
    let mut response = respond(&front, &connection, request, completion).await;
    if front.draining.load(Ordering::Relaxed) {
        // Handed over to a successor: the client's next request goes to a fresh connection,
        // which the successor accepts.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

fn reject(
    front: &Front,
    reason: &str,
    mut response: Response<ResponseBody>,
    mut completion: Completion,
) -> Response<ResponseBody> {
    front
        .metrics
        .http_rejected_total
        .with_label_values(&[reason])
        .inc();
    completion.status = response.status().as_u16();
    completion.record(0, true);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The 503 of a request no worker took in time (or at all: a full queue, a stopping pool).
fn overloaded(front: &Front, rejected: Rejected, completion: Completion) -> Response<ResponseBody> {
    let mut response = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "Service temporarily overloaded, retry later\n",
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(front.config().retry_after),
    );
    let label = rejected.label().unwrap_or("queue_timeout");
    reject(front, label, response, completion)
}

/// Requests the front refuses before reading a body, because passing them on would be unsafe:
/// `CONNECT` (a 2xx answer would turn the connection into a tunnel nobody serves), a `Host` that
/// is repeated or not one `host[:port]`, or missing from an HTTP/1.1 request (RFC 9112 §3.2: 400,
/// as nginx answers; hyper would join two into `a, b`, and an app building links from the
/// header or falling back to `SERVER_NAME` could be made to point anywhere), and a transfer
/// coding other than `chunked` (RFC 9112 §6.1: 501, the body cannot be decoded). hyper already
/// drops `Content-Length` when `Transfer-Encoding` is present, as RFC 9112 §6.3 prescribes.
fn framing_problem(parts: &hyper::http::request::Parts) -> Option<(StatusCode, &'static str)> {
    if parts.method == Method::CONNECT {
        return Some((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n"));
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    if let (Some(host), None) = (hosts.next(), hosts.next()) {
        if !is_host(host.as_bytes()) {
            return Some((StatusCode::BAD_REQUEST, "Invalid Host header\n"));
        }
    } else if parts.headers.contains_key(header::HOST) {
        return Some((StatusCode::BAD_REQUEST, "More than one Host header\n"));
    } else if parts.version == hyper::Version::HTTP_11 {
        return Some((StatusCode::BAD_REQUEST, "Missing Host header\n"));
    }
    let mut codings = parts
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    if codings.all(|coding| coding.eq_ignore_ascii_case(b"chunked")) {
        return None;
    }
    Some((
        StatusCode::NOT_IMPLEMENTED,
        "Only the chunked transfer coding is supported\n",
    ))
}

/// Whether `value` is one `uri-host [ ":" port ]` (RFC 9110 §7.2), or empty (allowed when the
/// request target has no authority). A comma is refused although RFC 3986 allows it in a name:
/// it is how two `Host` values look once joined.
fn is_host(value: &[u8]) -> bool {
    let (host, port) = match value.strip_prefix(b"[") {
        Some(literal) => match literal.iter().position(|&byte| byte == b']') {
            Some(end) => {
                let address = &literal[..end];
                let valid = !address.is_empty()
                    && address
                        .iter()
                        .all(|&byte| byte.is_ascii_hexdigit() || matches!(byte, b':' | b'.'));
                if !valid {
                    return false;
                }
                (&b""[..], &literal[end + 1..])
            }
            None => return false,
        },
        None => match value.iter().rposition(|&byte| byte == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &b""[..]),
        },
    };
    let name = host.iter().all(|&byte| {
        byte.is_ascii_alphanumeric()
            || matches!(
                byte,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b';'
                    | b'='
            )
    });
    let port = match port.strip_prefix(b":") {
        Some(digits) => digits.iter().all(u8::is_ascii_digit),
        None => port.is_empty(),
    };
    name && port
}

async fn respond(
    front: &Front,
    connection: &Connection,
    request: Request<Incoming>,
    mut completion: Completion,
) -> Response<ResponseBody> {
    let config = front.config();
    let (parts, incoming) = request.into_parts();
    if let Some((status, message)) = framing_problem(&parts) {
        return reject(front, "bad_request", plain(status, message), completion);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if config.max_body > 0 && declared.is_some_and(|length| length > config.max_body) {
        return reject(
            front,
            "body_too_large",
            plain(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large\n"),
            completion,
        );
    }
    let body = match body::receive(incoming, config.max_body, config.body_buffer).await {
        Ok(body) => body,
        Err(BodyError::TooLarge(_)) => {
            return reject(
                front,
                "body_too_large",
                plain(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large\n"),
                completion,
            );
        }
        Err(BodyError::Client(error)) => {
            tracing::debug!("client sent a broken body or left: {error}");
            return reject(
                front,
                "bad_request",
                plain(StatusCode::BAD_REQUEST, "Bad request body\n"),
                completion,
            );
        }
        Err(BodyError::Spill(error)) => {
            tracing::error!("{error}");
            return reject(
                front,
                "body_buffer",
                plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Cannot buffer the request body\n",
                ),
                completion,
            );
        }
    };

    let mut request = RequestFrame::new(1024);
    if let Err(error) = environ::write_environ(
        request.environ(),
        &parts,
        connection,
        body.len(),
        &config.environ,
    ) {
        tracing::debug!(
            "refusing {} {}: {error}",
            completion.method,
            completion.path
        );
        return reject(
            front,
            "bad_request",
            plain(StatusCode::BAD_REQUEST, "Bad request path\n"),
            completion,
        );
    }
    // The body is always complete and CONTENT_LENGTH always set, but an app reading a chunked
    // request may rely on `wsgi.input_terminated` (Werkzeug, mod_wsgi and gunicorn's convention).
    let terminated = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let (request_frame, offset) = match &body {
        RequestBody::Memory(bytes) if body.len() <= INLINE_BODY => {
            (request.inline_body(bytes, terminated), body.len())
        }
        _ => (request.pulled_body(terminated), 0),
    };

    let lease = match front
        .dispatcher
        .acquire(request_frame, config.timeout)
        .await
    {
        Ok(lease) => lease,
        Err(Rejected::WorkerGone(worker)) => {
            tracing::error!(
                "worker {worker} died while serving {} {}",
                completion.method,
                completion.path
            );
            let response = plain(
                StatusCode::BAD_GATEWAY,
                "Bad Gateway: the application worker died\n",
            );
            completion.status = response.status().as_u16();
            completion.record(0, true);
            return response;
        }
        Err(rejected) => return overloaded(front, rejected, completion),
    };
    let queue_wait = completion.accepted.elapsed();
    front
        .metrics
        .http_queue_wait_seconds
        .observe(queue_wait.as_secs_f64());
    completion.queue_wait = Some(queue_wait);
    completion.worker = Some(lease.slot());
    let context: Arc<str> = Arc::from(format!("{} {}", completion.method, completion.path));
    let mut exchange = Exchange::new(lease, body, offset, config.timeout, context);

    let failure = match exchange.head().await {
        Ok(Event::Head { head, chunk, end }) => {
            match build_response(&head, ResponseBody::Full(None)) {
                Ok(mut response) => {
                    completion.status = response.status().as_u16();
                    let bodiless = is_bodiless(response.status(), &parts.method);
                    let declared = if bodiless {
                        None
                    } else {
                        declared_length(&response)
                    };
                    if end {
                        // A response that cannot have a body gets none from here: the app's
                        // `Content-Length` (of the GET, for a HEAD) goes out as it is.
                        if !bodiless {
                            *response.body_mut() = ResponseBody::Full(Some(chunk.clone()));
                        }
                        let sent = chunk.len() as u64;
                        if let Some(declared) = declared.filter(|&declared| declared != sent) {
                            // Known before a byte is sent: the client gets a clean 502 instead
                            // of a body that ends early or runs on.
                            completion.log_length_mismatch(declared, sent);
                            (
                                StatusCode::BAD_GATEWAY,
                                "Bad Gateway: the application sent an invalid response\n",
                            )
                        } else {
                            completion.record(sent, true);
                            return response;
                        }
                    } else {
                        *response.body_mut() = ResponseBody::Stream(Box::new(Streaming::new(
                            exchange, chunk, completion, declared,
                        )));
                        return response;
                    }
                }
                Err(message) => {
                    tracing::error!(
                        "the application sent an invalid response to {} {}: {message}",
                        completion.method,
                        completion.path
                    );
                    (
                        StatusCode::BAD_GATEWAY,
                        "Bad Gateway: the application sent an invalid response\n",
                    )
                }
            }
        }
        Ok(Event::Chunk(_) | Event::End) => {
            tracing::error!("worker sent a body before the response head");
            (StatusCode::BAD_GATEWAY, "Bad Gateway\n")
        }
        Err(ExchangeError::NotStarted) => {
            completion.queue_wait = None;
            completion.worker = None;
            return overloaded(front, Rejected::QueueTimeout, completion);
        }
        Err(ExchangeError::Timeout) => (
            StatusCode::GATEWAY_TIMEOUT,
            "Gateway Timeout: the application did not answer in time\n",
        ),
        Err(ExchangeError::WorkerGone) => {
            tracing::error!(
                "worker {} died while serving {} {}",
                completion.worker.unwrap_or_default(),
                completion.method,
                completion.path
            );
            (
                StatusCode::BAD_GATEWAY,
                "Bad Gateway: the application worker died\n",
            )
        }
        Err(
            error @ (ExchangeError::Protocol(_)
            | ExchangeError::AppFailed
            | ExchangeError::LengthMismatch),
        ) => {
            tracing::error!(
                "serving {} {} failed: {error}",
                completion.method,
                completion.path
            );
            (StatusCode::BAD_GATEWAY, "Bad Gateway\n")
        }
    };
    let response = plain(failure.0, failure.1);
    completion.status = response.status().as_u16();
    completion.record(0, true);
    response
}

/// Whether a response has no body whatever its headers say (RFC 9110 §6.4.1): one to `HEAD`,
/// 1xx, 204 and 304.
fn is_bodiless(status: StatusCode, method: &Method) -> bool {
    method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The body length the app's `Content-Length` promises (RFC 9110 §8.6).
fn declared_length(response: &Response<ResponseBody>) -> Option<u64> {
    response
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Hop-by-hop headers belong to the connection hyper manages, not to the app.
fn is_hop_by_hop(name: &[u8]) -> bool {
    [
        &b"connection"[..],
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
    ]
    .iter()
    .any(|hop| name.eq_ignore_ascii_case(hop))
}

/// Builds the response from the worker's `status\0name\0value…` head.
pub(super) fn build_response(
    head: &[u8],
    body: ResponseBody,
) -> Result<Response<ResponseBody>, String> {
    let mut fields = head.split(|byte| *byte == 0);
    let status_line = fields.next().unwrap_or_default();
    let code = status_line
        .get(..3)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| format!("invalid status {:?}", String::from_utf8_lossy(status_line)))?;
    let mut response = Response::new(body);
    *response.status_mut() = code;
    let reason = status_line.get(4..).unwrap_or_default();
    if !reason.is_empty() && code.canonical_reason().map(str::as_bytes) != Some(reason) {
        if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.to_vec()) {
            response.extensions_mut().insert(reason);
        }
    }
    let headers = response.headers_mut();
    while let Some(name) = fields.next() {
        let value = fields.next().ok_or("a header without a value")?;
        if is_hop_by_hop(name) {
            continue;
        }
        let name = HeaderName::from_bytes(name)
            .map_err(|_| format!("invalid header name {:?}", String::from_utf8_lossy(name)))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| format!("invalid value of header {name}"))?;
        headers.append(name, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_one_name_or_address_with_an_optional_port() {
        for valid in [
            &b""[..],
            b"localhost",
            b"example.com:8000",
            b"127.0.0.1:80",
            b"[::1]:8000",
            b"[2001:db8::1]",
            b"my_host.internal",
            b"xn--caf-dma.example",
        ] {
            assert!(is_host(valid), "{:?}", String::from_utf8_lossy(valid));
        }
        for invalid in [
            &b"localhost, evil.example.com"[..],
            b"a,b",
            b"evil.example.com/path",
            b"user@example.com",
            b"example.com:80x",
            b"[::1",
            b"[evil.example.com]",
            b"a b",
        ] {
            assert!(!is_host(invalid), "{:?}", String::from_utf8_lossy(invalid));
        }
    }

    #[test]
    fn worker_heads_become_responses() {
        let head = b"201 Made It\0Content-Type\0text/plain\0Set-Cookie\0a=1\0Set-Cookie\0b=2\0Transfer-Encoding\0chunked";
        let response = build_response(head, ResponseBody::Full(None)).unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers().get_all("set-cookie").iter().count(), 2);
        assert!(response.headers().get("transfer-encoding").is_none());
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .unwrap();
        assert_eq!(reason.as_bytes(), b"Made It");
        assert!(build_response(b"2x0 OK", ResponseBody::Full(None)).is_err());
        assert!(build_response(b"200 OK\0X-Odd", ResponseBody::Full(None)).is_err());
        assert!(build_response(b"200 OK\0Bad Name\0v", ResponseBody::Full(None)).is_err());
    }
}
