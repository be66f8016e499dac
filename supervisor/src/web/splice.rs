//! Zero-copy forwarding of big streamed response chunks. A worker's `Body` payload is moved from
//! its slot socket into a pipe of the client's connection with splice(2), and from that pipe into
//! the TCP socket with splice(2) again, so the supervisor never copies those bytes through user
//! space (measured on a streamed 1 MiB body: the two copies were a third of the supervisor's time).
//!
//! hyper still frames the response (status line, headers, chunked encoding) and decides when to
//! write. The body it is given holds *markers* instead of bytes: `Bytes` pointing into a static,
//! never-written region (`MARK`) whose offset is the position of the real bytes in the pipe's
//! byte stream. The connection's I/O type (`SpliceStream`) recognises a marker among the buffers
//! hyper writes and splices that many bytes from the pipe instead; everything else is written
//! normally. hyper writes a response in order, so the pipe's bytes come out in the order the
//! markers were made; a marker whose offset is ahead of the pipe's output (hyper dropped some
//! body, e.g. after a `Content-Length` was reached) first discards the skipped bytes.
//!
//! It owns the pipe and the marker bookkeeping; reading the worker's frames is `worker::frame`'s,
//! and when to splice is the response pump's (`web::exchange`).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// `Body` frames at least this big are spliced; smaller ones cost less to copy than the extra
/// system calls of splicing them.
pub const SPLICE_FROM: usize = 16 * 1024;

/// Size of the marker region. Markers are offsets modulo this, so it must exceed what a pipe can
/// hold (a gap is then never ambiguous).
const MARK_LEN: usize = 4 << 20;
/// The marker region: zeroed memory that nothing reads (a zeroed allocation this big is fresh
/// anonymous memory from the kernel, so it costs no RSS), allocated once and kept for the
/// process's life (markers are `'static`).
static MARK: LazyLock<&'static [u8]> =
    LazyLock::new(|| Box::leak(vec![0u8; MARK_LEN].into_boxed_slice()));

/// Pipe size asked for. A pipe counts against the user's pipe-user-pages-soft (64 MiB by
/// default); pipes exist only while a response is being spliced, so this allows 128 at once
/// before new responses fall back to copying.
const PIPE_SIZE: usize = 512 * 1024;
/// Smallest pipe worth splicing through (see `Pipe::room`).
const PIPE_MIN: usize = 128 * 1024;

/// The splice state of one client connection, shared by its I/O (`SpliceStream`) and the pump of
/// whichever response is streaming on it.
#[derive(Debug, Clone, Default)]
pub struct Splicer(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    pipe: Option<Pipe>,
    /// Bytes ever spliced into / out of the pipe (the marker offsets are these modulo MARK_LEN).
    input: u64,
    output: u64,
    /// The pump waiting for room in the pipe.
    waker: Option<Waker>,
    /// The TCP socket refused the last write: the client is not keeping up.
    blocked: bool,
    /// No response is streaming: the pipe is closed once it is empty.
    idle: bool,
}

#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe may hold. Half its capacity: a pipe has one slot per page of its size, and
    /// bytes spliced from a socket occupy a slot per socket buffer fragment, which may hold less
    /// than a page; half leaves room for those partly filled slots, so a splice into the pipe
    /// never fails for lack of slots (that would look like an empty socket).
    room: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(PIPE_SIZE).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int and changes no memory.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        let capacity = usize::try_from(capacity).unwrap_or(0);
        if capacity < PIPE_MIN {
            return Err(io::Error::other("cannot enlarge the pipe"));
        }
        Ok(Pipe {
            read,
            write,
            room: capacity / 2,
        })
    }
}

/// Where a room check left the pump.
#[derive(Debug)]
pub enum Room {
    /// Splice up to this many bytes into this descriptor (the pipe's write end).
    Splice(RawFd, usize),
    /// Read the bytes into memory instead: no pipe could be made, or the client is not keeping
    /// up and the pipe is full (the response's read-ahead then continues in memory, bounded as
    /// ever, so a slow client does not hold the worker).
    Copy,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding this lock cannot leave the counters half-updated in a way that
    // matters more than losing the connection, so a poisoned lock is used as is.
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Splicer {
    /// A response starts streaming on the connection.
    pub fn begin(&self) {
        lock(&self.0).idle = false;
    }

    /// The response stopped streaming; the pipe goes once hyper has written what it holds.
    pub fn end(&self) {
        let mut state = lock(&self.0);
        state.idle = true;
        state.close_if_done();
    }

    /// Whether the pump may splice now `want` bytes, and how many; `Pending` (waking the pump
    /// later) while the pipe is full and the client is keeping up.
    pub fn poll_room(&self, cx: &mut Context<'_>, want: usize) -> Poll<Room> {
        let mut state = lock(&self.0);
        if state.pipe.is_none() {
            match Pipe::new() {
                Ok(pipe) => state.pipe = Some(pipe),
                Err(error) => {
                    tracing::debug!("streaming a response without splice: {error}");
                    return Poll::Ready(Room::Copy);
                }
            }
        }
        let queued = state.queued();
        let Some(pipe) = state.pipe.as_ref() else {
            return Poll::Ready(Room::Copy);
        };
        let room = pipe.room.saturating_sub(queued);
        // A sliver of room would make a sliver of a chunk (a chunk of its own on the wire, with
        // its own system calls): wait for room for a worthwhile piece.
        if room < want.min(SPLICE_FROM) {
            if state.blocked {
                return Poll::Ready(Room::Copy);
            }
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let fd = pipe.write.as_raw_fd();
        // A marker never wraps around the end of the region.
        let until_wrap = MARK_LEN - position(state.input);
        Poll::Ready(Room::Splice(fd, room.min(until_wrap)))
    }

    /// Records `len` bytes spliced into the pipe and returns the marker that stands for them.
    pub fn spliced(&self, len: usize) -> Bytes {
        let mut state = lock(&self.0);
        let at = position(state.input);
        state.input += len as u64;
        let end = (at + len).min(MARK_LEN);
        let mark: &'static [u8] = *MARK;
        Bytes::from_static(&mark[at..end])
    }
}

impl State {
    fn queued(&self) -> usize {
        usize::try_from(self.input - self.output).unwrap_or(usize::MAX)
    }

    fn close_if_done(&mut self) {
        if self.idle && self.queued() == 0 {
            self.pipe = None;
        }
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Drops the pipe's bytes that hyper skipped so that the output stands at marker offset `at`.
    fn skip_to(&mut self, at: usize) -> io::Result<()> {
        let gap = (at + MARK_LEN - position(self.output)) % MARK_LEN;
        if gap == 0 {
            return Ok(());
        }
        if gap > self.queued() {
            return Err(io::Error::other(
                "a spliced response body is out of step with its pipe",
            ));
        }
        let Some(pipe) = self.pipe.as_ref() else {
            return Err(io::Error::other("a spliced response body lost its pipe"));
        };
        let mut scratch = vec![0u8; gap.min(64 * 1024)];
        let mut left = gap;
        while left > 0 {
            let want = left.min(scratch.len());
            // SAFETY: reading at most `want` bytes into `scratch`, which is at least that long.
            let read = unsafe {
                libc::read(
                    pipe.read.as_raw_fd(),
                    scratch.as_mut_ptr().cast::<libc::c_void>(),
                    want,
                )
            };
            let read = usize::try_from(read).map_err(|_| io::Error::last_os_error())?;
            if read == 0 {
                return Err(io::Error::other("a response pipe ended early"));
            }
            left -= read;
            self.output += read as u64;
        }
        Ok(())
    }
}

fn position(count: u64) -> usize {
    // MARK_LEN is a power of two well inside usize.
    usize::try_from(count % MARK_LEN as u64).unwrap_or(0)
}

/// One marker for two that follow each other in the pipe, so that hyper writes them as one
/// chunk (fewer chunk headers, fewer system calls).
pub fn merge(first: &Bytes, second: &Bytes) -> Option<Bytes> {
    let at = marker(first)?;
    let end = at + first.len();
    if marker(second)? != end || end + second.len() > MARK_LEN {
        return None;
    }
    let mark: &'static [u8] = *MARK;
    Some(Bytes::from_static(&mark[at..end + second.len()]))
}

/// The marker offset of `buf`, if it is one.
fn marker(buf: &[u8]) -> Option<usize> {
    if buf.is_empty() {
        return None;
    }
    let base = MARK.as_ptr() as usize;
    let at = (buf.as_ptr() as usize).wrapping_sub(base);
    (at < MARK_LEN).then_some(at)
}

/// A client's TCP connection as hyper sees it: writes of markers become splices from the
/// connection's pipe, everything else passes through.
#[derive(Debug)]
pub struct SpliceStream {
    tcp: TcpStream,
    splicer: Splicer,
}

impl SpliceStream {
    /// Wraps an accepted connection.
    pub fn new(tcp: TcpStream, splicer: Splicer) -> SpliceStream {
        SpliceStream { tcp, splicer }
    }

    /// Writes as much of `bufs` as the socket takes now, splicing the markers; `WouldBlock` only
    /// when nothing was written.
    fn write_mixed(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = self.tcp.as_raw_fd();
        let mut total = 0;
        let mut index = 0;
        while index < bufs.len() {
            let (step, wanted) = if let Some(at) = marker(&bufs[index]) {
                let more = bufs[index + 1..].iter().any(|buf| !buf.is_empty());
                let wanted = bufs[index].len();
                index += 1;
                (self.splice_out(fd, at, wanted, more), wanted)
            } else {
                let end = bufs[index..]
                    .iter()
                    .position(|buf| marker(buf).is_some())
                    .map_or(bufs.len(), |offset| index + offset);
                let run = &bufs[index..end];
                let wanted = run.iter().map(|buf| buf.len()).sum();
                index = end;
                (send(fd, run, end < bufs.len()), wanted)
            };
            match step {
                Ok(written) => {
                    total += written;
                    if written < wanted {
                        break;
                    }
                }
                Err(error) if total > 0 && error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if total > 0 => {
                    tracing::debug!("writing a response failed after {total} bytes: {error}");
                    break;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(total)
    }

    fn splice_out(&self, fd: RawFd, at: usize, len: usize, more: bool) -> io::Result<usize> {
        let mut state = lock(&self.splicer.0);
        state.skip_to(at)?;
        let queued = state.queued();
        let Some(pipe) = state.pipe.as_ref() else {
            return Err(io::Error::other("a spliced response body lost its pipe"));
        };
        if queued == 0 {
            return Err(io::Error::other("a spliced response body is missing"));
        }
        let flags = libc::SPLICE_F_MOVE
            | libc::SPLICE_F_NONBLOCK
            | if more { libc::SPLICE_F_MORE } else { 0 };
        // SAFETY: splice between two descriptors we own, without offsets (both are streams).
        let moved = unsafe {
            libc::splice(
                pipe.read.as_raw_fd(),
                std::ptr::null_mut(),
                fd,
                std::ptr::null_mut(),
                len.min(queued),
                flags,
            )
        };
        match usize::try_from(moved) {
            Ok(moved) => {
                state.output += moved as u64;
                state.blocked = moved < len.min(queued);
                state.wake();
                state.close_if_done();
                Ok(moved)
            }
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::WouldBlock {
                    // The pipe holds the bytes, so the socket is full: a slow client.
                    state.blocked = true;
                    state.wake();
                }
                Err(error)
            }
        }
    }
}

/// sendmsg(2) of `bufs`; `more` holds the bytes back for the splice that follows (MSG_MORE), so
/// a chunk's size line does not leave as a packet of its own.
fn send(fd: RawFd, bufs: &[IoSlice<'_>], more: bool) -> io::Result<usize> {
    let count = bufs.len().min(libc::UIO_MAXIOV as usize);
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec on Unix; sendmsg only reads through the pointer.
    message.msg_iov = bufs.as_ptr().cast_mut().cast::<libc::iovec>();
    message.msg_iovlen = count as _;
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: `message` points at `count` valid iovecs borrowed for the duration of the call.
    let sent = unsafe { libc::sendmsg(fd, &message, flags) };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

impl AsyncRead for SpliceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpliceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !bufs.iter().any(|buf| marker(buf).is_some()) {
            return Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        }
        loop {
            std::task::ready!(this.tcp.poll_write_ready(cx))?;
            match this
                .tcp
                .try_io(Interest::WRITABLE, || this.write_mixed(bufs))
            {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        // hyper must queue body buffers as they are (its writev strategy), never copy them into
        // its own buffer: a marker's bytes are only in the pipe.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_recognised_by_where_they_point() {
        let splicer = Splicer::default();
        let first = splicer.spliced(100);
        let second = splicer.spliced(50);
        assert_eq!(marker(&first), Some(0));
        assert_eq!(marker(&second), Some(100));
        assert_eq!(marker(&second[10..]), Some(110));
        assert_eq!(marker(b"not a marker"), None);
        assert_eq!(marker(&[]), None);
        let both = merge(&first, &second).unwrap();
        assert_eq!((marker(&both), both.len()), (Some(0), 150));
        assert!(merge(&second, &first).is_none());
        assert!(merge(&first, &Bytes::from_static(b"x")).is_none());
    }
}
