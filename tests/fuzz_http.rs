//! Property test of the HTTP front through the real binary and real CPython workers: generated
//! raw HTTP/1.1 — valid requests with odd bytes in the request line and header fields, broken
//! chunk framing, duplicated or conflicting `Content-Length`/`Transfer-Encoding`, truncated and
//! pipelined streams — each on its own connection. Whatever a client sends, the answer is a
//! parsable status line or a clean close, never a server error of ours; a valid request right
//! after it is answered at once; and no worker is replaced (a worker must never pay for a
//! client's bytes). Case count: `util::fuzz::config`; long runs: `benches/fuzz.sh`.

use std::cell::RefCell;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

use crate::util::{self, Running, Sandbox, fuzz};

/// The app: answers every path, reading the whole body; checks the environ the way PEP 3333
/// promises it (an app error would be a 500, which the test refuses); echoes one request header
/// back, as apps do with request ids; `/big` streams chunks large enough for the shared ring.
const APP: &str = r#"
import hashlib

def application(environ, start_response):
    for key in ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL"):
        if type(environ[key]) is not str:
            raise TypeError("%s is %r" % (key, environ[key]))
    for key, value in environ.items():
        if key.startswith("HTTP_") and type(value) is not str:
            raise TypeError("%s is %r" % (key, value))
    body = environ["wsgi.input"].read()
    headers = [("Content-Type", "text/plain")]
    echo = environ.get("HTTP_X_REQUEST_ID")
    if echo is not None:
        headers.append(("X-Request-Id", echo))
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", headers)
        return (bytes([65 + index]) * 20000 for index in range(4))
    start_response("200 OK", headers)
    return [b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())]
"#;

/// How long the server may take to answer a request it has whole, before the client gives up
/// waiting and half-closes (a truncated request otherwise waits for bytes that never come).
const FIRST_BYTE_WAIT: Duration = Duration::from_millis(300);
/// Silence after which a response (or a pipelined series of them) is taken as complete.
const QUIET: Duration = Duration::from_millis(40);
/// After the client half-closed, the server must close within this: longer is a hang.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// A valid request after each case must be answered within this.
const PROBE_WAIT: Duration = Duration::from_secs(10);

const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"PATCH", b"CONNECT", b"TRACE",
    b"get", b"G ET", b"GET\0", b"\xffGET", b"",
];
const TARGETS: &[&[u8]] = &[
    b"/",
    b"/hello",
    b"/big",
    b"/echo?x=1&y=%00",
    b"*",
    b"http://example.com/x",
    b"/%00",
    b"/a%2500b",
    b"/%zz%4",
    b"/a b",
    b"//x/../..%2f",
    b"/caf\xc3\xa9",
    b"/\x7f",
    b"/\r",
    b"",
];
const VERSIONS: &[&[u8]] = &[
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/1.2",
    b"HTTP/2.0",
    b"HTTP/0.9",
    b"http/1.1",
    b"HTTP/1.1 ",
    b"HTTP/11",
    b"",
];
const NAMES: &[&[u8]] = &[
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"Expect",
    b"X-Request-Id",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"Cookie",
    b"Content-Length ",
    b" Transfer-Encoding",
    b"Transfer_Encoding",
    b"X\0Y",
    b"X\xffY",
    b"",
];
const VALUES: &[&[u8]] = &[
    b"chunked",
    b"Chunked",
    b"chunked, identity",
    b"identity, chunked",
    b"gzip, chunked",
    b" chunked",
    b"chunked\x0b",
    b"xchunked",
    b"0",
    b"5",
    b"-1",
    b"+5",
    b"5, 5",
    b"5, 6",
    b"18446744073709551616",
    b"100-continue",
    b"close",
    b"keep-alive, Upgrade",
    b"localhost, evil.example.com",
    b"caf\xe9 \xff",
    b"a\tb",
    b"a\0b",
    b"a\rb",
    b"a\nb",
    b"\x7f",
    b"",
];
/// Odd bytes to sprinkle into names and values.
const ODD: &[u8] = b"\0\t\r\n :;,\"\\\x0b\x7f\x80\xff=";
const SIZE_LINES: &[&[u8]] = &[
    b"-1",
    b"0x5",
    b"ffffffffffffffffffff",
    b"5 ;ext",
    b"5;ext=\"x\"",
    b" 5",
    b"5 ",
    b"",
    b"z",
    b"00000000000000000005",
];
const LAST_CHUNKS: &[&[u8]] = &[
    b"0\r\n\r\n",
    b"0\r\n",
    b"0;ext=1\r\n\r\n",
    b"0\r\nX-Trailer: 1\r\n\r\n",
    b"0\r\nContent-Length: 5\r\n\r\n",
    b"000\r\n\r\n",
    b"0 \r\n\r\n",
    b"0\n\n",
    b"",
];

/// How a request carries its body.
#[derive(Debug, Clone)]
enum Body {
    None,
    Length(Vec<u8>),
    /// Pieces sent as chunks; `bad_size` replaces one chunk's size line; `last` picks the
    /// last-chunk form; `no_crlf` drops the CRLF after one chunk's data.
    Chunked {
        pieces: Vec<Vec<u8>>,
        bad_size: Option<(usize, usize)>,
        no_crlf: Option<usize>,
        last: usize,
    },
}

/// One change to a request's head.
#[derive(Debug, Clone)]
enum HeadEdit {
    /// Adds a header with a name and value from the lists (indices taken modulo their length).
    Add(usize, usize),
    /// Adds a header whose name and value are arbitrary bytes.
    AddRaw(Vec<u8>, Vec<u8>),
    /// Puts an odd byte into header `index`'s name or value at a position.
    Sprinkle {
        index: usize,
        in_name: bool,
        at: usize,
        odd: usize,
    },
    /// Removes header `index`.
    Remove(usize),
    /// A bare LF instead of CRLF after header `index`.
    BareLf(usize),
    /// Adds a header whose value is this many KiB long (past any head size limit at the top).
    Long(usize),
    /// Adds this many small headers (past any header count limit at the top).
    Many(usize),
}

#[derive(Debug, Clone)]
struct HttpRequest {
    method: usize,
    target: usize,
    version: usize,
    edits: Vec<HeadEdit>,
    keep_alive: bool,
    body: Body,
}

/// A change to the bytes of the whole stream.
#[derive(Debug, Clone)]
enum ByteEdit {
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Overwrite(usize, u8),
    Delete(usize, usize),
}

fn pick<'a>(list: &[&'a [u8]], index: usize) -> &'a [u8] {
    list[index % list.len()]
}

impl HttpRequest {
    fn to_bytes(&self) -> Vec<u8> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"Host".to_vec(), b"localhost".to_vec()),
            (b"User-Agent".to_vec(), b"fuzz/1".to_vec()),
        ];
        if !self.keep_alive {
            headers.push((b"Connection".to_vec(), b"close".to_vec()));
        }
        let body = match &self.body {
            Body::None => Vec::new(),
            Body::Length(data) => {
                headers.push((
                    b"Content-Length".to_vec(),
                    data.len().to_string().into_bytes(),
                ));
                data.clone()
            }
            Body::Chunked {
                pieces,
                bad_size,
                no_crlf,
                last,
            } => {
                headers.push((b"Transfer-Encoding".to_vec(), b"chunked".to_vec()));
                let mut out = Vec::new();
                for (index, piece) in pieces.iter().enumerate() {
                    match bad_size {
                        Some((at, line)) if at % pieces.len() == index => {
                            out.extend_from_slice(pick(SIZE_LINES, *line));
                        }
                        _ => out.extend_from_slice(format!("{:x}", piece.len()).as_bytes()),
                    }
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(piece);
                    if no_crlf.is_none_or(|at| at % pieces.len() != index) {
                        out.extend_from_slice(b"\r\n");
                    }
                }
                out.extend_from_slice(pick(LAST_CHUNKS, *last));
                out
            }
        };
        let mut line_ends = vec![b"\r\n".as_slice(); headers.len() + 8];
        for edit in &self.edits {
            match edit {
                HeadEdit::Add(name, value) => {
                    headers.push((pick(NAMES, *name).to_vec(), pick(VALUES, *value).to_vec()));
                }
                HeadEdit::AddRaw(name, value) => headers.push((name.clone(), value.clone())),
                HeadEdit::Sprinkle {
                    index,
                    in_name,
                    at,
                    odd,
                } => {
                    if let Some(count) = std::num::NonZeroUsize::new(headers.len()) {
                        let (name, value) = &mut headers[*index % count];
                        let field = if *in_name { name } else { value };
                        let at = at % (field.len() + 1);
                        field.insert(at, ODD[odd % ODD.len()]);
                    }
                }
                HeadEdit::Remove(index) => {
                    if !headers.is_empty() {
                        let index = index % headers.len();
                        headers.remove(index);
                    }
                }
                HeadEdit::BareLf(index) => {
                    let count = line_ends.len();
                    line_ends[index % count] = b"\n";
                }
                HeadEdit::Long(kib) => headers.push((b"X-Long".to_vec(), vec![b'v'; kib * 1024])),
                HeadEdit::Many(count) => {
                    headers.extend(
                        (0..*count).map(|n| (format!("X-{n}").into_bytes(), b"v".to_vec())),
                    );
                }
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(pick(METHODS, self.method));
        out.push(b' ');
        out.extend_from_slice(pick(TARGETS, self.target));
        out.push(b' ');
        out.extend_from_slice(pick(VERSIONS, self.version));
        out.extend_from_slice(b"\r\n");
        for (index, (name, value)) in headers.iter().enumerate() {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(line_ends.get(index).copied().unwrap_or(b"\r\n"));
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn body() -> impl Strategy<Value = Body> {
    // Mostly small; sometimes past body_buffer (16 KiB), so the worker pulls the body in reads.
    let data =
        prop_oneof![4 => bytes(200), 1 => (17_000usize..40_000).prop_map(|len| vec![b'b'; len])];
    prop_oneof![
        2 => Just(Body::None),
        3 => data.prop_map(Body::Length),
        3 => (
            prop::collection::vec(bytes(300), 0..4),
            prop::option::weighted(0.15, (any::<usize>(), any::<usize>())),
            prop::option::weighted(0.1, any::<usize>()),
            prop_oneof![4 => Just(0usize), 1 => any::<usize>()],
        )
            .prop_map(|(pieces, bad_size, no_crlf, last)| Body::Chunked { pieces, bad_size, no_crlf, last }),
    ]
}

fn head_edit() -> impl Strategy<Value = HeadEdit> {
    prop_oneof![
        4 => (any::<usize>(), any::<usize>()).prop_map(|(name, value)| HeadEdit::Add(name, value)),
        1 => (bytes(12), bytes(24)).prop_map(|(name, value)| HeadEdit::AddRaw(name, value)),
        2 => (any::<usize>(), any::<bool>(), any::<usize>(), any::<usize>())
            .prop_map(|(index, in_name, at, odd)| HeadEdit::Sprinkle { index, in_name, at, odd }),
        1 => any::<usize>().prop_map(HeadEdit::Remove),
        1 => any::<usize>().prop_map(HeadEdit::BareLf),
        1 => prop_oneof![1usize..64, 64usize..600].prop_map(HeadEdit::Long),
        1 => (1usize..300).prop_map(HeadEdit::Many),
    ]
}

fn request() -> impl Strategy<Value = HttpRequest> {
    // Valid request lines most of the time, so that the headers and bodies get parsed.
    let method = prop_oneof![6 => 0usize..3, 1 => any::<usize>()];
    let target = prop_oneof![6 => 0usize..3, 1 => any::<usize>()];
    let version = prop_oneof![6 => Just(0usize), 1 => Just(1usize), 1 => any::<usize>()];
    (
        method,
        target,
        version,
        prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(head_edit(), 1..3)],
        any::<bool>(),
        body(),
    )
        .prop_map(
            |(method, target, version, edits, keep_alive, body)| HttpRequest {
                method,
                target,
                version,
                edits,
                keep_alive,
                body,
            },
        )
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        2 => any::<usize>().prop_map(ByteEdit::Truncate),
        1 => (any::<usize>(), bytes(8)).prop_map(|(at, data)| ByteEdit::Insert(at, data)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| ByteEdit::Overwrite(at, byte)),
        1 => (any::<usize>(), 1usize..16).prop_map(|(at, len)| ByteEdit::Delete(at, len)),
    ]
}

/// What one connection sends: one to three requests back to back (pipelined), then a few edits
/// of the bytes as a whole.
#[derive(Debug, Clone)]
struct Stream {
    requests: Vec<HttpRequest>,
    edits: Vec<ByteEdit>,
}

impl Stream {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self
            .requests
            .iter()
            .flat_map(HttpRequest::to_bytes)
            .collect();
        for edit in &self.edits {
            match edit {
                ByteEdit::Truncate(at) => out.truncate(at % (out.len() + 1)),
                ByteEdit::Insert(at, data) => {
                    let at = at % (out.len() + 1);
                    out.splice(at..at, data.iter().copied());
                }
                ByteEdit::Overwrite(at, byte) => {
                    if !out.is_empty() {
                        let at = at % out.len();
                        out[at] = *byte;
                    }
                }
                ByteEdit::Delete(at, len) => {
                    let at = at % (out.len() + 1);
                    let end = (at + len).min(out.len());
                    out.drain(at..end);
                }
            }
        }
        out
    }
}

fn stream() -> impl Strategy<Value = Stream> {
    (
        prop_oneof![
            3 => prop::collection::vec(request(), 1..2),
            1 => prop::collection::vec(request(), 2..4),
        ],
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(byte_edit(), 1..3)],
    )
        .prop_map(|(requests, edits)| Stream { requests, edits })
}

/// Sends `wire` on a fresh connection and returns everything the server answered before it
/// closed. `Err` when the server neither answered nor closed in time (a hang).
fn exchange(address: &str, wire: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream =
        TcpStream::connect(address).map_err(|error| format!("connect {address}: {error}"))?;
    let _ = stream.set_nodelay(true);
    // The server may answer and close before reading everything (a 400 on the first line):
    // a failed write is then expected, and what it answered is still to be read.
    let _ = stream.write_all(wire);
    let mut answer = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let mut read = |stream: &mut TcpStream, wait: Duration| -> Option<usize> {
        let _ = stream.set_read_timeout(Some(wait));
        match stream.read(&mut buffer) {
            Ok(count) => {
                answer.extend_from_slice(&buffer[..count]);
                Some(count)
            }
            // A reset is how a close looks when our unread bytes were still in its buffer.
            Err(error) if error.kind() == ErrorKind::ConnectionReset => Some(0),
            Err(_) => None,
        }
    };
    // Wait for an answer, then until the answers stop coming; then half-close, so that a
    // request cut short ends instead of waiting for the rest.
    let mut closed = false;
    match read(&mut stream, FIRST_BYTE_WAIT) {
        Some(0) => closed = true,
        Some(_) => loop {
            match read(&mut stream, QUIET) {
                Some(0) => {
                    closed = true;
                    break;
                }
                Some(_) => {}
                None => break,
            }
        },
        None => {}
    }
    if closed {
        return Ok(answer);
    }
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + CLOSE_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the server neither answered nor closed within {CLOSE_WAIT:?} of the client's half-close; it sent {:?}",
                String::from_utf8_lossy(&answer)
            ));
        }
        if read(&mut stream, left) == Some(0) {
            return Ok(answer);
        }
    }
}

/// The status code of the first response in `answer`, when it starts with a status line.
fn first_status(answer: &[u8]) -> Result<u16, String> {
    let line_end = answer
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .ok_or("no CRLF after the status line")?;
    let line = &answer[..line_end];
    let rest = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))
        .ok_or("not an HTTP/1.x status line")?;
    let code = rest.get(..3).ok_or("no status code")?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&byte| byte != b' ') {
        return Err("a malformed status code".to_owned());
    }
    let code: u16 = std::str::from_utf8(code)
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or("a malformed status code")?;
    if !(100..600).contains(&code) {
        return Err(format!("status {code} out of range"));
    }
    // The head up to its blank line, if it arrived whole, is `name: value` lines.
    // (A status line alone, as `100 Continue` is sent, has none.)
    let head = &answer[line_end..];
    if let Some(head_end) = head.windows(4).position(|quad| quad == b"\r\n\r\n") {
        let headers = head.get(2..head_end).unwrap_or_default();
        for header in headers
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty())
        {
            let header = header.strip_suffix(b"\r").unwrap_or(header);
            if header.iter().position(|&byte| byte == b':').unwrap_or(0) == 0 {
                return Err(format!(
                    "a malformed response header {:?}",
                    String::from_utf8_lossy(header)
                ));
            }
        }
    }
    Ok(code)
}

/// A valid request answered with 200 within [`PROBE_WAIT`].
fn probe(address: &str) -> Result<(), String> {
    let started = Instant::now();
    let mut stream =
        TcpStream::connect(address).map_err(|error| format!("probe connect: {error}"))?;
    let _ = stream.set_read_timeout(Some(PROBE_WAIT));
    stream
        .write_all(b"GET /probe HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|error| format!("probe write: {error}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|error| {
        format!("a valid request was not answered within {PROBE_WAIT:?}: {error}")
    })?;
    if !answer.starts_with(b"HTTP/1.1 200 ") {
        return Err(format!(
            "a valid request got {:?} after {:?}",
            String::from_utf8_lossy(&answer),
            started.elapsed()
        ));
    }
    Ok(())
}

fn worker_pids(running: &Running) -> Vec<u64> {
    let status = running.wait_for(Duration::from_secs(30), "two ready workers", |status| {
        status["pool"]["workers"].as_array().is_some_and(|workers| {
            workers.len() == 2 && workers.iter().all(|worker| worker["state"] == "ready")
        })
    });
    let mut pids: Vec<u64> = status["pool"]["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|worker| worker["pid"].as_u64())
        .collect();
    pids.sort_unstable();
    pids
}

/// Everything a client can send is answered with a status line or a clean close, the server
/// stays responsive, and the workers that served it are the same processes afterwards.
#[test]
fn generated_raw_requests_never_break_the_front_or_replace_a_worker() {
    let sandbox = Sandbox::new();
    sandbox.write("app.py", APP);
    let port = util::free_port();
    let address = format!("127.0.0.1:{port}");
    sandbox.write_config(&format!(
        "[app]\ndirectory = \".\"\npython = \"{}\"\nwsgi = \"app:application\"\n\n[web]\nlisten = [\"{address}\"]\nworkers = 2\nthreads = 2\ntimeout = \"10s\"\nmax_body = \"1MiB\"\nbody_buffer = \"16KiB\"\naccess_log = false\n",
        util::python().display()
    ));
    let running = sandbox.start();
    let pids = RefCell::new(worker_pids(&running));
    probe(&address).unwrap();

    let first_failure = RefCell::new(None::<String>);
    let mut runner = TestRunner::new(fuzz::config(40));
    let result = runner.run(&stream(), |stream| {
        let wire = stream.to_bytes();
        let problem = check_one(&address, &wire).err().or_else(|| {
            // A worker that died for this input is the failure; the pool's replacements
            // serve the next cases, so shrinking still finds the input that kills one.
            let alive = pids.borrow().iter().all(|&pid| util::alive(pid));
            (!alive).then(|| {
                let now = worker_pids(&running);
                let before = pids.replace(now.clone());
                format!("a worker was replaced: pids {before:?} became {now:?}")
            })
        });
        match problem {
            None => Ok(()),
            Some(problem) => {
                let mut first = first_failure.borrow_mut();
                if first.is_none() {
                    *first = Some(format!(
                        "{problem}\nsent: {:?}",
                        String::from_utf8_lossy(&wire)
                    ));
                }
                Err(TestCaseError::fail(format!(
                    "{problem}\nsent: {:?}",
                    String::from_utf8_lossy(&wire)
                )))
            }
        }
    });
    if let Err(error) = result {
        let log = running.log();
        let tail: String = log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!(
            "{error}\nfirst failure seen: {}\nsupervisor log (tail):\n{tail}",
            first_failure.borrow().clone().unwrap_or_default()
        );
    }
    // The same workers as before the first request.
    assert_eq!(
        worker_pids(&running),
        pids.into_inner(),
        "log:\n{}",
        running.log()
    );
    let log = running.log();
    assert!(
        !log.contains("panicked"),
        "a panic in the supervisor:\n{log}"
    );
}

fn check_one(address: &str, wire: &[u8]) -> Result<(), String> {
    let answer = exchange(address, wire)?;
    if !answer.is_empty() {
        let status = first_status(&answer).map_err(|problem| {
            format!(
                "{problem}: the server answered {:?}",
                String::from_utf8_lossy(&answer)
            )
        })?;
        // Server-side failures: an app error, a worker lost or a timeout, a full queue.
        if matches!(status, 500 | 502 | 503 | 504) {
            return Err(format!(
                "status {status} for a client's bytes: {:?}",
                String::from_utf8_lossy(&answer)
            ));
        }
    }
    probe(address)
}
