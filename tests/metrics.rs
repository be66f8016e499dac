//! The metrics endpoint on a real socket with a real `Metrics` (scrapes checked by `promtool`),
//! its bearer token and health probes, Celery queue lengths read from a real `redis-server`, and
//! `emit grafana` through the real binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sauna_supervisor::metrics::Metrics;
use sauna_supervisor::metrics::queue_sampler::{self, SamplerPlan};
use sauna_supervisor::metrics::server::{self, Health, MetricsServer};
use std::io::{Read as _, Write as _};
use tokio::sync::watch;

use crate::util::redis::RedisServer;
use crate::util::{Sandbox, free_port, require_tool, wait_until};

/// Longest wait for something observable.
const TIMEOUT: Duration = Duration::from_secs(20);

/// Every family of interface.md's "Metric names that must exist".
const CONTRACT_FAMILIES: [&str; 19] = [
    "sauna_http_requests_total",
    "sauna_http_request_duration_seconds",
    "sauna_http_queue_wait_seconds",
    "sauna_http_queue_depth",
    "sauna_http_rejected_total",
    "sauna_workers",
    "sauna_worker_rss_bytes",
    "sauna_worker_restarts_total",
    "sauna_program_up",
    "sauna_program_restarts_total",
    "sauna_beat_published_total",
    "sauna_beat_errors_total",
    "sauna_beat_lag_seconds",
    "sauna_beat_leader",
    "sauna_beat_next_run_timestamp_seconds",
    "sauna_celery_queue_length",
    "sauna_reloads_total",
    "sauna_generation",
    "sauna_build_info",
];

/// A response as the test sees it.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection, read to the end. Blocking: the async tests run
/// on a multi-threaded runtime, so the server keeps running on a worker thread meanwhile.
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Reply {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{authorization}\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the reply");
    let text = String::from_utf8(raw).expect("a UTF-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete reply");
    let mut lines = head.lines();
    let status = lines.next().expect("a status line")[9..12]
        .parse()
        .expect("a status code");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Runs `promtool check metrics` on a scrape; panics with its findings when it complains.
fn promtool_check(scrape: &str) {
    let promtool = require_tool("promtool", "apt-get install -y prometheus");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        let mut stdin = child.stdin.take().expect("promtool stdin");
        stdin.write_all(scrape.as_bytes()).expect("feed promtool");
    }
    let output = child.wait_with_output().expect("wait for promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}):\n{}{}\nscrape:\n{scrape}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A `Metrics` in which every role has recorded something.
fn busy_metrics() -> Arc<Metrics> {
    let metrics = Metrics::new().expect("register the families");
    metrics
        .http_requests_total
        .with_label_values(&["2xx"])
        .inc();
    metrics.http_request_duration_seconds.observe(0.042);
    metrics.http_queue_wait_seconds.observe(0.001);
    metrics.http_queue_depth.set(0);
    metrics
        .http_rejected_total
        .with_label_values(&["queue_full"])
        .inc();
    metrics.workers.with_label_values(&["idle"]).set(2);
    metrics
        .worker_rss_bytes
        .with_label_values(&["0"])
        .set(50 << 20);
    metrics
        .worker_restarts_total
        .with_label_values(&["max_rss"])
        .inc();
    metrics.program_up.with_label_values(&["celery"]).set(1);
    metrics
        .program_restarts_total
        .with_label_values(&["celery"])
        .inc();
    metrics
        .beat_published_total
        .with_label_values(&["cleanup"])
        .inc();
    metrics.beat_errors_total.with_label_values(&["cleanup"]);
    metrics.beat_lag_seconds.observe(0.003);
    metrics.beat_leader.set(1);
    metrics
        .beat_next_run_timestamp_seconds
        .with_label_values(&["cleanup"])
        .set(1_800_000_000);
    metrics
        .celery_queue_length
        .with_label_values(&["celery"])
        .set(4);
    metrics.reloads_total.with_label_values(&["success"]).inc();
    metrics.generation.set(2);
    Arc::new(metrics)
}

async fn serve(
    token: Option<&str>,
    metrics: Arc<Metrics>,
) -> (MetricsServer, watch::Sender<Health>) {
    let (health, receiver) = watch::channel(Health::starting());
    let any_port = "127.0.0.1:0".parse().expect("an address");
    let server = server::serve(any_port, token.map(str::to_owned), metrics, receiver)
        .await
        .expect("bind the metrics endpoint");
    (server, health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_real_scrape_passes_promtool_and_has_every_family() {
    let (server, _health) = serve(None, busy_metrics()).await;
    let addr = server.local_addr();
    let reply = http(addr, "GET", "/metrics", None);
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|value| value.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        reply.headers
    );
    for family in CONTRACT_FAMILIES {
        assert!(
            reply.body.contains(&format!("# TYPE {family} ")),
            "{family} missing from the scrape"
        );
    }
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(reply.body.contains(process), "{process} missing");
    }
    promtool_check(&reply.body);

    // A fresh registry (before any role recorded anything) is just as clean.
    let (fresh, _health) = serve(None, Arc::new(Metrics::new().expect("families"))).await;
    promtool_check(&http(fresh.local_addr(), "GET", "/metrics", None).body);

    let head = http(addr, "HEAD", "/metrics", None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(http(addr, "GET", "/nope", None).status, 404);
    let post = http(addr, "POST", "/metrics", None);
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    server.shutdown().await;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the port is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn with_a_token_a_scrape_without_it_gets_401() {
    let sandbox = Sandbox::new();
    sandbox.write("secrets/metrics-token", "t0ken-from-file\n");
    let config = proxy_conf::MetricsConfig {
        listen: Some("127.0.0.1:0".parse().expect("an address")),
        token_file: Some(PathBuf::from("secrets/metrics-token")),
        ..proxy_conf::MetricsConfig::default()
    };
    let (_health, receiver) = watch::channel(Health::now(true, Vec::new()));
    let server = server::start(&config, sandbox.root(), busy_metrics(), receiver)
        .await
        .expect("start the endpoint")
        .expect("listen is set");
    let addr = server.local_addr();
    let refused = http(addr, "GET", "/metrics", None);
    assert_eq!(refused.status, 401);
    assert!(
        refused
            .header("www-authenticate")
            .is_some_and(|value| value.starts_with("Bearer")),
        "{:?}",
        refused.headers
    );
    assert!(!refused.body.contains("sauna_"));
    assert_eq!(http(addr, "GET", "/metrics", Some("wrong")).status, 401);
    assert_eq!(http(addr, "GET", "/healthz", None).status, 401);
    let allowed = http(addr, "GET", "/metrics", Some("t0ken-from-file"));
    assert_eq!(allowed.status, 200);
    assert!(allowed.body.contains("sauna_generation 2"));

    let disabled = proxy_conf::MetricsConfig {
        listen: None,
        ..proxy_conf::MetricsConfig::default()
    };
    let (_health, receiver) = watch::channel(Health::starting());
    assert!(
        server::start(&disabled, sandbox.root(), busy_metrics(), receiver)
            .await
            .expect("an empty listen is not an error")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_taken_port_is_reported_with_its_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("address");
    let (_health, receiver) = watch::channel(Health::starting());
    let error = server::serve(listen, None, busy_metrics(), receiver)
        .await
        .expect_err("the port is taken");
    assert!(error.to_string().contains(&listen.to_string()), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn healthz_and_readyz_follow_the_main_loop() {
    let (server, health) = serve(None, busy_metrics()).await;
    let addr = server.local_addr();
    assert_eq!(http(addr, "GET", "/healthz", None).status, 200);
    let readyz = http(addr, "GET", "/readyz", None);
    assert_eq!(readyz.status, 503, "not ready before the first generation");
    assert!(readyz.body.contains("not serving yet"), "{}", readyz.body);

    health.send_replace(Health::now(true, Vec::new()));
    assert_eq!(http(addr, "GET", "/readyz", None).status, 200);
    let healthz = http(addr, "GET", "/healthz", None);
    assert_eq!(healthz.status, 200);
    assert_eq!(healthz.header("content-type"), Some("application/json"));

    let fatal = "program \"celery\" is fatal: exited 5 times within 60s";
    health.send_replace(Health::now(true, vec![fatal.to_owned()]));
    let healthz = http(addr, "GET", "/healthz", None);
    assert_eq!(healthz.status, 503);
    let verdict: serde_json::Value = serde_json::from_str(&healthz.body).expect("JSON body");
    assert_eq!(verdict["status"], "unhealthy");
    assert_eq!(verdict["problems"][0], fatal);

    // The main loop stops publishing: its last heartbeat ages past the limit.
    let stale = Instant::now()
        .checked_sub(server::HEARTBEAT_TIMEOUT + Duration::from_secs(1))
        .expect("the monotonic clock is older than a few seconds");
    health.send_replace(Health {
        ready: true,
        problems: Vec::new(),
        heartbeat: stale,
    });
    let healthz = http(addr, "GET", "/healthz", None);
    assert_eq!(healthz.status, 503);
    assert!(
        healthz.body.contains("has not reported"),
        "{}",
        healthz.body
    );

    // The main loop has ended: both probes fail.
    health.send_replace(Health::now(true, Vec::new()));
    assert_eq!(http(addr, "GET", "/healthz", None).status, 200);
    drop(health);
    assert_eq!(http(addr, "GET", "/healthz", None).status, 503);
    assert_eq!(http(addr, "GET", "/readyz", None).status, 503);
}

fn queue_length(scrape: &str, queue: &str) -> Option<i64> {
    let prefix = format!("sauna_celery_queue_length{{queue=\"{queue}\"}} ");
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn queue_lengths_follow_the_broker() {
    let redis_dir = tempfile::tempdir().expect("temp dir");
    let mut redis_server = RedisServer::start(redis_dir.path());
    let metrics = Arc::new(Metrics::new().expect("families"));
    let (server, _health) = serve(None, Arc::clone(&metrics)).await;
    let addr = server.local_addr();
    let sampler = queue_sampler::spawn(
        SamplerPlan {
            broker: redis_server.url(3),
            password: None,
            queues: vec!["celery".to_owned(), "hi".to_owned()],
            interval: Duration::from_millis(100),
        },
        Arc::clone(&metrics),
    );
    let scrape = || http(addr, "GET", "/metrics", None).body;
    wait_until(TIMEOUT, "empty queues to be sampled", || {
        let body = scrape();
        (queue_length(&body, "celery") == Some(0) && queue_length(&body, "hi") == Some(0))
            .then_some(())
    });

    // Messages at priority 0 and 7 (key `hi\x06\x166`) both count; another DB does not.
    let client = redis::Client::open(redis_server.url(3)).expect("client");
    let mut connection = client.get_connection().expect("connect");
    for (key, count) in [("hi", 2), ("hi\x06\x166", 1), ("celery", 1)] {
        for _ in 0..count {
            let _: i64 = redis::cmd("LPUSH")
                .arg(key)
                .arg("{}")
                .query(&mut connection)
                .expect("LPUSH");
        }
    }
    let other = redis::Client::open(redis_server.url(0)).expect("client");
    let _: i64 = redis::cmd("LPUSH")
        .arg("celery")
        .arg("{}")
        .query(&mut other.get_connection().expect("connect"))
        .expect("LPUSH");
    wait_until(TIMEOUT, "the pushed messages to be counted", || {
        let body = scrape();
        (queue_length(&body, "hi") == Some(3) && queue_length(&body, "celery") == Some(1))
            .then_some(())
    });

    // The broker goes away: the stale lengths disappear instead of lying.
    redis_server.stop();
    wait_until(TIMEOUT, "the queue series to disappear", || {
        queue_length(&scrape(), "hi").is_none().then_some(())
    });

    // Dropping the sampler (reload, stop) removes its series too.
    drop(sampler);
    assert!(queue_length(&scrape(), "celery").is_none());
}

#[test]
fn emit_grafana_prints_or_writes_an_importable_dashboard() {
    let sandbox = Sandbox::new();
    let printed = sandbox.run(&["emit", "grafana"]);
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let dashboard: serde_json::Value =
        serde_json::from_slice(&printed.stdout).expect("the dashboard is JSON");
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");

    let written = sandbox.run(&["emit", "grafana", "-o", "out"]);
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let file = std::fs::read(sandbox.path("out/grafana-dashboard.json")).expect("the file");
    assert_eq!(file, printed.stdout);
}

#[test]
fn the_running_supervisor_serves_metrics_and_health() {
    let sandbox = Sandbox::new();
    let port = free_port();
    sandbox.write_config(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let running = sandbox.start();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_until(TIMEOUT, "/readyz to answer 200", || {
        (http(addr, "GET", "/readyz", None).status == 200).then_some(())
    });
    assert_eq!(http(addr, "GET", "/healthz", None).status, 200);
    let scrape = http(addr, "GET", "/metrics", None);
    assert_eq!(scrape.status, 200);
    assert!(
        scrape.body.contains("sauna_generation 1"),
        "{}",
        scrape.body
    );
    promtool_check(&scrape.body);
    assert!(running.stop().success());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the endpoint closes with the supervisor"
    );
}

#[test]
fn the_binary_takes_its_token_from_the_environment() {
    let sandbox = Sandbox::new();
    let port = free_port();
    sandbox.write_config(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\ntoken_env = \"SAUNA_TEST_METRICS_TOKEN\"\n"
    ));
    let running = sandbox.start_with(|command| {
        command.env("SAUNA_TEST_METRICS_TOKEN", "from-the-environment");
    });
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    assert_eq!(http(addr, "GET", "/metrics", None).status, 401);
    let scrape = http(addr, "GET", "/metrics", Some("from-the-environment"));
    assert_eq!(scrape.status, 200);
    assert!(
        !running.log().contains("from-the-environment"),
        "the token reached the log"
    );
    assert!(running.stop().success());
}

#[test]
fn a_fatal_program_turns_healthz_503() {
    let sandbox = Sandbox::new();
    let port = free_port();
    sandbox.write_config(&format!(
        r#"
[programs.sleeper]
command = ["sleep", "600"]

[programs.crasher]
command = ["sh", "-c", "exit 1"]
crash_limit = 2
crash_window = "30s"

[metrics]
listen = "127.0.0.1:{port}"
"#
    ));
    let running = sandbox.start();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let healthz = wait_until(TIMEOUT, "/healthz to report the fatal program", || {
        let reply = http(addr, "GET", "/healthz", None);
        (reply.status == 503).then_some(reply)
    });
    let verdict: serde_json::Value = serde_json::from_str(&healthz.body).expect("JSON body");
    let problem = verdict["problems"][0].as_str().unwrap_or_default();
    assert!(
        problem.starts_with("program \"crasher\" is fatal"),
        "{verdict}"
    );
    // Fatal is a health problem, not unreadiness: the rest of the stack still serves.
    assert_eq!(http(addr, "GET", "/readyz", None).status, 200);
    // `sleeper` counts as up once it has survived `ready_after`.
    let scrape = wait_until(TIMEOUT, "sleeper to be up", || {
        let scrape = http(addr, "GET", "/metrics", None).body;
        scrape
            .contains("sauna_program_up{program=\"sleeper\"} 1")
            .then_some(scrape)
    });
    assert!(
        scrape.contains("sauna_program_up{program=\"crasher\"} 0"),
        "{scrape}"
    );
    assert!(
        scrape.contains("sauna_program_restarts_total{program=\"crasher\"} 1"),
        "{scrape}"
    );
    promtool_check(&scrape);
    assert!(running.stop().success());
}

/// The Celery app of the every-role test's worker program.
const TASKS_PY: &str = r#"
import os
from celery import Celery

app = Celery("tasks", broker=os.environ["BROKER"])
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

@app.task(name="tasks.noop")
def noop(*args, **kwargs):
    return None
"#;

/// The web app of the end-to-end tests: 200 everywhere except `/missing`; `/sleep?SECONDS`.
const WSGI_APP: &str = r#"
import time

def application(environ, start_response):
    if environ["PATH_INFO"] == "/sleep":
        time.sleep(float(environ["QUERY_STRING"]))
    if environ["PATH_INFO"] == "/missing":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"missing"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"#;

/// The value of the sample `series` (name and labels exactly as rendered), if present.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

#[test]
fn with_every_role_active_every_family_moves_and_promtool_passes() {
    let redis_dir = tempfile::tempdir().expect("temp dir");
    let redis_server = RedisServer::start(redis_dir.path());
    let sandbox = Sandbox::new();
    sandbox.write("app.py", WSGI_APP);
    sandbox.write("tasks.py", TASKS_PY);
    let web: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    sandbox.write_config(&format!(
        r#"
[app]
directory = "."
python = "{python}"
wsgi = "app:application"

[web]
listen = ["{web}"]
workers = 2

[programs.worker]
command = ["python", "-m", "celery", "-A", "tasks", "worker", "-P", "solo", "-Q", "work,other",
           "--without-heartbeat", "--without-gossip", "--without-mingle"]
env = {{ BROKER = "{broker}" }}

[beat]
broker = "{broker}"

[beat.jobs.tick]
task = "tasks.noop"
every = "1s"
queue = "ticks"

[beat.jobs.work]
task = "tasks.noop"
every = "1s"
queue = "work"

[metrics]
listen = "{addr}"
sample_interval = "200ms"
"#,
        python = crate::util::python().display(),
        broker = redis_server.url(2),
    ));
    let running = sandbox.start();
    wait_until(TIMEOUT, "/readyz to answer 200", || {
        (http(addr, "GET", "/readyz", None).status == 200).then_some(())
    });
    assert_eq!(http(web, "GET", "/hello", None).status, 200);
    assert_eq!(http(web, "GET", "/missing", None).status, 404);

    // Nobody consumes `ticks`, so every beat publish stays in the queue the job names; the Celery
    // worker consumes `work` and `other`.
    let scrape = wait_until(TIMEOUT, "every role to have recorded something", || {
        let scrape = http(addr, "GET", "/metrics", None).body;
        let moved = sample(&scrape, "sauna_http_requests_total{status=\"2xx\"}") >= Some(1.0)
            && sample(&scrape, "sauna_http_requests_total{status=\"4xx\"}") >= Some(1.0)
            && sample(&scrape, "sauna_workers{state=\"ready\"}") == Some(2.0)
            && sample(&scrape, "sauna_program_up{program=\"worker\"}") == Some(1.0)
            && sample(&scrape, "sauna_beat_published_total{job=\"tick\"}") >= Some(1.0)
            && queue_length(&scrape, "ticks") >= Some(1)
            // Derived from the worker's `-Q work,other`: sampled even while empty.
            && queue_length(&scrape, "other") == Some(0)
            && queue_length(&scrape, "work").is_some();
        moved.then_some(scrape)
    });
    for family in CONTRACT_FAMILIES {
        assert!(
            scrape.contains(&format!("# TYPE {family} ")),
            "{family} missing from the scrape:\n{scrape}"
        );
    }
    for series in [
        "sauna_http_request_duration_seconds_count",
        "sauna_http_queue_wait_seconds_count",
    ] {
        assert!(sample(&scrape, series) >= Some(2.0), "{series}:\n{scrape}");
    }
    assert_eq!(sample(&scrape, "sauna_generation"), Some(1.0), "{scrape}");
    assert_eq!(sample(&scrape, "sauna_beat_leader"), Some(1.0), "{scrape}");
    assert!(
        scrape.contains("sauna_beat_next_run_timestamp_seconds{job=\"tick\"}"),
        "{scrape}"
    );
    promtool_check(&scrape);
    assert_eq!(http(addr, "GET", "/healthz", None).status, 200);

    // The broker goes away: the stale queue lengths disappear instead of lying.
    drop(redis_server);
    wait_until(TIMEOUT, "the queue series to disappear", || {
        queue_length(&http(addr, "GET", "/metrics", None).body, "ticks")
            .is_none()
            .then_some(())
    });
    assert!(running.stop().success());
}

/// The sum of every series of a labelled family.
fn family_sum(scrape: &str, family: &str) -> f64 {
    scrape
        .lines()
        .filter(|line| line.starts_with(&format!("{family}{{")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn rejections_recycles_and_reloads_move_their_counters() {
    let sandbox = Sandbox::new();
    sandbox.write("app.py", WSGI_APP);
    let web: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    sandbox.write_config(&format!(
        r#"
[app]
directory = "."
python = "{python}"
wsgi = "app:application"

[web]
listen = ["{web}"]
workers = 1
max_requests = 2
queue_size = 1
queue_timeout = "20s"

[metrics]
listen = "{addr}"
"#,
        python = crate::util::python().display(),
    ));
    let running = sandbox.start();
    let scrape = || http(addr, "GET", "/metrics", None).body;
    let worker_ready = || {
        wait_until(TIMEOUT, "a ready worker", || {
            (sample(&scrape(), "sauna_workers{state=\"ready\"}") == Some(1.0)).then_some(())
        })
    };
    worker_ready();

    // A recycle: the worker is replaced after max_requests.
    for _ in 0..3 {
        assert_eq!(http(web, "GET", "/hello", None).status, 200);
    }
    wait_until(TIMEOUT, "a recycle by max_requests", || {
        (sample(
            &scrape(),
            "sauna_worker_restarts_total{reason=\"max_requests\"}",
        ) >= Some(1.0))
        .then_some(())
    });

    // A 503: one request in the worker, one waiting, the next finds the queue full.
    worker_ready();
    let busy = std::thread::spawn(move || http(web, "GET", "/sleep?2", None).status);
    wait_until(TIMEOUT, "the worker to be busy", || {
        (sample(&scrape(), "sauna_http_in_flight_requests") == Some(1.0)).then_some(())
    });
    let queued = std::thread::spawn(move || http(web, "GET", "/hello", None).status);
    wait_until(TIMEOUT, "a request to wait in the queue", || {
        (sample(&scrape(), "sauna_http_queue_depth") == Some(1.0)).then_some(())
    });
    assert_eq!(http(web, "GET", "/hello", None).status, 503);
    assert_eq!(busy.join().expect("the slow request"), 200);
    assert_eq!(queued.join().expect("the queued request"), 200);
    let after = scrape();
    assert_eq!(
        sample(&after, "sauna_http_rejected_total{reason=\"queue_full\"}"),
        Some(1.0),
        "{after}"
    );
    assert!(sample(&after, "sauna_http_requests_total{status=\"5xx\"}") >= Some(1.0));

    // A reload counts, whatever its outcome.
    let before = family_sum(&after, "sauna_reloads_total");
    let reload = sandbox.run(&["reload"]);
    wait_until(TIMEOUT, "the reload to be counted", || {
        (family_sum(&scrape(), "sauna_reloads_total") == before + 1.0).then_some(())
    });
    let final_scrape = scrape();
    promtool_check(&final_scrape);
    assert!(
        running.stop().success(),
        "reload said: {}",
        String::from_utf8_lossy(&reload.stderr)
    );
}

/// How many LLEN commands `redis` has answered (the sampler's only command).
fn llen_calls(redis: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .expect("INFO commandstats");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_llen:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

#[test]
fn with_the_endpoint_off_celery_queues_are_not_sampled() {
    // Two supervisors watching a queue on their own Redis, sampling every 100 ms: one serves
    // metrics (the control: it samples and logs the outage), the other has `listen = ""`.
    let start = |listen: String| {
        let sandbox = Sandbox::new();
        let redis = RedisServer::start(&sandbox.path("redis"));
        sandbox.write_config(&format!(
            "[metrics]\nlisten = \"{listen}\"\nqueues = [\"reports\"]\nbroker = \"{}\"\nsample_interval = \"100ms\"\n",
            redis.url(0)
        ));
        let running = sandbox.start();
        (sandbox, redis, running)
    };
    let (_on_dir, mut on_redis, on) = start(format!("127.0.0.1:{}", free_port()));
    let (_off_dir, mut off_redis, off) = start(String::new());
    wait_until(TIMEOUT, "the control to sample 10 times", || {
        (llen_calls(&on_redis) >= 10).then_some(())
    });
    assert_eq!(llen_calls(&off_redis), 0, "metrics off: Redis was sampled");
    on_redis.stop();
    off_redis.stop();
    on.wait_for_log("cannot read Celery queue lengths", TIMEOUT);
    let log = off.log();
    assert!(
        !log.contains("Celery queue") && !log.contains("Celery broker"),
        "metrics off: no sampling, no retries to log:\n{log}"
    );
    assert!(on.stop().success());
    assert!(off.stop().success());
}
