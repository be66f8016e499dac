//! A check of HTTP/1.1 message framing on a client connection's read side, for the one chunked
//! framing error hyper (1.x) lets through: whitespace after a chunk size that no `;` extension
//! follows, as in a last chunk `0 \r\n`. RFC 9112 §7.1.1 allows whitespace (BWS) only before a
//! chunk extension; a size line ending in whitespace is read differently by other parsers in a
//! proxy chain, which is what request smuggling is made of. hyper's decoder has no switch for
//! this and is not forked here, so the bytes hyper reads are watched instead.
//!
//! [`Framing`] follows the connection's messages the way hyper's server frames them (RFC 9112
//! §6.3): each request head is found and parsed with `httparse`, hyper's own parser, to learn
//! whether a body follows and how it is framed (the last `Transfer-Encoding` coding `chunked`,
//! else one agreed `Content-Length`, else none); a `Content-Length` body is skipped by count, and
//! a chunked body is walked line by line (size, extensions, data, trailers). It never changes a
//! byte. [`Strict`] wraps the socket: bytes up to the offending one are handed to hyper as read,
//! and the next read fails. By then hyper has parsed the head, so the failed read reaches it
//! while it decodes the body, exactly as one of its own decoding errors would: the request's body
//! read fails, `respond` answers 400 with `Connection: close`, and no worker sees the request.
//!
//! Anything the check does not follow — a head hyper refuses itself (a malformed head, one over
//! `max_header_size`, a `Transfer-Encoding` not ending in `chunked`, conflicting lengths),
//! `CONNECT`, or a chunk line hyper rejects anyway — stops the check for the rest of the
//! connection: hyper's answer to such input closes the connection, and the check only ever adds
//! refusals to hyper's, never acceptances.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header fields parsed per head; hyper refuses more (431), so more stops the check.
const MAX_HEADERS: usize = 100;

/// Where in the connection's byte stream the check is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a request line: empty lines are skipped, as hyper does.
    Idle,
    /// Inside a head; `blank` when the current line has nothing but an optional CR so far.
    Head {
        blank: bool,
    },
    /// `remaining` body bytes framed by `Content-Length`.
    Length {
        remaining: u64,
    },
    /// The first hex digit of a chunk size.
    SizeStart,
    /// More hex digits of a chunk size.
    Size,
    /// Whitespace after the size: only `;` may follow it.
    SizeSpace,
    /// A chunk extension, up to its CR.
    Extension,
    /// The LF ending a chunk size line.
    SizeLf,
    /// `remaining` bytes of chunk data.
    Data {
        remaining: u64,
    },
    /// The CR and the LF after chunk data.
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line, and its LF.
    Trailer,
    TrailerLf,
    /// The LF of the empty line ending a chunked body.
    EndLf,
    /// Not following the connection any more (see the module comment).
    Off,
}

/// A chunk size line with whitespace that no `;` follows, at `at` in the bytes last fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// Offset of the offending byte in the slice given to [`Framing::feed`].
    pub at: usize,
}

/// The framing of one connection's request stream, fed the bytes as they are read.
#[derive(Debug)]
pub struct Framing {
    state: State,
    /// The head read so far when it spans reads.
    head: Vec<u8>,
    /// Heads longer than this are hyper's to refuse (431).
    max_head: usize,
    /// The chunk size being read.
    size: u64,
}

impl Framing {
    /// The check of a new connection whose heads may be up to `max_head` bytes.
    pub fn new(max_head: usize) -> Framing {
        Framing {
            state: State::Idle,
            head: Vec::new(),
            max_head,
            size: 0,
        }
    }

    /// Follows `bytes`, the next ones read from the client.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        let mut at = 0;
        while at < bytes.len() {
            at = match self.state {
                State::Off => return Ok(()),
                State::Idle => match bytes[at] {
                    b'\r' | b'\n' => at + 1,
                    _ => {
                        self.state = State::Head { blank: false };
                        self.head_from(bytes, at)
                    }
                },
                State::Head { .. } => self.head_from(bytes, at),
                State::Length { remaining } => {
                    let (taken, left) = take(bytes.len() - at, remaining);
                    self.state = if left == 0 {
                        State::Idle
                    } else {
                        State::Length { remaining: left }
                    };
                    at + taken
                }
                State::Data { remaining } => {
                    let (taken, left) = take(bytes.len() - at, remaining);
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining: left }
                    };
                    at + taken
                }
                _ => {
                    if self.chunk_byte(bytes[at]) {
                        return Err(Violation { at });
                    }
                    at + 1
                }
            };
        }
        Ok(())
    }

    /// Follows one byte of a chunked body outside its data; true when it is the violation.
    fn chunk_byte(&mut self, byte: u8) -> bool {
        let hex = |byte: u8| char::from(byte).to_digit(16).map(u64::from);
        self.state = match (self.state, byte) {
            (State::SizeStart | State::Size, byte) if hex(byte).is_some() => {
                let digit = hex(byte).unwrap_or_default();
                match self
                    .size
                    .checked_mul(16)
                    .and_then(|size| size.checked_add(digit))
                {
                    Some(size) => {
                        self.size = size;
                        State::Size
                    }
                    None => State::Off,
                }
            }
            (State::Size | State::SizeSpace, b' ' | b'\t') => State::SizeSpace,
            (State::Size | State::SizeSpace, b';') => State::Extension,
            (State::Size | State::Extension, b'\r') => State::SizeLf,
            (State::SizeSpace, b'\r') => {
                self.state = State::Off;
                return true;
            }
            (State::Extension, byte) if byte != b'\n' => State::Extension,
            (State::SizeLf, b'\n') if self.size == 0 => State::TrailerStart,
            (State::SizeLf, b'\n') => State::Data {
                remaining: self.size,
            },
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => {
                self.size = 0;
                State::SizeStart
            }
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::Trailer, b'\r') => State::TrailerLf,
            (State::TrailerStart | State::Trailer, _) => State::Trailer,
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::EndLf, b'\n') => State::Idle,
            // hyper refuses everything else itself.
            _ => State::Off,
        };
        false
    }

    /// Reads head bytes from `bytes[at..]`; returns where the head's end left off, or the end
    /// of `bytes` when the head goes on.
    fn head_from(&mut self, bytes: &[u8], at: usize) -> usize {
        let State::Head { mut blank } = self.state else {
            return bytes.len();
        };
        for (offset, &byte) in bytes[at..].iter().enumerate() {
            match byte {
                b'\n' if blank => {
                    let end = at + offset + 1;
                    let framing = if self.head.is_empty() {
                        body_of(&bytes[at..end])
                    } else {
                        self.head.extend_from_slice(&bytes[at..end]);
                        let framing = body_of(&self.head);
                        self.head.clear();
                        framing
                    };
                    self.state = framing;
                    self.size = 0;
                    return end;
                }
                b'\n' => blank = true,
                b'\r' => {}
                _ => blank = false,
            }
        }
        self.head.extend_from_slice(&bytes[at..]);
        self.state = if self.head.len() > self.max_head {
            self.head = Vec::new();
            State::Off
        } else {
            State::Head { blank }
        };
        bytes.len()
    }
}

/// Up to `remaining` of `available` bytes: how many are taken and how many remain after them.
fn take(available: usize, remaining: u64) -> (usize, u64) {
    let taken = usize::try_from(remaining).map_or(available, |remaining| remaining.min(available));
    (taken, remaining - taken as u64)
}

/// How the body after `head` (a complete request head) is framed, as hyper's server reads it.
fn body_of(head: &[u8]) -> State {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return State::Off;
    }
    if request.method == Some("CONNECT") {
        return State::Off;
    }
    let field = |name: &'static str| {
        request
            .headers
            .iter()
            .filter(move |header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value)
    };
    // hyper looks at the last coding of the last Transfer-Encoding line only, and refuses a
    // request whose last coding is not chunked.
    if let Some(last) = field("transfer-encoding").next_back() {
        let coding = last.rsplit(|&byte| byte == b',').next().unwrap_or_default();
        return if coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            State::SizeStart
        } else {
            State::Off
        };
    }
    let mut length: Option<u64> = None;
    for value in field("content-length") {
        for part in value.split(|&byte| byte == b',') {
            let parsed = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|digits| digits.parse::<u64>().ok());
            match (parsed, length) {
                (None, _) => return State::Off,
                (Some(new), Some(old)) if new != old => return State::Off,
                (Some(new), _) => length = Some(new),
            }
        }
    }
    match length {
        Some(remaining) if remaining > 0 => State::Length { remaining },
        _ => State::Idle,
    }
}

/// A client socket whose reads are checked by [`Framing`].
#[derive(Debug)]
pub struct Strict<S> {
    inner: S,
    framing: Framing,
    /// Set once the bytes before a violation were handed out: the next read fails.
    refused: bool,
}

impl<S> Strict<S> {
    /// Wraps `inner`, a new connection whose heads may be up to `max_head` bytes.
    pub fn new(inner: S, max_head: usize) -> Strict<S> {
        Strict {
            inner,
            framing: Framing::new(max_head),
            refused: false,
        }
    }
}

fn refusal() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "invalid chunk size line: whitespace after the size is only allowed before a ';' extension (RFC 9112 §7.1.1)",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Strict<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Err(refusal()));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Err(violation) = this.framing.feed(&buf.filled()[before..]) {
            if violation.at == 0 {
                buf.set_filled(before);
                return Poll::Ready(Err(refusal()));
            }
            buf.set_filled(before + violation.at);
            this.refused = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Strict<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 << 10;

    /// Feeds `stream` in pieces of `step` bytes; the absolute offset of a violation.
    fn violation(stream: &[u8], step: usize) -> Option<usize> {
        let mut framing = Framing::new(LIMIT);
        let mut offset = 0;
        for piece in stream.chunks(step) {
            if let Err(violation) = framing.feed(piece) {
                return Some(offset + violation.at);
            }
            offset += piece.len();
        }
        None
    }

    /// The same answer whichever way the stream is split into reads.
    fn check(stream: &[u8]) -> Option<usize> {
        let whole = violation(stream, stream.len());
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(violation(stream, step), whole, "split every {step} bytes");
        }
        whole
    }

    const CHUNKED: &str = "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn whitespace_ending_a_size_line_is_the_violation() {
        let stream = format!("{CHUNKED}5\r\nhello\r\n0 \r\n\r\n");
        assert_eq!(check(stream.as_bytes()), Some(stream.len() - 4));
        let stream = format!("{CHUNKED}5\t\r\nhello\r\n0\r\n\r\n");
        assert_eq!(check(stream.as_bytes()), Some(CHUNKED.len() + 2));
    }

    #[test]
    fn valid_chunked_bodies_pass_whatever_their_extensions_and_trailers() {
        for body in [
            "5\r\nhello\r\n0\r\n\r\n",
            "5 ;name=value\r\nhello\r\n0\t; last\r\n\r\n",
            "A\r\n0 \r\n123456\r\n0;x\r\nX-Trailer: 1\r\nY: 2\r\n\r\n",
            "0\r\n\r\n",
        ] {
            let stream = format!("{CHUNKED}{body}GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(check(stream.as_bytes()), None, "{body:?}");
        }
    }

    #[test]
    fn content_length_bodies_are_skipped_and_pipelined_requests_followed() {
        let body = "0 \r\n0 \r\n";
        let stream = format!(
            "\r\nPOST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}{CHUNKED}0 \r\n\r\n",
            body.len()
        );
        let expected = stream.len() - 4;
        assert_eq!(check(stream.as_bytes()), Some(expected));
        let stream = "GET / HTTP/1.1\r\nHost: a\r\n\r\n0 \r\n\r\n";
        assert_eq!(check(stream.as_bytes()), None, "no body: not a chunk line");
    }

    #[test]
    fn framing_follows_hyper() {
        // Transfer-Encoding wins over Content-Length.
        let stream = "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0 \r\n\r\n";
        assert!(check(stream.as_bytes()).is_some());
        // What hyper refuses itself stops the check.
        for head in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            let stream = format!("{head}0 \r\n\r\n{CHUNKED}0 \r\n\r\n");
            assert_eq!(check(stream.as_bytes()), None, "{head:?}");
        }
        // A head past the limit is hyper's 431.
        let mut framing = Framing::new(100);
        let head = format!("POST / HTTP/1.1\r\nX: {}\r\n", "y".repeat(200));
        assert_eq!(framing.feed(head.as_bytes()), Ok(()));
        assert_eq!(framing.state, State::Off);
        assert!(framing.head.capacity() == 0, "the partial head is freed");
    }
}
