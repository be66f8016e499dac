//! The HTTP/1.1 front of the web pool: the listening sockets (TCP and Unix, one socket per
//! `[web].listen` address, owned by the supervisor so that a worker restart never resets a queued
//! connection), one hyper connection task per client, and the handling of one request from
//! accept to response: body buffering (413), environ, dispatch (503 with `Retry-After` when the
//! queue is full or too slow), the exchange with the worker (504 on timeout, 502 when the worker
//! dies), the access log and the request metrics. No HTTP is parsed in Python.
//!
//! A reload changes the front in place: the settings are swapped for requests that arrive from
//! then on, and listening sockets are added or closed one by one, the others untouched (their
//! queued connections are never reset). The reload's warm-up request (`warm_up`) is built here too,
//! so it reaches the canary exactly as a client's request would.
//!
//! An upgrade (see `upgrade`) hands the listening sockets to a new supervisor process: the
//! successor adopts them ([`Listener::adopt`]) instead of binding, both processes accept from the
//! same sockets while the successor starts, and then [`FrontHandle::hand_over`] stops this front
//! accepting, answers each further request on an open connection with `Connection: close` (so
//! clients reconnect to the successor between requests instead of racing an idle close), and
//! keeps the Unix socket files, which the successor owns from then on.
//!
//! It does not start or stop workers (the pool does) nor choose them (the dispatcher does).

pub mod body;
pub mod environ;
pub mod exchange;

use std::convert::Infallible;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use proxy_conf::Listen;
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::web::dispatch::Dispatcher;
use crate::web::worker::frame::{self, FLAG_PULL, FLAG_TERMINATED, HEADER_LEN, Kind};
use body::{BodyError, RequestBody};
use environ::{Connection, EnvironConfig};
use exchange::{Completion, Event, Exchange, ExchangeError, ResponseBody, Streaming};

/// Bodies up to this size travel inside the request frame; larger ones are pulled by the worker.
const INLINE_BODY: u64 = 256 * 1024;
/// A client must send its request head within this time (slowloris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an upgrade's hand-over checks whether every client connection has left.
const HAND_OVER_POLL: Duration = Duration::from_millis(20);

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// `host:port`.
    Tcp(TcpListener),
    /// `unix:/path`; the path is removed on shutdown.
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

    /// Takes over a listening socket inherited from the supervisor this one replaces, for the
    /// `[web].listen` entry `configured`. The socket keeps its address and its queue of pending
    /// connections; a Unix socket's file is never unlinked or re-bound (the old process still
    /// accepts on it until the hand-over). Fails when the descriptor is not a listening socket
    /// of the kind `configured` names.
    pub fn adopt(configured: &Listen, fd: OwnedFd) -> io::Result<Listener> {
        match configured {
            Listen::Unix(path) => {
                let listener = std::os::unix::net::UnixListener::from(fd);
                listener.local_addr()?;
                listener.set_nonblocking(true)?;
                Ok(Listener::Unix(
                    UnixListener::from_std(listener)?,
                    path.clone(),
                ))
            }
            Listen::Tcp(_) => {
                let listener = std::net::TcpListener::from(fd);
                listener.local_addr()?;
                listener.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(listener)?))
            }
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(listener) => listener.as_fd(),
            Listener::Unix(listener, _) => listener.as_fd(),
        }
    }
}

/// A listen address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct BindError {
    /// The address from `[web].listen`.
    pub address: Listen,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// Binds every address, or fails naming the first that cannot be bound.
pub fn bind(addresses: &[Listen], backlog: u32) -> Result<Vec<Listener>, BindError> {
    addresses
        .iter()
        .map(|address| {
            bind_one(address, backlog).map_err(|source| BindError {
                address: address.clone(),
                source,
            })
        })
        .collect()
}

fn bind_one(address: &Listen, backlog: u32) -> io::Result<Listener> {
    match address {
        Listen::Unix(path) => bind_unix(path, backlog),
        Listen::Tcp(address) => {
            let socket = if address.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_nodelay(true)?;
            socket.bind(*address)?;
            Ok(Listener::Tcp(socket.listen(backlog)?))
        }
    }
}

fn bind_unix(path: &Path, backlog: u32) -> io::Result<Listener> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // A socket file left by a previous run is replaced; a live socket is not stolen and
        // a path that is not a socket is never deleted.
        if !metadata.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is listening on it",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    // std binds with a backlog of 128; listen(2) again to apply the configured one.
    let raw = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // SAFETY: `raw` is the descriptor of the listener we own; listen(2) only changes its backlog.
    if unsafe { libc::listen(raw, i32::try_from(backlog).unwrap_or(i32::MAX)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    Ok(Listener::Unix(
        UnixListener::from_std(listener)?,
        path.to_path_buf(),
    ))
}

/// Settings of the front, from `[web]`.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// 413 beyond this many body bytes; 0 = no limit.
    pub max_body: u64,
    /// Bodies above this are buffered in a temporary file.
    pub body_buffer: u64,
    /// Per-request deadline once a worker has it.
    pub timeout: Duration,
    /// `Retry-After` seconds sent with 503.
    pub retry_after: u64,
    /// Write access log lines.
    pub access_log: bool,
    /// Environ settings.
    pub environ: EnvironConfig,
}

/// Everything a request handler needs.
pub struct Front {
    /// Settings; a reload swaps them, a request keeps the ones it started with.
    config: RwLock<Arc<FrontConfig>>,
    /// Where requests get their worker slot.
    pub dispatcher: Arc<Dispatcher>,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Set by [`FrontHandle::hand_over`]: every response from then on closes its connection.
    draining: AtomicBool,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("config", &self.config())
            .finish_non_exhaustive()
    }
}

impl Front {
    /// A front with `config`.
    pub fn new(config: FrontConfig, dispatcher: Arc<Dispatcher>, metrics: Arc<Metrics>) -> Front {
        Front {
            config: RwLock::new(Arc::new(config)),
            dispatcher,
            metrics,
            draining: AtomicBool::new(false),
        }
    }

    /// The settings new requests use.
    pub fn config(&self) -> Arc<FrontConfig> {
        // The lock only guards swapping one Arc for another, which cannot be left half-done.
        Arc::clone(
            &self
                .config
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the settings for requests that arrive from now on (a reload).
    pub fn set_config(&self, config: FrontConfig) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
    }
}

/// One listening socket being served.
#[derive(Debug)]
struct Accepting {
    /// The `[web].listen` entry it was bound for (what a reload compares).
    configured: Listen,
    /// The bound address, with the real port.
    address: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    unix_path: Option<PathBuf>,
    /// A duplicate of the listening socket, for handing it to a successor (`upgrade`); `None`
    /// when the duplication failed (EMFILE), which only an upgrade notices.
    socket: Option<OwnedFd>,
}

impl Accepting {
    /// Stops accepting on this socket and closes it; connections already open are unaffected.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The running front.
#[derive(Debug)]
pub struct FrontHandle {
    front: Arc<Front>,
    listeners: Vec<Accepting>,
    graceful: Arc<GracefulShutdown>,
}

impl FrontHandle {
    /// The shared front (settings, dispatcher).
    pub fn front(&self) -> &Arc<Front> {
        &self.front
    }

    /// The served addresses, with real ports, in `[web].listen` order.
    pub fn addresses(&self) -> Vec<String> {
        self.listeners
            .iter()
            .map(|listener| listener.address.clone())
            .collect()
    }

    /// The `[web].listen` entries being served.
    pub fn configured(&self) -> Vec<Listen> {
        self.listeners
            .iter()
            .map(|listener| listener.configured.clone())
            .collect()
    }

    /// Starts accepting on `listener`, bound for the `[web].listen` entry `configured`.
    pub fn add(&mut self, configured: Listen, listener: Listener) {
        let accepting = start_accepting(configured, listener, &self.front, &self.graceful);
        self.listeners.push(accepting);
    }

    /// Stops accepting on the `[web].listen` entry `configured`; its open connections finish as
    /// usual. The socket is closed when the returned accept task has ended (await it before
    /// telling anyone the address is gone).
    pub fn remove(&mut self, configured: &Listen) -> Option<JoinHandle<()>> {
        let index = self
            .listeners
            .iter()
            .position(|listener| listener.configured == *configured)?;
        let listener = self.listeners.remove(index);
        let _ = listener.stop.send(true);
        if let Some(path) = &listener.unix_path {
            let _ = std::fs::remove_file(path);
        }
        Some(listener.task)
    }

    /// Duplicates of the listening sockets with their `[web].listen` entries, for a successor
    /// started by `upgrade` to inherit.
    pub fn duplicate_listeners(&self) -> io::Result<Vec<(Listen, OwnedFd)>> {
        self.listeners
            .iter()
            .map(|listener| {
                let socket = listener.socket.as_ref().ok_or_else(|| {
                    io::Error::other(format!(
                        "the socket of {} could not be duplicated when it was bound",
                        listener.address
                    ))
                })?;
                Ok((listener.configured.clone(), socket.try_clone()?))
            })
            .collect()
    }

    /// The successor of an upgrade serves the same sockets now: stop accepting (keeping the Unix
    /// socket files, which are the successor's), close each open connection after its next
    /// response (`Connection: close`), and give clients `linger` to make that request before
    /// [`FrontHandle::shutdown`] closes the connections still idle. Returns early once every
    /// connection has closed.
    pub async fn hand_over(&mut self, linger: Duration) {
        self.front.draining.store(true, Ordering::Relaxed);
        for mut listener in self.listeners.drain(..) {
            listener.unix_path = None;
            listener.stop().await;
        }
        let deadline = tokio::time::Instant::now() + linger;
        while self.graceful.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(HAND_OVER_POLL).await;
        }
    }

    /// Stops accepting, lets open connections finish their current request (idle keep-alive
    /// connections close at once) for up to `grace`, then drops the rest. True when every
    /// connection finished in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        for listener in self.listeners {
            listener.stop().await;
        }
        match Arc::try_unwrap(self.graceful) {
            Ok(graceful) => tokio::time::timeout(grace, graceful.shutdown())
                .await
                .is_ok(),
            Err(_) => false,
        }
    }
}

fn start_accepting(
    configured: Listen,
    listener: Listener,
    front: &Arc<Front>,
    graceful: &Arc<GracefulShutdown>,
) -> Accepting {
    let (stop, stopped) = watch::channel(false);
    let unix_path = match &listener {
        Listener::Unix(_, path) => Some(path.clone()),
        Listener::Tcp(_) => None,
    };
    let address = listener.address();
    // Only EMFILE can fail this; serving goes on, and an upgrade says why it cannot.
    let socket = listener.as_fd().try_clone_to_owned().ok();
    let task = tokio::spawn(accept_loop(
        listener,
        Arc::clone(front),
        Arc::clone(graceful),
        stopped,
    ));
    Accepting {
        configured,
        address,
        stop,
        task,
        unix_path,
        socket,
    }
}

/// Starts accepting on every listener; `listeners` pairs each with its `[web].listen` entry.
pub fn serve(listeners: Vec<(Listen, Listener)>, front: Arc<Front>) -> FrontHandle {
    let graceful = Arc::new(GracefulShutdown::new());
    let listeners = listeners
        .into_iter()
        .map(|(configured, listener)| start_accepting(configured, listener, &front, &graceful))
        .collect();
    FrontHandle {
        front,
        listeners,
        graceful,
    }
}

async fn accept_loop(
    listener: Listener,
    front: Arc<Front>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(true)
        // pipeline_flush(true) loses hyper's automatic 400 on a malformed request (the
        // connection closes before the buffered error is written), so it stays off.
        .pipeline_flush(false)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = stop.changed() => return,
        };
        let (io, connection) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning on a full descriptor table.
                tracing::error!(
                    "accepting a connection on {} failed: {error}",
                    listener.address()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connection = Arc::new(connection);
        let front = Arc::clone(&front);
        let service =
            service_fn(move |request| handle(Arc::clone(&front), Arc::clone(&connection), request));
        match io {
            Stream::Tcp(stream) => {
                let served =
                    graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = served.await;
                });
            }
            Stream::Unix(stream) => {
                let served =
                    graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = served.await;
                });
            }
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, Connection)> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, peer) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let local = stream.local_addr().ok();
            Ok((
                Stream::Tcp(stream),
                Connection {
                    peer: Some(peer),
                    local,
                },
            ))
        }
        Listener::Unix(listener, _) => {
            let (stream, _) = listener.accept().await?;
            Ok((
                Stream::Unix(stream),
                Connection {
                    peer: None,
                    local: None,
                },
            ))
        }
    }
}

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

async fn handle(
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

/// Requests the front refuses before reading a body, because passing them on would be unsafe:
/// `CONNECT` (a 2xx answer would turn the connection into a tunnel nobody serves) and a transfer
/// coding other than `chunked` (RFC 9112 §6.1: 501, the body cannot be decoded). hyper already
/// drops `Content-Length` when `Transfer-Encoding` is present, as RFC 9112 §6.3 prescribes.
fn framing_problem(parts: &hyper::http::request::Parts) -> Option<(StatusCode, &'static str)> {
    if parts.method == Method::CONNECT {
        return Some((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n"));
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

    let mut request_frame = BytesMut::with_capacity(1024);
    request_frame.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(error) = environ::write_environ(
        &mut request_frame,
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
    let environ_len = u32::try_from(request_frame.len() - HEADER_LEN).unwrap_or(u32::MAX);
    let (flags, offset) = match &body {
        RequestBody::Memory(bytes) if body.len() <= INLINE_BODY => {
            request_frame.extend_from_slice(bytes);
            (0, body.len())
        }
        _ => (FLAG_PULL, 0),
    };
    // The body is always complete and CONTENT_LENGTH always set, but an app reading a chunked
    // request may rely on `wsgi.input_terminated` (Werkzeug, mod_wsgi and gunicorn's convention).
    let flags = if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        flags | FLAG_TERMINATED
    } else {
        flags
    };
    frame::patch_header(&mut request_frame, 0, Kind::Request, flags, environ_len);

    let lease = match front.dispatcher.acquire().await {
        Ok(lease) => lease,
        Err(rejected) => {
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service temporarily overloaded, retry later\n",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(config.retry_after));
            return reject(front, rejected.label(), response, completion);
        }
    };
    let queue_wait = completion.accepted.elapsed();
    front
        .metrics
        .http_queue_wait_seconds
        .observe(queue_wait.as_secs_f64());
    completion.queue_wait = Some(queue_wait);
    completion.worker = Some(lease.slot());
    let context: Arc<str> = Arc::from(format!("{} {}", completion.method, completion.path));
    let mut exchange = Exchange::new(lease, request_frame, body, offset, config.timeout, context);

    let failure = match exchange.next_event().await {
        Ok(Event::Head { head, chunk, end }) => {
            let end = end || exchange.try_finish();
            let body = if end {
                ResponseBody::Full(Some(chunk.clone()))
            } else {
                ResponseBody::Full(None)
            };
            match build_response(&head, body) {
                Ok(mut response) => {
                    completion.status = response.status().as_u16();
                    if end {
                        completion.record(chunk.len() as u64, true);
                    } else {
                        *response.body_mut() = ResponseBody::Stream(Box::new(Streaming::new(
                            exchange, chunk, completion,
                        )));
                    }
                    return response;
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
        Err(error @ (ExchangeError::Protocol(_) | ExchangeError::AppFailed)) => {
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
    let mut request_frame = BytesMut::with_capacity(512);
    request_frame.extend_from_slice(&[0; HEADER_LEN]);
    let connection = Connection {
        peer: None,
        local: None,
    };
    environ::write_environ(&mut request_frame, &parts, &connection, 0, &config.environ)
        .map_err(|error| format!("[web].warmup {path:?}: {error}"))?;
    let environ_len = u32::try_from(request_frame.len() - HEADER_LEN).unwrap_or(u32::MAX);
    frame::patch_header(&mut request_frame, 0, Kind::Request, 0, environ_len);
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
fn build_response(head: &[u8], body: ResponseBody) -> Result<Response<ResponseBody>, String> {
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
