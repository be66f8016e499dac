//! `emit`, `htpasswd` and `check --live` against the real servers: nginx checks every emitted
//! variant and serves in front of a real `sauna-supervisor run` reading the same sauna.toml,
//! redis-server and PostgreSQL start with the emitted files, systemd-analyze
//! verifies the units, and golden files pin the exact output of each target.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::postgres::{self, Cluster, give_to_pg_user, os_user};
use crate::util::{
    Daemon, Running, Sandbox, assert_success, binary, body, curl, free_port, is_root, nginx,
    python, require_tool, run, wait_until,
};

const APT_REDIS: &str = "apt-get install -y redis-server";

/// Runs the binary in the sandbox and insists on success.
fn ok(sandbox: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = sandbox.command(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run sauna-supervisor");
    assert!(
        output.status.success(),
        "sauna-supervisor {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

// ---------------------------------------------------------------------------------------------
// nginx

/// The web part every nginx variant shares: the pool on `listen` (`"127.0.0.1:PORT"` or
/// `"unix:PATH"`), the echo app run by the test venv's Python; `keys` go into `[deploy]`,
/// `tables` after it. The variants that only go through `nginx -t` never start the app.
fn nginx_config(
    sandbox: &Sandbox,
    listen: &str,
    http_port: u16,
    keys: &str,
    tables: &str,
) -> String {
    format!(
        r#"[app]
wsgi = "app:application"

[web]
listen = ["{listen}"]
workers = 2
threads = 2
max_body = "1MiB"
timeout = "2s"
forwarded_allow_ips = ["127.0.0.1"]

[deploy]
name = "site"
server_names = ["localhost", "127.0.0.1"]
http_port = {http_port}
https_port = {https_port}
ipv6 = false
access_log = "{root}/logs/access.log"
error_log = "{root}/logs/error.log"
{keys}

[deploy.static]
"/static/" = "{root}/static"

{tables}
"#,
        https_port = free_port(),
        root = sandbox.root().display()
    )
}

/// Emits the site for `config`, checks it with `nginx -t` and returns the main config. The
/// sandbox's `sauna.toml` is the one `sauna-supervisor run` later serves the app with.
fn emit_and_check_nginx(sandbox: &Sandbox, config: &str, env: &[(&str, &str)]) -> PathBuf {
    let nginx = nginx::binary();
    sandbox.write_config(config);
    std::fs::create_dir_all(sandbox.path("static")).expect("static dir");
    let site = sandbox.write("nginx/site.conf", &ok(sandbox, &["emit", "nginx"], env));
    let main = nginx::main_conf(sandbox, &site);
    let output = run(nginx::command(&nginx, sandbox, &main).arg("-t"));
    assert_success(
        &output,
        &format!(
            "nginx -t of\n{}\n",
            std::fs::read_to_string(&site).unwrap_or_default()
        ),
    );
    main
}

/// A self-signed pair made by openssl for `localhost`.
fn self_signed(sandbox: &Sandbox) -> (PathBuf, PathBuf) {
    let openssl = require_tool("openssl", "apt-get install -y openssl");
    let (cert, key) = (sandbox.path("tls/cert.pem"), sandbox.path("tls/key.pem"));
    std::fs::create_dir_all(sandbox.path("tls")).expect("tls dir");
    let output = run(Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    assert_success(&output, "openssl req");
    (cert, key)
}

/// `htpasswd USER` with the password on stdin.
fn htpasswd(user: &str, password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(binary())
        .args(["htpasswd", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run htpasswd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password");
    let output = child.wait_with_output().expect("htpasswd output");
    assert_success(&output, "sauna-supervisor htpasswd");
    String::from_utf8(output.stdout).expect("UTF-8")
}

#[test]
fn nginx_accepts_every_emitted_variant() {
    // Plain HTTP, with WebSocket locations and the response cache.
    let plain = Sandbox::new();
    let config = nginx_config(
        &plain,
        &format!("127.0.0.1:{}", free_port()),
        free_port(),
        "websocket = [\"/ws/\", \"/live\"]",
        &format!(
            "[deploy.cache]\npath = \"{}\"\n",
            plain.path("cache").display()
        ),
    );
    emit_and_check_nginx(&plain, &config, &[]);

    // TLS with a given self-signed pair, plus an ACME webroot for the HTTP server.
    let tls = Sandbox::new();
    let (cert, key) = self_signed(&tls);
    let config = nginx_config(
        &tls,
        &format!("127.0.0.1:{}", free_port()),
        free_port(),
        "",
        &format!(
            "[deploy.tls]\ncertificate = \"{}\"\nkey = \"{}\"\nacme_webroot = \"{}\"\n",
            cert.display(),
            key.display(),
            tls.path("acme").display()
        ),
    );
    emit_and_check_nginx(&tls, &config, &[]);

    // Let's Encrypt before the first certificate: nginx refuses the site, so `emit all` adds
    // the temporary site its steps fetch the certificate through, and nginx accepts that one.
    let acme = Sandbox::new();
    let acme_port = free_port();
    let config = nginx_config(
        &acme,
        &format!("127.0.0.1:{}", free_port()),
        acme_port,
        "",
        &format!(
            "[deploy.tls]\nacme_webroot = \"{}\"\n",
            acme.path("acme").display()
        ),
    );
    acme.write_config(&config);
    ok(&acme, &["emit", "all", "-o", "out"], &[]);
    let nginx = nginx::binary();
    let full = nginx::main_conf(&acme, &acme.path("out/nginx/site.conf"));
    let refused = run(nginx::command(&nginx, &acme, &full).arg("-t"));
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr)
                .contains("/etc/letsencrypt/live/localhost/"),
        "{refused:?}"
    );
    let temporary = nginx::main_conf(&acme, &acme.path("out/nginx/site-acme.conf"));
    let output = run(nginx::command(&nginx, &acme, &temporary).arg("-t"));
    assert_success(&output, "nginx -t of the temporary ACME site");
    // It hands certbot's token out and nothing else.
    acme.write("acme/.well-known/acme-challenge/token", "token.thumbprint");
    let mut server = Daemon::spawn("nginx", &mut nginx::command(&nginx, &acme, &temporary));
    server.wait_for_port(acme_port);
    let challenge = curl(&[&format!(
        "http://127.0.0.1:{acme_port}/.well-known/acme-challenge/token"
    )]);
    assert!(challenge.starts_with("HTTP/1.1 200"), "{challenge}");
    assert!(challenge.ends_with("\ntoken.thumbprint"), "{challenge}");
    let other = curl(&[&format!("http://127.0.0.1:{acme_port}/")]);
    assert!(other.starts_with("HTTP/1.1 503"), "{other}");
    drop(server);

    // The staging password.
    let staging = Sandbox::new();
    staging.write("htpasswd", &htpasswd("reviewer", "s3cret"));
    let config = nginx_config(
        &staging,
        &format!("127.0.0.1:{}", free_port()),
        free_port(),
        "",
        &format!(
            "[deploy.staging]\nhtpasswd = \"{}\"\n",
            staging.path("htpasswd").display()
        ),
    );
    emit_and_check_nginx(&staging, &config, &[]);

    // Scale-out: several app hosts in the upstream, on [web].listen's port.
    let hosts = Sandbox::new();
    let config = nginx_config(
        &hosts,
        "127.0.0.1:8000",
        free_port(),
        "app_hosts = [\"127.0.0.2\", \"127.0.0.3\", \"localhost\"]",
        "",
    );
    emit_and_check_nginx(&hosts, &config, &[]);
    let site = std::fs::read_to_string(hosts.path("nginx/site.conf")).expect("site");
    for server in ["127.0.0.2:8000", "127.0.0.3:8000", "localhost:8000"] {
        assert!(site.contains(&format!("server {server} ")), "{site}");
    }
}

/// The WSGI app nginx proxies to through the real pool: it answers every request with the
/// environ's string values as JSON, plus a fresh `request_id` (so a cached answer shows as a
/// repeated id). Paths under `/cacheable` are marked cacheable for a minute; `/sleep?S` sleeps.
const ECHO_APP: &str = r#"
import json, time, uuid

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/sleep":
        time.sleep(float(environ["QUERY_STRING"]))
    body = {key: value for key, value in environ.items() if isinstance(value, str)}
    body["request_id"] = uuid.uuid4().hex
    headers = [("Content-Type", "application/json")]
    if path.startswith("/cacheable"):
        headers.append(("Cache-Control", "public, max-age=60"))
    start_response("200 OK", headers)
    return [json.dumps(body).encode()]
"#;

/// Writes the echo app into the sandbox and names the test venv's Python in `[app]`, so that
/// `config` is the one both `emit nginx` and `sauna-supervisor run` read.
fn with_echo_app(sandbox: &Sandbox, config: &str) -> String {
    sandbox.write("app.py", ECHO_APP);
    config.replacen(
        "[app]\n",
        &format!("[app]\npython = \"{}\"\n", python().display()),
        1,
    )
}

/// Starts `sauna-supervisor run` with the sandbox's `sauna.toml` and waits for its two workers.
fn start_app(sandbox: &Sandbox) -> Running {
    let running = sandbox.start();
    running.wait_for(Duration::from_secs(30), "two ready web workers", |status| {
        status["pool"]["workers"]
            .as_array()
            .is_some_and(|workers| workers.iter().filter(|w| w["state"] == "ready").count() == 2)
    });
    running
}

/// The environ the echo app answered with, as `key → value`.
fn environ(response: &str) -> serde_json::Map<String, serde_json::Value> {
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    serde_json::from_str(body(response))
        .unwrap_or_else(|e| panic!("the echo app's JSON ({e}) in\n{response}"))
}

/// Asserts `environ[key] == expected`, showing the whole environ when not.
#[track_caller]
fn assert_environ(environ: &serde_json::Map<String, serde_json::Value>, key: &str, expected: &str) {
    assert_eq!(
        environ.get(key).and_then(|v| v.as_str()),
        Some(expected),
        "{key} in {environ:#?}"
    );
}

/// curl's client address: not 127.0.0.1, where nginx connects to the pool from, so the app
/// seeing it as REMOTE_ADDR proves it came through X-Forwarded-For.
const CLIENT: &str = "127.0.0.2";

#[test]
fn nginx_serves_static_files_proxies_with_forwarded_headers_and_asks_for_the_staging_password() {
    let nginx = nginx::binary();
    let sandbox = Sandbox::new();
    let (app_port, http_port) = (free_port(), free_port());
    let (cert, key) = self_signed(&sandbox);
    sandbox.write("htpasswd", &htpasswd("reviewer", "open sesame"));
    let config = with_echo_app(
        &sandbox,
        &nginx_config(
            &sandbox,
            &format!("127.0.0.1:{app_port}"),
            http_port,
            "websocket = [\"/ws/\"]",
            &format!(
                "[deploy.staging]\nhtpasswd = \"{}\"\n[deploy.tls]\ncertificate = \"{}\"\nkey = \"{}\"\nacme_webroot = \"{}\"\n",
                sandbox.path("htpasswd").display(),
                cert.display(),
                key.display(),
                sandbox.path("acme").display()
            ),
        ),
    );
    let https_port: u16 = config
        .lines()
        .find_map(|l| l.strip_prefix("https_port = "))
        .and_then(|p| p.parse().ok())
        .expect("https_port in the config");
    let main = emit_and_check_nginx(&sandbox, &config, &[]);
    sandbox.write("static/hello.txt", "hello from disk\n");
    // nginx may run its worker as another user: the sandbox must be readable.
    for dir in [sandbox.root().to_path_buf(), sandbox.path("static")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    sandbox.write("acme/.well-known/acme-challenge/token-1", "token-1.key\n");
    sandbox.write("static/style.css", &"body { color: black; }\n".repeat(200));
    let app = start_app(&sandbox);
    let mut server = Daemon::spawn("nginx", &mut nginx::command(&nginx, &sandbox, &main));
    server.wait_for_port(https_port);

    // Plain HTTP redirects to HTTPS on its port.
    let redirect = curl(&[&format!("http://localhost:{http_port}/app?x=1")]);
    assert!(redirect.starts_with("HTTP/1.1 301"), "{redirect}");
    assert!(
        redirect.contains(&format!("Location: https://localhost:{https_port}/app?x=1")),
        "{redirect}"
    );

    // The ACME challenge is answered from the webroot over plain HTTP, without the password.
    let challenge = curl(&[&format!(
        "http://localhost:{http_port}/.well-known/acme-challenge/token-1"
    )]);
    assert!(challenge.starts_with("HTTP/1.1 200"), "{challenge}");
    assert_eq!(body(&challenge), "token-1.key\n");

    let base = format!("https://localhost:{https_port}");
    let authorized = |args: &[&str], path: &str| {
        let url = format!("{base}{path}");
        let mut all = vec![
            "-k",
            "--http1.1",
            "-4",
            "--interface",
            CLIENT,
            "-u",
            "reviewer:open sesame",
        ];
        all.extend_from_slice(args);
        all.push(&url);
        curl(&all)
    };
    // Staging: no password → 401 with a challenge; a wrong one → 401.
    let denied = curl(&["-k", "--http1.1", &format!("{base}/app")]);
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    assert!(
        denied.contains("WWW-Authenticate: Basic realm=\"Staging\""),
        "{denied}"
    );
    let wrong = curl(&[
        "-k",
        "--http1.1",
        "-u",
        "reviewer:nope",
        &format!("{base}/app"),
    ]);
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");

    // The static file comes from disk with long cache headers, and HSTS.
    let file = authorized(&[], "/static/hello.txt");
    assert!(file.starts_with("HTTP/1.1 200"), "{file}");
    assert!(file.ends_with("hello from disk\n"), "{file}");
    assert!(file.contains("Cache-Control: max-age=2592000"), "{file}");
    assert!(
        file.contains("Strict-Transport-Security: max-age=31536000"),
        "{file}"
    );
    assert!(
        !file.contains("Server: nginx/"),
        "server_tokens off: {file}"
    );
    // A file missing from the static directory is nginx's 404, not a question for the app.
    let missing = authorized(&[], "/static/missing.txt");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    // An app request reaches the pool with the forwarded headers, and since nginx's address is
    // in forwarded_allow_ips the app sees the client's address and scheme, not nginx's.
    let environ_seen = environ(&authorized(&[], "/app?x=1"));
    for (key, expected) in [
        ("REQUEST_METHOD", "GET"),
        ("PATH_INFO", "/app"),
        ("QUERY_STRING", "x=1"),
        ("REMOTE_ADDR", CLIENT),
        ("wsgi.url_scheme", "https"),
        ("HTTP_X_FORWARDED_FOR", CLIENT),
        ("HTTP_X_FORWARDED_PROTO", "https"),
        ("HTTP_X_FORWARDED_HOST", "localhost"),
        ("HTTP_X_FORWARDED_PORT", &https_port.to_string()),
        ("HTTP_X_REAL_IP", CLIENT),
        // `Host $http_host` keeps the port the client used, so absolute URLs built from
        // HTTP_HOST (Django's build_absolute_uri, say) point back at the right port.
        ("HTTP_HOST", &format!("localhost:{https_port}")),
        ("SERVER_NAME", "localhost"),
        ("SERVER_PORT", &https_port.to_string()),
    ] {
        assert_environ(&environ_seen, key, expected);
    }
    // Forwarded from a known proxy, the client's port is unknown rather than nginx's.
    assert!(
        !environ_seen.contains_key("REMOTE_PORT"),
        "{environ_seen:#?}"
    );
    // Upstream connections are kept alive: no `Connection: close` reaches the app.
    assert!(
        !environ_seen.contains_key("HTTP_CONNECTION"),
        "{environ_seen:#?}"
    );

    // The same headers sent straight to the pool from an address not in forwarded_allow_ips
    // are ignored: the app sees the real peer and plain HTTP.
    let forged = environ(&curl(&[
        "--interface",
        CLIENT,
        "-H",
        "X-Forwarded-For: 198.51.100.7",
        "-H",
        "X-Forwarded-Proto: https",
        &format!("http://127.0.0.1:{app_port}/direct"),
    ]));
    assert_environ(&forged, "REMOTE_ADDR", CLIENT);
    assert_environ(&forged, "wsgi.url_scheme", "http");

    // WebSocket locations pass the handshake headers on.
    let ws = environ(&authorized(
        &["-H", "Upgrade: websocket", "-H", "Connection: Upgrade"],
        "/ws/chat",
    ));
    assert_environ(&ws, "HTTP_UPGRADE", "websocket");
    assert_environ(&ws, "HTTP_CONNECTION", "upgrade");
    // Text is compressed.
    let css = authorized(
        &["-H", "Accept-Encoding: gzip", "-o", "/dev/null", "-D", "-"],
        "/static/style.css",
    );
    assert!(css.contains("Content-Encoding: gzip"), "{css}");

    // A body above [web].max_body is refused by nginx already.
    let big = sandbox.write("big.bin", &"x".repeat(2 << 20));
    let refused = authorized(
        &["--data-binary", &format!("@{}", big.display())],
        "/upload",
    );
    assert!(refused.starts_with("HTTP/1.1 413"), "{refused}");

    // A header line far past nginx's default 8 KiB buffer but within [web].max_header_size
    // reaches the app, as it would straight at the pool; a head far past it stops at nginx.
    let big_header = format!("X-Big: {}", "b".repeat(40 << 10));
    let passed = authorized(&["-H", &big_header], "/big-header");
    assert!(passed.starts_with("HTTP/1.1 200"), "{passed}");
    // (From a file: one argument cannot be this long.)
    let huge_header = sandbox.write(
        "huge-header.txt",
        &format!("X-Big: {}\n", "h".repeat(200 << 10)),
    );
    let huge_header = format!("@{}", huge_header.display());
    let stopped = authorized(&["-H", &huge_header], "/huge-header");
    assert!(stopped.starts_with("HTTP/1.1 400"), "{stopped}");

    // Only the app requests reached the pool: its access log names them and no static path.
    // The access log is written in batches, in order: once a last request's line is there,
    // every earlier request's line would be too.
    let last = authorized(&[], "/last");
    assert!(last.starts_with("HTTP/1.1 200"), "{last}");
    app.wait_for_log("GET /last", Duration::from_secs(10));
    let log = app.log();
    assert!(log.contains("GET /app"), "{log}");
    assert!(
        !log.contains("/static/"),
        "nginx passed a static path on:\n{log}"
    );
    assert!(
        !log.contains("/upload"),
        "nginx passed the large body on:\n{log}"
    );
    assert!(log.contains("GET /big-header"), "{log}");
    assert!(
        !log.contains("/huge-header"),
        "nginx passed the huge head on:\n{log}"
    );
    drop(server);
    let exit = app.stop();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn nginx_over_a_unix_socket_caches_only_what_the_app_marks_cacheable_and_lets_the_pool_time_out() {
    let nginx = nginx::binary();
    let sandbox = Sandbox::new();
    let http_port = free_port();
    let socket = sandbox.path("run/web.sock");
    let config = with_echo_app(
        &sandbox,
        &nginx_config(
            &sandbox,
            &format!("unix:{}", socket.display()),
            http_port,
            "",
            &format!(
                "[deploy.cache]\npath = \"{}\"\n",
                sandbox.path("cache").display()
            ),
        ),
    );
    let main = emit_and_check_nginx(&sandbox, &config, &[]);
    let site = std::fs::read_to_string(sandbox.path("nginx/site.conf")).expect("site");
    assert!(
        site.contains(&format!("server unix:{} ", socket.display())),
        "{site}"
    );
    sandbox.write("static/hello.txt", "hello from disk\n");
    let app = start_app(&sandbox);
    let mut server = Daemon::spawn("nginx", &mut nginx::command(&nginx, &sandbox, &main));
    server.wait_for_port(http_port);
    let get = |path: &str| {
        curl(&[
            "--interface",
            CLIENT,
            &format!("http://127.0.0.1:{http_port}{path}"),
        ])
    };

    let file = get("/static/hello.txt");
    assert!(file.ends_with("\n\nhello from disk\n"), "{file}");

    // A Unix socket is only reachable through the file system, so the pool believes nginx.
    let seen = environ(&get("/app?y=2"));
    assert_environ(&seen, "REMOTE_ADDR", CLIENT);
    assert_environ(&seen, "wsgi.url_scheme", "http");
    assert_environ(&seen, "HTTP_X_FORWARDED_FOR", CLIENT);
    assert_environ(&seen, "QUERY_STRING", "y=2");
    assert_environ(&seen, "SERVER_NAME", "127.0.0.1");

    let id = |path: &str| -> String {
        environ(&get(path))
            .get("request_id")
            .and_then(|id| id.as_str())
            .expect("request_id")
            .to_owned()
    };
    let first = id("/cacheable/page");
    assert_eq!(
        id("/cacheable/page"),
        first,
        "a cacheable page was fetched twice"
    );
    let private = id("/private");
    assert_ne!(id("/private"), private, "an unmarked page was cached");

    // proxy_read_timeout is above [web].timeout: a slow request gets the pool's 504, not nginx's.
    let slow = get("/sleep?8");
    assert!(slow.starts_with("HTTP/1.1 504"), "{slow}");
    assert!(
        body(&slow).contains("the application did not answer in time"),
        "{slow}"
    );

    assert!(!app.log().contains("/static/"), "{}", app.log());
    drop(server);
    let exit = app.stop();
    assert!(exit.success(), "{exit:?}");
}

// ---------------------------------------------------------------------------------------------
// Redis

fn redis_cli(port: u16, password: &str, args: &[&str]) -> String {
    let cli = require_tool("redis-cli", "apt-get install -y redis-tools");
    let output = run(Command::new(cli)
        .env("REDISCLI_AUTH", password)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args));
    assert_success(&output, &format!("redis-cli {args:?}"));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn start_redis(conf: &Path, port: u16, password: &str) -> Daemon {
    let server = require_tool("redis-server", APT_REDIS);
    let mut daemon = Daemon::spawn("redis-server", Command::new(server).arg(conf));
    wait_until(
        Duration::from_secs(20),
        "redis-server to answer PING",
        || {
            daemon.assert_running();
            let cli = require_tool("redis-cli", "apt-get install -y redis-tools");
            let output = Command::new(cli)
                .env("REDISCLI_AUTH", password)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&output.stdout).trim() == "PONG").then_some(())
        },
    );
    daemon
}

#[test]
fn redis_starts_with_each_emitted_file_and_check_live_spots_an_evicting_broker() {
    let sandbox = Sandbox::new();
    let (broker_port, cache_port) = (free_port(), free_port());
    let password = "broker pass";
    sandbox.write("redis.password", &format!("{password}\n"));
    sandbox.write(
        "sauna.toml",
        &format!(
            r#"[beat]
broker = "redis://127.0.0.1:{broker_port}/3"

[programs.celery]
command = ["celery", "-A", "app", "worker", "-b", "redis://127.0.0.1:{broker_port}/20"]

[deploy]
name = "t"

[redis]
password_file = "{root}/redis.password"
dir = "{root}/data"

[redis.cache]
url = "redis://127.0.0.1:{cache_port}/1"
maxmemory = "64MiB"
policy = "allkeys-lfu"
"#,
            root = sandbox.root().display()
        ),
    );
    let listing = ok(&sandbox, &["emit", "redis", "-o", "out"], &[]);
    assert!(listing.contains("redis/t-broker.conf"), "{listing}");
    let broker_conf =
        std::fs::read_to_string(sandbox.path("out/redis/t-broker.conf")).expect("broker conf");
    assert!(
        !broker_conf.contains(password),
        "the password itself must not be in the file"
    );
    for dir in ["data/t-broker", "data/t-cache"] {
        std::fs::create_dir_all(sandbox.path(dir)).expect("data dir");
    }

    let _broker = start_redis(
        &sandbox.path("out/redis/t-broker.conf"),
        broker_port,
        password,
    );
    let _cache = start_redis(
        &sandbox.path("out/redis/t-cache.conf"),
        cache_port,
        password,
    );
    let get = |port, key| redis_cli(port, password, &["CONFIG", "GET", key]);
    assert_eq!(
        get(broker_port, "maxmemory-policy"),
        "maxmemory-policy\nnoeviction"
    );
    assert_eq!(get(broker_port, "appendonly"), "appendonly\nyes");
    // Database 20 is used by the celery command line, so 21 databases.
    assert_eq!(get(broker_port, "databases"), "databases\n21");
    assert_eq!(
        get(cache_port, "maxmemory-policy"),
        "maxmemory-policy\nallkeys-lfu"
    );
    assert_eq!(
        get(cache_port, "maxmemory"),
        format!("maxmemory\n{}", 64 << 20)
    );
    assert_eq!(get(cache_port, "appendonly"), "appendonly\nno");
    assert_eq!(get(broker_port, "protected-mode"), "protected-mode\nyes");
    // Without the password the server refuses commands.
    let cli = require_tool("redis-cli", "apt-get install -y redis-tools");
    let anonymous = run(Command::new(cli).args(["-p", &broker_port.to_string(), "GET", "x"]));
    assert!(
        String::from_utf8_lossy(&anonymous.stdout).contains("NOAUTH"),
        "{anonymous:?}"
    );

    let live = ok(&sandbox, &["check", "--live"], &[]);
    assert!(live.contains("live servers agree"), "{live}");

    redis_cli(
        broker_port,
        password,
        &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
    );
    let output = sandbox.run(&["check", "--live"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("maxmemory-policy is allkeys-lru, but it holds the Celery broker"),
        "{stdout}"
    );
}

#[test]
fn redis_serves_the_broker_on_a_unix_socket() {
    let server = require_tool("redis-server", APT_REDIS);
    let cli = require_tool("redis-cli", "apt-get install -y redis-tools");
    let sandbox = Sandbox::new();
    let socket = sandbox.path("broker.sock");
    sandbox.write(
        "sauna.toml",
        &format!(
            "[redis]\nbroker = \"redis+socket://{}?virtual_host=2\"\ndir = \"{}\"\n",
            socket.display(),
            sandbox.root().display()
        ),
    );
    ok(&sandbox, &["emit", "redis", "-o", "out"], &[]);
    std::fs::create_dir_all(sandbox.path("sauna-broker")).expect("data dir");
    let mut daemon = Daemon::spawn(
        "redis-server",
        Command::new(server).arg(sandbox.path("out/redis/sauna-broker.conf")),
    );
    let policy = wait_until(Duration::from_secs(20), "redis on its socket", || {
        daemon.assert_running();
        let output = Command::new(&cli)
            .arg("-s")
            .arg(&socket)
            .args(["CONFIG", "GET", "maxmemory-policy"])
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .filter(|text| !text.is_empty())
    });
    assert_eq!(policy, "maxmemory-policy\nnoeviction");
    let port = run(Command::new(&cli)
        .arg("-s")
        .arg(&socket)
        .args(["CONFIG", "GET", "port"]));
    assert_eq!(String::from_utf8_lossy(&port.stdout).trim(), "port\n0");
    let live = ok(&sandbox, &["check", "--live"], &[]);
    assert!(live.contains("live servers agree"), "{live}");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

#[test]
fn postgres_runs_with_the_emitted_files_and_only_the_app_reaches_its_database() {
    let psql = postgres::psql();
    let sandbox = Sandbox::new();
    let port = free_port();
    let admin = os_user();
    // `check` also imports the app (issue #3), so the sandbox has one.
    sandbox.write(
        "app.py",
        "def application(environ, start_response):\n    return []\n",
    );
    sandbox.write(
        "sauna.toml",
        &format!(
            r#"[app]
wsgi = "app:application"

[web]
workers = 3
threads = 2

[programs.celery]
command = ["celery", "-A", "app", "worker", "--concurrency=4"]
instances = 2

[beat]

[postgres]
database = "shop"
user = "shop_app"
password_env = "SHOP_DB_PASSWORD"
port = {port}
memory = "512MiB"
admin = "{admin}"
"#
        ),
    );
    let listing = ok(&sandbox, &["emit", "postgres", "-o", "out"], &[]);
    assert!(listing.contains("postgres/sauna-init.sql"), "{listing}");
    let conf = std::fs::read_to_string(sandbox.path("out/postgres/sauna.conf")).expect("conf");
    // 3×2 web + 4×2 Celery + 1 beat + 10 extra + 3 reserved.
    assert!(conf.contains("max_connections = 28\n"), "{conf}");

    // A cluster owned by the PostgreSQL user, in the sandbox.
    if is_root() {
        std::fs::set_permissions(sandbox.root(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let chown = run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(sandbox.path("out")));
        assert_success(&chown, "chown");
    }
    let cluster = Cluster::init(&sandbox.path("pg"), &["-U", &admin, "--auth=peer"]);
    let data = cluster.data();
    for (from, to) in [
        ("sauna.conf", "sauna.conf"),
        ("sauna-pg_hba.conf", "pg_hba.conf"),
    ] {
        std::fs::copy(sandbox.path(&format!("out/postgres/{from}")), data.join(to))
            .expect("copy conf");
    }
    let mut main_conf =
        std::fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
    main_conf.push_str("\ninclude 'sauna.conf'\n");
    std::fs::write(data.join("postgresql.conf"), main_conf).expect("append include");
    give_to_pg_user(&data);
    let _server = cluster.start(port);

    // The admin runs the init script through the socket (peer); the password comes from the env.
    let password = "correct horse battery";
    let init = run(cluster
        .admin_psql(port)
        .env("SHOP_DB_PASSWORD", password)
        .args(["-v", "ON_ERROR_STOP=1", "-f"])
        .arg(sandbox.path("out/postgres/sauna-init.sql")));
    assert_success(&init, "psql -f sauna-init.sql");
    // Running it again is harmless.
    let again = run(cluster
        .admin_psql(port)
        .env("SHOP_DB_PASSWORD", password)
        .arg("-f")
        .arg(sandbox.path("out/postgres/sauna-init.sql")));
    assert_success(&again, "psql -f sauna-init.sql (again)");
    // Without the password it refuses to run.
    let missing = run(cluster
        .admin_psql(port)
        .env_remove("SHOP_DB_PASSWORD")
        .arg("-f")
        .arg(sandbox.path("out/postgres/sauna-init.sql")));
    assert!(!missing.status.success(), "{missing:?}");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("the app password is empty"),
        "{missing:?}"
    );

    let connect = |db: &str, pass: &str| {
        run(Command::new(&psql)
            .env("PGPASSWORD", pass)
            .env("PGCONNECT_TIMEOUT", "5")
            .args([
                &format!("host=127.0.0.1 port={port} user=shop_app dbname={db}"),
                "-tAc",
                "SELECT current_user || ' ' || current_database()",
            ]))
    };
    let app = connect("shop", password);
    assert_success(&app, "psql as the app role");
    assert_eq!(String::from_utf8_lossy(&app.stdout).trim(), "shop_app shop");
    let other = connect("postgres", password);
    assert!(
        !other.status.success(),
        "the app role reached another database: {other:?}"
    );
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("pg_hba.conf rejects connection"),
        "{other:?}"
    );
    let wrong = connect("shop", "guess");
    assert!(!wrong.status.success(), "a wrong password was accepted");

    let live = ok(
        &sandbox,
        &["check", "--live"],
        &[("SHOP_DB_PASSWORD", password)],
    );
    assert!(live.contains("live servers agree"), "{live}");
    // A config that needs more connections than the server allows is reported.
    let bigger = std::fs::read_to_string(sandbox.path("sauna.toml"))
        .expect("config")
        .replace("workers = 3", "workers = 40");
    sandbox.write("sauna.toml", &bigger);
    let output = sandbox
        .command(&["check", "--live"])
        .env("SHOP_DB_PASSWORD", password)
        .output()
        .expect("check --live");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("max_connections is 28"), "{stdout}");
    assert!(
        stdout.contains("web: 40 workers × 2 threads = 80"),
        "{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd

#[test]
fn systemd_analyze_verifies_the_units() {
    let analyze = require_tool("systemd-analyze", "apt-get install -y systemd");
    let sandbox = Sandbox::new();
    sandbox.write(
        "sauna.toml",
        &format!(
            r#"[app]
wsgi = "app:application"

[web]
graceful_timeout = "40s"

[programs.celery]
command = ["celery", "worker"]
stop_timeout = "90s"

[beat]
broker = "redis://127.0.0.1:6379/3"

[deploy]
name = "shop"

[deploy.systemd]
binary = "{binary}"
user = "root"
group = "root"
writable_paths = ["{root}"]

[redis]
dir = "{root}"
user = "root"
server = "{binary}"
"#,
            binary = binary().display(),
            root = sandbox.root().display()
        ),
    );
    ok(&sandbox, &["emit", "systemd", "-o", "out"], &[]);
    let unit = std::fs::read_to_string(sandbox.path("out/systemd/shop.service")).expect("unit");
    // The longest stop is celery's 90 s; 15 s of slack on top.
    assert!(unit.contains("TimeoutStopSec=105\n"), "{unit}");
    // A missing secrets file fails the start instead of being skipped.
    assert!(
        unit.contains("\nEnvironmentFile=/etc/sauna/shop.env\n"),
        "{unit}"
    );
    assert!(!unit.contains("EnvironmentFile=-"), "{unit}");
    let units = ["shop.service", "shop-broker-redis.service"]
        .map(|u| sandbox.path(&format!("out/systemd/{u}")));
    let output = run(Command::new(analyze).arg("verify").args(&units));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {output:?}\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Install steps

/// The steps `emit all -o DIR` prints after the file listing; every line of them is shell.
fn steps_of(stdout: &str) -> &str {
    let start = stdout
        .find("# Next steps")
        .unwrap_or_else(|| panic!("no steps in\n{stdout}"));
    &stdout[start..]
}

/// The lines of the numbered step whose title starts with `title`, without the title.
fn step<'a>(steps: &'a str, title: &str) -> Vec<&'a str> {
    let mut lines = steps.lines().skip_while(|line| {
        !line
            .split_once(". ")
            .is_some_and(|(number, rest)| number.starts_with("# ") && rest.starts_with(title))
    });
    assert!(lines.next().is_some(), "no step {title:?} in\n{steps}");
    lines.take_while(|line| !line.is_empty()).collect()
}

/// `sh -n`: the text parses as shell.
fn assert_shell_syntax(text: &str) {
    let path = std::env::temp_dir().join(format!("sauna-steps-{}.sh", std::process::id()));
    std::fs::write(&path, text).expect("write steps");
    let output = run(Command::new("sh").arg("-n").arg(&path));
    let _ = std::fs::remove_file(&path);
    assert_success(&output, "sh -n on the steps");
}

/// Every regular file under `dir`, as absolute paths.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// This machine's PostgreSQL cluster for port 5432 as `pg_lsclusters` reports it:
/// `(version, name)`, the one on 5432 first, else `main`.
fn this_machines_cluster() -> (String, String) {
    let ls = require_tool("pg_lsclusters", "apt-get install -y postgresql-common");
    let output = run(Command::new(ls).arg("--no-header"));
    assert_success(&output, "pg_lsclusters");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let clusters: Vec<Vec<String>> = text
        .lines()
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .filter(|fields: &Vec<String>| fields.len() >= 3)
        .collect();
    let chosen = clusters
        .iter()
        .find(|fields| fields[2] == "5432")
        .or_else(|| clusters.iter().find(|fields| fields[1] == "main"))
        .unwrap_or_else(|| {
            panic!(
                "no cluster in pg_lsclusters: run `{}`\n{text}",
                postgres::APT
            )
        });
    (chosen[0].clone(), chosen[1].clone())
}

#[test]
fn emit_all_steps_install_every_file_as_root_and_through_sudo_for_others() {
    let setpriv = require_tool("setpriv", "apt-get install -y util-linux");
    assert!(
        is_root(),
        "this test compares the steps emitted as root with another user's and must run as root (CI does)"
    );
    let sandbox = Sandbox::new();
    sandbox.write("sauna.toml", GOLDEN_CONFIG);
    // Values that a careless quoting would change or expand.
    let redis_password = "r3dis \"pass\" word";
    let db_password = "it's $HOME `id` \\ done";
    let secrets = [
        ("REDIS_PASSWORD", redis_password),
        ("MYAPP_DB_PASSWORD", db_password),
    ];
    let mut command = sandbox.command(&["emit", "all", "-o", "out"]);
    command.envs(secrets);
    let output = run(&mut command);
    assert_success(&output, "emit all");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    for (_, secret) in secrets {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret reached the output:\n{stdout}\n{stderr}"
        );
    }
    let steps = steps_of(&stdout);

    // Root pastes them as they are; every line is shell.
    assert!(!steps.contains("sudo"), "{steps}");
    assert_shell_syntax(steps);
    // One numbered step after another, from 1.
    let numbers: Vec<usize> = steps
        .lines()
        .filter_map(|line| line.strip_prefix("# ")?.split_once(". ")?.0.parse().ok())
        .collect();
    assert_eq!(numbers, (1..=numbers.len()).collect::<Vec<_>>(), "{steps}");
    assert!(numbers.len() >= 8, "{steps}");
    // Every file emit wrote is installed (or, the dashboard, named) by a step.
    let out = sandbox.path("out");
    let written = files_under(&out);
    assert_eq!(written.len(), 12, "{written:?}");
    for file in &written {
        let path = file.display().to_string();
        assert!(steps.contains(&path), "no step names {path}:\n{steps}");
    }
    // No placeholder: the real version, and this machine's PostgreSQL paths.
    assert!(!stdout.contains("VERSION"), "{stdout}");
    assert!(
        steps.contains(&format!(
            "# sauna-supervisor {}, the binary that printed these steps",
            env!("CARGO_PKG_VERSION")
        )),
        "{steps}"
    );
    assert!(
        steps.contains(&format!(
            "install -m 0755 -o root -g root {} /usr/local/bin/sauna-supervisor",
            std::fs::canonicalize(binary()).expect("binary").display()
        )),
        "{steps}"
    );
    let (version, cluster) = this_machines_cluster();
    let etc = format!("/etc/postgresql/{version}/{cluster}");
    assert!(
        Path::new(&etc).join("postgresql.conf").is_file(),
        "pg_lsclusters names {etc}, which has no postgresql.conf"
    );
    // That version's own pg_config agrees (postgresql-common's /usr/bin/pg_config picks the newest).
    let pg_config =
        run(Command::new(format!("/usr/lib/postgresql/{version}/bin/pg_config")).arg("--version"));
    assert_success(&pg_config, "pg_config --version");
    assert!(
        String::from_utf8_lossy(&pg_config.stdout).starts_with(&format!("PostgreSQL {version}.")),
        "{pg_config:?}"
    );
    let postgres = step(steps, "PostgreSQL").join("\n");
    for expected in [
        format!(
            " {}/postgres/myapp.conf {etc}/conf.d/myapp.conf\n",
            out.display()
        ),
        format!(
            "{etc}/postgresql.conf || echo \"include_dir = 'conf.d'\" >> {etc}/postgresql.conf"
        ),
        format!("{etc}/pg_hba.conf.new {etc}/pg_hba.conf && rm {etc}/pg_hba.conf.new"),
        format!("systemctl restart postgresql@{version}-{cluster}\n"),
    ] {
        assert!(
            postgres.contains(&expected),
            "{expected:?} not in\n{postgres}"
        );
    }
    // The order that works: secrets before the database, the database before the app.
    let position = |needle: &str| {
        steps
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in\n{steps}"))
    };
    assert!(position("apt-get install") < position("/etc/sauna/myapp.env"));
    assert!(position("/etc/sauna/myapp.env") < position("enable --now myapp-broker-redis"));
    assert!(position("enable --now myapp-broker-redis") < position("-d postgres -f -"));
    assert!(position("-d postgres -f -") < position("nginx -t"));
    assert!(position("nginx -t") < position("systemctl enable --now myapp\n"));
    assert!(position("systemctl enable --now myapp\n") < position("check --live"));
    assert!(steps.contains("# Without systemd"), "{steps}");

    // The secrets file: private, exactly the variables the *_env keys name, values intact for
    // the shell (systemd reads the same double-quoted syntax).
    let env_file = out.join("myapp.env");
    let mode = std::fs::metadata(&env_file)
        .expect("env file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let text = std::fs::read_to_string(&env_file).expect("env file");
    let names: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    assert_eq!(names, ["REDIS_PASSWORD", "MYAPP_DB_PASSWORD"], "{text}");
    let read_back = run(Command::new("sh")
        .env_clear()
        .arg("-c")
        .arg("set -a; . \"$0\"; printf '%s\\n%s' \"$REDIS_PASSWORD\" \"$MYAPP_DB_PASSWORD\"")
        .arg(&env_file));
    assert_success(&read_back, "sourcing the env file");
    assert_eq!(
        String::from_utf8_lossy(&read_back.stdout),
        format!("{redis_password}\n{db_password}")
    );
    let unit = std::fs::read_to_string(out.join("systemd/myapp.service")).expect("unit");
    assert!(
        unit.contains("\nEnvironmentFile=/etc/sauna/myapp.env\n"),
        "{unit}"
    );
    assert!(!unit.contains("EnvironmentFile=-"), "{unit}");

    // A secret that is not set: refused, naming it, nothing written.
    let mut command = sandbox.command(&["emit", "all", "-o", "refused"]);
    command
        .env("REDIS_PASSWORD", redis_password)
        .env_remove("MYAPP_DB_PASSWORD");
    let refused = run(&mut command);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[postgres].password_env names MYAPP_DB_PASSWORD, which is not set"),
        "{stderr}"
    );
    assert!(!sandbox.path("refused").exists());

    // Another user: every root command goes through sudo.
    std::fs::set_permissions(sandbox.root(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let theirs = sandbox.path("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    let chown = run(Command::new("chown").arg("65534:65534").arg(&theirs));
    assert_success(&chown, "chown");
    let output = run(Command::new(&setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(binary())
        .args(["emit", "all", "-c"])
        .arg(sandbox.path("sauna.toml"))
        .arg("-o")
        .arg(&theirs)
        .envs(secrets));
    assert_success(&output, "emit all as nobody");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let sudo_steps = steps_of(&stdout);
    assert_shell_syntax(sudo_steps);
    for expected in [
        format!(
            "\nsudo install -m 0600 -o root -g root {}/myapp.env /etc/sauna/myapp.env\n",
            theirs.display()
        ),
        "\nsudo systemctl daemon-reload\nsudo systemctl enable --now myapp\n".to_owned(),
        "\nsudo sh -c '(set -a && . /etc/sauna/myapp.env && exec runuser -u myapp -- ".to_owned(),
        "\nsudo nginx -t && sudo systemctl reload-or-restart nginx\n".to_owned(),
    ] {
        assert!(
            sudo_steps.contains(&expected),
            "{expected:?} not in\n{sudo_steps}"
        );
    }
    for line in sudo_steps.lines() {
        for command in [
            "install ",
            "systemctl ",
            "runuser ",
            "nginx ",
            "apt-get ",
            "(",
        ] {
            assert!(
                !line.starts_with(command),
                "{line:?} needs root but does not go through sudo"
            );
        }
    }
}

#[test]
fn the_printed_postgres_step_sets_up_a_real_cluster_beside_the_distributions_lines() {
    let psql = postgres::psql();
    require_tool("runuser", "apt-get install -y util-linux");
    assert!(
        is_root(),
        "this test runs the printed root steps (runuser, install -o postgres) and must run as root (CI does)"
    );
    let sandbox = Sandbox::new();
    std::fs::set_permissions(sandbox.root(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let port = free_port();
    sandbox.write(
        "sauna.toml",
        &format!(
            r#"[app]
wsgi = "app:application"

[postgres]
database = "shop"
user = "shop_app"
password_env = "SHOP_DB_PASSWORD"
port = {port}
memory = "256MiB"

[deploy]
name = "shop"

[deploy.systemd]
user = "root"
group = "root"
"#
        ),
    );
    let password = "correct horse' \"battery\" $x";
    let stdout = ok(
        &sandbox,
        &["emit", "all", "-o", "out"],
        &[("SHOP_DB_PASSWORD", password)],
    );
    let steps = steps_of(&stdout);
    let (version, cluster) = this_machines_cluster();
    let etc = format!("/etc/postgresql/{version}/{cluster}");

    // A cluster in the sandbox laid out like Debian's: conf.d/ next to postgresql.conf, and the
    // distribution's pg_hba.conf (peer on the socket, scram over TCP for everyone).
    let pg = Cluster::init(
        &sandbox.path("pg"),
        &[
            "-U",
            "postgres",
            "--auth-local=peer",
            "--auth-host=scram-sha-256",
        ],
    );
    let data = pg.data();
    std::fs::create_dir(data.join("conf.d")).expect("conf.d");
    let original_hba = std::fs::read_to_string(data.join("pg_hba.conf")).expect("pg_hba.conf");

    // The printed lines, with the cluster's directory and the installed files pointed into the
    // sandbox; systemctl is this test's job (it starts the server itself).
    let out = sandbox.path("out");
    let local = |line: &str| {
        line.replace(&etc, &data.display().to_string())
            .replace(
                "/etc/sauna/shop.env",
                &out.join("shop.env").display().to_string(),
            )
            .replace(
                "/etc/sauna/shop-init.sql",
                &out.join("postgres/shop-init.sql").display().to_string(),
            )
    };
    let lines: Vec<String> = step(steps, "PostgreSQL")
        .into_iter()
        .filter(|line| !line.starts_with('#') && !line.starts_with("systemctl "))
        .filter(|line| {
            !(line.starts_with("install ") && line.ends_with("/etc/sauna/shop-init.sql"))
        })
        .map(local)
        .collect();
    let (psql_lines, setup): (Vec<String>, Vec<String>) =
        lines.into_iter().partition(|line| line.contains("psql"));
    assert_eq!(psql_lines.len(), 1, "{steps}");
    assert!(setup.len() >= 5, "{setup:?}");
    let sh = |line: &str| {
        let output = run(Command::new("sh")
            .arg("-c")
            .arg(line)
            .env("PGHOST", pg.socket_dir()));
        assert_success(&output, line);
    };
    // Twice: pasting the step again changes nothing.
    for _ in 0..2 {
        for line in &setup {
            sh(line);
        }
    }
    let hba = std::fs::read_to_string(data.join("pg_hba.conf")).expect("pg_hba.conf");
    assert!(hba.starts_with("# BEGIN sauna-supervisor shop\n"), "{hba}");
    assert_eq!(
        hba.matches("# BEGIN sauna-supervisor shop").count(),
        1,
        "{hba}"
    );
    assert!(
        hba.ends_with(&original_hba),
        "the distribution's lines are gone:\n{hba}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("pg_hba.conf.orig")).expect("orig"),
        original_hba
    );
    let main_conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
    assert_eq!(
        main_conf.matches("\ninclude_dir = 'conf.d'").count(),
        1,
        "include_dir added once"
    );

    let _server = pg.start(port);
    // The printed psql line creates the role and the database, from the secrets file; again
    // is harmless.
    sh(&psql_lines[0]);
    sh(&psql_lines[0]);

    let connect = |user: &str, pass: &str, db: &str| {
        run(Command::new(&psql)
            .env("PGPASSWORD", pass)
            .env("PGCONNECT_TIMEOUT", "5")
            .args([
                &format!("host=127.0.0.1 port={port} user={user} dbname={db}"),
                "-tAc",
                "SELECT current_user || ' ' || current_database()",
            ]))
    };
    let app = connect("shop_app", password, "shop");
    assert_success(&app, "psql as the app role");
    assert_eq!(String::from_utf8_lossy(&app.stdout).trim(), "shop_app shop");
    let elsewhere = connect("shop_app", password, "postgres");
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("pg_hba.conf rejects connection"),
        "the app role reached another database: {elsewhere:?}"
    );
    assert!(
        !connect("shop_app", "guess", "shop").status.success(),
        "a wrong password was accepted"
    );
    // The distribution's lines below still admit everyone else.
    let admin = |sql: &str| run(pg.admin_psql(port).args(["-tAc", sql]));
    assert_success(
        &admin("CREATE ROLE other LOGIN PASSWORD 'other'"),
        "create role other",
    );
    let other = connect("other", "other", "postgres");
    assert_success(
        &other,
        "another role over TCP through the distribution's line",
    );
}

/// Kills the process whose pid a pidfile names, when the test ends in any way.
struct PidFileGuard(PathBuf);

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn without_systemd_the_printed_lines_run_the_supervisor_as_its_user_with_the_secrets() {
    require_tool("start-stop-daemon", "apt-get install -y dpkg");
    let curl_tool = require_tool("curl", "apt-get install -y curl");
    assert!(
        is_root(),
        "this test runs the printed root lines (start-stop-daemon --chuid) and must run as root (CI does)"
    );
    let sandbox = Sandbox::new();
    std::fs::set_permissions(sandbox.root(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    // A program and the metrics endpoint: what runs as `nobody` needs nothing but the binary
    // (the test venv's Python may sit where `nobody` cannot reach it).
    let metrics = free_port();
    sandbox.write(
        "sauna.toml",
        &format!(
            r#"[programs.idle]
command = ["sleep", "600"]

[metrics]
listen = "127.0.0.1:{metrics}"
token_env = "SHOP_METRICS_TOKEN"

[deploy]
name = "shop"

[deploy.systemd]
binary = "{binary}"
config = "{root}/sauna.toml"
user = "nobody"
group = "nogroup"
"#,
            root = sandbox.root().display(),
            binary = binary().display(),
        ),
    );
    let token = "t0ken with spaces";
    let stdout = ok(
        &sandbox,
        &["emit", "all", "-o", "out"],
        &[("SHOP_METRICS_TOKEN", token)],
    );
    let steps = steps_of(&stdout);
    let fallback: Vec<&str> = steps
        .lines()
        .skip_while(|line| !line.starts_with("# Without systemd"))
        .skip_while(|line| {
            !line.starts_with("# In step") || !line.contains("the unit shop.service")
        })
        .skip(1)
        .collect();
    // The printed lines, with /etc/sauna, /run/sauna and /var/log/sauna in the sandbox.
    let local = |line: &str| {
        line.replace(
            "/etc/sauna/shop.env",
            &sandbox.path("out/shop.env").display().to_string(),
        )
        .replace("/run/sauna", &sandbox.path("run").display().to_string())
        .replace("/var/log/sauna", &sandbox.path("log").display().to_string())
    };
    let commands: Vec<String> = fallback
        .iter()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| local(line))
        .collect();
    assert_eq!(commands.len(), 2, "{steps}");
    let stop_note = fallback
        .iter()
        .find_map(|line| line.split_once("stop, status and reload need it too: "))
        .map(|(_, command)| local(command))
        .unwrap_or_else(|| panic!("no stop command in\n{steps}"));
    let _guard = PidFileGuard(sandbox.path("run/shop.pid"));
    for command in &commands {
        let output = run(Command::new("sh").arg("-c").arg(command));
        assert_success(&output, command);
    }
    // It runs its program, as nobody, with its control socket where the unit would put it.
    wait_until(Duration::from_secs(30), "the program to run", || {
        let output = Command::new(binary())
            .args(["status", "--json", "-c"])
            .arg(sandbox.path("sauna.toml"))
            .env("RUNTIME_DIRECTORY", sandbox.path("run"))
            .output()
            .ok()?;
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        (status["programs"][0]["instances"][0]["state"] == "running").then_some(())
    });
    let pid: u32 = std::fs::read_to_string(sandbox.path("run/shop.pid"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    assert!(
        status.lines().any(|line| line.starts_with("Uid:\t65534\t")),
        "{status}"
    );
    assert!(sandbox.path("run/control.sock").exists());
    // The token reached it through the secrets file: the metrics want exactly that token.
    let scrape = |bearer: &str| {
        run(Command::new(&curl_tool).args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {bearer}"),
            &format!("http://127.0.0.1:{metrics}/metrics"),
        ]))
    };
    assert_eq!(String::from_utf8_lossy(&scrape(token).stdout), "200");
    assert_eq!(String::from_utf8_lossy(&scrape("guess").stdout), "401");
    // The printed stop command stops it.
    let output = run(Command::new("sh").arg("-c").arg(&stop_note));
    assert_success(&output, &stop_note);
    wait_until(Duration::from_secs(30), "the supervisor to exit", || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    let log = std::fs::read_to_string(sandbox.path("log/shop.log")).expect("log file");
    assert!(!log.is_empty(), "nothing in the log file");
    assert!(!log.contains(token), "the token reached the log:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// Golden files

/// A configuration exercising every target (shared with the install steps' golden test in
/// supervisor/src/emit.rs); machine facts are pinned through `[postgres].memory`
/// and explicit Celery concurrency, so the output does not depend on the machine.
const GOLDEN_CONFIG: &str = include_str!("golden/all.toml");

#[test]
fn emitted_files_match_the_golden_files() {
    let sandbox = Sandbox::new();
    sandbox.write("sauna.toml", GOLDEN_CONFIG);
    let listing = ok(
        &sandbox,
        &["emit", "all", "-o", "out"],
        &[
            ("REDIS_PASSWORD", "golden"),
            ("MYAPP_DB_PASSWORD", "golden"),
        ],
    );
    // `emit all` says where each file goes and prints the steps that put it there.
    for expected in [
        "nginx/myapp.conf",
        "install as /etc/nginx/conf.d/myapp.conf",
        "install as /etc/systemd/system/myapp.service",
        "install as /etc/sauna/myapp.env",
        "# Next steps",
        "nginx -t && systemctl reload-or-restart nginx",
        "exec runuser -u postgres -- psql -X -v ON_ERROR_STOP=1 -p 5432 -d postgres -f -",
        "systemctl enable --now myapp-broker-redis myapp-cache-redis",
        "systemctl enable --now myapp\n",
    ] {
        assert!(
            listing.contains(expected),
            "{expected:?} missing from\n{listing}"
        );
    }
    assert!(
        !listing.contains("golden"),
        "the password leaked: {listing}"
    );
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
    let update = std::env::var_os("SAUNA_UPDATE_GOLDEN").is_some();
    let mut produced = Vec::new();
    for target in ["nginx", "redis", "postgres", "systemd"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(sandbox.path(&format!("out/{target}")))
            .expect("emitted dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            let name = file
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let actual = std::fs::read_to_string(&file).expect("emitted file");
            let expected_path = golden.join(target).join(&name);
            produced.push(format!("{target}/{name}"));
            if update {
                std::fs::create_dir_all(expected_path.parent().expect("parent"))
                    .expect("golden dir");
                std::fs::write(&expected_path, &actual).expect("write golden");
                continue;
            }
            let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
                panic!(
                    "no golden file {}: run with SAUNA_UPDATE_GOLDEN=1 to create it",
                    expected_path.display()
                )
            });
            assert_eq!(
                actual,
                expected,
                "{target}/{name} differs from {}; if the change is intended, run with SAUNA_UPDATE_GOLDEN=1",
                expected_path.display()
            );
        }
    }
    assert_eq!(produced.len(), 10, "{produced:?}");
}

#[test]
fn a_cache_sharing_the_broker_keeps_the_broker_policy_and_says_why() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "sauna.toml",
        r#"[beat]
broker = "redis://127.0.0.1:6379/3"

[redis.cache]
url = "redis://127.0.0.1:6379/1"
"#,
    );
    let output = sandbox.run(&["emit", "redis"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("shares the broker's server"), "{stderr}");
    assert!(stdout.contains("maxmemory-policy noeviction"), "{stdout}");
    assert!(!stdout.contains("allkeys-lru"), "{stdout}");
    assert!(stdout.contains("[redis.cache].url: database 1"), "{stdout}");
}

#[test]
fn emit_refuses_a_config_whose_values_disagree() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "sauna.toml",
        r#"[app]
wsgi = "app:application"

[web]
listen = ["127.0.0.1:8000"]
forwarded_allow_ips = ["10.0.0.1"]

[beat]
broker = "redis://127.0.0.1:6379/3"

[programs.celery]
command = ["celery", "worker", "--broker=redis://127.0.0.1:6390/4"]

[redis]
"#,
    );
    let nginx = sandbox.run(&["emit", "nginx"]);
    let stderr = String::from_utf8_lossy(&nginx.stderr);
    assert_eq!(nginx.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("does not include 127.0.0.1, where nginx connects from"),
        "{stderr}"
    );
    let redis = sandbox.run(&["emit", "redis"]);
    let stderr = String::from_utf8_lossy(&redis.stderr);
    assert_eq!(redis.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("every broker URL must name the same server"),
        "{stderr}"
    );
    let all = sandbox.run(&["emit", "all"]);
    assert_eq!(all.status.code(), Some(2));
    assert!(!sandbox.path("out").exists());
}
