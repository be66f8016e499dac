//! The reload's warm-up request: `GET [web].warmup` sent through the canary exactly as a client's
//! request would reach it through nginx, and what it answered. The request names the site's host
//! (`proxy_conf::WarmUp`, resolved at load), since applications refuse hosts they do not serve;
//! an `https://` warm-up carries `X-Forwarded-Proto: https` as nginx's TLS server sends it. It has
//! no peer address, like a request on a Unix socket, so the environ believes that header.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::http::{Request, header};
use proxy_conf::WarmUp;

use super::Front;
use super::body::RequestBody;
use super::environ::{self, Connection, EnvironConfig};
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

/// Writes the environ of `warm_up` into `out`: the request nginx would forward for a client
/// asking for it (`Host`, and `X-Forwarded-Proto: https` for an `https://` warm-up), arriving
/// without a peer address as on a Unix socket, so the proxy's header is believed.
fn write_environ(
    out: &mut BytesMut,
    warm_up: &WarmUp,
    config: &EnvironConfig,
) -> Result<(), String> {
    let mut request = Request::builder()
        .method("GET")
        .uri(warm_up.path.as_str())
        .header(header::HOST, warm_up.host.as_str())
        .header(header::USER_AGENT, "sauna-supervisor warm-up");
    if warm_up.https {
        request = request.header("x-forwarded-proto", "https");
    }
    // proxy-conf admits only targets and hosts that parse; this is the error path if one did not.
    let (parts, ()) = request
        .body(())
        .map_err(|error| format!("[web].warmup {warm_up}: {error}"))?
        .into_parts();
    let connection = Connection {
        peer: None,
        local: None,
    };
    environ::write_environ(out, &parts, &connection, 0, config)
        .map_err(|error| format!("[web].warmup {warm_up}: {error}"))
}

/// Sends `GET` of `warm_up` to the worker holding `lease` (a reload's canary) exactly as a
/// client's request would reach it — same environ, same frames — and collects its status and
/// the head of its body. Fails with what went wrong when there is no complete answer within
/// `timeout`.
pub async fn warm_up(
    front: &Front,
    mut lease: crate::web::dispatch::Lease,
    warm_up: &WarmUp,
    timeout: Duration,
) -> Result<WarmUpAnswer, String> {
    let mut request = RequestFrame::new(512);
    write_environ(request.environ(), warm_up, &front.config().environ)?;
    lease.send(request.inline_body(&[], false), timeout);
    let mut exchange = Exchange::new(
        lease,
        RequestBody::Memory(Bytes::new()),
        0,
        timeout,
        Arc::from(format!("GET {warm_up} (warm-up)")),
    );
    let describe = |error: ExchangeError| match error {
        ExchangeError::Timeout => format!("GET {warm_up} got no answer within {timeout:?}"),
        other => format!("GET {warm_up} failed: {other}"),
    };
    let (head, mut body, mut end) = match exchange.next_event().await.map_err(describe)? {
        Event::Head { head, chunk, end } => (head, BytesMut::from(&chunk[..]), end),
        Event::Chunk(_) | Event::End => {
            return Err(format!(
                "GET {warm_up}: the worker sent a body before the head"
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
                return Err(format!("GET {warm_up}: the worker sent a second head"));
            }
        }
    }
    let status = build_response(&head, ResponseBody::Full(None))
        .map_err(|message| format!("GET {warm_up}: invalid response: {message}"))?
        .status()
        .as_u16();
    body.truncate(WARM_UP_BODY_HEAD);
    Ok(WarmUpAnswer {
        status,
        body_head: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::front::environ::tests::{get, pairs};

    /// The environ of `warm_up` as (key, value) pairs.
    fn environ(warm_up: &WarmUp) -> Vec<(String, String)> {
        let mut out = BytesMut::new();
        write_environ(&mut out, warm_up, &EnvironConfig::default()).unwrap();
        pairs(&out)
    }

    #[test]
    fn the_warm_up_names_its_host() {
        let env = environ(&WarmUp {
            host: "example.com".to_owned(),
            path: "/health?deep=1".to_owned(),
            https: false,
        });
        assert_eq!(get(&env, "HTTP_HOST"), Some("example.com"));
        assert_eq!(get(&env, "SERVER_NAME"), Some("example.com"));
        assert_eq!(get(&env, "SERVER_PORT"), Some("80"));
        assert_eq!(get(&env, "PATH_INFO"), Some("/health"));
        assert_eq!(get(&env, "QUERY_STRING"), Some("deep=1"));
        assert_eq!(get(&env, "wsgi.url_scheme"), Some("http"));
        assert_eq!(get(&env, "HTTP_X_FORWARDED_PROTO"), None);
    }

    #[test]
    fn an_https_warm_up_comes_as_forwarded_by_a_tls_proxy() {
        let env = environ(&WarmUp {
            host: "example.com".to_owned(),
            path: "/health".to_owned(),
            https: true,
        });
        assert_eq!(get(&env, "wsgi.url_scheme"), Some("https"));
        assert_eq!(get(&env, "HTTP_X_FORWARDED_PROTO"), Some("https"));
        assert_eq!(get(&env, "SERVER_PORT"), Some("443"));
        let with_port = environ(&WarmUp {
            host: "example.com:8443".to_owned(),
            path: "/".to_owned(),
            https: true,
        });
        assert_eq!(get(&with_port, "SERVER_NAME"), Some("example.com"));
        assert_eq!(get(&with_port, "SERVER_PORT"), Some("8443"));
    }
}
