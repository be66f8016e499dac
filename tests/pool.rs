//! The web pool through real CPython workers: WSGI behaviour (every test app is wrapped in
//! `wsgiref.validate.validator`), timeouts, crashes, recycling, the queue, slow uploads and real
//! frameworks. Most tests drive `pool::start` directly (a library API) and talk raw HTTP/1.1 over
//! TCP, so that pipelining, chunked bodies and bad requests are visible exactly as sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_conf::{AppConfig, AppTarget, ByteSize, Listen, WebConfig};
use sauna_supervisor::metrics::Metrics;
use sauna_supervisor::supervisor::lifecycle::StopMode;
use sauna_supervisor::web::pool::{self, PoolError, PoolHandle, PoolStatus};

use crate::util::{self, Sandbox};

/// The test app: one WSGI callable answering many paths, wrapped in the PEP 3333 validator.
const APP: &str = r#"
import hashlib, json, os, sys, threading, time
from wsgiref.validate import validator

HELD = []

def _app(environ, start_response):
    path = environ["PATH_INFO"]
    text = [("Content-Type", "text/plain")]
    if path == "/hello":
        start_response("200 OK", text)
        return [b"Hello, World!"]
    if path.startswith("/environ"):
        body = {k: v for k, v in environ.items() if isinstance(v, str)}
        body["wsgi.input_terminated"] = environ.get("wsgi.input_terminated")
        body["wsgi.multithread"] = environ["wsgi.multithread"]
        body["wsgi.version"] = list(environ["wsgi.version"])
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]
    if path == "/echo":
        stream = environ["wsgi.input"]
        mode = environ.get("QUERY_STRING", "")
        if mode == "lines":
            data = b"".join(stream.readlines())
        elif mode == "iter":
            data = b"".join(line for line in stream)
        elif mode == "line":
            data = b""
            while True:
                line = stream.readline()
                if not line:
                    break
                data += line
        else:
            data = b""
            while True:
                chunk = stream.read(7777)
                if not chunk:
                    break
                data += chunk
        result = {"len": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                  "content_length": environ.get("CONTENT_LENGTH")}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(result).encode()]
    if path == "/stream":
        start_response("200 OK", text)
        def chunks():
            for i in range(5):
                yield b"chunk %d\n" % i
                time.sleep(0.05)
        return chunks()
    if path == "/forever":
        marker = environ["QUERY_STRING"]
        start_response("200 OK", text)
        class Forever:
            def __iter__(self):
                while True:
                    yield b"x" * 1024
                    time.sleep(0.01)
            def close(self):
                open(marker, "w").write("closed")
        return Forever()
    if path == "/big":
        start_response("200 OK", text)
        return (b"y" * 65536 for _ in range(16))
    if path == "/varied":
        # Bigger than a slot's shared ring (2 MiB) in chunks that do not divide it, each chunk
        # its own byte, one of them through write().
        write = start_response("200 OK", text)
        write(bytes([250]) * 70000)
        return (bytes([index % 250]) * 70000 for index in range(40))
    if path == "/cookies":
        start_response("200 OK", text + [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Latin", "caf\xe9")])
        return [b"two cookies"]
    if path == "/write":
        write = start_response("200 OK", text)
        write(b"written ")
        return [b"and returned"]
    if path == "/empty":
        start_response("204 No Content", [])
        return []
    if path == "/reason":
        start_response("299 Custom Thing", text)
        return [b"custom"]
    if path == "/error":
        raise ValueError("boom in the app")
    if path == "/error-late":
        start_response("200 OK", text)
        def late():
            yield b"partial"
            raise RuntimeError("late failure")
        return late()
    if path == "/exc-info":
        start_response("200 OK", text)
        try:
            raise KeyError("replaced")
        except KeyError:
            start_response("500 Internal Server Error", text, sys.exc_info())
        return [b"error page"]
    if path == "/sleep":
        time.sleep(float(environ["QUERY_STRING"] or "1"))
        start_response("200 OK", text)
        return [b"slept"]
    if path == "/hold":
        # Says which worker holds it, then holds it (until killed).
        with open(environ["QUERY_STRING"], "w") as marker:
            marker.write(str(os.getpid()))
        time.sleep(60)
        start_response("200 OK", text)
        return [b"held"]
    if path == "/spin":
        # 5 ms of CPU, then the worker's voluntary context switches so far: how often it slept.
        end = time.perf_counter() + 0.005
        while time.perf_counter() < end:
            pass
        switches = 0
        for task in os.listdir("/proc/self/task"):
            with open("/proc/self/task/%s/status" % task) as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        switches += int(line.split()[1])
        start_response("200 OK", text)
        return [str(switches).encode()]
    if path == "/crash":
        os._exit(3)
    if path == "/pid":
        start_response("200 OK", text)
        return [str(os.getpid()).encode()]
    if path == "/grow":
        HELD.append(bytearray(int(environ["QUERY_STRING"]) << 20))
        start_response("200 OK", text)
        return [str(os.getpid()).encode()]
    if path == "/file":
        start_response("200 OK", text)
        return environ["wsgi.file_wrapper"](open(__file__, "rb"), 4096)
    if path == "/errors":
        environ["wsgi.errors"].write("message to wsgi.errors\n")
        start_response("200 OK", text)
        return [b"logged"]
    start_response("404 Not Found", text)
    return [b"not found"]

application = validator(_app)
"#;

/// A pool started in its own runtime, so the test can use blocking sockets.
struct TestPool {
    runtime: tokio::runtime::Runtime,
    handle: Option<PoolHandle>,
    address: String,
    metrics: Arc<Metrics>,
}

impl TestPool {
    fn status(&self) -> PoolStatus {
        let handle = self.handle.as_ref().expect("pool running");
        self.runtime.block_on(handle.status())
    }

    fn wait_for(&self, what: &str, predicate: impl Fn(&PoolStatus) -> bool) -> PoolStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status();
            if predicate(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status: {status:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready_pids(&self) -> Vec<u32> {
        let status = self.status();
        let mut pids: Vec<u32> = status
            .workers
            .iter()
            .filter(|worker| format!("{:?}", worker.state) == "Ready")
            .filter_map(|worker| worker.pid)
            .collect();
        pids.sort_unstable();
        pids
    }

    fn shutdown(mut self, mode: StopMode) {
        if let Some(handle) = self.handle.take() {
            self.runtime.block_on(handle.shutdown(mode));
        }
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.runtime.block_on(handle.shutdown(StopMode::Fast));
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime")
}

fn app_config(dir: &Path, wsgi: &str) -> AppConfig {
    AppConfig {
        directory: Some(dir.to_path_buf()),
        python: util::python().display().to_string(),
        target: Some(AppTarget::Wsgi(wsgi.to_owned())),
        ..AppConfig::default()
    }
}

/// A `[web].listen` entry, as proxy-conf reads it.
fn listen(text: &str) -> Listen {
    text.parse().expect("a listen address")
}

/// A count for `[web]`, as proxy-conf reads it.
fn count(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("a non-zero count")
}

fn web_config(adjust: impl FnOnce(&mut WebConfig)) -> WebConfig {
    let mut web = WebConfig {
        listen: vec![listen("127.0.0.1:0")],
        workers: NonZeroUsize::MIN,
        access_log: false,
        ..WebConfig::default()
    };
    adjust(&mut web);
    web
}

fn try_start(
    app: &AppConfig,
    web: &WebConfig,
    dir: &Path,
) -> (
    tokio::runtime::Runtime,
    Result<PoolHandle, PoolError>,
    Arc<Metrics>,
) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    let runtime = runtime();
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let result = runtime.block_on(pool::start(app, web, dir, Arc::clone(&metrics)));
    (runtime, result, metrics)
}

fn start(app: &AppConfig, web: &WebConfig, dir: &Path) -> TestPool {
    let (runtime, result, metrics) = try_start(app, web, dir);
    let handle = result.unwrap_or_else(|error| panic!("pool did not start: {error}"));
    let address = handle.listen_addresses()[0].clone();
    TestPool {
        runtime,
        handle: Some(handle),
        address,
        metrics,
    }
}

fn start_test_app(sandbox: &Sandbox, adjust: impl FnOnce(&mut WebConfig)) -> TestPool {
    sandbox.write("app.py", APP);
    start(
        &app_config(sandbox.root(), "app:application"),
        &web_config(adjust),
        sandbox.root(),
    )
}

/// A parsed HTTP response.
#[derive(Debug)]
struct Response {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// False when the connection ended before the body did.
    complete: bool,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
            .collect()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.text()))
    }
}

fn connect(address: &str) -> TcpStream {
    let stream = TcpStream::connect(address).expect("connect to the pool");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set timeout");
    stream
}

/// Reads one response; `head` for a response to HEAD (no body whatever the headers say).
fn read_response(reader: &mut BufReader<TcpStream>, head: bool) -> Response {
    let mut line = String::new();
    reader.read_line(&mut line).expect("read status line");
    let mut parts = line.trim_end().splitn(3, ' ');
    let _version = parts.next();
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let reason = parts.next().unwrap_or("").to_owned();
    let mut headers = Vec::new();
    loop {
        let mut raw = Vec::new();
        reader.read_until(b'\n', &mut raw).expect("read header");
        let text: String = raw.iter().map(|b| char::from(*b)).collect();
        let text = text.trim_end();
        if text.is_empty() {
            break;
        }
        let (name, value) = text.split_once(':').expect("header colon");
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut response = Response {
        status,
        reason,
        headers,
        body: Vec::new(),
        complete: true,
    };
    if head || status == 204 || status == 304 || (100..200).contains(&status) {
        return response;
    }
    if response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            if reader.read_line(&mut size).unwrap_or(0) == 0 {
                response.complete = false;
                break;
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).expect("chunk");
            if size == 0 {
                break;
            }
            response.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = response.header("content-length") {
        let mut body = vec![0; length.parse().expect("content-length")];
        reader.read_exact(&mut body).expect("body");
        response.body = body;
    } else {
        reader
            .read_to_end(&mut response.body)
            .expect("body to close");
    }
    response
}

/// Sends `raw` on a new connection and reads one response.
fn exchange(address: &str, raw: &[u8]) -> Response {
    let mut stream = connect(address);
    stream.write_all(raw).expect("send request");
    let head = raw.starts_with(b"HEAD ");
    read_response(&mut BufReader::new(stream), head)
}

fn get(address: &str, path: &str) -> Response {
    exchange(
        address,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

fn post(address: &str, path: &str, content_type: &str, body: &[u8]) -> Response {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    exchange(address, &raw)
}

fn sha256_hex(data: &[u8]) -> String {
    let output = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().expect("stdin").write_all(data)?;
            child.wait_with_output()
        })
        .expect("run sha256sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn serves_hello_world_with_keep_alive_and_pipelining() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    let response = get(&pool.address, "/hello");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"Hello, World!");

    // Three pipelined requests on one connection, answered in order.
    let mut stream = connect(&pool.address);
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /pid HTTP/1.1\r\nHost: t\r\n\r\nGET /missing HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send pipelined");
    let mut reader = BufReader::new(stream);
    assert_eq!(read_response(&mut reader, false).body, b"Hello, World!");
    assert_eq!(read_response(&mut reader, false).status, 200);
    assert_eq!(read_response(&mut reader, false).status, 404);

    // The front recorded the requests, their status classes and their queue wait.
    let metrics = pool.metrics.render().unwrap();
    assert!(
        metrics.contains("sauna_http_requests_total{status=\"2xx\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sauna_http_requests_total{status=\"4xx\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sauna_http_queue_wait_seconds_count 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sauna_workers{state=\"ready\"} 1"),
        "{metrics}"
    );
    pool.shutdown(StopMode::Graceful);
}

#[test]
fn environ_follows_pep_3333() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| web.script_name = "/mount".to_owned());
    let response = exchange(
        &pool.address,
        b"POST /mount/caf%C3%A9/a%2Fb?x=%C3%A9&y=1 HTTP/1.1\r\nHost: example.com:8080\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nX-Twice: a\r\nX-Twice: b\r\nConnection: close\r\n\r\nhello",
    );
    // The app's environ route is not under /mount's PATH_INFO "/environ", so ask for it directly.
    assert_eq!(response.status, 404, "{}", response.text());
    let response = exchange(
        &pool.address,
        b"POST /mount/environ?x=%C3%A9&y=1 HTTP/1.1\r\nHost: example.com:8080\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nX-Twice: a\r\nX-Twice: b\r\nConnection: close\r\n\r\nhello",
    );
    let environ = response.json();
    assert_eq!(environ["SCRIPT_NAME"], "/mount");
    assert_eq!(environ["PATH_INFO"], "/environ");
    assert_eq!(environ["QUERY_STRING"], "x=%C3%A9&y=1");
    assert_eq!(environ["REQUEST_METHOD"], "POST");
    assert_eq!(environ["SERVER_NAME"], "example.com");
    assert_eq!(environ["SERVER_PORT"], "8080");
    assert_eq!(environ["SERVER_PROTOCOL"], "HTTP/1.1");
    assert_eq!(environ["CONTENT_TYPE"], "text/plain");
    assert_eq!(environ["CONTENT_LENGTH"], "5");
    assert_eq!(environ["HTTP_X_TWICE"], "a, b");
    assert_eq!(environ["REMOTE_ADDR"], "127.0.0.1");
    assert_eq!(environ["wsgi.url_scheme"], "http");
    assert_eq!(environ["wsgi.input_terminated"], serde_json::Value::Null);
    assert_eq!(environ["wsgi.version"], serde_json::json!([1, 0]));
    assert_eq!(environ["REQUEST_URI"], "/mount/environ?x=%C3%A9&y=1");
    assert!(environ.get("HTTP_CONTENT_TYPE").is_none());

    // PATH_INFO: percent-decoded bytes read as latin-1.
    let environ = get(&pool.address, "/mount/environ/caf%C3%A9/a%2Fb").json();
    assert_eq!(environ["PATH_INFO"], "/environ/caf\u{c3}\u{a9}/a/b");
    let response = exchange(&pool.address, b"GET /environ HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 9.9.9.9\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n");
    let environ = response.json();
    // 127.0.0.1 is a trusted proxy by default.
    assert_eq!(environ["REMOTE_ADDR"], "9.9.9.9");
    assert_eq!(environ["wsgi.url_scheme"], "https");
    assert_eq!(environ["PATH_INFO"], "/environ");
}

#[test]
fn request_bodies_reach_the_app_whole_in_every_read_style() {
    let sandbox = Sandbox::new();
    // A small memory threshold so the large body goes through the temporary file.
    let pool = start_test_app(&sandbox, |web| web.body_buffer = ByteSize(100_000));
    let small = b"line one\nline two\nthree".to_vec();
    let large: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for body in [&small, &large] {
        for mode in ["", "lines", "iter", "line"] {
            let response = post(
                &pool.address,
                &format!("/echo?{mode}"),
                "application/octet-stream",
                body,
            );
            let result = response.json();
            assert_eq!(result["len"], body.len(), "mode {mode:?}");
            assert_eq!(result["sha256"], sha256_hex(body), "mode {mode:?}");
            assert_eq!(result["content_length"], body.len().to_string());
        }
    }
    // Chunked request body: buffered, then given with CONTENT_LENGTH and wsgi.input_terminated.
    let response = exchange(
        &pool.address,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(response.json()["len"], 11);
    let chunked_environ = exchange(
        &pool.address,
        b"POST /environ HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .json();
    assert_eq!(chunked_environ["wsgi.input_terminated"], true);
    assert_eq!(chunked_environ["CONTENT_LENGTH"], "2");
    // Expect: 100-continue gets its interim response before the body is sent.
    let mut stream = connect(&pool.address);
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .expect("send head");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("interim");
    assert!(line.starts_with("HTTP/1.1 100"), "{line}");
    reader.read_line(&mut line).expect("blank");
    stream.write_all(b"data").expect("send body");
    assert_eq!(read_response(&mut reader, false).json()["len"], 4);
}

#[test]
fn responses_keep_wsgi_semantics() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    let address = &pool.address;

    let stream = get(address, "/stream");
    assert_eq!(stream.header("transfer-encoding"), Some("chunked"));
    assert!(stream.complete);
    assert_eq!(
        stream.text(),
        "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n"
    );

    let cookies = get(address, "/cookies");
    assert_eq!(cookies.headers_named("set-cookie"), vec!["a=1", "b=2"]);
    assert_eq!(cookies.header("x-latin"), Some("caf\u{e9}"));

    assert_eq!(get(address, "/write").text(), "written and returned");
    let empty = get(address, "/empty");
    assert_eq!((empty.status, empty.body.len()), (204, 0));
    let custom = get(address, "/reason");
    assert_eq!(
        (custom.status, custom.reason.as_str()),
        (299, "Custom Thing")
    );

    let head = exchange(
        address,
        b"HEAD /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    let big = get(address, "/big");
    assert_eq!(big.body.len(), 16 * 65536);
    let file = get(address, "/file");
    assert_eq!(file.body, APP.as_bytes());
    assert_eq!(get(address, "/errors").text(), "logged");

    // An app exception is a 500 and the worker keeps serving.
    let pid = get(address, "/pid").text();
    let error = get(address, "/error");
    assert_eq!(error.status, 500);
    assert_eq!(get(address, "/exc-info").status, 500);
    assert_eq!(get(address, "/pid").text(), pid);

    // A failure after the headers were sent cuts the response short; the worker survives.
    // (hyper may close before flushing the head; either way no complete response arrives).
    let mut stream = connect(address);
    stream
        .write_all(b"GET /error-late HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    assert!(
        !raw.contains("\r\n0\r\n\r\n"),
        "the truncated response must not look complete: {raw:?}"
    );
    assert_eq!(get(address, "/pid").text(), pid);

    // Bad HTTP is refused by the front without reaching Python.
    let bad = exchange(address, b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n");
    assert_eq!(bad.status, 400);
    let nul = get(address, "/a%00b");
    assert_eq!(nul.status, 400);
    // RFC 9112 §3.2: an HTTP/1.1 request needs exactly one Host; HTTP/1.0 may go without.
    let hostless = exchange(address, b"GET /pid HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(hostless.status, 400);
    assert!(hostless.text().contains("Missing Host header"));
    let twice = exchange(
        address,
        b"GET /pid HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(twice.status, 400);
    let old_client = exchange(address, b"GET /pid HTTP/1.0\r\n\r\n");
    assert_eq!((old_client.status, old_client.text()), (200, pid.clone()));
    // Framing that is unsafe to pass on: a tunnel nobody serves, a body that cannot be decoded.
    // The worker still serves afterwards.
    let connect = exchange(
        address,
        b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n",
    );
    assert_eq!(connect.status, 405);
    let gzip = exchange(
        address,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(gzip.status, 501);
    assert_eq!(get(address, "/pid").text(), pid);
}

fn varied_body() -> Vec<u8> {
    let mut body = vec![250u8; 70000];
    for index in 0..40u8 {
        body.extend(std::iter::repeat_n(index % 250, 70000));
    }
    body
}

#[test]
fn big_streamed_bodies_arrive_intact_through_the_shared_ring() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    let expected = varied_body();
    // One connection, several responses: the ring wraps around and is reused across requests.
    let mut reader = BufReader::new(connect(&pool.address));
    for _ in 0..4 {
        reader
            .get_mut()
            .write_all(b"GET /varied HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("send");
        let response = read_response(&mut reader, false);
        assert!(response.complete);
        assert_eq!(response.body.len(), expected.len());
        assert!(response.body == expected, "the body arrived altered");
    }
    // Two clients at once on the one worker's ring, one after the other.
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let address = pool.address.clone();
            std::thread::spawn(move || get(&address, "/varied").body)
        })
        .collect();
    for client in clients {
        assert!(client.join().expect("client") == expected);
    }
}

#[test]
fn a_client_that_does_not_read_does_not_hold_the_only_worker() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    // 2.8 MB, more than the shared ring holds: the rest must be read ahead by the front.
    let mut idle = connect(&pool.address);
    idle.write_all(b"GET /varied HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send");
    for _ in 0..3 {
        assert_eq!(get(&pool.address, "/hello").body, b"Hello, World!");
    }
    // The idle client still gets its whole body once it reads.
    let response = read_response(&mut BufReader::new(idle), false);
    assert!(response.body == varied_body(), "the body arrived altered");
}

#[test]
fn close_is_called_when_the_client_leaves_mid_stream() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    let marker = sandbox.path("closed.txt");
    let mut stream = connect(&pool.address);
    stream
        .write_all(
            format!(
                "GET /forever?{} HTTP/1.1\r\nHost: t\r\n\r\n",
                marker.display()
            )
            .as_bytes(),
        )
        .expect("send");
    let mut buffer = [0u8; 4096];
    let read = stream.read(&mut buffer).expect("first bytes");
    assert!(read > 0);
    drop(stream);
    util::wait_until(
        Duration::from_secs(10),
        "close() of the streaming iterable",
        || marker.exists().then_some(()),
    );
    // The slot is clean again.
    assert_eq!(get(&pool.address, "/hello").body, b"Hello, World!");
}

#[test]
fn import_error_is_reported_with_its_traceback() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "broken.py",
        "import os\n\ndef helper():\n    raise RuntimeError('settings missing')\n\nhelper()\n",
    );
    let app = app_config(sandbox.root(), "broken:application");
    let (_runtime, result, _) = try_start(&app, &web_config(|_| {}), sandbox.root());
    let error = result.expect_err("a broken app must not start");
    let text = error.to_string();
    assert!(matches!(error, PoolError::Import { .. }), "{text}");
    assert!(text.contains("Traceback (most recent call last)"), "{text}");
    assert!(text.contains("RuntimeError: settings missing"), "{text}");
    assert!(text.contains("broken.py\", line 4, in helper"), "{text}");

    let checked = sauna_supervisor::web::pool::check_import(&app, sandbox.root());
    assert!(matches!(
        checked,
        Err(sauna_supervisor::web::pool::ImportCheck::Failed(traceback)) if traceback.contains("RuntimeError: settings missing")
    ));
    sandbox.write("app.py", APP);
    sauna_supervisor::web::pool::check_import(
        &app_config(sandbox.root(), "app:application"),
        sandbox.root(),
    )
    .expect("the good app imports");
}

#[test]
fn timeout_answers_504_logs_the_stack_and_replaces_the_worker() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| {
        web.workers = count(2);
        web.timeout = proxy_conf::Duration::from_millis(1000);
    });
    let before = pool.ready_pids();
    let started = Instant::now();
    let response = get(&pool.address, "/sleep?30");
    assert_eq!(response.status, 504);
    assert!(started.elapsed() < Duration::from_secs(10));
    let status = pool.wait_for("a replacement worker", |status| {
        let ready = status
            .workers
            .iter()
            .filter(|w| format!("{:?}", w.state) == "Ready")
            .count();
        ready == 2
            && status.workers.iter().any(|w| {
                w.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("Python stack"))
            })
    });
    let error = status
        .workers
        .iter()
        .find_map(|w| w.last_error.clone())
        .expect("last error");
    assert!(error.contains("GET /sleep?30 timed out"), "{error}");
    assert!(
        error.contains("in _app"),
        "the stack names the app function: {error}"
    );
    let after = pool.ready_pids();
    assert_eq!(
        before.iter().filter(|pid| after.contains(pid)).count(),
        1,
        "only the stuck worker was replaced"
    );
    assert_eq!(get(&pool.address, "/hello").status, 200);
}

#[test]
fn crash_answers_502_and_the_slot_recovers() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    let before = pool.ready_pids();
    assert_eq!(get(&pool.address, "/crash").status, 502);
    pool.wait_for("the crashed worker's replacement", |status| {
        status
            .workers
            .iter()
            .any(|w| format!("{:?}", w.state) == "Ready" && !before.contains(&w.pid.unwrap_or(0)))
    });
    assert_eq!(get(&pool.address, "/hello").status, 200);
    let status = pool.status();
    assert!(
        status.workers[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("exit status 3"),
        "{status:#?}"
    );
}

#[test]
fn recycles_by_request_count_without_failing_a_request() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| web.max_requests = 5);
    let mut pids = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut requests = 0;
    while pids.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "workers were not recycled: {pids:?}"
        );
        let response = get(&pool.address, "/pid");
        assert_eq!(response.status, 200, "request {requests} failed");
        pids.insert(response.text());
        requests += 1;
    }
    pool.wait_for("one ready worker", |status| status.workers.len() == 1);
}

#[test]
fn recycles_by_memory_after_the_request() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| web.max_rss = ByteSize(150 << 20));
    let first = get(&pool.address, "/grow?200").text();
    let status = pool.wait_for("a recycled worker", |status| {
        status.workers.iter().any(|w| {
            format!("{:?}", w.state) == "Ready"
                && w.pid.map(|p| p.to_string()) != Some(first.clone())
        }) && status.workers.len() == 1
    });
    assert_eq!(status.workers.len(), 1);
    assert_ne!(get(&pool.address, "/pid").text(), first);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| {
        web.queue_size = count(1);
        web.queue_timeout = proxy_conf::Duration::from_secs(5);
    });
    let address = pool.address.clone();
    let busy = std::thread::spawn({
        let address = address.clone();
        move || get(&address, "/sleep?2")
    });
    util::wait_until(Duration::from_secs(10), "the worker to be busy", || {
        (pool.status().workers[0].in_flight == 1).then_some(())
    });
    let queued = std::thread::spawn({
        let address = address.clone();
        move || get(&address, "/hello")
    });
    std::thread::sleep(Duration::from_millis(300));
    let rejected = get(&address, "/hello");
    assert_eq!(rejected.status, 503);
    assert_eq!(rejected.header("retry-after"), Some("5"));
    assert_eq!(busy.join().expect("busy").status, 200);
    assert_eq!(queued.join().expect("queued").status, 200);
}

#[test]
fn a_slow_upload_does_not_hold_the_only_worker() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    let address = pool.address.clone();
    let upload = std::thread::spawn(move || {
        let mut stream = connect(&address);
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\nConnection: close\r\n\r\n")
            .expect("head");
        for _ in 0..20 {
            stream.write_all(b"x").expect("one byte");
            std::thread::sleep(Duration::from_millis(100));
        }
        read_response(&mut BufReader::new(stream), false)
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        let started = Instant::now();
        assert_eq!(get(&pool.address, "/hello").status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a fast request waited behind the upload"
        );
    }
    assert_eq!(upload.join().expect("upload").json()["len"], 20);
}

#[test]
fn bodies_over_max_body_get_413() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| web.max_body = ByteSize(1000));
    assert_eq!(
        post(&pool.address, "/echo", "text/plain", &[b'a'; 1001]).status,
        413
    );
    let chunked = exchange(
        &pool.address,
        format!("POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n", "b".repeat(2000)).as_bytes(),
    );
    assert_eq!(chunked.status, 413);
    assert_eq!(
        post(&pool.address, "/echo", "text/plain", &[b'a'; 1000]).json()["len"],
        1000
    );
}

#[test]
fn threads_serve_concurrent_requests_in_one_worker() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| web.threads = count(4));
    let started = Instant::now();
    let sleepers: Vec<_> = (0..4)
        .map(|_| {
            let address = pool.address.clone();
            std::thread::spawn(move || get(&address, "/sleep?1").status)
        })
        .collect();
    for sleeper in sleepers {
        assert_eq!(sleeper.join().expect("sleeper"), 200);
    }
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "4 threads served 4 sleeps at once"
    );
    assert_eq!(
        get(&pool.address, "/environ").json()["wsgi.multithread"],
        true
    );
}

#[test]
fn scale_adds_and_removes_workers() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    pool.handle.as_ref().expect("pool").scale(2);
    pool.wait_for("three ready workers", |status| {
        status
            .workers
            .iter()
            .filter(|w| format!("{:?}", w.state) == "Ready")
            .count()
            == 3
    });
    pool.handle.as_ref().expect("pool").scale(-2);
    pool.wait_for("one worker", |status| {
        status.workers.len() == 1 && status.workers_wanted == 1
    });
    assert_eq!(get(&pool.address, "/hello").status, 200);
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    let address = pool.address.clone();
    let slow = std::thread::spawn(move || get(&address, "/sleep?1"));
    util::wait_until(
        Duration::from_secs(10),
        "the request to reach the worker",
        || (pool.status().workers[0].in_flight == 1).then_some(()),
    );
    pool.shutdown(StopMode::Graceful);
    assert_eq!(slow.join().expect("slow").text(), "slept");
}

#[test]
fn unix_socket_listener_serves_requests() {
    let sandbox = Sandbox::new();
    let socket = sandbox.path("web.sock");
    let pool = start_test_app(&sandbox, |web| {
        web.listen = vec![Listen::Unix(socket.clone())]
    });
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect unix");
    stream
        .write_all(b"GET /environ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"SERVER_NAME\": \"h\""), "{text}");
    pool.shutdown(StopMode::Graceful);
    assert!(!socket.exists(), "the socket file is removed on stop");
}

#[test]
fn bind_errors_name_the_address() {
    let sandbox = Sandbox::new();
    sandbox.write("app.py", APP);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("addr").to_string();
    let web = web_config(|web| web.listen = vec![listen(&address)]);
    let (_runtime, result, _) = try_start(
        &app_config(sandbox.root(), "app:application"),
        &web,
        sandbox.root(),
    );
    let error = result.expect_err("port taken").to_string();
    assert!(error.contains(&address), "{error}");

    // A unix path holding something else than a socket is refused, never deleted.
    let precious = sandbox.write("precious.txt", "keep me");
    let web = web_config(|web| web.listen = vec![Listen::Unix(precious.clone())]);
    let (_runtime, result, _) = try_start(
        &app_config(sandbox.root(), "app:application"),
        &web,
        sandbox.root(),
    );
    let error = result.expect_err("not a socket").to_string();
    assert!(error.contains("not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
}

/// A sandbox config running the test app on a free port through the real binary.
fn binary_config(sandbox: &Sandbox, web_extra: &str) -> String {
    sandbox.write("app.py", APP);
    let port = util::free_port();
    sandbox.write_config(&format!(
        "[app]\ndirectory = \".\"\npython = \"{}\"\nwsgi = \"app:application\"\n\n[web]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 2\n{web_extra}\n",
        util::python().display()
    ));
    format!("127.0.0.1:{port}")
}

fn ready_workers(status: &serde_json::Value) -> usize {
    status["pool"]["workers"].as_array().map_or(0, |workers| {
        workers.iter().filter(|w| w["state"] == "ready").count()
    })
}

#[test]
fn the_binary_runs_the_pool_reports_it_and_stops_gracefully() {
    let sandbox = Sandbox::new();
    let address = binary_config(&sandbox, "timeout = \"1s\"");
    let running = sandbox.start();
    let status = running.wait_for(Duration::from_secs(30), "two ready workers", |status| {
        ready_workers(status) == 2
    });
    assert_eq!(status["pool"]["workers"][0]["generation"], 1);
    assert_eq!(get(&address, "/hello").body, b"Hello, World!");
    running.wait_for_log("GET /hello 200", Duration::from_secs(10));

    // Timeout through the binary: 504, the Python stack in the log, the pool whole again.
    assert_eq!(get(&address, "/sleep?30").status, 504);
    running.wait_for_log("Python stack", Duration::from_secs(10));
    running.wait_for_log("in _app", Duration::from_secs(10));
    running.wait_for(Duration::from_secs(30), "the pool whole again", |status| {
        ready_workers(status) == 2
    });

    // TTIN adds a worker, TTOU removes one.
    running.signal("TTIN");
    running.wait_for(Duration::from_secs(30), "three ready workers", |status| {
        ready_workers(status) == 3
    });
    running.signal("TTOU");
    running.wait_for(Duration::from_secs(30), "two workers", |status| {
        status["pool"]["workers"].as_array().map_or(0, Vec::len) == 2
    });

    // Metrics recorded by the front.
    let exit = running.stop();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn check_shows_the_import_traceback() {
    let sandbox = Sandbox::new();
    binary_config(&sandbox, "");
    sandbox.write(
        "app.py",
        "raise ImportError('no module named settings_prod')\n",
    );
    let output = sandbox.run(&["check"]);
    assert_eq!(output.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("Traceback (most recent call last)"),
        "{stdout}"
    );
    assert!(stdout.contains("no module named settings_prod"), "{stdout}");
}

const FLASK_APP: &str = r#"
import hashlib
from wsgiref.validate import validator
from flask import Flask, jsonify, request

flask_app = Flask(__name__)

@flask_app.get("/")
def home():
    return "<h1>Flask home</h1>"

@flask_app.post("/form")
def form():
    return "name=%s&city=%s" % (request.form["name"], request.form["city"])

@flask_app.post("/upload")
def upload():
    data = request.files["upload"].read()
    return jsonify(title=request.form["title"], filename=request.files["upload"].filename,
                   size=len(data), sha256=hashlib.sha256(data).hexdigest())

application = validator(flask_app)
"#;

const DJANGO_APP: &str = r#"
import hashlib
from wsgiref.validate import validator
import django
from django.conf import settings

settings.configure(DEBUG=False, SECRET_KEY="test-only", ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"],
                   MIDDLEWARE=[], INSTALLED_APPS=[])
django.setup()

from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse, JsonResponse
from django.urls import path

def home(request):
    return HttpResponse("<h1>Django home</h1>")

def form(request):
    return HttpResponse("name=%s&city=%s" % (request.POST["name"], request.POST["city"]))

def upload(request):
    upload = request.FILES["upload"]
    data = upload.read()
    return JsonResponse({"title": request.POST["title"], "filename": upload.name, "size": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()})

urlpatterns = [path("", home), path("form", form), path("upload", upload)]
application = validator(get_wsgi_application())
"#;

const PYRAMID_APP: &str = r#"
import hashlib
from wsgiref.validate import validator
from pyramid.config import Configurator
from pyramid.response import Response

def home(request):
    return Response("<h1>Pyramid home</h1>")

def form(request):
    return Response("name=%s&city=%s" % (request.POST["name"], request.POST["city"]))

def upload(request):
    field = request.POST["upload"]
    data = field.file.read()
    return {"title": request.POST["title"], "filename": field.filename, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}

def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.add_route("home", "/")
        config.add_route("form", "/form")
        config.add_route("upload", "/upload")
        config.add_view(home, route_name="home")
        config.add_view(form, route_name="form", request_method="POST")
        config.add_view(upload, route_name="upload", request_method="POST", renderer="json")
        return validator(config.make_wsgi_app())
"#;

const PYRAMID_INI: &str = "[app:main]\nuse = call:pyramid_app:main\n\n[loggers]\nkeys = root\n\n[handlers]\nkeys = console\n\n[formatters]\nkeys = generic\n\n[logger_root]\nlevel = WARN\nhandlers = console\n\n[handler_console]\nclass = StreamHandler\nargs = (sys.stderr,)\nformatter = generic\n\n[formatter_generic]\nformat = %(levelname)s %(message)s\n";

/// Serves a page, a urlencoded form POST and a 2 MB multipart upload through `app`.
fn check_framework(app: AppConfig, dir: &Path, home: &str) {
    let pool = start(&app, &web_config(|_| {}), dir);
    let page = get(&pool.address, "/");
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains(home), "{}", page.text());

    let form = post(
        &pool.address,
        "/form",
        "application/x-www-form-urlencoded",
        b"name=J%C3%BCrgen+M&city=Z%C3%BCrich",
    );
    assert_eq!(form.status, 200, "{}", form.text());
    assert_eq!(form.text(), "name=J\u{fc}rgen M&city=Z\u{fc}rich");

    let file: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(7919) % 256) as u8)
        .collect();
    let boundary = "sauna-boundary-7d1";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nquarterly report\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"report.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let upload = post(
        &pool.address,
        "/upload",
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    );
    assert_eq!(upload.status, 200, "{}", upload.text());
    let result = upload.json();
    assert_eq!(result["title"], "quarterly report");
    assert_eq!(result["filename"], "report.bin");
    assert_eq!(result["size"], file.len());
    assert_eq!(result["sha256"], sha256_hex(&file));
    pool.shutdown(StopMode::Graceful);
}

#[test]
fn flask_serves_pages_forms_and_uploads() {
    let sandbox = Sandbox::new();
    sandbox.write("flask_app.py", FLASK_APP);
    check_framework(
        app_config(sandbox.root(), "flask_app:application"),
        sandbox.root(),
        "Flask home",
    );
}

#[test]
fn django_serves_pages_forms_and_uploads() {
    let sandbox = Sandbox::new();
    sandbox.write("django_app.py", DJANGO_APP);
    check_framework(
        app_config(sandbox.root(), "django_app:application"),
        sandbox.root(),
        "Django home",
    );
}

#[test]
fn pyramid_through_pastedeploy_serves_pages_forms_and_uploads() {
    let sandbox = Sandbox::new();
    sandbox.write("pyramid_app.py", PYRAMID_APP);
    sandbox.write("production.ini", PYRAMID_INI);
    let app = AppConfig {
        target: Some(AppTarget::Paste("production.ini#main".to_owned())),
        ..app_config(sandbox.root(), "unused")
    };
    check_framework(app, sandbox.root(), "Pyramid home");
}

#[test]
fn a_recycled_threaded_worker_finishes_every_request_before_it_exits() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| {
        web.threads = count(2);
        web.max_requests = 2;
    });
    assert_eq!(get(&pool.address, "/hello").status, 200);
    // The long request takes one slot, the short one the other; the short one is the worker's
    // last before its recycle, and its slot closes while the long one still runs on the other.
    let long = std::thread::spawn({
        let address = pool.address.clone();
        move || get(&address, "/sleep?1.5")
    });
    util::wait_until(Duration::from_secs(10), "the long request", || {
        (pool.status().workers[0].in_flight == 1).then_some(())
    });
    assert_eq!(get(&pool.address, "/sleep?0.2").text(), "slept");
    assert_eq!(long.join().unwrap().text(), "slept");
    pool.wait_for("the recycled worker gone", |status| {
        status.workers.len() == 1
    });
}

#[test]
fn access_log_lines_carry_their_fields_in_json() {
    let sandbox = Sandbox::new();
    let address = binary_config(&sandbox, "");
    let running = sandbox.start_with(|command| {
        command.args(["--log-format", "json"]);
    });
    running.wait_for(Duration::from_secs(30), "two ready workers", |status| {
        ready_workers(status) == 2
    });
    assert_eq!(get(&address, "/hello?x=1").status, 200);
    running.wait_for_log("\"target\":\"sauna::access\"", Duration::from_secs(10));
    let line = running
        .log()
        .lines()
        .find(|line| line.contains("sauna::access"))
        .map(str::to_owned)
        .unwrap();
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    let fields = &entry; // the JSON layer flattens event fields
    assert_eq!(fields["method"], "GET", "{line}");
    assert_eq!(fields["path"], "/hello?x=1", "{line}");
    assert_eq!(fields["status"], 200, "{line}");
    assert_eq!(fields["bytes"], 13, "{line}");
    assert!(fields["queue_ms"].is_number(), "{line}");
    assert!(fields["duration_ms"].is_number(), "{line}");
    assert!(fields["worker"].is_number(), "{line}");
}

#[test]
fn a_stream_that_outlives_the_timeout_is_cut_and_its_worker_replaced() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| {
        web.timeout = proxy_conf::Duration::from_millis(1000);
    });
    let before = pool.ready_pids();
    let marker = sandbox.path("never.txt");
    let mut stream = connect(&pool.address);
    stream
        .write_all(
            format!(
                "GET /forever?{} HTTP/1.1\r\nHost: t\r\n\r\n",
                marker.display()
            )
            .as_bytes(),
        )
        .unwrap();
    let started = Instant::now();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stream was cut at the deadline"
    );
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
    let status = pool.wait_for("a fresh worker", |status| {
        status.workers.len() == 1
            && format!("{:?}", status.workers[0].state) == "Ready"
            && !before.contains(&status.workers[0].pid.unwrap_or(0))
    });
    let error = status.workers[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("GET /forever"), "{error}");
    assert_eq!(get(&pool.address, "/hello").status, 200);
}

/// Waits until the pool has `busy` requests in its workers.
fn wait_in_flight(pool: &TestPool, busy: usize) {
    pool.wait_for("requests in the workers", |status| {
        status.workers.iter().map(|w| w.in_flight).sum::<usize>() == busy
    });
}

/// Waits until `waiting` requests wait for a worker (queued or offered ahead to a busy one).
fn wait_waiting(pool: &TestPool, waiting: i64) {
    util::wait_until(Duration::from_secs(10), "a waiting request", || {
        (pool.metrics.http_queue_depth.get() == waiting).then_some(())
    });
}

#[test]
fn a_fast_request_offered_behind_a_slow_one_is_taken_back_when_another_worker_frees() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| web.workers = count(2));
    let address = pool.address.clone();
    let medium = std::thread::spawn({
        let address = address.clone();
        move || get(&address, "/sleep?0.5").status
    });
    wait_in_flight(&pool, 1);
    let slow = std::thread::spawn({
        let address = address.clone();
        move || {
            let started = Instant::now();
            (get(&address, "/sleep?3").status, started.elapsed())
        }
    });
    wait_in_flight(&pool, 2);
    // Both workers are busy: the fast request is offered ahead to the slot whose request
    // started last, the slow one's.
    let started = Instant::now();
    let fast = get(&address, "/hello");
    let fast_took = started.elapsed();
    assert_eq!(fast.status, 200);
    let (slow_status, slow_took) = slow.join().expect("slow");
    assert_eq!((slow_status, medium.join().expect("medium")), (200, 200));
    assert!(
        fast_took < Duration::from_secs(2) && slow_took >= Duration::from_secs(3),
        "the fast request waited behind the slow one: {fast_took:?} (slow {slow_took:?})"
    );
    assert_eq!(
        pool.metrics.http_offers_taken_back_total.get(),
        1,
        "it was offered to the slow worker and taken back when the other one freed"
    );
}

#[test]
fn a_request_offered_to_a_worker_killed_before_it_started_it_is_served_by_another() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |web| web.workers = count(2));
    let address = pool.address.clone();
    let medium = std::thread::spawn({
        let address = address.clone();
        move || get(&address, "/sleep?1.5").status
    });
    wait_in_flight(&pool, 1);
    let marker = sandbox.root().join("held-by");
    let held = std::thread::spawn({
        let address = address.clone();
        let path = format!("/hold?{}", marker.display());
        move || get(&address, &path).status
    });
    let pid: i32 = util::wait_until(Duration::from_secs(10), "the held request", || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    });
    // Offered ahead to the holding worker (its request started last), which never claims it.
    let fast = std::thread::spawn({
        let address = address.clone();
        move || get(&address, "/pid")
    });
    wait_waiting(&pool, 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the holding worker");
    assert_eq!(
        held.join().expect("held"),
        502,
        "its own request dies with it"
    );
    let fast = fast.join().expect("fast");
    assert_eq!(
        fast.status, 200,
        "the offered request was never started: run elsewhere"
    );
    assert_ne!(fast.text(), pid.to_string());
    assert_eq!(medium.join().expect("medium"), 200);
    // Taken back from the dead worker (and maybe again from the busy one, for the dead one's
    // replacement when that is ready first).
    assert!(pool.metrics.http_offers_taken_back_total.get() >= 1);
}

#[test]
fn a_saturated_worker_runs_its_next_request_without_sleeping() {
    let sandbox = Sandbox::new();
    let pool = start_test_app(&sandbox, |_| {});
    // Four clients keep a request in service and three waiting (offered ahead or queued) at all
    // times.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let address = pool.address.clone();
            std::thread::spawn(move || {
                (0..40)
                    .map(|_| {
                        let response = get(&address, "/spin");
                        assert_eq!(response.status, 200);
                        response.text().parse::<u64>().expect("a switch count")
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let counts: Vec<u64> = clients
        .into_iter()
        .flat_map(|client| client.join().expect("client"))
        .collect();
    let (first, last) = (
        counts.iter().min().copied().unwrap_or_default(),
        counts.iter().max().copied().unwrap_or_default(),
    );
    let per_request = (last - first) as f64 / (counts.len() - 1) as f64;
    // Waiting for each request over the socket costs at least one sleep per request; an offer
    // claimed as soon as the previous request ends costs none.
    assert!(
        per_request < 0.5,
        "the worker slept {per_request:.2} times per request ({} sleeps over {} requests)",
        last - first,
        counts.len()
    );
}
