//! The running front: one accept loop per listening socket (`listeners`' loop, which rides out a
//! shortage of descriptors), one hyper HTTP/1.1 connection task per client (keep-alive,
//! pipelining, the slowloris head timeout, the head size limit with its 431, the read-side
//! framing check of `framing`), and the [`FrontHandle`] the pool holds — adding and
//! removing sockets on a reload, duplicating them into an upgrade's fd table, the hand-over to a
//! successor and the graceful shutdown. What a request gets is `respond`'s.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use proxy_conf::Listen;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Front;
use super::environ::Connection;
use super::framing::Strict;
use super::respond::handle;
use crate::listeners::{AcceptBackoff, FdTable, Listener, Role};

/// A client must send its request head within this time (slowloris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's default read buffer limit (8 KiB + 100 × 4 KiB), kept unless a bigger head is allowed.
const HYPER_BUFFER: usize = 8192 + 4096 * 100;
/// How often an upgrade's hand-over checks whether every client connection has left.
const HAND_OVER_POLL: Duration = Duration::from_millis(20);

/// One listening socket being served.
#[derive(Debug)]
struct Accepting {
    /// The address as `[web].listen` spells it (what a reload compares).
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

    /// The served addresses as `[web].listen` spells them.
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

    /// Adds a duplicate of each listening socket to `table`, by its `[web].listen` entry, for a
    /// successor started by `upgrade` to inherit.
    pub fn duplicate_into(&self, table: &mut FdTable) -> io::Result<()> {
        for listener in &self.listeners {
            let socket = listener.socket.as_ref().ok_or_else(|| {
                io::Error::other(format!(
                    "the socket of {} could not be duplicated when it was bound",
                    listener.address
                ))
            })?;
            table.insert(Role::Web, listener.configured.clone(), socket.try_clone()?);
        }
        Ok(())
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
    let mut backoff = AcceptBackoff::new(format!("web front on {}", listener.address()));
    let mut base = http1::Builder::new();
    base.keep_alive(true)
        // pipeline_flush(true) loses hyper's automatic 400 on a malformed request (the
        // connection closes before the buffered error is written), so it stays off.
        .pipeline_flush(false)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let (io, connection) = tokio::select! {
            accepted = backoff.accept(|| accept(&listener)) => accepted,
            _ = stop.changed() => return,
        };
        // A reload's new limit applies from the next connection on.
        let max_header_size = front.config().max_header_size;
        let mut builder = base.clone();
        builder
            .max_header_size(max_header_size)
            // hyper's read buffer must be able to hold the largest head allowed.
            .max_buf_size(HYPER_BUFFER.max(max_header_size.saturating_add(8192)));
        let peer = connection.peer;
        let connection = Arc::new(connection);
        let front = Arc::clone(&front);
        let service =
            service_fn(move |request| handle(Arc::clone(&front), Arc::clone(&connection), request));
        match io {
            Stream::Tcp(stream) => {
                let stream = TokioIo::new(Strict::new(stream, max_header_size));
                let served = graceful.watch(builder.serve_connection(stream, service));
                tokio::spawn(async move { closed(served.await, peer, max_header_size) });
            }
            Stream::Unix(stream) => {
                let stream = TokioIo::new(Strict::new(stream, max_header_size));
                let served = graceful.watch(builder.serve_connection(stream, service));
                tokio::spawn(async move { closed(served.await, peer, max_header_size) });
            }
        }
    }
}

/// How a client connection ended. hyper answers a request head over `max_header_size` with 431
/// and closes the connection without calling the service, so this is the one place that sees
/// it: one line per connection, no worker involved.
fn closed(result: Result<(), hyper::Error>, peer: Option<SocketAddr>, max_header_size: usize) {
    let Err(error) = result else {
        return;
    };
    let client = peer.map_or_else(
        || "a Unix socket client".to_owned(),
        |peer| peer.to_string(),
    );
    if error.is_parse_too_large() {
        tracing::warn!(
            "431: the request head from {client} is larger than [web].max_header_size ({max_header_size} bytes) or has too many header fields; connection closed"
        );
    } else {
        tracing::debug!("connection from {client} ended: {error}");
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
