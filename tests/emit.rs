//! `emit`, `htpasswd` and `check --live` against the real servers: nginx checks every emitted
//! variant and serves in front of a real `sauna-supervisor run` reading the same sauna.toml,
//! redis-server and PostgreSQL start with the emitted files, systemd-analyze
//! verifies the units, and golden files pin the exact output of each target.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::util::{Running, Sandbox, binary, free_port, python, require_tool, wait_until};

const APT_NGINX: &str = "apt-get install -y nginx";
const APT_REDIS: &str = "apt-get install -y redis-server";
const APT_POSTGRES: &str = "apt-get install -y postgresql";

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

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A server process started by a test: TERM on drop, then KILL if it lingers.
struct Daemon {
    name: &'static str,
    child: Child,
}

impl Daemon {
    fn spawn(name: &'static str, command: &mut Command) -> Daemon {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon { name, child }
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early with {status}", self.name);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
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

/// Wraps the emitted site in a minimal main config whose every path is inside the sandbox, so
/// nginx runs unprivileged-friendly: one process, no daemon, temp files and pid in the prefix.
fn nginx_main_conf(sandbox: &Sandbox, site: &Path) -> PathBuf {
    std::fs::create_dir_all(sandbox.path("nginx/tmp")).expect("nginx temp dir");
    std::fs::create_dir_all(sandbox.path("logs")).expect("log dir");
    sandbox.write(
        "nginx/nginx.conf",
        &format!(
            "daemon off;\nmaster_process off;\npid {root}/nginx/nginx.pid;\nerror_log {root}/logs/main-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {root}/nginx/tmp/body;\n    proxy_temp_path {root}/nginx/tmp/proxy;\n    fastcgi_temp_path {root}/nginx/tmp/fastcgi;\n    uwsgi_temp_path {root}/nginx/tmp/uwsgi;\n    scgi_temp_path {root}/nginx/tmp/scgi;\n    include {site};\n}}\n",
            root = sandbox.root().display(),
            site = site.display()
        ),
    )
}

fn nginx_command(nginx: &Path, sandbox: &Sandbox, main: &Path) -> Command {
    let mut command = Command::new(nginx);
    command
        .arg("-p")
        .arg(sandbox.path("nginx"))
        .arg("-c")
        .arg(main)
        .args(["-e", "stderr"]);
    command
}

/// Emits the site for `config`, checks it with `nginx -t` and returns the main config. The
/// sandbox's `sauna.toml` is the one `sauna-supervisor run` later serves the app with.
fn emit_and_check_nginx(sandbox: &Sandbox, config: &str, env: &[(&str, &str)]) -> PathBuf {
    let nginx = require_tool("nginx", APT_NGINX);
    sandbox.write_config(config);
    std::fs::create_dir_all(sandbox.path("static")).expect("static dir");
    let site = sandbox.write("nginx/site.conf", &ok(sandbox, &["emit", "nginx"], env));
    let main = nginx_main_conf(sandbox, &site);
    let output = run(nginx_command(&nginx, sandbox, &main).arg("-t"));
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

fn curl(args: &[&str]) -> String {
    let curl = require_tool("curl", "apt-get install -y curl");
    let output = run(Command::new(curl)
        .args(["-sS", "--max-time", "10", "-i"])
        .args(args));
    assert_success(&output, &format!("curl {args:?}"));
    String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n")
}

/// The body of a `curl -i` response.
fn body(response: &str) -> &str {
    response.split_once("\n\n").map_or("", |(_, body)| body)
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

fn wait_for_port(port: u16, daemon: &mut Daemon) {
    wait_until(
        Duration::from_secs(20),
        &format!("{} on port {port}", daemon.name),
        || {
            daemon.assert_running();
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        },
    );
}

/// curl's client address: not 127.0.0.1, where nginx connects to the pool from, so the app
/// seeing it as REMOTE_ADDR proves it came through X-Forwarded-For.
const CLIENT: &str = "127.0.0.2";

#[test]
fn nginx_serves_static_files_proxies_with_forwarded_headers_and_asks_for_the_staging_password() {
    let nginx = require_tool("nginx", APT_NGINX);
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
    let mut server = Daemon::spawn("nginx", &mut nginx_command(&nginx, &sandbox, &main));
    wait_for_port(https_port, &mut server);

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

    // Only the app requests reached the pool: its access log names them and no static path.
    app.wait_for_log("GET /ws/chat", Duration::from_secs(10));
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
    drop(server);
    let exit = app.stop();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn nginx_over_a_unix_socket_caches_only_what_the_app_marks_cacheable_and_lets_the_pool_time_out() {
    let nginx = require_tool("nginx", APT_NGINX);
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
    let mut server = Daemon::spawn("nginx", &mut nginx_command(&nginx, &sandbox, &main));
    wait_for_port(http_port, &mut server);
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

/// The newest installed PostgreSQL server binaries.
fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|bin| bin.join("initdb").is_file());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server under /usr/lib/postgresql: run `{APT_POSTGRES}`")
    })
}

/// PostgreSQL refuses to run as root: as root, commands run as the `postgres` user.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let setpriv = require_tool("setpriv", "apt-get install -y util-linux");
        let mut command = Command::new(setpriv);
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn os_user() -> String {
    if is_root() {
        "postgres".to_owned()
    } else {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .expect("the current user has a name")
    }
}

#[test]
fn postgres_runs_with_the_emitted_files_and_only_the_app_reaches_its_database() {
    let bin = pg_bin();
    let psql = require_tool("psql", "apt-get install -y postgresql-client");
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
    let pg = sandbox.path("pg");
    std::fs::create_dir_all(pg.join("sock")).expect("pg dirs");
    if is_root() {
        let chown = run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&pg));
        assert_success(&chown, "chown");
    }
    let data = pg.join("data");
    let initdb = run(as_pg_user(&bin.join("initdb")).arg("-D").arg(&data).args([
        "-U",
        &admin,
        "-E",
        "UTF8",
        "--no-instructions",
        "--auth=peer",
    ]));
    assert_success(&initdb, "initdb");
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
    if is_root() {
        let chown = run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&data));
        assert_success(&chown, "chown");
    }

    let mut server = Daemon::spawn(
        "postgres",
        as_pg_user(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(pg.join("sock")),
    );
    wait_until(
        Duration::from_secs(30),
        "postgres to accept connections",
        || {
            server.assert_running();
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .output()
                .ok()?;
            ready.status.success().then_some(())
        },
    );

    // The admin runs the init script through the socket (peer); the password comes from the env.
    let password = "correct horse battery";
    let init = run(as_pg_user(&psql)
        .env("SHOP_DB_PASSWORD", password)
        .arg("-h")
        .arg(pg.join("sock"))
        .args([
            "-p",
            &port.to_string(),
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
        ])
        .arg(sandbox.path("out/postgres/sauna-init.sql")));
    assert_success(&init, "psql -f sauna-init.sql");
    // Running it again is harmless.
    let again = run(as_pg_user(&psql)
        .env("SHOP_DB_PASSWORD", password)
        .arg("-h")
        .arg(pg.join("sock"))
        .args(["-p", &port.to_string(), "-d", "postgres", "-f"])
        .arg(sandbox.path("out/postgres/sauna-init.sql")));
    assert_success(&again, "psql -f sauna-init.sql (again)");
    // Without the password it refuses to run.
    let missing = run(as_pg_user(&psql)
        .env_remove("SHOP_DB_PASSWORD")
        .arg("-h")
        .arg(pg.join("sock"))
        .args(["-p", &port.to_string(), "-d", "postgres", "-f"])
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
        String::from_utf8_lossy(&other.stderr).contains("no pg_hba.conf entry"),
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
// Golden files

/// A configuration exercising every target; machine facts are pinned through `[postgres].memory`
/// and explicit Celery concurrency, so the output does not depend on the machine.
const GOLDEN_CONFIG: &str = r#"[app]
directory = "/srv/myapp"
wsgi = "myapp.wsgi:application"

[web]
listen = ["127.0.0.1:8000"]
workers = 4
threads = 2
timeout = "20s"
max_body = "25MiB"

[programs.celery]
command = ["celery", "-A", "myapp.celery", "worker", "-c", "3"]
instances = 2
stop_timeout = "60s"

[beat]
broker = "redis://127.0.0.1:6379/3"

[deploy]
name = "myapp"
server_names = ["example.com", "www.example.com"]
static = { "/static/" = "/srv/myapp/static", "/media" = "/srv/myapp/media" }
websocket = ["/ws/"]

[deploy.tls]
acme_webroot = "/var/www/letsencrypt"

[deploy.staging]
htpasswd = "/etc/nginx/myapp.htpasswd"

[deploy.cache]

[deploy.systemd]
user = "myapp"
group = "myapp"
writable_paths = ["/srv/myapp/media"]

[redis]
password_env = "REDIS_PASSWORD"

[redis.cache]
url = "redis://127.0.0.1:6380/1"

[postgres]
database = "myapp"
user = "myapp"
password_env = "MYAPP_DB_PASSWORD"
memory = "8GiB"
"#;

#[test]
fn emitted_files_match_the_golden_files() {
    let sandbox = Sandbox::new();
    sandbox.write("sauna.toml", GOLDEN_CONFIG);
    let listing = ok(
        &sandbox,
        &["emit", "all", "-o", "out"],
        &[("REDIS_PASSWORD", "golden")],
    );
    // `emit all` says where each file goes and what to run next.
    for expected in [
        "nginx/myapp.conf",
        "install as /etc/nginx/conf.d/myapp.conf",
        "install as /etc/systemd/system/myapp.service",
        "Then:",
        "nginx -t && systemctl reload nginx",
        "sudo --preserve-env=MYAPP_DB_PASSWORD -u postgres psql",
        "systemctl enable --now myapp-broker-redis myapp-cache-redis myapp",
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
    assert_eq!(produced.len(), 9, "{produced:?}");
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
