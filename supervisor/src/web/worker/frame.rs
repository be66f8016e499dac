//! The wire format between the HTTP front and a worker (protocol version 3), and the buffered,
//! poll-based reader/writer of one worker channel. It owns the byte layout only: what a request
//! or a response means is decided by `front::exchange` (Rust side) and `shim.py` (Python side).
//!
//! Every frame is a 12-byte little-endian header followed by `len` payload bytes:
//!
//! ```text
//! u32 len   payload bytes after the header
//! u32 arg   kind-specific (environ length, head length, read size)
//! u8  kind  see `Kind`
//! u8  flags kind-specific
//! u16 seq   `Request`: its number on the slot (wrapping); 0 elsewhere
//! ```
//!
//! The header is one `struct.unpack_from('<IIBBH')` in Python. A request's environ is a single
//! block of `key\0value\0…` bytes that the shim turns into a dict with `bytes.decode('latin-1')`,
//! `str.split('\0')` and `dict(zip(it, it))` — three C-level calls, no per-key Python work. Each
//! request slot has its own channel, so frames need no request id and never interleave.
//!
//! A `Request` frame reaches the worker either written to the slot's socket or, when it fits,
//! as an offer (`worker::offer`): the same bytes in a shared region, announced on the slot's
//! eventfd. Either way everything after it — `Read`/`Data`, `Abort`, the response frames — goes
//! over the socket while that request is in service. An `Abort` names the request it is for
//! (`arg` = its `seq`): one that arrives after its request ended is ignored, not taken for the
//! next one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::UnixStream;

use crate::web::worker::ring::Ring;

/// The protocol version the shim reports in its `Ready` frame; both sides ship in one binary, the
/// check catches a stale shim file or a hand-started worker.
pub const PROTOCOL: u32 = 4;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload accepted from a worker; a bigger length means a corrupt channel.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// `Request` flag: the body continues beyond the inline bytes and is pulled with `Read`.
pub const FLAG_PULL: u8 = 1;
/// `Request` flag: the client sent the body chunked; the app gets `wsgi.input_terminated`.
pub const FLAG_TERMINATED: u8 = 2;
/// `Start` flag: the response is complete (no `Body`/`End` frames follow).
pub const FLAG_END: u8 = 1;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Front → worker: `arg` bytes of environ block, then inline body bytes.
    Request = 1,
    /// Front → worker: body bytes answering a `Read`; empty means end of body.
    Data = 2,
    /// Front → worker: the client of request `arg` (its `seq`) went away; stop producing its
    /// response.
    Abort = 3,
    /// Worker → front (control channel): the app is imported; payload `pid\0protocol\0python`.
    Ready = 16,
    /// Worker → front (control channel): the app failed to import; payload is the traceback.
    Failed = 17,
    /// Worker → front: status and headers (`arg` bytes, `status\0name\0value…`), then body bytes.
    Start = 18,
    /// Worker → front: more body bytes.
    Body = 19,
    /// Worker → front: the response is complete.
    End = 20,
    /// Worker → front: the app failed after the headers were sent; abort the response.
    Error = 21,
    /// Worker → front: the app wants up to `arg` more body bytes.
    Read = 22,
    /// Worker → front: more body bytes, in the slot's shared ring (`worker::ring`) at offset
    /// `arg`; the payload is their length (u32). The channel hands them on as a `Body` frame.
    Shared = 23,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Kind> {
        Some(match value {
            1 => Kind::Request,
            2 => Kind::Data,
            3 => Kind::Abort,
            16 => Kind::Ready,
            17 => Kind::Failed,
            18 => Kind::Start,
            19 => Kind::Body,
            20 => Kind::End,
            21 => Kind::Error,
            22 => Kind::Read,
            23 => Kind::Shared,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// Kind-specific flags.
    pub flags: u8,
    /// Kind-specific argument.
    pub arg: u32,
    /// The payload.
    pub payload: Bytes,
}

/// Appends a frame header to `out`.
pub fn put_header(out: &mut BytesMut, kind: Kind, flags: u8, arg: u32, len: usize) {
    // Payloads we send are bounded by INLINE_BODY/READ_CHUNK and the environ size; saturating
    // keeps a pathological environ from wrapping into a valid-looking short length.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&arg.to_le_bytes());
    out.extend_from_slice(&[kind as u8, flags, 0, 0]);
}

/// A `Request` frame built in place: a header placeholder, the environ block written straight
/// after it (no copy), then the inline body bytes; [`RequestFrame::inline_body`] or
/// [`RequestFrame::pulled_body`] fills the header in. Every request a worker gets — a client's,
/// a reload's warm-up — is built here.
#[derive(Debug)]
pub struct RequestFrame {
    bytes: BytesMut,
}

impl RequestFrame {
    /// Starts a request frame with room for about `capacity` bytes of environ and body.
    pub fn new(capacity: usize) -> RequestFrame {
        let mut bytes = BytesMut::with_capacity(HEADER_LEN + capacity);
        bytes.extend_from_slice(&[0; HEADER_LEN]);
        RequestFrame { bytes }
    }

    /// Where the environ block (`key\0value\0…`) is written.
    pub fn environ(&mut self) -> &mut BytesMut {
        &mut self.bytes
    }

    /// Ends the environ and appends the whole body: the worker reads nothing more. `terminated`:
    /// the client sent the body chunked ([`FLAG_TERMINATED`]).
    pub fn inline_body(mut self, body: &[u8], terminated: bool) -> BytesMut {
        let environ_len = self.environ_len();
        self.bytes.extend_from_slice(body);
        self.finish(0, terminated, environ_len)
    }

    /// Ends the environ with no body bytes inline: the worker pulls the body with `Read` frames
    /// ([`FLAG_PULL`]). `terminated` as for [`RequestFrame::inline_body`].
    pub fn pulled_body(self, terminated: bool) -> BytesMut {
        let environ_len = self.environ_len();
        self.finish(FLAG_PULL, terminated, environ_len)
    }

    fn environ_len(&self) -> u32 {
        u32::try_from(self.bytes.len() - HEADER_LEN).unwrap_or(u32::MAX)
    }

    fn finish(mut self, flags: u8, terminated: bool, environ_len: u32) -> BytesMut {
        let flags = if terminated {
            flags | FLAG_TERMINATED
        } else {
            flags
        };
        patch_header(&mut self.bytes, Kind::Request, flags, environ_len);
        self.bytes
    }
}

/// Sets the `seq` of a complete `Request` frame (its number on the slot it is sent to).
pub fn set_sequence(frame: &mut [u8], sequence: u16) {
    if let Some(field) = frame.get_mut(10..HEADER_LEN) {
        field.copy_from_slice(&sequence.to_le_bytes());
    }
}

/// Writes the header of a frame whose payload was appended after a `HEADER_LEN` placeholder at
/// the start of `out`.
fn patch_header(out: &mut [u8], kind: Kind, flags: u8, arg: u32) {
    let len = out.len() - HEADER_LEN;
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let header = &mut out[..HEADER_LEN];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&arg.to_le_bytes());
    header[8..12].copy_from_slice(&[kind as u8, flags, 0, 0]);
}

/// Why a channel stopped yielding frames.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The worker closed its end (it exited or crashed).
    #[error("the worker closed its channel")]
    Closed,
    /// A read or write failed.
    #[error("worker channel I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid frame.
    #[error("worker sent an invalid frame: {0}")]
    Protocol(String),
}

/// Takes one complete frame off the front of `buffer`, if there is one.
pub fn decode(buffer: &mut BytesMut) -> Result<Option<Frame>, ChannelError> {
    if buffer.len() < HEADER_LEN {
        return Ok(None);
    }
    let word = |at: usize| {
        u32::from_le_bytes([buffer[at], buffer[at + 1], buffer[at + 2], buffer[at + 3]])
    };
    let len = word(0) as usize;
    let arg = word(4);
    let (kind_byte, flags) = (buffer[8], buffer[9]);
    let kind = Kind::from_u8(kind_byte)
        .ok_or_else(|| ChannelError::Protocol(format!("unknown frame kind {kind_byte}")))?;
    if len > MAX_PAYLOAD {
        return Err(ChannelError::Protocol(format!("frame of {len} bytes")));
    }
    if buffer.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buffer.advance(HEADER_LEN);
    let payload = buffer.split_to(len).freeze();
    Ok(Some(Frame {
        kind,
        flags,
        arg,
        payload,
    }))
}

/// One end of a worker channel (a request slot or the control channel): a Unix stream socket
/// with a read buffer and a queue of bytes still to write, driven by polling so that both an
/// `async fn` and a hyper response body can use it without an extra task.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
    input: BytesMut,
    output: BytesMut,
    /// The slot's shared body ring and the ring position of the next `Shared` chunk.
    ring: Option<(Arc<Ring>, u64)>,
}

/// Keeps glibc from returning freed heap memory to the kernel unless more than this is free at the
/// top of a heap. Channel reads allocate a fresh buffer of up to `STREAM_READ_SIZE` while hyper
/// still holds the previous chunks, and free it once they are written: with glibc's default
/// (a dynamic threshold that stays at 128 KiB for allocations below the mmap threshold) nearly
/// every such free trimmed the heap with madvise and the next read page-faulted the memory back
/// in. Measured on a streamed 1 MiB body: 1.2-1.4x the MB/s with this set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 4 << 20;

/// Sets the allocator up for the channels' read pattern (see `TRIM_THRESHOLD`). Call once at
/// startup, before the runtime starts its threads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's malloc parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Initial read buffer: a typical response arrives in one `read`.
const READ_SIZE: usize = 64 * 1024;
/// Frames at least this big are read up to a frame boundary (see `Channel::read_size`).
const BIG_FRAME: usize = 8 * 1024;
/// Most bytes a streaming `read` asks for. Whole frames up to this size are taken at once (fewer
/// system calls); it stays below glibc's default mmap threshold (128 KiB) because every such
/// read reserves a fresh buffer, and a mapped one is page-faulted in and unmapped per read
/// (measured: 5 % of the supervisor's time at 256 KiB).
const STREAM_READ_SIZE: usize = 120 * 1024;

impl Channel {
    /// Wraps a connected socket (it must already be non-blocking and registered with tokio).
    pub fn new(stream: UnixStream) -> Channel {
        Channel {
            stream,
            input: BytesMut::with_capacity(READ_SIZE),
            output: BytesMut::new(),
            ring: None,
        }
    }

    /// Wraps a request slot's socket whose worker may send body chunks through `ring`.
    pub fn with_ring(stream: UnixStream, ring: Arc<Ring>) -> Channel {
        let mut channel = Channel::new(stream);
        channel.ring = Some((ring, 0));
        channel
    }

    /// Turns a `Shared` frame into the `Body` frame it stands for.
    fn resolve(&mut self, frame: Frame) -> Result<Frame, ChannelError> {
        if frame.kind != Kind::Shared {
            return Ok(frame);
        }
        let Some((ring, position)) = self.ring.as_mut() else {
            return Err(ChannelError::Protocol(
                "a shared chunk without a ring".to_owned(),
            ));
        };
        let len = match frame.payload[..] {
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]) as usize,
            _ => {
                return Err(ChannelError::Protocol(
                    "a malformed shared chunk".to_owned(),
                ));
            }
        };
        let at = frame.arg as usize;
        // The worker writes the ring in order, so each chunk starts where the last one ended.
        let expected = usize::try_from(*position % ring.size() as u64).unwrap_or(usize::MAX);
        if at != expected || len > ring.size() - at {
            return Err(ChannelError::Protocol(format!(
                "a shared chunk at {at}+{len}, expected at {expected}"
            )));
        }
        let payload = ring.chunk(at, len, *position);
        *position += len as u64;
        Ok(Frame {
            kind: Kind::Body,
            flags: 0,
            arg: 0,
            payload,
        })
    }

    /// Queues bytes to be written by the next `poll_flush`.
    pub fn queue(&mut self) -> &mut BytesMut {
        &mut self.output
    }

    /// True when queued bytes are waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Writes out the queued bytes.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ChannelError>> {
        while !self.output.is_empty() {
            let written = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.output))?;
            if written == 0 {
                return Poll::Ready(Err(ChannelError::Closed));
            }
            self.output.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads the next frame.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, ChannelError>> {
        loop {
            if let Some(frame) = decode(&mut self.input)? {
                return Poll::Ready(self.resolve(frame));
            }
            ready!(self.stream.poll_read_ready(cx))?;
            let (want, exact) = self.read_size();
            let free = self.input.capacity() - self.input.len();
            if free < want && (exact || free < READ_SIZE / 4) {
                self.input.reserve(want);
            }
            match self.stream.try_read_buf(&mut (&mut self.input).limit(want)) {
                Ok(0) => return Poll::Ready(Err(ChannelError::Closed)),
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error.into())),
            }
        }
    }

    /// How many bytes the next `read` asks for, and whether they must fit in the buffer whole.
    ///
    /// Once a big frame (a streamed body chunk) has begun, the read aims at a frame boundary:
    /// the rest of this frame plus as many more of the same size as fit in `STREAM_READ_SIZE`,
    /// and the header after them (apps stream fixed-size chunks, so the guess is usually exact). A read ending inside
    /// a frame leaves that partial frame to be moved into a fresh buffer when the next one is
    /// reserved (the old one is still shared with chunks hyper has not written yet): a
    /// `memmove` of up to a whole chunk per read. Ending at the boundary leaves at most a
    /// header to move, and each payload is handed to hyper where it landed.
    fn read_size(&self) -> (usize, bool) {
        if self.input.len() >= HEADER_LEN {
            let len =
                u32::from_le_bytes([self.input[0], self.input[1], self.input[2], self.input[3]])
                    as usize;
            if len >= BIG_FRAME {
                let rest = (HEADER_LEN + len).saturating_sub(self.input.len());
                let more = STREAM_READ_SIZE.saturating_sub(rest + HEADER_LEN) / (len + HEADER_LEN);
                return (rest + more * (len + HEADER_LEN) + HEADER_LEN, true);
            }
        }
        (READ_SIZE, false)
    }

    /// Takes the rest of a response if it has already arrived, without waiting: a lone `End`
    /// frame (an empty chunk), or, with `shared`, one `Shared` chunk followed by the `End` (the
    /// chunk: a big one-chunk body goes through the ring). Lets the front answer a one-chunk
    /// streamed response with `Content-Length` instead of chunked encoding; anything else stays
    /// where it is.
    pub fn try_take_end(&mut self, shared: bool) -> Result<Option<Bytes>, ChannelError> {
        const SHARED_FRAME: usize = HEADER_LEN + 4;
        let is_end = |input: &[u8]| {
            input.len() >= HEADER_LEN && input[8] == Kind::End as u8 && input[..4] == [0, 0, 0, 0]
        };
        let is_shared = |input: &[u8]| {
            shared
                && input.len() >= HEADER_LEN
                && input[8] == Kind::Shared as u8
                && input[..4] == [4, 0, 0, 0]
        };
        let wanted = if is_shared(&self.input) {
            SHARED_FRAME + HEADER_LEN
        } else {
            HEADER_LEN
        };
        if self.input.len() < wanted {
            self.input.reserve(READ_SIZE);
            if self.stream.try_read_buf(&mut self.input).is_err() {
                return Ok(None);
            }
        }
        if is_end(&self.input) {
            self.input.advance(HEADER_LEN);
            return Ok(Some(Bytes::new()));
        }
        if !(is_shared(&self.input) && is_end(&self.input[SHARED_FRAME.min(self.input.len())..])) {
            return Ok(None);
        }
        let Some(frame) = decode(&mut self.input)? else {
            return Ok(None);
        };
        let chunk = self.resolve(frame)?.payload;
        self.input.advance(HEADER_LEN);
        Ok(Some(chunk))
    }

    /// Reads the next frame.
    pub async fn frame(&mut self) -> Result<Frame, ChannelError> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    /// Reads whatever raw bytes arrive (used for faulthandler's stack dump on the control
    /// channel, which is plain text, not frames). Returns an empty buffer at end of stream.
    pub async fn read_raw(&mut self) -> io::Result<Bytes> {
        if !self.input.is_empty() {
            return Ok(self.input.split().freeze());
        }
        loop {
            self.stream.readable().await?;
            self.input.reserve(READ_SIZE);
            match self.stream.try_read_buf(&mut self.input) {
                Ok(_) => return Ok(self.input.split().freeze()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_missing_bytes() {
        let mut wire = BytesMut::new();
        put_header(&mut wire, Kind::Start, FLAG_END, 6, 11);
        wire.extend_from_slice(b"200 OK\0body");
        put_header(&mut wire, Kind::End, 0, 0, 0);

        let mut partial = BytesMut::from(&wire[..5]);
        assert_eq!(decode(&mut partial).unwrap(), None);
        let mut partial = BytesMut::from(&wire[..HEADER_LEN + 3]);
        assert_eq!(decode(&mut partial).unwrap(), None);

        let first = decode(&mut wire).unwrap().unwrap();
        assert_eq!(first.kind, Kind::Start);
        assert_eq!(first.flags, FLAG_END);
        assert_eq!(first.arg, 6);
        assert_eq!(&first.payload[..], b"200 OK\0body");
        let second = decode(&mut wire).unwrap().unwrap();
        assert_eq!((second.kind, second.payload.len()), (Kind::End, 0));
        assert!(wire.is_empty());
    }

    #[test]
    fn header_patched_in_place_matches_put_header() {
        let mut built = BytesMut::new();
        built.extend_from_slice(&[0; HEADER_LEN]);
        built.extend_from_slice(b"A\0b\0xyz");
        patch_header(&mut built, Kind::Request, FLAG_PULL, 3);
        let mut expected = BytesMut::new();
        put_header(&mut expected, Kind::Request, FLAG_PULL, 3, 7);
        expected.extend_from_slice(b"A\0b\0xyz");
        assert_eq!(built, expected);
    }

    #[test]
    fn request_frames_carry_the_environ_length_the_body_and_the_flags() {
        let mut request = RequestFrame::new(64);
        request
            .environ()
            .extend_from_slice(b"REQUEST_METHOD\0POST\0");
        let mut wire = request.inline_body(b"a=1", false);
        let frame = decode(&mut wire).unwrap().unwrap();
        assert_eq!((frame.kind, frame.flags, frame.arg), (Kind::Request, 0, 20));
        assert_eq!(&frame.payload[..], b"REQUEST_METHOD\0POST\0a=1");
        assert!(wire.is_empty());

        let mut request = RequestFrame::new(64);
        request.environ().extend_from_slice(b"A\0b\0");
        let mut wire = request.pulled_body(true);
        let frame = decode(&mut wire).unwrap().unwrap();
        assert_eq!(frame.flags, FLAG_PULL | FLAG_TERMINATED);
        assert_eq!((frame.arg, &frame.payload[..]), (4, &b"A\0b\0"[..]));

        let mut wire = RequestFrame::new(0).inline_body(b"", true);
        set_sequence(&mut wire, 0xBEEF);
        assert_eq!(
            wire[10..12],
            0xBEEFu16.to_le_bytes(),
            "the seq field, for the shim"
        );
        let frame = decode(&mut wire).unwrap().unwrap();
        assert_eq!((frame.flags, frame.arg), (FLAG_TERMINATED, 0));
        assert!(frame.payload.is_empty());
    }

    #[test]
    fn a_channel_reads_frames_of_changing_sizes_whole() {
        // Body frames bigger and smaller than the size the boundary-aiming reads guess, so
        // reads also end inside frames; every payload must still arrive intact and in order.
        let sizes = [
            100, 70_000, 70_000, 9_000, 200_000, 65_536, 65_536, 20_000, 0,
        ];
        let mut wire = BytesMut::new();
        for (index, &size) in sizes.iter().enumerate() {
            let fill = u8::try_from(index).unwrap();
            put_header(&mut wire, Kind::Body, 0, 0, size);
            wire.extend_from_slice(&vec![fill; size]);
        }
        put_header(&mut wire, Kind::End, 0, 0, 0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let mut channel = Channel::new(UnixStream::from_std(ours).unwrap());
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                // Uneven writes, so frames also straddle what each read sees.
                for piece in wire.chunks(50_000) {
                    (&theirs).write_all(piece).unwrap();
                }
            });
            for (index, &size) in sizes.iter().enumerate() {
                let frame = channel.frame().await.unwrap();
                assert_eq!((frame.kind, frame.payload.len()), (Kind::Body, size));
                let fill = u8::try_from(index).unwrap();
                assert!(frame.payload.iter().all(|&byte| byte == fill));
            }
            assert_eq!(channel.frame().await.unwrap().kind, Kind::End);
            writer.join().unwrap();
        });
    }

    /// A channel with a 4 KiB ring that holds `bytes` from its start, and the worker's end of
    /// its socket. Call inside a runtime.
    fn ring_channel(bytes: &[u8]) -> (Channel, std::os::unix::net::UnixStream) {
        let (ring, fd) = Ring::new(4096).unwrap();
        // The worker's side: write the bytes through the memfd, then announce them.
        let file = std::fs::File::from(fd);
        std::os::unix::fs::FileExt::write_all_at(&file, bytes, 64).unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let channel = Channel::with_ring(UnixStream::from_std(ours).unwrap(), ring);
        (channel, theirs)
    }

    #[test]
    fn shared_frames_become_body_frames_from_the_ring_in_order() {
        let runtime = crate::test_support::runtime();
        runtime.block_on(async {
            let (mut channel, theirs) = ring_channel(b"hello world");
            let shared = |at: u32, len: u32| {
                let mut wire = BytesMut::new();
                put_header(&mut wire, Kind::Shared, 0, at, 4);
                wire.extend_from_slice(&len.to_le_bytes());
                wire
            };
            use std::io::Write;
            (&theirs).write_all(&shared(0, 5)).unwrap();
            (&theirs).write_all(&shared(5, 6)).unwrap();
            let first = channel.frame().await.unwrap();
            assert_eq!(
                (first.kind, &first.payload[..]),
                (Kind::Body, &b"hello"[..])
            );
            let second = channel.frame().await.unwrap();
            assert_eq!(&second.payload[..], b" world");
            // Not where the previous chunk ended: a broken worker.
            (&theirs).write_all(&shared(100, 1)).unwrap();
            assert!(matches!(
                channel.frame().await,
                Err(ChannelError::Protocol(_))
            ));
        });
        // Without a ring, a Shared frame is a protocol error too.
        runtime.block_on(async {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let mut channel = Channel::new(UnixStream::from_std(ours).unwrap());
            let mut wire = BytesMut::new();
            put_header(&mut wire, Kind::Shared, 0, 0, 4);
            wire.extend_from_slice(&1u32.to_le_bytes());
            std::io::Write::write_all(&mut &theirs, &wire).unwrap();
            assert!(matches!(
                channel.frame().await,
                Err(ChannelError::Protocol(_))
            ));
        });
    }

    #[test]
    fn a_whole_one_chunk_body_is_taken_with_its_end() {
        crate::test_support::runtime().block_on(async {
            let (mut channel, theirs) = ring_channel(b"bodymore");
            let send = |frames: &[(Kind, u32, &[u8])]| {
                let mut wire = BytesMut::new();
                for (kind, arg, payload) in frames {
                    put_header(&mut wire, *kind, 0, *arg, payload.len());
                    wire.extend_from_slice(payload);
                }
                std::io::Write::write_all(&mut &theirs, &wire).unwrap();
            };
            let head = (Kind::Start, 6, &b"200 OK"[..]);
            let four = 4u32.to_le_bytes();
            // The head and a chunk in the ring, the End still to come: no rest yet, and the
            // chunk stays for the streamed body.
            send(&[head, (Kind::Shared, 0, &four)]);
            assert_eq!(channel.frame().await.unwrap().kind, Kind::Start);
            assert_eq!(channel.try_take_end(true).unwrap(), None);
            send(&[(Kind::End, 0, b"")]);
            let body = channel.frame().await.unwrap();
            assert_eq!((body.kind, &body.payload[..]), (Kind::Body, &b"body"[..]));
            assert_eq!(channel.frame().await.unwrap().kind, Kind::End);
            // All of it already there: the chunk is the rest, unless the head brought bytes.
            send(&[head, (Kind::Shared, 4, &four), (Kind::End, 0, b"")]);
            assert_eq!(channel.frame().await.unwrap().kind, Kind::Start);
            assert_eq!(channel.try_take_end(false).unwrap(), None);
            let rest = channel.try_take_end(true).unwrap();
            assert_eq!(rest.as_deref(), Some(&b"more"[..]));
            // A lone End is an empty rest.
            send(&[head, (Kind::End, 0, b"")]);
            assert_eq!(channel.frame().await.unwrap().kind, Kind::Start);
            assert_eq!(channel.try_take_end(false).unwrap(), Some(Bytes::new()));
        });
    }

    #[test]
    fn unknown_kinds_and_huge_lengths_are_protocol_errors() {
        let mut wire = BytesMut::from(&[0u8, 0, 0, 0, 0, 0, 0, 0, 99, 0, 0, 0][..]);
        assert!(matches!(decode(&mut wire), Err(ChannelError::Protocol(_))));
        let mut wire = BytesMut::new();
        put_header(&mut wire, Kind::Body, 0, 0, MAX_PAYLOAD + 1);
        assert!(matches!(decode(&mut wire), Err(ChannelError::Protocol(_))));
    }
}
