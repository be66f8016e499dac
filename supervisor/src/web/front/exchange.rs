//! One request's conversation with the worker slot it was dispatched to: send the request frame
//! (unless the dispatcher already offered it), answer the worker's body reads from the buffered
//! body, and turn its response frames into a hyper response whose body is streamed as the worker
//! produces it (checked against the app's `Content-Length`: a mismatch is logged as the app's
//! error). It enforces the request's deadline — an offered request the worker never started is
//! taken back then and answered like a queue timeout — and when the client leaves early it takes
//! an unstarted offer back, or tells the worker (`Abort`) and drains the slot in the background
//! so the slot is reused only once the worker is done. It owns no socket: the slot comes from
//! the dispatcher as a `Lease` and goes back to it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame as BodyFrame, SizeHint};
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::metrics::Metrics;
use crate::web::dispatch::{Lease, Outcome};
use crate::web::front::body::RequestBody;
use crate::web::worker::frame::{self, ChannelError, FLAG_END, Kind};

/// Largest body piece sent per `Read`.
const READ_CHUNK: usize = 256 * 1024;

/// What the worker produced next.
#[derive(Debug)]
pub enum Event {
    /// Status line and headers (`status\0name\0value…`), the first body bytes, and whether the
    /// response is already complete.
    Head {
        /// The encoded status and headers.
        head: Bytes,
        /// Body bytes sent along.
        chunk: Bytes,
        /// No more frames follow.
        end: bool,
    },
    /// More body.
    Chunk(Bytes),
    /// The response is complete.
    End,
}

/// Why an exchange ended without a complete response.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The request passed `timeout`.
    #[error("the request took longer than the timeout")]
    Timeout,
    /// The request passed `timeout` offered to a worker that never started it (busy all that
    /// time); it was taken back.
    #[error("no worker started the request within the timeout")]
    NotStarted,
    /// The worker died (its slot closed).
    #[error("the worker died while serving the request")]
    WorkerGone,
    /// The worker sent something invalid.
    #[error("{0}")]
    Protocol(String),
    /// The app raised after the headers were sent.
    #[error("the application failed after sending the response headers")]
    AppFailed,
    /// The app's body is not as long as its `Content-Length` said.
    #[error("the application's body does not match its Content-Length")]
    LengthMismatch,
}

/// The request's conversation with its slot.
pub struct Exchange {
    lease: Option<Lease>,
    /// The worker's number, for log lines.
    worker: usize,
    body: RequestBody,
    offset: u64,
    deadline: Pin<Box<Sleep>>,
    started: Instant,
    context: Arc<str>,
    draining: bool,
    /// A frame came from the worker: it has started the request (an offer can no longer be
    /// taken back).
    answered: bool,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// Starts the exchange: queues the lease's request frame on the slot unless the dispatcher
    /// offered it. `body` is the part of the body not sent inline, served to the worker's `Read`s
    /// from `offset`.
    pub fn new(
        mut lease: Lease,
        body: RequestBody,
        offset: u64,
        timeout: Duration,
        context: Arc<str>,
    ) -> Exchange {
        let request = lease.take_request();
        if let (Some(channel), Some(request)) = (lease.channel(), request) {
            let queue = channel.queue();
            if queue.is_empty() {
                *queue = request;
            } else {
                queue.extend_from_slice(&request);
            }
        }
        Exchange {
            worker: lease.slot(),
            lease: Some(lease),
            body,
            offset,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            started: Instant::now(),
            context,
            draining: false,
            answered: false,
        }
    }

    /// Takes the request back if it was offered and the worker has not started it.
    fn withdraw(&mut self) -> bool {
        if self.answered {
            return false;
        }
        let withdrawn = self.lease.as_mut().is_some_and(Lease::withdraw);
        if withdrawn {
            self.lease = None;
        }
        withdrawn
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(lease) = self.lease.take() {
            lease.release(outcome);
        }
    }

    fn fail(&mut self, error: ChannelError) -> ExchangeError {
        match error {
            ChannelError::Closed => {
                self.finish(Outcome::Gone);
                ExchangeError::WorkerGone
            }
            // A worker killed with bytes of ours still unread resets the channel instead of
            // closing it: the same death, not a channel fault.
            ChannelError::Io(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                self.finish(Outcome::Gone);
                ExchangeError::WorkerGone
            }
            ChannelError::Io(error) => {
                self.finish(Outcome::Gone);
                ExchangeError::Protocol(format!("worker channel failed: {error}"))
            }
            ChannelError::Protocol(message) => {
                self.finish(Outcome::Broken(message.clone()));
                ExchangeError::Protocol(message)
            }
        }
    }

    /// Drives the exchange to its next event.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, ExchangeError>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(self.time_out()));
        }
        loop {
            let Some(channel) = self.lease.as_mut().and_then(Lease::channel) else {
                return Poll::Ready(Err(ExchangeError::WorkerGone));
            };
            if channel.has_output() {
                match channel.poll_flush(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(self.fail(error))),
                    Poll::Ready(Ok(())) => {}
                }
            }
            let frame = match channel.poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(self.fail(error))),
                Poll::Ready(Ok(frame)) => frame,
            };
            self.answered = true;
            match frame.kind {
                Kind::Read => {
                    let max = usize::try_from(frame.arg)
                        .unwrap_or(READ_CHUNK)
                        .clamp(1, READ_CHUNK);
                    let piece = if self.draining {
                        Bytes::new()
                    } else {
                        match self.body.read_at(self.offset, max) {
                            Ok(piece) => piece,
                            Err(error) => {
                                tracing::error!("cannot read the buffered request body: {error}");
                                Bytes::new()
                            }
                        }
                    };
                    self.offset += piece.len() as u64;
                    let queue = channel.queue();
                    frame::put_header(queue, Kind::Data, 0, 0, piece.len());
                    queue.extend_from_slice(&piece);
                }
                Kind::Start => {
                    let head_len = usize::try_from(frame.arg).unwrap_or(usize::MAX);
                    if head_len > frame.payload.len() {
                        return Poll::Ready(Err(self.fail(ChannelError::Protocol(
                            "head longer than its frame".to_owned(),
                        ))));
                    }
                    let mut payload = frame.payload;
                    let chunk = payload.split_off(head_len);
                    let end = frame.flags & FLAG_END != 0;
                    if end {
                        self.finish(Outcome::Done);
                    }
                    return Poll::Ready(Ok(Event::Head {
                        head: payload,
                        chunk,
                        end,
                    }));
                }
                Kind::Body => return Poll::Ready(Ok(Event::Chunk(frame.payload))),
                Kind::End => {
                    self.finish(Outcome::Done);
                    return Poll::Ready(Ok(Event::End));
                }
                Kind::Error => {
                    self.finish(Outcome::Done);
                    return Poll::Ready(Err(ExchangeError::AppFailed));
                }
                other => {
                    let message = format!("unexpected {other:?} frame on a request slot");
                    return Poll::Ready(Err(self.fail(ChannelError::Protocol(message))));
                }
            }
        }
    }

    /// The rest of the response (the slot released) when it has already arrived after a head
    /// whose first body bytes were `chunk` (see `Channel::try_take_end`).
    fn try_finish(&mut self, chunk: &Bytes) -> Result<Option<Bytes>, ExchangeError> {
        let Some(channel) = self.lease.as_mut().and_then(Lease::channel) else {
            return Ok(None);
        };
        if channel.has_output() {
            return Ok(None);
        }
        match channel.try_take_end(chunk.is_empty()) {
            Ok(Some(rest)) => {
                self.finish(Outcome::Done);
                Ok(Some(rest))
            }
            Ok(None) => Ok(None),
            Err(error) => Err(self.fail(error)),
        }
    }

    /// Gives the slot back as timed out (the pool kills the worker) and returns the error; an
    /// offer the worker never started is taken back instead.
    fn time_out(&mut self) -> ExchangeError {
        if self.withdraw() {
            return ExchangeError::NotStarted;
        }
        let age = self.started.elapsed();
        let context = format!(
            "request {} timed out after {:.1} s",
            self.context,
            age.as_secs_f64()
        );
        self.finish(Outcome::TimedOut(context));
        ExchangeError::Timeout
    }

    /// Resolves when the request's deadline has passed.
    pub async fn expired(&mut self) {
        self.deadline.as_mut().await;
    }

    /// Waits for the next event.
    pub async fn next_event(&mut self) -> Result<Event, ExchangeError> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Waits for the response head; a body that has already arrived whole by then comes with
    /// it, marked as the end.
    pub async fn head(&mut self) -> Result<Event, ExchangeError> {
        match self.next_event().await? {
            Event::Head {
                head,
                chunk,
                end: false,
            } => Ok(match self.try_finish(&chunk)? {
                Some(rest) => Event::Head {
                    head,
                    chunk: if chunk.is_empty() { rest } else { chunk },
                    end: true,
                },
                None => Event::Head {
                    head,
                    chunk,
                    end: false,
                },
            }),
            event => Ok(event),
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.draining || self.lease.is_none() || self.withdraw() {
            return;
        }
        // The client left before the response ended: tell the worker, then read until its
        // response ends, so the slot is handed on clean.
        if let Some(lease) = self.lease.take() {
            spawn_drain(
                lease,
                self.deadline.deadline(),
                self.started,
                Arc::clone(&self.context),
            );
        }
    }
}

/// Drains a request nobody waits for any more (its client left) that the worker has started
/// or may have: `Abort`, then its response is read and dropped until it ends, within `timeout`.
pub fn drain(lease: Lease, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    spawn_drain(
        lease,
        deadline,
        Instant::now(),
        Arc::from("(left by its client before it began)"),
    );
}

fn spawn_drain(
    mut lease: Lease,
    deadline: tokio::time::Instant,
    started: Instant,
    context: Arc<str>,
) {
    let sequence = lease.sequence();
    if let Some(channel) = lease.channel() {
        frame::put_header(channel.queue(), Kind::Abort, 0, u32::from(sequence), 0);
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return; // no runtime: the lease is dropped as broken and the worker replaced
    };
    let mut drain = Exchange {
        worker: lease.slot(),
        lease: Some(lease),
        body: RequestBody::Memory(Bytes::new()),
        offset: 0,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
        started,
        context,
        draining: true,
        answered: true,
    };
    runtime.spawn(async move {
        while let Ok(Event::Chunk(_) | Event::Head { end: false, .. }) = drain.next_event().await {}
    });
}

/// What is recorded when a response ends: the access log line and the request metrics.
pub struct Completion {
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Write an access log line.
    pub access_log: bool,
    /// `GET /path`.
    pub method: String,
    /// The request path and query.
    pub path: String,
    /// Response status.
    pub status: u16,
    /// When the request was accepted.
    pub accepted: Instant,
    /// Accepted → a worker started it.
    pub queue_wait: Option<Duration>,
    /// The worker slot.
    pub worker: Option<usize>,
}

impl Completion {
    /// Logs a response whose body length differs from the app's `Content-Length`: an
    /// application error (a WSGI app computing its own length wrong), not the client's fault.
    pub fn log_length_mismatch(&self, declared: u64, sent: u64) {
        tracing::error!(
            "application error: the response to {} {} declared Content-Length: {declared} but the app sent {sent} body bytes",
            self.method,
            self.path,
        );
    }

    /// Records the end of the response after `bytes` body bytes.
    pub fn record(&mut self, bytes: u64, completed: bool) {
        let duration = self.accepted.elapsed();
        let class = match self.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.metrics
            .http_requests_total
            .with_label_values(&[class])
            .inc();
        self.metrics
            .http_request_duration_seconds
            .observe(duration.as_secs_f64());
        if self.access_log {
            crate::logging::log_access(crate::logging::AccessRecord {
                at: std::time::SystemTime::now(),
                // Recorded once, at the end: the strings move to the log's writer thread.
                method: std::mem::take(&mut self.method),
                path: std::mem::take(&mut self.path),
                status: self.status,
                bytes,
                duration,
                queue_wait: self.queue_wait,
                worker: self.worker,
                completed,
            });
        }
    }
}

/// The response body handed to hyper.
pub enum ResponseBody {
    /// A complete body.
    Full(Option<Bytes>),
    /// Streamed from the worker as it produces it.
    Stream(Box<Streaming>),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseBody::Full(bytes) => f
                .debug_tuple("Full")
                .field(&bytes.as_ref().map(Bytes::len))
                .finish(),
            ResponseBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// Batches of body chunks read ahead of a slow client, and chunks per batch: the worker is
/// released once its response is in here, unless the response is bigger than that.
const READ_AHEAD_BATCHES: usize = 8;
const BATCH_CHUNKS: usize = 8;

/// What the read-ahead task hands to the response body.
#[derive(Debug)]
enum Piece {
    Data(Bytes),
    End,
    Failed(ExchangeError),
}

/// The state of a streamed response body.
///
/// A small task (`pump`) reads the worker's frames into a bounded queue, independently of how
/// fast hyper can write to the client: a slow reader holds memory (up to
/// `READ_AHEAD_BATCHES` × `BATCH_CHUNKS` chunks), not a worker slot. Past that bound the worker
/// waits, which is the backpressure. Frames that have already arrived travel as one batch, so
/// a fast stream costs one task wake-up per read, not per chunk.
pub struct Streaming {
    batches: mpsc::Receiver<Vec<Piece>>,
    pending: std::collections::VecDeque<Piece>,
    first: Option<Bytes>,
    bytes: u64,
    done: bool,
    completion: Completion,
    /// The app's `Content-Length`, which the body must match.
    declared: Option<u64>,
}

impl Streaming {
    /// A body that starts with `first` and continues with the worker's `Body` frames; `declared`
    /// is the length the app's `Content-Length` promised, if the body must have it.
    pub fn new(
        exchange: Exchange,
        first: Bytes,
        completion: Completion,
        declared: Option<u64>,
    ) -> Streaming {
        let (sender, batches) = mpsc::channel(READ_AHEAD_BATCHES);
        tokio::spawn(pump(exchange, sender));
        Streaming {
            batches,
            pending: std::collections::VecDeque::new(),
            first: Some(first).filter(|chunk| !chunk.is_empty()),
            bytes: 0,
            done: false,
            completion,
            declared,
        }
    }

    /// Counts `chunk` as sent; `false` (logged) when it runs past the declared length.
    fn count(&mut self, chunk: &Bytes) -> bool {
        self.bytes += chunk.len() as u64;
        match self.declared {
            Some(declared) if self.bytes > declared => {
                self.completion.log_length_mismatch(declared, self.bytes);
                false
            }
            _ => true,
        }
    }

    /// The body has ended: logs it when it is shorter than the declared length.
    fn check_complete(&self) {
        if let Some(declared) = self.declared.filter(|&declared| self.bytes < declared) {
            self.completion.log_length_mismatch(declared, self.bytes);
        }
    }
}

/// Turns an exchange event into a piece; `None` for an empty chunk.
fn piece_of(exchange: &mut Exchange, event: Result<Event, ExchangeError>) -> Option<Piece> {
    Some(match event {
        Ok(Event::Chunk(chunk)) if chunk.is_empty() => return None,
        Ok(Event::Chunk(chunk)) => Piece::Data(chunk),
        Ok(Event::End) => Piece::End,
        Ok(Event::Head { .. }) => {
            let error = ExchangeError::Protocol("a second response head".to_owned());
            exchange.finish(Outcome::Broken(error.to_string()));
            Piece::Failed(error)
        }
        Err(ExchangeError::WorkerGone) => {
            tracing::error!(
                "worker {} died while serving {}; the response was cut off",
                exchange.worker,
                exchange.context
            );
            Piece::Failed(ExchangeError::WorkerGone)
        }
        Err(error) => {
            tracing::warn!("response to {} aborted: {error}", exchange.context);
            Piece::Failed(error)
        }
    })
}

/// Moves the worker's response into the queue until it ends. When the client goes away the
/// queue closes, the exchange is dropped and its `Drop` tells the worker to stop.
async fn pump(mut exchange: Exchange, sender: mpsc::Sender<Vec<Piece>>) {
    loop {
        let event = tokio::select! {
            event = exchange.next_event() => event,
            () = sender.closed() => return,
        };
        let Some(piece) = piece_of(&mut exchange, event) else {
            continue;
        };
        let mut last = !matches!(piece, Piece::Data(_));
        let mut batch = vec![piece];
        // Take whatever else has already arrived, without waiting.
        while !last && batch.len() < BATCH_CHUNKS {
            let mut idle = Context::from_waker(std::task::Waker::noop());
            let Poll::Ready(event) = exchange.poll_event(&mut idle) else {
                break;
            };
            if let Some(piece) = piece_of(&mut exchange, event) {
                last = !matches!(piece, Piece::Data(_));
                batch.push(piece);
            }
        }
        // Waiting for room here is the backpressure on the worker; the request's deadline
        // still applies while the client is slow.
        let permit = tokio::select! {
            permit = sender.reserve() => permit,
            () = exchange.expired(), if !last => {
                let error = exchange.time_out();
                let _ = sender.send(vec![Piece::Failed(error)]).await;
                return;
            }
        };
        match permit {
            Ok(permit) => permit.send(batch),
            Err(_closed) => return,
        }
        if last {
            return;
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.completion.record(self.bytes, self.done);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, ExchangeError>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => {
                Poll::Ready(bytes.take().map(|bytes| Ok(BodyFrame::data(bytes))))
            }
            ResponseBody::Stream(stream) => {
                if let Some(first) = stream.first.take() {
                    if !stream.count(&first) {
                        stream.done = true;
                        return Poll::Ready(Some(Err(ExchangeError::LengthMismatch)));
                    }
                    return Poll::Ready(Some(Ok(BodyFrame::data(first))));
                }
                if stream.done {
                    return Poll::Ready(None);
                }
                if stream.pending.is_empty() {
                    match stream.batches.poll_recv(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(batch)) => stream.pending.extend(batch),
                        Poll::Ready(None) => {
                            stream.done = true;
                            return Poll::Ready(Some(Err(ExchangeError::WorkerGone)));
                        }
                    }
                }
                match stream.pending.pop_front() {
                    None => Poll::Pending,
                    Some(Piece::Data(chunk)) => {
                        if stream.count(&chunk) {
                            Poll::Ready(Some(Ok(BodyFrame::data(chunk))))
                        } else {
                            stream.done = true;
                            Poll::Ready(Some(Err(ExchangeError::LengthMismatch)))
                        }
                    }
                    Some(Piece::End) => {
                        stream.done = true;
                        // A short body is only logged: hyper sends what there is and closes
                        // the connection, the one way to tell the client it is incomplete.
                        stream.check_complete();
                        Poll::Ready(None)
                    }
                    Some(Piece::Failed(error)) => {
                        if matches!(error, ExchangeError::Timeout) {
                            stream.completion.status = 504;
                        }
                        stream.done = true;
                        Poll::Ready(Some(Err(error)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(bytes) => bytes.is_none(),
            ResponseBody::Stream(stream) => stream.done && stream.first.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Stream(_) => SizeHint::default(),
        }
    }
}
