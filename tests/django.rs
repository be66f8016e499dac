//! The README's "Deploy a Django app", followed with a real project. `tests/django_project`
//! (`django-admin startproject mysite`, the admin, a `pages` app with a model, a Celery app) is
//! release 1 in a sandbox; PostgreSQL and nginx run with the files `emit all` writes, Redis wants
//! a password, and sauna.toml names each secret once. `run` migrates and collects the static
//! files (`[hooks].before_start`) before anything serves; pages and static files come through
//! nginx, an admin logs in with a CSRF-protected POST, beat's job makes Celery write a row to
//! PostgreSQL. Then release 2 (`tests/django_releases/2`: a migration, a changed task, a changed
//! view) is copied over release 1 in place and `reload` rolls it under load: its migration runs
//! (`before_reload`), no request fails, the pages and the Celery worker run the new code.
//! Release 3's migration fails on the data: `reload` exits 1 with the error and release 2 keeps
//! serving, web and Celery alike.

use std::io::{BufReader, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::reload::read_response_closing;
use crate::util::postgres::{self, Cluster, give_to_pg_user};
use crate::util::redis::RedisServer;
use crate::util::{
    Running, Sandbox, assert_success, body, curl, free_port, nginx, output_text, python, repo_root,
    run,
};

/// Passwords as the README has them made (`openssl rand -hex 16`): hex needs no escaping in a
/// URL, so the by-hand `manage.py` command can put the password into DATABASE_URL as it is.
const DB_PASSWORD: &str = "3f9c1e0b7d5a4c2e8f6b1a0d9c7e5b3a";
const REDIS_PASSWORD: &str = "b41d07c9e2f85a3d6c0e9b7a1f4d2c8e";
const ADMIN_PASSWORD: &str = "a long admin password";

/// The site's name, as the README's example.com: nginx's server_name, Django's ALLOWED_HOSTS
/// (and nothing else there) and every request's Host — the reload's warm-up included, which
/// takes it from `[deploy].server_names`.
const HOST: &str = "mysite.test";

/// What release 1's and release 2's home page say.
const RELEASE_1: &str = "Hello from release 1";
const RELEASE_2: &str = "Hello from release 2, deployed in place";

/// The secrets file `emit all` writes and the unit reads: the supervisor's environment.
const SECRETS: [(&str, &str); 2] = [
    ("MYSITE_REDIS_PASSWORD", REDIS_PASSWORD),
    ("MYSITE_DB_PASSWORD", DB_PASSWORD),
];

/// Copies the files under `from` into `to`, replacing what is there: a release deployed in place.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create release dir");
    for entry in std::fs::read_dir(from).expect("read fixture dir").flatten() {
        let name = entry.file_name();
        if name == "__pycache__" {
            continue;
        }
        let target = to.join(&name);
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture file");
        }
    }
}

/// The fixtures are tests/django_project and tests/django_releases/N.
fn fixture(relative: &str) -> std::path::PathBuf {
    repo_root().join("tests").join(relative)
}

/// The test venv has Django, psycopg and Celery, or the test fails with how to get them.
fn require_python_packages() {
    let check = run(Command::new(python()).args(["-c", "import django, psycopg, celery"]));
    assert!(
        check.status.success(),
        "the test Python lacks Django, psycopg or Celery: run `{} -m pip install -r tests/requirements.txt` (or `scripts/test.sh`)\n{}",
        python().display(),
        output_text(&check)
    );
}

/// The free ports one run uses.
struct Ports {
    /// `[web].listen`, where nginx proxies to.
    web: u16,
    /// nginx's `[deploy].http_port`.
    http: u16,
    postgres: u16,
    metrics: u16,
}

/// sauna.toml as the README writes it, with this sandbox's paths and free ports.
fn config(sandbox: &Sandbox, ports: &Ports, redis: u16) -> String {
    format!(
        r#"[app]
directory = "{root}/app"
python = "{python}"
wsgi = "mysite.wsgi:application"
env = {{ DJANGO_SETTINGS_MODULE = "mysite.settings", DJANGO_SECRET_KEY_FILE = "{root}/mysite-django.key", DJANGO_ALLOWED_HOSTS = "{HOST}", STATIC_ROOT = "{root}/static" }}

[web]
listen = ["127.0.0.1:{web}"]
workers = 2
threads = 2
warmup = "/"

[programs.celery]
command = ["python", "-m", "celery", "-A", "mysite", "worker", "-c", "2", "-l", "info"]
stop_timeout = "30s"

[beat]
broker = "redis://127.0.0.1:{redis}/0"

[beat.jobs.tick]
task = "pages.record_tick"
every = "1s"
args = ["beat"]

[hooks]
before_start = [["python", "manage.py", "migrate", "--noinput"],
                ["python", "manage.py", "collectstatic", "--noinput"]]
before_reload = [["python", "manage.py", "migrate", "--noinput"],
                 ["python", "manage.py", "collectstatic", "--noinput"]]

[metrics]
listen = "127.0.0.1:{metrics}"

[redis]
password_env = "MYSITE_REDIS_PASSWORD"
url_env = "CELERY_BROKER_URL"

[postgres]
database = "mysite"
user = "mysite"
password_env = "MYSITE_DB_PASSWORD"
url_env = "DATABASE_URL"
port = {pg}
memory = "256MiB"
admin = "{admin}"

[deploy]
name = "mysite"
server_names = ["{HOST}"]
http_port = {http}
ipv6 = false
access_log = "{root}/logs/nginx-access.log"
error_log = "{root}/logs/nginx-error.log"

[deploy.static]
"/static/" = "{root}/static"
"#,
        root = sandbox.root().display(),
        python = python().display(),
        admin = postgres::os_user(),
        web = ports.web,
        http = ports.http,
        pg = ports.postgres,
        metrics = ports.metrics,
    )
}

/// `python manage.py ARGS` in the release directory, the way the README runs one by hand: the
/// secrets file sourced, DATABASE_URL written out from the database password, and the secret
/// key's file.
fn manage(sandbox: &Sandbox, pg_port: u16, args: &[&str], env: &[(&str, &str)]) -> Output {
    run(Command::new(python())
        .arg("manage.py")
        .args(args)
        .current_dir(sandbox.path("app"))
        .envs(SECRETS)
        .env(
            "DATABASE_URL",
            format!("postgres://mysite:{DB_PASSWORD}@127.0.0.1:{pg_port}/mysite"),
        )
        .env("DJANGO_SECRET_KEY_FILE", sandbox.path("mysite-django.key"))
        .envs(env.iter().copied())
        .stdin(Stdio::null()))
}

/// A PostgreSQL cluster set up the way `emit all`'s PostgreSQL step sets up Debian's: the
/// emitted settings in conf.d/ (read through include_dir), the app's pg_hba.conf lines above
/// the distribution's, then the init SQL run by the admin with the password from the
/// secrets — which creates the role and the database.
fn start_postgres(sandbox: &Sandbox, port: u16) -> crate::util::Daemon {
    let admin = postgres::os_user();
    let cluster = Cluster::init(
        &sandbox.path("pg"),
        &[
            "-U",
            &admin,
            "--auth-local=peer",
            "--auth-host=scram-sha-256",
        ],
    );
    let data = cluster.data();
    std::fs::create_dir(data.join("conf.d")).expect("conf.d");
    std::fs::copy(
        sandbox.path("out/postgres/mysite.conf"),
        data.join("conf.d/mysite.conf"),
    )
    .expect("install mysite.conf");
    let mut main_conf =
        std::fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
    main_conf.push_str("\ninclude_dir = 'conf.d'\n");
    std::fs::write(data.join("postgresql.conf"), main_conf).expect("include conf.d");
    let ours = std::fs::read_to_string(sandbox.path("out/postgres/mysite-pg_hba.conf"))
        .expect("mysite-pg_hba.conf");
    let theirs = std::fs::read_to_string(data.join("pg_hba.conf")).expect("pg_hba.conf");
    std::fs::write(data.join("pg_hba.conf"), ours + &theirs).expect("pg_hba.conf");
    give_to_pg_user(&data);
    let server = cluster.start(port);
    let sql = std::fs::File::open(sandbox.path("out/postgres/mysite-init.sql")).expect("init SQL");
    let init = run(cluster
        .admin_psql(port)
        .envs(SECRETS)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(sql));
    assert_success(&init, "psql < mysite-init.sql");
    server
}

/// A connection as the app's role, for looking at what Celery and the migrations wrote.
fn database(port: u16) -> ::postgres::Client {
    ::postgres::Client::connect(
        &format!("host=127.0.0.1 port={port} user=mysite password={DB_PASSWORD} dbname=mysite"),
        ::postgres::NoTls,
    )
    .expect("connect to PostgreSQL as mysite")
}

/// The rows Celery wrote after row `after`: (id, source, release), the release being NULL
/// before release 2's migration added the column.
fn ticks(db: &mut ::postgres::Client, after: i64) -> Vec<(i64, String, Option<i32>)> {
    let has_release = db
        .query_one(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = 'pages_tick' AND column_name = 'release'",
            &[],
        )
        .map(|row| row.get::<_, i64>(0) == 1)
        .expect("information_schema");
    let sql = if has_release {
        "SELECT id, source, release FROM pages_tick WHERE id > $1 ORDER BY id"
    } else {
        "SELECT id, source, NULL::integer FROM pages_tick WHERE id > $1 ORDER BY id"
    };
    db.query(sql, &[&after])
        .expect("query pages_tick")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// The pages app's applied migrations.
fn migrations(db: &mut ::postgres::Client) -> Vec<String> {
    db.query(
        "SELECT name FROM django_migrations WHERE app = 'pages' ORDER BY id",
        &[],
    )
    .expect("query django_migrations")
    .iter()
    .map(|row| row.get(0))
    .collect()
}

/// Waits until Celery has written a row after row `after` that `wanted` accepts; returns it.
fn wait_for_tick(
    db: &mut ::postgres::Client,
    after: i64,
    running: &Running,
    what: &str,
    wanted: impl Fn(&(i64, String, Option<i32>)) -> bool,
) -> (i64, String, Option<i32>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(tick) = ticks(db, after).into_iter().find(&wanted) {
            return tick;
        }
        assert!(
            Instant::now() < deadline,
            "no row {what} in pages_tick within 60 s: {:?}\nlog:\n{}",
            ticks(db, after),
            running.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// `reload`'s exit code and everything it printed.
fn reload(sandbox: &Sandbox) -> (Option<i32>, String) {
    let output = sandbox.run(&["reload"]);
    (
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// `curl` through nginx with the site's Host.
fn site(args: &[&str]) -> String {
    let host = format!("Host: {HOST}");
    let mut all = vec!["-H", host.as_str()];
    all.extend_from_slice(args);
    curl(&all)
}

/// The home page through nginx: (status line code, body).
fn home(http_port: u16) -> (u16, String) {
    let response = site(&[&format!("http://127.0.0.1:{http_port}/")]);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (code, body(&response).trim().to_owned())
}

/// One response the load saw: when it was sent, and the page's text or what went wrong.
struct Seen {
    sent: Instant,
    answer: Result<String, String>,
}

/// Clients asking for the home page through nginx in a loop until stopped: one keeps its
/// connection alive, one opens a new connection for each request.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Vec<Seen>>>,
}

impl Load {
    fn start(http_port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [true, false]
            .into_iter()
            .map(|keep_alive| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut connection: Option<BufReader<TcpStream>> = None;
                    // Bounded: a hung server fails the test instead of spinning forever.
                    while !stop.load(Ordering::Relaxed) && seen.len() < 100_000 {
                        let sent = Instant::now();
                        let answer = get_home(&mut connection, http_port, keep_alive);
                        if answer.is_err() || !keep_alive {
                            connection = None;
                        }
                        seen.push(Seen { sent, answer });
                    }
                    seen
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|thread| thread.join().expect("load thread"))
            .collect()
    }
}

/// `GET /` through nginx on `connection` (opened when there is none); the page's text.
fn get_home(
    connection: &mut Option<BufReader<TcpStream>>,
    port: u16,
    keep_alive: bool,
) -> Result<String, String> {
    if connection.is_none() {
        let stream =
            TcpStream::connect(("127.0.0.1", port)).map_err(|error| format!("connect: {error}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|error| error.to_string())?;
        *connection = Some(BufReader::new(stream));
    }
    let reader = connection.as_mut().ok_or("no connection")?;
    let close = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    reader
        .get_mut()
        .write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n{close}\r\n").as_bytes())
        .map_err(|error| format!("send: {error}"))?;
    let (status, body, close) = read_response_closing(reader)?;
    // nginx ends a kept-alive connection after keepalive_requests (1000) with `Connection: close`.
    if close {
        *connection = None;
    }
    match status {
        200 => Ok(body.trim().to_owned()),
        _ => Err(format!("status {status}: {body}")),
    }
}

/// The value of `name="NAME" value="..."` in an HTML form.
fn form_value<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let start = html.find(&format!("name=\"{name}\" value=\""))? + name.len() + 15;
    html[start..].split('"').next()
}

/// Pages and static files through nginx, and the admin's login: a POST without the CSRF token is
/// refused, with it the admin logs in and sees the site administration.
fn check_pages_static_files_and_the_admin(sandbox: &Sandbox, http_port: u16) {
    let base = format!("http://127.0.0.1:{http_port}");
    assert_eq!(home(http_port), (200, RELEASE_1.to_owned()));
    let css = site(&[&format!("{base}/static/pages/site.css")]);
    assert!(css.starts_with("HTTP/1.1 200"), "{css}");
    assert!(body(&css).contains("font-family"), "{css}");
    let admin_css = site(&[&format!("{base}/static/admin/css/base.css")]);
    assert!(admin_css.starts_with("HTTP/1.1 200"), "{admin_css}");
    assert!(admin_css.contains("Cache-Control: max-age="), "{admin_css}");

    let jar = sandbox.path("cookies.txt");
    let jar = jar.to_str().expect("UTF-8 path");
    let login_url = format!("{base}/admin/login/?next=/admin/");
    let form = site(&["-c", jar, &login_url]);
    assert!(form.starts_with("HTTP/1.1 200"), "{form}");
    let token = form_value(body(&form), "csrfmiddlewaretoken")
        .unwrap_or_else(|| panic!("no CSRF token in the login form:\n{form}"))
        .to_owned();
    let credentials = format!(
        "username=admin&password={}&next=/admin/",
        ADMIN_PASSWORD.replace(' ', "+")
    );
    let forged = site(&["-b", jar, "--data", &credentials, &login_url]);
    assert!(forged.starts_with("HTTP/1.1 403"), "{forged}");
    let login = site(&[
        "-b",
        jar,
        "-c",
        jar,
        "--data",
        &format!("csrfmiddlewaretoken={token}&{credentials}"),
        &login_url,
    ]);
    assert!(login.starts_with("HTTP/1.1 302"), "{login}");
    assert!(
        login.to_ascii_lowercase().contains("\nlocation: /admin/\n"),
        "{login}"
    );
    let admin = site(&["-b", jar, &format!("{base}/admin/")]);
    assert!(admin.starts_with("HTTP/1.1 200"), "{admin}");
    assert!(body(&admin).contains("Site administration"), "{admin}");
    assert!(body(&admin).contains("Ticks"), "{admin}");
}

/// A sample of `/metrics`.
fn metric(port: u16, series: &str) -> Option<f64> {
    curl(&[&format!("http://127.0.0.1:{port}/metrics")])
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn a_django_site_deploys_from_scratch_and_a_release_rolls_in_place_with_its_migration() {
    require_python_packages();
    let sandbox = Sandbox::new();
    // PostgreSQL runs as its own user when the tests run as root: it must reach its directory.
    std::fs::set_permissions(sandbox.root(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let ports = Ports {
        web: free_port(),
        http: free_port(),
        postgres: free_port(),
        metrics: free_port(),
    };

    // Release 1, the secret key, Redis with its password, and sauna.toml.
    copy_tree(&fixture("django_project"), &sandbox.path("app"));
    sandbox.write(
        "mysite-django.key",
        "a test key that is long enough to be one\n",
    );
    let redis = RedisServer::start_with_password(&sandbox.path("redis"), REDIS_PASSWORD);
    sandbox.write_config(&config(&sandbox, &ports, redis.port()));

    // `emit all` writes every file; PostgreSQL gets its role and database from them.
    let mut emit = sandbox.command(&["emit", "all", "-o", "out"]);
    emit.envs(SECRETS);
    let emitted = run(&mut emit);
    assert_success(&emitted, "emit all");
    let _postgres = start_postgres(&sandbox, ports.postgres);

    // `run` migrates and collects the static files (before_start) before anything serves.
    let running = sandbox.start_with(|command| {
        command.envs(SECRETS);
    });
    running.wait_for(
        Duration::from_secs(60),
        "two ready web workers and a running Celery worker",
        |status| {
            let ready = status["pool"]["workers"].as_array().is_some_and(|workers| {
                workers.iter().filter(|w| w["state"] == "ready").count() == 2
            });
            let celery = status["programs"][0]["instances"][0]["state"] == "running";
            ready && celery
        },
    );
    let log = running.log();
    assert!(
        log.contains("Applying pages.0001_initial... OK") && log.contains("static files copied"),
        "before_start did not migrate and collect the static files:\n{log}"
    );
    let mut db = database(ports.postgres);
    assert_eq!(migrations(&mut db), ["0001_initial"]);

    // An admin, created once by hand as the README says.
    let createsuperuser = manage(
        &sandbox,
        ports.postgres,
        &["createsuperuser", "--noinput"],
        &[
            ("DJANGO_SUPERUSER_USERNAME", "admin"),
            ("DJANGO_SUPERUSER_EMAIL", "admin@example.com"),
            ("DJANGO_SUPERUSER_PASSWORD", ADMIN_PASSWORD),
        ],
    );
    assert_success(&createsuperuser, "manage.py createsuperuser");

    let _nginx = nginx::serve(&sandbox, &sandbox.path("out/nginx/mysite.conf"), ports.http);
    check_pages_static_files_and_the_admin(&sandbox, ports.http);

    // Beat publishes the job every second; Celery, given the broker URL with the password by
    // [redis].url_env, writes a row to PostgreSQL, given DATABASE_URL by [postgres].url_env.
    wait_for_tick(&mut db, 0, &running, "from beat", |(_, source, _)| {
        source == "beat"
    });
    assert!(
        !running.log().contains("/static/"),
        "nginx passed a static path on to the pool:\n{}",
        running.log()
    );

    // Release 2, copied over release 1 in place, while clients keep asking for the home page;
    // `reload` runs its migration (before_reload), then rolls the workers and Celery.
    let load = Load::start(ports.http);
    thread::sleep(Duration::from_millis(500));
    copy_tree(&fixture("django_releases/2"), &sandbox.path("app"));
    let (code, said) = reload(&sandbox);
    let reloaded = Instant::now();
    assert_eq!(code, Some(0), "{said}\nlog:\n{}", running.log());
    assert!(
        said.contains("Applying pages.0002_tick_release... OK"),
        "reload shows the migration's output: {said}"
    );
    assert!(said.contains("\"celery\" rolled"), "{said}");
    // ALLOWED_HOSTS has only the site's name: the warm-up passed Django's host check with it.
    assert!(
        said.contains(&format!("warm-up GET http://{HOST}/ answered 200")),
        "{said}"
    );
    let last_before = ticks(&mut db, 0).last().map_or(0, |tick| tick.0);
    thread::sleep(Duration::from_millis(500));
    let seen = load.finish();
    let failed: Vec<&String> = seen
        .iter()
        .filter_map(|seen| seen.answer.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the deploy: {failed:?}",
        failed.len(),
        seen.len()
    );
    assert!(
        seen.len() > 20,
        "the load barely ran: {} requests",
        seen.len()
    );
    for seen in &seen {
        let answer = seen.answer.as_deref().unwrap_or_default();
        assert!(
            answer == RELEASE_1 || answer == RELEASE_2,
            "an answer from neither release: {answer:?}"
        );
        assert!(
            seen.sent < reloaded || answer == RELEASE_2,
            "release 1 answered after the reload"
        );
    }
    assert_eq!(home(ports.http), (200, RELEASE_2.to_owned()));
    assert_eq!(migrations(&mut db), ["0001_initial", "0002_tick_release"]);
    // Every row written since the reload returned comes from release 2's task.
    let tick = wait_for_tick(&mut db, last_before, &running, "after the reload", |_| true);
    let after_reload = ticks(&mut db, last_before);
    assert!(
        after_reload
            .iter()
            .all(|(_, _, release)| *release == Some(2)),
        "Celery ran release 1's task after the reload: {after_reload:?} (first {tick:?})"
    );

    // Release 3's migration fails on the rows already there: the reload is refused with the
    // error, and release 2 keeps serving — the web workers and Celery, whose release 3 task
    // would write release 3.
    copy_tree(&fixture("django_releases/3"), &sandbox.path("app"));
    let (code, said) = reload(&sandbox);
    assert_eq!(code, Some(1), "{said}\nlog:\n{}", running.log());
    // The summary at the end names the command and ends with the migration's error.
    let summary = said
        .split_once("refused by [hooks].before_reload")
        .map(|(_, summary)| summary)
        .unwrap_or_else(|| panic!("reload does not say the hook refused it: {said}"));
    assert!(
        summary.contains("`python manage.py migrate --noinput` exited with status 1")
            && summary.contains(
                "IntegrityError: check constraint \"tick_release_gte_3\" of relation \"pages_tick\" is violated by some row"
            ),
        "reload shows the failed migration's error: {said}"
    );
    let last_before = ticks(&mut db, 0).last().map_or(0, |tick| tick.0);
    assert_eq!(home(ports.http), (200, RELEASE_2.to_owned()));
    assert_eq!(migrations(&mut db), ["0001_initial", "0002_tick_release"]);
    assert_eq!(
        metric(
            ports.metrics,
            "sauna_reloads_total{outcome=\"hook_failed\"}"
        ),
        Some(1.0)
    );
    let status = running.status_json();
    assert_eq!(status["generation"], 2, "{status}");
    let second = wait_for_tick(
        &mut db,
        last_before,
        &running,
        "after the refusal",
        |tick| tick.0 > last_before + 1,
    );
    let after_refusal = ticks(&mut db, last_before);
    assert!(
        after_refusal
            .iter()
            .all(|(_, _, release)| *release == Some(2)),
        "Celery left release 2 after the refused reload: {after_refusal:?} (up to {second:?})"
    );

    assert!(running.stop().success());
}
