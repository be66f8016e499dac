//! RFC 9112 conformance of the front, through the real binary and a real CPython worker, with
//! raw bytes over TCP: a repeated or comma-joined `Host` (§3.2), request heads over
//! `[web].max_header_size` (431), a last chunk with whitespace after its size (§7.1.1), an app
//! whose body does not match its own `Content-Length`, and a worker killed while it serves. Each
//! test checks the status the client gets, what the app saw (every request it serves is appended
//! to a file), that the worker was not replaced, and the log line.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::{self, Running, Sandbox};

/// Appends every request it serves (path, Host, body) to `seen.jsonl`, then answers.
const APP: &str = r#"
import json, os, time

def application(environ, start_response):
    path = environ["PATH_INFO"]
    body = environ["wsgi.input"].read()
    with open(os.path.join(os.path.dirname(__file__), "seen.jsonl"), "a") as seen:
        seen.write(json.dumps({"path": path, "host": environ.get("HTTP_HOST"),
                               "body": body.decode("latin-1"),
                               "header": len(environ.get("HTTP_X_BIG", ""))}) + "\n")
    if path == "/forever":
        start_response("200 OK", [("Content-Type", "text/plain")])
        def forever():
            while True:
                yield b"tick\n"
                time.sleep(0.01)
        return forever()
    if path == "/short":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
        return [b"hello"]
    if path == "/short-stream":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
        def pieces():
            yield b"hel"
            time.sleep(0.05)
            yield b"lo"
        return pieces()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"pid=%d body=%s" % (os.getpid(), body)]
"#;

/// A supervisor serving [`APP`] with one single-threaded worker.
struct Front {
    sandbox: Sandbox,
    running: Running,
    address: SocketAddr,
}

impl Front {
    /// Starts it; `web` is added to `[web]`.
    fn start(web: &str) -> Front {
        let sandbox = Sandbox::new();
        sandbox.write("app.py", APP);
        let address: SocketAddr = ([127, 0, 0, 1], util::free_port()).into();
        sandbox.write_config(&format!(
            "[app]\ndirectory = \".\"\npython = \"{python}\"\nwsgi = \"app:application\"\n\n[web]\nlisten = [\"{address}\"]\nworkers = 1\n{web}\n",
            python = util::python().display(),
        ));
        let running = sandbox.start();
        let front = Front {
            sandbox,
            running,
            address,
        };
        front.worker_pid();
        front
    }

    /// The pid of the ready worker, once there is one.
    fn worker_pid(&self) -> u64 {
        let status = self
            .running
            .wait_for(Duration::from_secs(30), "a ready worker", |status| {
                status["pool"]["workers"][0]["state"] == "ready"
            });
        status["pool"]["workers"][0]["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no worker pid in {status}"))
    }

    /// Sends `request` as it is and reads the answer until the server closes the connection.
    fn send(&self, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(self.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        // The server may answer and close before reading everything (431): a failed write is
        // not the test's business, the answer is.
        let mut writer = stream.try_clone().unwrap();
        let request = request.to_vec();
        let writing = std::thread::spawn(move || {
            let _ = writer.write_all(&request);
        });
        let mut answer = Vec::new();
        let mut buffer = [0; 8192];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => answer.extend_from_slice(&buffer[..read]),
            }
        }
        let _ = writing.join();
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// The requests the app has served, one JSON object each.
    fn seen(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.sandbox.path("seen.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn log(&self) -> String {
        self.running.log()
    }
}

/// The status code of an answer, 0 when there is none.
fn status(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

#[test]
fn a_repeated_or_comma_joined_host_is_refused_with_400() {
    let front = Front::start("");
    let pid = front.worker_pid();
    for (host, why) in [
        (
            "Host: localhost\r\nHost: evil.example.com\r\n",
            "two Host fields",
        ),
        ("Host: localhost, evil.example.com\r\n", "a comma list"),
        ("Host: evil.example.com/path\r\n", "a path in Host"),
    ] {
        let answer =
            front.send(format!("GET /host HTTP/1.1\r\n{host}Connection: close\r\n\r\n").as_bytes());
        assert_eq!(status(&answer), 400, "{why}: {answer}");
    }
    let answer =
        front.send(b"GET /host HTTP/1.1\r\nHost: localhost:8000\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&answer), 200, "{answer}");
    let seen = front.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the valid request reached the app: {seen:?}"
    );
    assert_eq!(seen[0]["host"], "localhost:8000");
    assert_eq!(front.worker_pid(), pid, "the worker is untouched");
    front
        .running
        .wait_for_log("GET /host 400", Duration::from_secs(5));
}

#[test]
fn a_head_over_the_default_64_kib_gets_431_logged_once_and_no_worker_sees_it() {
    let front = Front::start("");
    let pid = front.worker_pid();
    let big = |size: usize| {
        format!(
            "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(size)
        )
    };
    let answer = front.send(big(200 * 1024).as_bytes());
    assert_eq!(status(&answer), 431, "{answer}");
    front.running.wait_for_log(
        "larger than [web].max_header_size (65536 bytes)",
        Duration::from_secs(5),
    );
    // Well under the limit, as in a request with big cookies: served.
    let answer = front.send(big(60 * 1024).as_bytes());
    assert_eq!(status(&answer), 200, "{answer}");
    let seen = front.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["header"], 60 * 1024);
    assert_eq!(front.worker_pid(), pid, "the worker is untouched");
    assert_eq!(
        front.log().matches("max_header_size").count(),
        1,
        "one line for the one refused connection:\n{}",
        front.log()
    );
}

#[test]
fn max_header_size_is_configurable() {
    let front = Front::start("max_header_size = \"16KiB\"");
    let pid = front.worker_pid();
    let answer = front.send(
        format!(
            "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(20 * 1024)
        )
        .as_bytes(),
    );
    assert_eq!(status(&answer), 431, "{answer}");
    front.running.wait_for_log(
        "larger than [web].max_header_size (16384 bytes)",
        Duration::from_secs(5),
    );
    assert!(front.seen().is_empty());
    assert_eq!(front.worker_pid(), pid);
}

#[test]
fn a_max_header_size_past_hypers_default_buffer_is_honoured() {
    let front = Front::start("max_header_size = \"1MiB\"");
    let answer = front.send(
        format!(
            "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(600 * 1024)
        )
        .as_bytes(),
    );
    assert_eq!(status(&answer), 200, "{}", &answer[..answer.len().min(200)]);
    assert_eq!(front.seen()[0]["header"], 600 * 1024);
}

#[test]
fn a_last_chunk_with_whitespace_after_its_size_is_refused_with_400() {
    let front = Front::start("");
    let pid = front.worker_pid();
    const HEAD: &str =
        "POST /chunked HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (body, why) in [
        (
            "5\r\nhello\r\n0 \r\n\r\n",
            "a space after the last chunk's size",
        ),
        (
            "5\r\nhello\r\n0\t\r\n\r\n",
            "a tab after the last chunk's size",
        ),
        ("5 \r\nhello\r\n0\r\n\r\n", "a space after a chunk's size"),
    ] {
        let answer = front.send(format!("{HEAD}{body}").as_bytes());
        assert_eq!(status(&answer), 400, "{why}: {answer}");
        assert!(
            answer.contains("connection: close") || answer.contains("Connection: close"),
            "{answer}"
        );
    }
    // The head first, the broken body a moment later: refused the same way.
    let mut stream = TcpStream::connect(front.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(HEAD.as_bytes()).unwrap();
    stream.write_all(b"5\r\nhello\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stream.write_all(b"0 \r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert_eq!(status(&answer), 400, "{answer}");
    assert!(
        front.seen().is_empty(),
        "the app never got the body as complete: {:?}",
        front.seen()
    );
    // Whitespace before an extension is allowed (BWS), and extensions and trailers pass.
    let answer = front.send(
        format!(
            "{}\r\nConnection: close\r\n\r\n5 ;name=value\r\nhello\r\n0\t;last\r\nX-Trailer: 1\r\n\r\n",
            HEAD.trim_end_matches("\r\n")
        )
        .as_bytes(),
    );
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(body(&answer).ends_with("body=hello"), "{answer}");
    assert_eq!(front.seen().len(), 1);
    assert_eq!(front.worker_pid(), pid, "the worker is untouched");
    front
        .running
        .wait_for_log("POST /chunked 400", Duration::from_secs(5));
}

#[test]
fn a_body_shorter_than_the_apps_content_length_is_an_application_error() {
    let front = Front::start("");
    let pid = front.worker_pid();
    // The whole response is known before a byte goes out: a clean 502.
    let answer = front.send(b"GET /short HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&answer), 502, "{answer}");
    front.running.wait_for_log(
        "application error: the response to GET /short declared Content-Length: 100 but the app sent 5 body bytes",
        Duration::from_secs(5),
    );
    // Streamed: the head is out already, so the connection is cut, and the log says why.
    let started = std::time::Instant::now();
    let answer = front.send(b"GET /short-stream HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status(&answer), 200, "{answer}");
    assert!("hello".starts_with(body(&answer)), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the keep-alive connection is closed at once, not left waiting for 95 more bytes"
    );
    front.running.wait_for_log(
        "application error: the response to GET /short-stream declared Content-Length: 100 but the app sent 5 body bytes",
        Duration::from_secs(5),
    );
    // HEAD answers carry the length of the GET without its body: no error.
    let answer =
        front.send(b"HEAD /short HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(front.worker_pid(), pid, "the app is fine, its worker stays");
    assert_eq!(
        front.log().matches("declared Content-Length").count(),
        2,
        "{}",
        front.log()
    );
}

#[test]
fn a_worker_killed_while_serving_is_logged_as_died_not_as_a_channel_failure() {
    let front = Front::start("");
    let pid = front.worker_pid();
    let pid_text = pid.to_string();
    // Stopped, the worker cannot read the request it is given; killed with it unread, its end
    // of the channel is reset rather than closed — what a worker killed mid-request looks like.
    util::run(std::process::Command::new("kill").args(["-STOP", &pid_text]));
    let client = {
        let front_address = front.address;
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(front_address).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(15)))
                .unwrap();
            stream
                .write_all(b"POST /work HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
                .unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer
        })
    };
    front.running.wait_for(
        Duration::from_secs(10),
        "the request on the worker",
        |status| status["pool"]["workers"][0]["in_flight"] == 1,
    );
    util::run(std::process::Command::new("kill").args(["-KILL", &pid_text]));
    let answer = client.join().unwrap();
    assert_eq!(status(&answer), 502, "{answer}");
    front.running.wait_for_log(
        "worker 0 died while serving POST /work",
        Duration::from_secs(10),
    );
    assert!(
        !front.log().contains("worker channel failed"),
        "{}",
        front.log()
    );
    assert!(front.seen().is_empty());

    // Killed while streaming a response: the client's body is cut, and the log says the same.
    let replacement =
        front
            .running
            .wait_for(Duration::from_secs(30), "a replacement worker", |status| {
                status["pool"]["workers"][0]["state"] == "ready"
                    && status["pool"]["workers"][0]["pid"] != pid
            })["pool"]["workers"][0]["pid"]
            .as_u64()
            .unwrap();
    let mut stream = TcpStream::connect(front.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .write_all(b"GET /forever HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut first = [0; 256];
    let read = stream.read(&mut first).unwrap();
    assert!(
        String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..read])
    );
    util::run(std::process::Command::new("kill").args(["-KILL", &replacement.to_string()]));
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    front.running.wait_for_log(
        "worker 0 died while serving GET /forever",
        Duration::from_secs(10),
    );
}
