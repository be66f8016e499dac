//! Rolling reloads of the web pool through the real binary, under continuous load from client
//! threads (keep-alive and fresh connections, GET and POST with bodies): releases switch with no
//! failed request, a broken, hanging or cold release is refused or rolled back while the old one
//! keeps answering, a long request survives a reload, concurrent reloads are serialized, `[web]`
//! changes (workers, listen addresses) apply, a worker crashing mid-roll is refilled by the roll,
//! `status --json` shows each worker's generation, also while the roll runs, and the warm-up
//! names the site's host (`[deploy].server_names` or its own URL) to an app that checks it.
//!
//! Releases are directories `releases/vN` behind a `current` symlink, as deploy tools lay them
//! out; switching the symlink and running `reload` is a deploy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{self, Running, Sandbox, output_text};

/// One release of the test app. `EXTRA` is spliced in at import time (a raise, a hang …).
const APP: &str = r#"
import os, time
RELEASE = "@RELEASE@"
@EXTRA@

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/warmup":
        status = os.environ.get("WARMUP_STATUS", "200 OK")
        start_response(status, [("Content-Type", "text/plain")])
        return [b"warm-up of " + RELEASE.encode()]
    if path == "/slow":
        time.sleep(float(environ["QUERY_STRING"] or "5"))
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%s %d" % (RELEASE, len(body))).encode()]
"#;

/// How each client thread talks to the server, in turn.
const BODY: &[u8] = &[b'x'; 3000];

struct Stack {
    sandbox: Sandbox,
    port: u16,
    /// `[metrics]` keeps its address across rewrites of the config.
    metrics_port: u16,
    running: Option<Running>,
}

impl Stack {
    /// A sandbox serving release `v1` through `current`, with `web_extra` added to `[web]`.
    fn start(web_extra: &str) -> Stack {
        let sandbox = Sandbox::new();
        let port = util::free_port();
        let stack = Stack {
            sandbox,
            port,
            metrics_port: util::free_port(),
            running: None,
        };
        stack.release("v1", "");
        stack.switch("v1");
        stack.configure(&format!("listen = [\"127.0.0.1:{port}\"]\n{web_extra}"));
        let running = stack.sandbox.start();
        let mut stack = stack;
        stack.running = Some(running);
        stack
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// Writes `[app]`/`[web]` with `web` added to `[web]` (2 workers and a 10 s
    /// `reload_timeout` unless it sets them).
    fn configure(&self, web: &str) {
        self.configure_with(web, "");
    }

    /// [`Stack::configure`], with `sections` (whole tables, e.g. `[deploy]`) appended.
    fn configure_with(&self, web: &str, sections: &str) {
        let mut web = web.to_owned();
        if !web.contains("workers =") {
            web.push_str("\nworkers = 2");
        }
        if !web.contains("reload_timeout =") {
            web.push_str("\nreload_timeout = \"10s\"");
        }
        self.sandbox.write_config(&format!(
            "[app]\npython = \"{}\"\ndirectory = \"current\"\nwsgi = \"app:application\"\n\n\
             [web]\nthreads = 2\ngraceful_timeout = \"10s\"\n{web}\n\n\
             [metrics]\nlisten = \"127.0.0.1:{}\"\n\n{sections}",
            util::python().display(),
            self.metrics_port
        ));
    }

    /// Writes `releases/NAME/app.py`, answering `NAME <body length>`.
    fn release(&self, name: &str, extra: &str) {
        self.sandbox.write(
            &format!("releases/{name}/app.py"),
            &APP.replace("@RELEASE@", name).replace("@EXTRA@", extra),
        );
    }

    /// Points `current` at `releases/NAME`, atomically (a new link renamed over the old one).
    fn switch(&self, name: &str) {
        let staged = self.sandbox.path("current.new");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(self.sandbox.path(&format!("releases/{name}")), &staged)
            .expect("symlink");
        std::fs::rename(&staged, self.sandbox.path("current")).expect("switch current");
    }

    fn reload(&self) -> Output {
        self.sandbox.run(&["reload"])
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop();
        }
    }
}

/// One response as a client saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    sent: Instant,
    received: Instant,
    /// The release that answered, or what went wrong.
    pub(crate) answer: Result<String, String>,
}

/// Client threads sending requests in a loop until stopped (also used by `upgrade`).
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(address: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|client| {
                let (stop, seen, address) =
                    (Arc::clone(&stop), Arc::clone(&seen), address.to_owned());
                thread::spawn(move || {
                    let keep_alive = client % 2 == 0;
                    let mut connection: Option<BufReader<TcpStream>> = None;
                    let mut round = 0usize;
                    // Bounded: a hung server fails the test instead of spinning forever.
                    while !stop.load(Ordering::Relaxed) && round < 200_000 {
                        round += 1;
                        let post = round % 2 == 0;
                        let sent = Instant::now();
                        let answer = exchange(&mut connection, &address, post, keep_alive);
                        if answer.is_err() || !keep_alive {
                            connection = None;
                        }
                        seen.lock().expect("seen").push(Seen {
                            sent,
                            received: Instant::now(),
                            answer,
                        });
                    }
                })
            })
            .collect();
        Load {
            stop,
            seen,
            threads,
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }

    /// Waits until `more` further responses arrived (the load is really flowing).
    pub(crate) fn wait_for(&self, more: usize) {
        let target = self.count() + more;
        util::wait_until(Duration::from_secs(20), "responses under load", || {
            (self.count() >= target).then_some(())
        });
    }

    pub(crate) fn finish(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("client thread");
        }
        Arc::try_unwrap(self.seen)
            .map(|seen| seen.into_inner().expect("seen"))
            .unwrap_or_default()
    }
}

/// Sends one request (GET, or POST with `BODY`) and returns the release that answered. A
/// response with `Connection: close` ends the connection, as for any HTTP client.
fn exchange(
    connection: &mut Option<BufReader<TcpStream>>,
    address: &str,
    post: bool,
    keep_alive: bool,
) -> Result<String, String> {
    if connection.is_none() {
        let stream = TcpStream::connect(address).map_err(|error| format!("connect: {error}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|error| error.to_string())?;
        *connection = Some(BufReader::new(stream));
    }
    let Some(reader) = connection.as_mut() else {
        return Err("no connection".to_owned());
    };
    let close = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let head = if post {
        format!(
            "POST /echo HTTP/1.1\r\nHost: test\r\n{close}Content-Length: {}\r\n\r\n",
            BODY.len()
        )
    } else {
        format!("GET /hello HTTP/1.1\r\nHost: test\r\n{close}\r\n")
    };
    let stream = reader.get_mut();
    stream
        .write_all(head.as_bytes())
        .and_then(|()| if post { stream.write_all(BODY) } else { Ok(()) })
        .map_err(|error| format!("send: {error}"))?;
    let (status, body, close) = read_response_closing(reader)?;
    if close {
        *connection = None;
    }
    if status != 200 {
        return Err(format!("status {status}: {body}"));
    }
    let expected = if post { BODY.len() } else { 0 };
    match body.split_once(' ') {
        Some((release, length)) if length == expected.to_string() => Ok(release.to_owned()),
        _ => Err(format!("unexpected body {body:?}")),
    }
}

pub(crate) fn read_response(reader: &mut BufReader<TcpStream>) -> Result<(u16, String), String> {
    read_response_closing(reader).map(|(status, body, _)| (status, body))
}

/// A response's status and body, and whether it carried `Connection: close`.
pub(crate) fn read_response_closing(
    reader: &mut BufReader<TcpStream>,
) -> Result<(u16, String, bool), String> {
    let mut close = false;
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|error| format!("read: {error}"))?;
    if line.is_empty() {
        return Err("connection closed before a response".to_owned());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader
            .read_line(&mut header)
            .map_err(|error| format!("read: {error}"))?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| "bad content-length")?;
            }
            if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|error| format!("read body: {error}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned(), close))
}

/// `GET /metrics`.
fn scrape(stack: &Stack) -> String {
    let mut stream =
        TcpStream::connect(("127.0.0.1", stack.metrics_port)).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("send");
    let (status, body) = read_response(&mut BufReader::new(stream)).expect("metrics answer");
    assert_eq!(status, 200, "{body}");
    body
}

pub(crate) fn failures(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter().filter(|seen| seen.answer.is_err()).collect()
}

fn workers(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status["pool"]["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Ten deploys in a row under load: zero failed requests; while `reload` runs a response is the
/// old or the new release, after it returns only the new one; workers count and listen
/// addresses change on the way; every worker shows the final generation in `status --json`.
#[test]
fn ten_reloads_under_load_switch_releases_without_a_failed_request() {
    let stack = Stack::start("");
    let load = Load::start(&stack.address(), 4);
    load.wait_for(50);
    let extra_port = util::free_port();
    let mut windows = Vec::new();
    for round in 2..=11u32 {
        let name = format!("v{round}");
        stack.release(&name, "");
        stack.switch(&name);
        let workers = if (6..9).contains(&round) { 3 } else { 2 };
        let listen = if round == 4 {
            format!("\"127.0.0.1:{}\", \"127.0.0.1:{extra_port}\"", stack.port)
        } else {
            format!("\"127.0.0.1:{}\"", stack.port)
        };
        stack.configure(&format!("listen = [{listen}]\nworkers = {workers}\n"));
        let started = Instant::now();
        let output = stack.reload();
        let returned = Instant::now();
        assert!(
            output.status.success(),
            "reload {round}: {}",
            output_text(&output)
        );
        assert!(
            output_text(&output).contains("canary ready"),
            "{}",
            output_text(&output)
        );
        windows.push((started, returned, round));
        match round {
            4 => {
                let mut fresh = None;
                let answer = exchange(&mut fresh, &format!("127.0.0.1:{extra_port}"), false, false);
                assert_eq!(answer, Ok(name.clone()), "the added address serves");
            }
            5 => assert!(
                TcpStream::connect(("127.0.0.1", extra_port)).is_err(),
                "the removed address no longer accepts"
            ),
            6 | 9 => {
                let status = stack.running().status_json();
                assert_eq!(
                    status["pool"]["workers_wanted"], workers,
                    "[web].workers applied: {status}"
                );
            }
            _ => {}
        }
        load.wait_for(20);
    }
    let status = stack.running().status_json();
    let seen = load.finish();
    assert!(
        seen.len() >= 200,
        "the load kept flowing: {} requests",
        seen.len()
    );
    let failed = failures(&seen);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    for response in &seen {
        let Ok(release) = &response.answer else {
            continue;
        };
        let release: u32 = release
            .trim_start_matches('v')
            .parse()
            .expect("release number");
        // The newest reload that had returned before this request was sent.
        let done = windows
            .iter()
            .filter(|(_, returned, _)| *returned <= response.sent)
            .map(|(_, _, round)| *round)
            .max()
            .unwrap_or(1);
        // The next reload may answer it only if it had started when the answer came.
        let next_started = windows
            .iter()
            .any(|(started, _, round)| *round == done + 1 && *started <= response.received);
        assert!(
            release == done || (next_started && release == done + 1),
            "a request sent after reload {done} returned was answered by v{release}"
        );
    }
    assert_eq!(status["pool"]["generation"], 11, "{status}");
    let metrics = scrape(&stack);
    let reloads: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("sauna_worker_restarts_total{reason=\"reload\"} "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_default();
    assert!(
        reloads >= 20.0,
        "every rolled worker counts as a reload restart:\n{metrics}"
    );
    let workers = workers(&status);
    let serving: Vec<_> = workers
        .iter()
        .filter(|worker| worker["state"] == "ready")
        .collect();
    assert_eq!(serving.len(), 2, "{status}");
    assert!(
        serving.iter().all(|worker| worker["generation"] == 11),
        "every serving worker is on generation 11: {status}"
    );
}

/// A release whose import raises, one whose import hangs past `reload_timeout`, one that fails
/// its warm-up, and one whose second worker fails (after the canary passed): each makes `reload`
/// exit 1 saying why, the old release keeps answering every request, and a good release after
/// them rolls out normally.
#[test]
fn broken_releases_are_refused_or_rolled_back_while_the_old_one_serves() {
    let stack = Stack::start("warmup = \"/warmup\"");
    let web = format!("listen = [\"{}\"]\nwarmup = \"/warmup\"\n", stack.address());
    let load = Load::start(&stack.address(), 4);
    load.wait_for(50);

    // An added listen address that cannot be bound: refused before any worker starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let taken_address = taken.local_addr().expect("address").to_string();
    stack.configure(&format!(
        "listen = [\"{}\", \"{taken_address}\"]\nwarmup = \"/warmup\"\n",
        stack.address()
    ));
    let output = stack.reload();
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    assert!(
        output_text(&output).contains(&format!("cannot listen on {taken_address}")),
        "{}",
        output_text(&output)
    );
    drop(taken);
    stack.configure(&web);

    // The import raises: exit 1 with the traceback, nothing touched.
    stack.release("raises", "raise RuntimeError('release raises on import')");
    stack.switch("raises");
    let output = stack.reload();
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let all = output_text(&output);
    assert!(
        all.contains("RuntimeError: release raises on import"),
        "{all}"
    );
    assert!(all.contains("Traceback"), "{all}");

    // The import hangs: the canary times out after reload_timeout and is killed.
    stack.release("hangs", "time.sleep(600)");
    stack.switch("hangs");
    stack.configure(&format!("{web}reload_timeout = \"2s\"\n"));
    let started = Instant::now();
    let output = stack.reload();
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("did not report ready within"),
        "{}",
        output_text(&output)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    stack.configure(&web);

    // The warm-up answers 500: refused with the response.
    stack.release(
        "cold",
        "os.environ['WARMUP_STATUS'] = '500 Internal Server Error'",
    );
    stack.switch("cold");
    let output = stack.reload();
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let all = output_text(&output);
    assert!(
        all.contains("500") && all.contains("warm-up of cold"),
        "{all}"
    );

    // The canary passes, the next new worker fails: rolled back to the old release.
    let marker = stack.sandbox.path("second-import");
    stack.release(
        "flaky",
        &format!(
            "MARK = {:?}\nif os.path.exists(MARK):\n    raise RuntimeError('the second worker of flaky breaks')\nopen(MARK, 'w').close()",
            marker.display().to_string()
        ),
    );
    stack.switch("flaky");
    let output = stack.reload();
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    let all = output_text(&output);
    assert!(all.contains("the second worker of flaky breaks"), "{all}");
    assert!(all.contains("rolled back"), "{all}");
    let after_rollback = Instant::now();
    load.wait_for(50);
    let status = stack.running().wait_for(
        Duration::from_secs(20),
        "only generation 1 serving",
        |status| {
            let workers = workers(status);
            workers.iter().filter(|w| w["state"] == "ready").count() == 2
                && workers.iter().all(|w| w["generation"] == 1)
        },
    );
    assert_eq!(status["pool"]["generation"], 1, "{status}");

    // A good release goes through.
    stack.release("v2", "");
    stack.switch("v2");
    let deploying = Instant::now();
    let output = stack.reload();
    assert!(output.status.success(), "{}", output_text(&output));
    let switched = Instant::now();
    load.wait_for(50);

    let seen = load.finish();
    assert!(
        seen.len() >= 200,
        "the load kept flowing: {} requests",
        seen.len()
    );
    let failed = failures(&seen);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    for response in &seen {
        let release = response.answer.as_deref().unwrap_or_default();
        if response.sent >= switched {
            assert_eq!(release, "v2");
        } else if response.sent >= deploying {
            assert!(release == "v1" || release == "v2", "{release}");
        } else if response.sent >= after_rollback {
            assert_eq!(release, "v1", "the old release serves after a rollback");
        } else {
            assert!(release == "v1" || release == "flaky", "{release}");
        }
    }
}

/// A release that answers 400 to any `Host` but its own, as Django does for a host missing from
/// `ALLOWED_HOSTS`, and writes down how each warm-up reached it: "HOST SCHEME PORT QUERY".
const HOST_CHECKING_APP: &str = r#"
SITE = "site.test"
SEEN = @SEEN@

def application(environ, start_response):
    host = environ.get("HTTP_HOST", "")
    if host.rsplit(":", 1)[0] != SITE:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [("DisallowedHost: %r is not %s" % (host, SITE)).encode()]
    if environ["PATH_INFO"] == "/warmup":
        with open(SEEN, "a") as seen:
            seen.write("%s %s %s %s\n" % (host, environ["wsgi.url_scheme"],
                                         environ["SERVER_PORT"], environ["QUERY_STRING"] or "-"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from " + SITE.encode()]
"#;

/// The warm-up names the site, so a release that checks its host passes it: without a host
/// name in `[deploy].server_names` (only nginx's catch-all, wildcards and a regex) the warm-up
/// asks for `localhost` and the reload is refused with the app's 400; with `site.test` listed
/// after them the same release rolls out. An absolute `https://` URL names its own host and
/// port, ahead of `[deploy]`, and reaches the app as a request nginx forwarded over TLS.
#[test]
fn the_warm_up_names_the_site_so_an_app_checking_its_host_rolls_out() {
    let stack = Stack::start("");
    let seen = stack.sandbox.path("warm-ups.txt");
    stack.sandbox.write(
        "releases/strict/app.py",
        &HOST_CHECKING_APP.replace("@SEEN@", &format!("{:?}", seen.display().to_string())),
    );
    stack.switch("strict");
    let web = format!("listen = [\"{}\"]\nwarmup = \"/warmup\"\n", stack.address());
    let many_hosts = r#""_", "*.site.test", ".site.test", '~^www\.site\.test$'"#;

    stack.configure_with(&web, &format!("[deploy]\nserver_names = [{many_hosts}]\n"));
    let output = stack.reload();
    let said = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("warm-up GET http://localhost/warmup with 400")
            && said.contains("DisallowedHost: 'localhost' is not site.test"),
        "{said}"
    );

    stack.configure_with(
        &web,
        &format!("[deploy]\nserver_names = [{many_hosts}, \"site.test\", \"www.site.test\"]\n"),
    );
    let output = stack.reload();
    let said = output_text(&output);
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains("warm-up GET http://site.test/warmup answered 200"),
        "{said}"
    );
    let lines = std::fs::read_to_string(&seen).unwrap_or_default();
    assert_eq!(lines, "site.test http 80 -\n");

    let web = format!(
        "listen = [\"{}\"]\nwarmup = \"https://site.test:8443/warmup?deep=1\"\n",
        stack.address()
    );
    stack.configure_with(&web, "[deploy]\nserver_names = [\"other.test\"]\n");
    let output = stack.reload();
    let said = output_text(&output);
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains("warm-up GET https://site.test:8443/warmup?deep=1 answered 200"),
        "{said}"
    );
    let lines = std::fs::read_to_string(&seen).unwrap_or_default();
    assert_eq!(
        lines,
        "site.test http 80 -\nsite.test:8443 https 8443 deep=1\n"
    );
}

/// A 5 s request in flight when two reloads are asked at once: both reloads succeed one after
/// the other, and the long request completes with 200 from the release it started on.
#[test]
fn a_long_request_survives_and_two_concurrent_reloads_are_serialized() {
    let stack = Stack::start("");
    let address = stack.address();
    let slow = thread::spawn(move || {
        let mut stream = TcpStream::connect(&address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        stream
            .write_all(b"GET /slow?5 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .expect("send");
        read_response(&mut BufReader::new(stream))
    });
    stack.running().wait_for(
        Duration::from_secs(10),
        "the slow request in flight",
        |status| {
            workers(status)
                .iter()
                .any(|worker| worker["in_flight"].as_u64().unwrap_or(0) > 0)
        },
    );
    stack.release("v2", "");
    stack.switch("v2");
    let (first, second) = thread::scope(|scope| {
        let first = scope.spawn(|| stack.reload());
        let second = scope.spawn(|| stack.reload());
        (
            first.join().expect("first reload"),
            second.join().expect("second reload"),
        )
    });
    assert!(first.status.success(), "{}", output_text(&first));
    assert!(second.status.success(), "{}", output_text(&second));
    assert_eq!(
        slow.join().expect("slow request"),
        Ok((200, "v1 0".to_owned())),
        "the request in flight finished on its release"
    );
    let status = stack.running().status_json();
    let generation = status["pool"]["generation"].as_u64().unwrap_or(0);
    assert!(generation >= 2, "{status}");
    let mut fresh = None;
    assert_eq!(
        exchange(&mut fresh, &stack.address(), false, false),
        Ok("v2".to_owned())
    );
}

/// An old worker killed while the roll is under way: the roll refills its slot from the new
/// release instead of the crash restart starting an old one beside it, and the reload completes.
#[test]
fn an_old_worker_crashing_during_the_roll_is_refilled_by_the_roll() {
    let stack = Stack::start("workers = 3");
    let before = stack.running().status_json();
    let last_old = workers(&before)
        .iter()
        .find(|worker| worker["slot"] == 2)
        .and_then(|worker| worker["pid"].as_u64())
        .expect("the pid of worker 2");
    // Each new worker takes half a second to import, so the roll is still at slot 1 when the
    // old worker of slot 2 dies.
    stack.release("v2", "time.sleep(0.5)");
    stack.switch("v2");
    let mut reload = stack
        .sandbox
        .command(&["reload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start reload");
    let mut progress = BufReader::new(reload.stderr.take().expect("stderr"));
    let mut printed = String::new();
    loop {
        let mut line = String::new();
        if progress.read_line(&mut line).expect("read progress") == 0 {
            break;
        }
        printed.push_str(&line);
        if line.contains("1/3 workers replaced") {
            let killed = std::process::Command::new("kill")
                .args(["-KILL", &last_old.to_string()])
                .status()
                .expect("run kill");
            assert!(killed.success());
        }
    }
    let status = reload.wait().expect("reload exits");
    assert!(status.success(), "{printed}");
    assert!(printed.contains("3/3 workers replaced"), "{printed}");
    let after = stack.running().wait_for(
        Duration::from_secs(20),
        "three generation-2 workers and nothing else",
        |status| {
            let workers = workers(status);
            workers.len() == 3
                && workers
                    .iter()
                    .all(|worker| worker["state"] == "ready" && worker["generation"] == 2)
        },
    );
    assert_eq!(after["pool"]["workers_wanted"], 3, "{after}");
    let log = stack.running().log();
    assert!(log.contains("exited unexpectedly"), "{log}");
    let old_starts = log
        .lines()
        .filter(|line| line.contains("web worker ready") && line.contains("generation=1"))
        .count();
    assert_eq!(
        old_starts, 3,
        "no old worker was restarted beside the roll:\n{log}"
    );
    let mut fresh = None;
    assert_eq!(
        exchange(&mut fresh, &stack.address(), false, false),
        Ok("v2".to_owned())
    );
}

/// `status` while a reload runs asks the pool as it is: the new generation's workers show up
/// beside the old ones as the roll goes, not a picture taken when the reload began.
#[test]
fn status_during_a_reload_shows_the_workers_of_both_generations() {
    let stack = Stack::start("");
    // Each new worker takes a second to import, so the roll is long enough to be watched.
    stack.release("v2", "time.sleep(1)");
    stack.switch("v2");
    let reload = stack
        .sandbox
        .command(&["reload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start reload");
    let during = stack.running().wait_for(
        Duration::from_secs(20),
        "a generation-2 worker beside ready generation-1 ones while reloading",
        |status| {
            let workers = workers(status);
            status["phase"] == "reloading"
                && workers.iter().any(|worker| worker["generation"] == 2)
                && workers
                    .iter()
                    .any(|worker| worker["generation"] == 1 && worker["state"] == "ready")
        },
    );
    assert_eq!(during["generation"], 1, "not serving yet: {during}");
    assert!(during["pool"]["reloading"].is_string(), "{during}");
    let output = reload.wait_with_output().expect("reload exits");
    assert!(output.status.success(), "{}", output_text(&output));
    let after = stack.running().status_json();
    assert_eq!(
        (after["phase"].as_str(), after["generation"].as_u64()),
        (Some("running"), Some(2)),
        "{after}"
    );
    // The last old worker may still be draining when `reload` returns; then it is gone.
    stack.running().wait_for(
        Duration::from_secs(20),
        "only generation-2 workers",
        |status| {
            workers(status)
                .iter()
                .all(|worker| worker["generation"] == 2 && worker["state"] == "ready")
        },
    );
}

#[test]
fn run_watch_keeps_the_old_code_serving_through_a_syntax_error() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    let address = format!("127.0.0.1:{port}");
    let write_app = |release: &str| {
        sandbox.write(
            "app/app.py",
            &APP.replace("@RELEASE@", release).replace("@EXTRA@", ""),
        );
    };
    write_app("v1");
    sandbox.write_config(&format!(
        "[app]\npython = \"{}\"\ndirectory = \"app\"\nwsgi = \"app:application\"\n\n\
         [web]\nlisten = [\"{address}\"]\nworkers = 2\nreload_timeout = \"10s\"\n",
        util::python().display()
    ));
    let running = sandbox.start_with(|command| {
        command.arg("--watch");
    });
    assert_eq!(
        exchange(&mut None, &address, false, false),
        Ok("v1".to_owned())
    );

    // Gunicorn's --reload dies here; the old workers must keep answering.
    sandbox.write("app/app.py", "def application(environ, start_response:\n");
    running.wait_for_log("SyntaxError", Duration::from_secs(20));
    running.wait_for_log("rolled back", Duration::from_secs(20));
    for _ in 0..20 {
        assert_eq!(
            exchange(&mut None, &address, true, false),
            Ok("v1".to_owned())
        );
    }

    write_app("v2");
    util::wait_until(
        Duration::from_secs(20),
        "the fixed release to serve",
        || (exchange(&mut None, &address, false, false).ok()? == "v2").then_some(()),
    );
    // The rolled-back attempt does not count: the fixed release is generation 2.
    running.wait_for(Duration::from_secs(20), "generation 2", |status| {
        status["generation"] == 2 && status["phase"] == "running"
    });
    assert!(running.stop().success());
}
