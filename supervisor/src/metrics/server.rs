//! The HTTP endpoint that Prometheus and health probes talk to: `GET /metrics` (text format
//! 0.0.4 of every family in [`Metrics`]), `GET /healthz` and `GET /readyz`, on `[metrics].listen`,
//! optionally behind a bearer token.
//!
//! It owns the endpoint's listening socket (bound or adopted through `listeners`), the
//! connections and the [`Health`] snapshot protocol between the main loop and the probes. It
//! deliberately does not decide what is healthy: the main loop knows each role's policy and
//! publishes its verdict as a [`Health`] on a `watch` channel; this module only adds the one check
//! the main loop cannot make about itself — that it is still publishing.
//! Nothing here touches supervisor state, so a scrape never waits on the main loop.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use proxy_conf::{Listen, MetricsConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::listeners::{self, AcceptBackoff, FdTable, Role, SocketError};
use crate::metrics::Metrics;

/// A heartbeat older than this makes `/healthz` report the main loop as hung. The main loop
/// publishes at least every second, so this leaves room for a slow iteration without flapping.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client that has not sent its request headers within this is disconnected, so idle or
/// slow connections cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more are closed on accept. Scrapers and probes need a handful.
const MAX_CONNECTIONS: usize = 64;

/// Connections the kernel queues before they are accepted (what the standard library's
/// `TcpListener::bind`, which the endpoint used before `listeners`, asks for).
const BACKLOG: u32 = 128;

/// The exposition format 0.0.4, with the charset made explicit.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The main loop's verdict on the supervisor, sent on every loop iteration and at least every
/// second through a `tokio::sync::watch` channel.
#[derive(Debug, Clone)]
pub struct Health {
    /// The first generation is serving; `/readyz` answers 200 from then on. Set it back to
    /// `false` while stopping, so load balancers drain.
    pub ready: bool,
    /// Roles outside their policy, one sentence each (`program "celery" is fatal: …`);
    /// `/healthz` answers 503 while this is not empty.
    pub problems: Vec<String>,
    /// When the main loop produced this snapshot.
    pub heartbeat: Instant,
}

impl Health {
    /// The snapshot before the first generation serves: alive, not ready, no problems.
    pub fn starting() -> Health {
        Health {
            ready: false,
            problems: Vec::new(),
            heartbeat: Instant::now(),
        }
    }

    /// A fresh snapshot stamped now.
    pub fn now(ready: bool, problems: Vec<String>) -> Health {
        Health {
            ready,
            problems,
            heartbeat: Instant::now(),
        }
    }
}

/// Why the endpoint could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    /// The listening socket could not be bound.
    #[error(
        "metrics endpoint: cannot listen on \"{listen}\": {error} (set [metrics].listen to a free host:port, or \"\" to disable the endpoint)"
    )]
    Bind {
        /// `[metrics].listen`.
        listen: SocketAddr,
        /// Why.
        error: SocketError,
    },
    /// `[metrics].token_file` could not be read.
    #[error("metrics endpoint: cannot read the bearer token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `[metrics].token_env` names an unset or non-UTF-8 variable.
    #[error(
        "metrics endpoint: [metrics].token_env names ${name}, which is not set in the supervisor's environment"
    )]
    TokenEnvMissing {
        /// The variable's name.
        name: String,
    },
    /// The token source holds only whitespace; refusing to run with an empty token.
    #[error("metrics endpoint: the bearer token from {from} is empty")]
    TokenEmpty {
        /// Where the token came from (`file …` or `$NAME`).
        from: String,
    },
}

/// The running endpoint. Dropping it stops accepting and closes open connections.
#[derive(Debug)]
pub struct MetricsServer {
    /// `[metrics].listen` as configured (port 0 stays 0): the key of the socket in an upgrade's
    /// fd table.
    listen: SocketAddr,
    local_addr: SocketAddr,
    /// A duplicate of the listening socket, for a successor started by `upgrade` to inherit.
    socket: Option<OwnedFd>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Adds a duplicate of the listening socket to `table`, for a successor started by
    /// `upgrade` to inherit.
    pub fn duplicate_into(&self, table: &mut FdTable) -> io::Result<()> {
        let socket = match &self.socket {
            Some(socket) => socket.try_clone()?,
            None => {
                return Err(io::Error::other(
                    "the metrics socket could not be duplicated when it was bound",
                ));
            }
        };
        table.insert(Role::Metrics, Listen::Tcp(self.listen), socket);
        Ok(())
    }

    /// Stops accepting, closes open connections and waits for the accept task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        // Dropping `stop` already ends the accept loop; aborting also covers a task that is
        // between two polls of its select.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts the endpoint described by `[metrics]`, or returns `None` when it is off (`listen = ""`).
/// A relative `token_file` is taken relative to `config_dir` (the config file's directory).
pub async fn start(
    config: &MetricsConfig,
    config_dir: &Path,
    metrics: Arc<Metrics>,
    health: watch::Receiver<Health>,
) -> Result<Option<MetricsServer>, MetricsServerError> {
    start_on(config, config_dir, metrics, health, None).await
}

/// [`start`] on the socket `inherited` holds for the same `listen`, when it does: the socket a
/// successor adopts in an upgrade, bound by the supervisor it replaces. Both processes answer on
/// it until the old one hands over.
pub async fn start_on(
    config: &MetricsConfig,
    config_dir: &Path,
    metrics: Arc<Metrics>,
    health: watch::Receiver<Health>,
    inherited: Option<&mut FdTable>,
) -> Result<Option<MetricsServer>, MetricsServerError> {
    let Some(listen) = config.listen else {
        return Ok(None);
    };
    let token = read_token(config, config_dir)?;
    let listener =
        match inherited.and_then(|table| table.take(Role::Metrics, &Listen::Tcp(listen))) {
            Some(fd) => listeners::adopt_tcp(fd)
                .map_err(|error| MetricsServerError::Bind { listen, error })?,
            None => bind(listen)?,
        };
    serve_on(listen, listener, token, metrics, health).map(Some)
}

fn bind(listen: SocketAddr) -> Result<TcpListener, MetricsServerError> {
    listeners::bind_tcp(listen, &listeners::Options::new(Role::Metrics, BACKLOG))
        .map_err(|error| MetricsServerError::Bind { listen, error })
}

/// The bearer token `[metrics]` asks for: the trimmed contents of `token_file`, else of the
/// environment variable `token_env`, else none.
pub fn read_token(
    config: &MetricsConfig,
    config_dir: &Path,
) -> Result<Option<String>, MetricsServerError> {
    let (token, from) = if let Some(file) = &config.token_file {
        let path = config_dir.join(file);
        let text =
            std::fs::read_to_string(&path).map_err(|source| MetricsServerError::TokenFile {
                path: path.clone(),
                source,
            })?;
        (text, format!("file {}", path.display()))
    } else if let Some(name) = &config.token_env {
        let value = std::env::var(name)
            .map_err(|_| MetricsServerError::TokenEnvMissing { name: name.clone() })?;
        (value, format!("${name}"))
    } else {
        return Ok(None);
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(MetricsServerError::TokenEmpty { from });
    }
    Ok(Some(token.to_owned()))
}

/// Binds `listen` and serves until the returned [`MetricsServer`] is shut down or dropped.
/// With `token`, every request must carry `Authorization: Bearer <token>`.
pub async fn serve(
    listen: SocketAddr,
    token: Option<String>,
    metrics: Arc<Metrics>,
    health: watch::Receiver<Health>,
) -> Result<MetricsServer, MetricsServerError> {
    let listener = bind(listen)?;
    serve_on(listen, listener, token, metrics, health)
}

fn serve_on(
    listen: SocketAddr,
    listener: TcpListener,
    token: Option<String>,
    metrics: Arc<Metrics>,
    health: watch::Receiver<Health>,
) -> Result<MetricsServer, MetricsServerError> {
    let local_addr = listener
        .local_addr()
        .map_err(|error| MetricsServerError::Bind {
            listen,
            error: SocketError::Os {
                step: listeners::Step::Bind,
                error,
            },
        })?;
    // Only EMFILE can fail this; serving goes on, and an upgrade says why it cannot.
    let socket = listener.as_fd().try_clone_to_owned().ok();
    let shared = Arc::new(Shared {
        metrics,
        health,
        token: token.map(String::into_bytes),
    });
    if shared.token.is_none() && !local_addr.ip().is_loopback() {
        tracing::warn!(address = %local_addr, "metrics endpoint reachable beyond this host without a token; set [metrics].token_file or token_env");
    }
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(accept_loop(listener, local_addr, shared, stopped));
    tracing::info!(address = %local_addr, "metrics endpoint listening (/metrics, /healthz, /readyz)");
    Ok(MetricsServer {
        listen,
        local_addr,
        socket,
        stop: Some(stop),
        task: Some(task),
    })
}

/// What every connection reads; never written after start.
struct Shared {
    metrics: Arc<Metrics>,
    health: watch::Receiver<Health>,
    token: Option<Vec<u8>>,
}

async fn accept_loop(
    listener: TcpListener,
    address: SocketAddr,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    // Owned here so that ending the loop aborts every open connection with it.
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::new(format!("metrics endpoint on {address}"));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            (stream, _peer) = backoff.accept(|| listener.accept()) => {
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::debug!("metrics endpoint: {MAX_CONNECTIONS} connections open; closing a new one");
                    continue;
                }
                connections.spawn(serve_connection(stream, Arc::clone(&shared)));
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = respond(&shared, &request, Instant::now());
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    if let Err(error) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%error, "metrics endpoint: connection ended with an error");
    }
}

/// Answers one request from its head alone (no endpoint reads a body).
fn respond<B>(shared: &Shared, request: &Request<B>, now: Instant) -> Response<Full<Bytes>> {
    if let Some(token) = &shared.token {
        if !bearer_matches(request.headers().get(header::AUTHORIZATION), token) {
            return unauthorized();
        }
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => match shared.metrics.render() {
            Ok(body) => with_type(
                StatusCode::OK,
                METRICS_CONTENT_TYPE,
                Bytes::from(body.into_bytes()),
            ),
            Err(error) => {
                tracing::warn!(%error, "metrics endpoint: encoding the metrics failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("encoding the metrics failed: {error}\n"),
                )
            }
        },
        "/healthz" => {
            let closed = shared.health.has_changed().is_err();
            let verdict = health_verdict(&shared.health.borrow(), closed, now);
            match verdict {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ok" })),
                Err(problems) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({ "status": "unhealthy", "problems": problems }),
                ),
            }
        }
        "/readyz" => {
            let closed = shared.health.has_changed().is_err();
            match readiness(&shared.health.borrow(), closed) {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
                Err(reason) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({ "status": "not ready", "reason": reason }),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; this endpoint serves /metrics, /healthz and /readyz\n",
        ),
    }
}

/// `/healthz`: healthy while the main loop still publishes and reports no problem. `closed`
/// means the main loop dropped its sender, i.e. it has ended.
fn health_verdict(health: &Health, closed: bool, now: Instant) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if closed {
        problems.push("the supervisor's main loop has ended".to_owned());
    } else {
        let silent = now.saturating_duration_since(health.heartbeat);
        if silent > HEARTBEAT_TIMEOUT {
            problems.push(format!(
                "the supervisor's main loop has not reported for {:.1}s (hung?)",
                silent.as_secs_f64()
            ));
        }
    }
    problems.extend(health.problems.iter().cloned());
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// `/readyz`: ready once the main loop says the first generation serves, until it stops.
fn readiness(health: &Health, closed: bool) -> Result<(), &'static str> {
    if closed {
        Err("the supervisor is stopping")
    } else if health.ready {
        Ok(())
    } else {
        Err("the first generation is not serving yet")
    }
}

/// Whether an `Authorization` header carries exactly `token` as a bearer token.
fn bearer_matches(value: Option<&HeaderValue>, token: &[u8]) -> bool {
    let Some(value) = value else {
        return false;
    };
    let value = value.as_bytes();
    let scheme = b"bearer ";
    if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return false;
    }
    constant_time_eq(value[scheme.len()..].trim_ascii(), token)
}

/// Compares without an early exit, so the time taken does not tell an attacker how many
/// leading bytes of a guess were right. The length is not secret (it shows in the request).
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    let difference = presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(difference) == 0
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::UNAUTHORIZED, "bearer token required\n");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"sauna-supervisor\""),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    with_type(
        status,
        "text/plain; charset=utf-8",
        Bytes::copy_from_slice(body.as_bytes()),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = value.to_string();
    body.push('\n');
    with_type(status, "application/json", Bytes::from(body.into_bytes()))
}

fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn shared(token: Option<&str>, health: Health) -> (Shared, watch::Sender<Health>) {
        let (sender, receiver) = watch::channel(health);
        let shared = Shared {
            metrics: Arc::new(Metrics::new().unwrap()),
            health: receiver,
            token: token.map(|t| t.as_bytes().to_vec()),
        };
        (shared, sender)
    }

    fn request(method: &str, path: &str, authorization: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(value) = authorization {
            builder = builder.header(header::AUTHORIZATION, value);
        }
        builder.body(()).unwrap()
    }

    fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = block_on(response.into_body().collect()).to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn block_on<T, E>(future: impl std::future::Future<Output = Result<T, E>>) -> T {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(future).map_err(|_| ()).unwrap()
    }

    #[test]
    fn metrics_answer_in_text_format() {
        let (shared, _sender) = shared(None, Health::starting());
        let response = respond(&shared, &request("GET", "/metrics", None), Instant::now());
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert!(body(response).contains("# TYPE sauna_generation gauge"));
    }

    #[test]
    fn unknown_paths_are_404_and_other_methods_405() {
        let (shared, _sender) = shared(None, Health::starting());
        let now = Instant::now();
        let response = respond(&shared, &request("GET", "/", None), now);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = respond(&shared, &request("POST", "/metrics", None), now);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
        let response = respond(&shared, &request("HEAD", "/metrics", None), now);
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[test]
    fn token_is_required_on_every_path_when_set() {
        let (shared, _sender) = shared(Some("s3cret"), Health::now(true, Vec::new()));
        let now = Instant::now();
        for path in ["/metrics", "/healthz", "/readyz", "/nope"] {
            let response = respond(&shared, &request("GET", path, None), now);
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
            assert!(
                response.headers()[header::WWW_AUTHENTICATE]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer")
            );
        }
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "Bearer",
        ] {
            let response = respond(&shared, &request("GET", "/metrics", Some(wrong)), now);
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{wrong}");
        }
        for right in ["Bearer s3cret", "bearer s3cret", "Bearer  s3cret "] {
            let response = respond(&shared, &request("GET", "/metrics", Some(right)), now);
            assert_eq!(response.status(), StatusCode::OK, "{right}");
        }
    }

    #[test]
    fn health_follows_problems_heartbeat_and_channel() {
        let start = Instant::now();
        let fresh = Health {
            ready: true,
            problems: Vec::new(),
            heartbeat: start,
        };
        assert_eq!(health_verdict(&fresh, false, start), Ok(()));
        assert_eq!(
            health_verdict(&fresh, false, start + HEARTBEAT_TIMEOUT),
            Ok(())
        );
        let stale = health_verdict(&fresh, false, start + HEARTBEAT_TIMEOUT * 2).unwrap_err();
        assert!(stale[0].contains("has not reported for 10.0s"), "{stale:?}");
        let gone = health_verdict(&fresh, true, start).unwrap_err();
        assert_eq!(gone, ["the supervisor's main loop has ended"]);
        let fatal = Health {
            problems: vec!["program \"celery\" is fatal".to_owned()],
            ..fresh
        };
        assert_eq!(
            health_verdict(&fatal, false, start).unwrap_err(),
            ["program \"celery\" is fatal"]
        );
        // A heartbeat from the "future" (clock read before the snapshot) is not a problem.
        assert_eq!(
            health_verdict(&Health::now(true, Vec::new()), false, start),
            Ok(())
        );
    }

    #[test]
    fn healthz_and_readyz_answer_json() {
        let (shared, sender) = shared(None, Health::starting());
        let now = Instant::now();
        let healthz = respond(&shared, &request("GET", "/healthz", None), now);
        assert_eq!(healthz.status(), StatusCode::OK);
        assert_eq!(healthz.headers()[header::CONTENT_TYPE], "application/json");
        let readyz = respond(&shared, &request("GET", "/readyz", None), now);
        assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
        let reason: serde_json::Value = serde_json::from_str(&body(readyz)).unwrap();
        assert_eq!(reason["reason"], "the first generation is not serving yet");

        sender.send_replace(Health::now(true, vec!["program \"x\" is fatal".to_owned()]));
        let now = Instant::now();
        let readyz = respond(&shared, &request("GET", "/readyz", None), now);
        assert_eq!(readyz.status(), StatusCode::OK);
        let healthz = respond(&shared, &request("GET", "/healthz", None), now);
        assert_eq!(healthz.status(), StatusCode::SERVICE_UNAVAILABLE);
        let verdict: serde_json::Value = serde_json::from_str(&body(healthz)).unwrap();
        assert_eq!(verdict["problems"][0], "program \"x\" is fatal");

        drop(sender);
        let readyz = respond(&shared, &request("GET", "/readyz", None), now);
        assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_comes_from_file_or_env_and_is_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "  abc\n").unwrap();
        let mut config = MetricsConfig::default();
        assert_eq!(read_token(&config, dir.path()).unwrap(), None);
        config.token_file = Some(PathBuf::from("token"));
        assert_eq!(
            read_token(&config, dir.path()).unwrap().as_deref(),
            Some("abc")
        );
        std::fs::write(dir.path().join("token"), "\n").unwrap();
        assert!(matches!(
            read_token(&config, dir.path()),
            Err(MetricsServerError::TokenEmpty { .. })
        ));
        config.token_file = Some(PathBuf::from("missing"));
        let error = read_token(&config, dir.path()).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
        config.token_file = None;
        config.token_env = Some("SAUNA_TEST_SURELY_UNSET_TOKEN_VARIABLE".to_owned());
        assert!(matches!(
            read_token(&config, dir.path()),
            Err(MetricsServerError::TokenEnvMissing { .. })
        ));
    }
}
