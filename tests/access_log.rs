//! The access log through the real binary: every request answered before a clean stop (SIGTERM
//! or `sauna-supervisor stop`) has its line in the output, in text and in JSON, although the
//! lines are written in batches by a thread of their own.
//!
//! The tests read the supervisor's stderr only once the stop has begun, and then slowly, as a
//! stalled log reader would: by then far more lines than a pipe holds wait in the supervisor's
//! buffer, the stop itself is over long before the reader has caught up, and only the flush at
//! exit (which waits for the reader) brings the rest out.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::util::{Sandbox, wait_until};

const APP: &str = r#"
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello, World!"]
"#;

/// Requests sent before the stop: their lines (~180 bytes each) are ten times what a pipe
/// holds (64 KiB), and well under what the supervisor buffers (2 MiB).
const REQUESTS: usize = 4000;

/// How fast the test reads the log once the stop has begun: ~400 KB/s, so draining the lines
/// takes well over a second, longer than the stop.
const READ_CHUNK: usize = 4096;
const READ_PAUSE: Duration = Duration::from_millis(10);

/// The supervisor under test, killed if the test fails before it exits.
struct Supervisor(Child);

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the supervisor with its stderr in a pipe nobody reads yet; returns it and the address.
fn start(sandbox: &Sandbox, format: &str) -> (Supervisor, String) {
    sandbox.write("app.py", APP);
    let port = crate::util::free_port();
    sandbox.write_config(&format!(
        "[app]\ndirectory = \".\"\npython = \"{}\"\nwsgi = \"app:application\"\n\n\
         [web]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 2\naccess_log = true\n",
        crate::util::python().display()
    ));
    let child = sandbox
        .command(&["run", "--log-format", format])
        // Only warnings besides the access log: no other line written after the last request
        // would carry the buffered access lines out with it, so only the flush at exit can.
        .env("RUST_LOG", "warn,sauna::access=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sauna-supervisor run");
    let child = Supervisor(child);
    wait_until(Duration::from_secs(30), "two ready workers", || {
        let output = sandbox.run(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        let workers = status["pool"]["workers"].as_array()?;
        (workers.iter().filter(|w| w["state"] == "ready").count() == 2).then_some(())
    });
    (child, format!("127.0.0.1:{port}"))
}

/// Everything the supervisor writes to stderr until it exits, read slowly; checks its exit
/// status.
fn read_until_exit(mut supervisor: Supervisor) -> String {
    let child = &mut supervisor.0;
    let mut stderr = child.stderr.take().expect("stderr piped");
    let mut log = Vec::new();
    let mut chunk = [0; READ_CHUNK];
    loop {
        let read = stderr.read(&mut chunk).expect("read stderr");
        if read == 0 {
            break;
        }
        log.extend_from_slice(&chunk[..read]);
        std::thread::sleep(READ_PAUSE);
    }
    let log = String::from_utf8(log).expect("the log is UTF-8");
    let status = child.wait().expect("wait for sauna-supervisor");
    assert!(status.success(), "{status}; log:\n{log}");
    log
}

/// Sends `count` keep-alive requests on one connection, reading each response in full.
fn send_requests(address: &str, count: usize) {
    let stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for index in 0..count {
        // One write per request: pieces would meet Nagle and delayed ACKs (40 ms each).
        let request = format!("GET /hello?n={index} HTTP/1.1\r\nHost: test\r\n\r\n");
        writer.write_all(request.as_bytes()).unwrap();
        let mut length = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>().unwrap());
                }
            }
        }
        let mut body = vec![0; length.expect("a Content-Length")];
        reader.read_exact(&mut body).unwrap();
        assert_eq!(body, b"Hello, World!");
    }
}

/// The request numbers of the access lines in `log`, in order.
fn logged_requests(log: &str, json: bool) -> Vec<usize> {
    log.lines()
        .filter(|line| line.contains("sauna::access"))
        .map(|line| {
            let path = if json {
                let entry: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"));
                assert_eq!(entry["status"], 200, "{line}");
                entry["path"].as_str().unwrap().to_owned()
            } else {
                assert!(line.contains(" 200"), "{line}");
                let start = line.find("/hello?n=").unwrap();
                line[start..].split_whitespace().next().unwrap().to_owned()
            };
            path.trim_start_matches("/hello?n=").parse().unwrap()
        })
        .collect()
}

fn assert_every_request_logged(log: &str, json: bool) {
    let logged = logged_requests(log, json);
    let expected: Vec<usize> = (0..REQUESTS).collect();
    assert_eq!(
        logged,
        expected,
        "{} access lines for {REQUESTS} requests; log:\n{log}",
        logged.len()
    );
}

#[test]
fn every_text_access_line_survives_a_sigterm_right_after_the_requests() {
    let sandbox = Sandbox::new();
    let (child, address) = start(&sandbox, "text");
    send_requests(&address, REQUESTS);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    assert_every_request_logged(&read_until_exit(child), false);
}

#[test]
fn every_json_access_line_survives_a_stop_right_after_the_requests() {
    let sandbox = Sandbox::new();
    let (child, address) = start(&sandbox, "json");
    send_requests(&address, REQUESTS);
    // `stop` returns once the supervisor has exited, which needs its stderr read meanwhile.
    let mut stop = sandbox
        .command(&["stop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sauna-supervisor stop");
    let log = read_until_exit(child);
    assert!(stop.wait().expect("wait for stop").success());
    assert_every_request_logged(&log, true);
}
