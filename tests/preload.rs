//! `[web] preload` through the real binary: real Flask, Django and Pyramid apps are imported once
//! by a template and served by workers forked from it; threads started at import are warned
//! about and a socket opened at import is reopened by `post_fork`; random seeds differ per
//! worker; an import error fails the start and a broken release rolls back; a crashed worker is
//! forked again far faster than an import; a reload imports the new release once; timeouts still
//! log the Python stack; and a `kill -9` of the supervisor leaves no process behind.
//!
//! Every app appends its pid to `imports.log` when it is imported, so the tests count imports.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{self, Running, Sandbox, alive, http_get, output_text};

/// Appends the importing process's pid to `imports.log` (relative to the app's directory).
const COUNT_IMPORT: &str = r#"
import os as _os
with open(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "imports.log"), "a") as _log:
    _log.write("%d\n" % _os.getpid())
"#;

/// A plain WSGI app answering `pid ppid random`; `EXTRA` runs at import.
const PLAIN: &str = r#"
import os, random, time
@COUNT@
@EXTRA@

def application(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(60)
    if environ["QUERY_STRING"] == "hold":
        time.sleep(0.5)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%d %d %r" % (os.getpid(), os.getppid(), random.random())).encode()]
"#;

/// `[app]` and `[web]` for the app in the sandbox root, with `web` added to `[web]`.
fn configure(sandbox: &Sandbox, port: u16, app: &str, web: &str) {
    sandbox.write_config(&format!(
        "[app]\npython = \"{}\"\n{app}\n\n[web]\nlisten = [\"127.0.0.1:{port}\"]\naccess_log = false\npreload = true\n{web}\n",
        util::python().display()
    ));
}

fn plain_app(sandbox: &Sandbox, extra: &str) {
    sandbox.write(
        "app.py",
        &PLAIN
            .replace("@COUNT@", COUNT_IMPORT)
            .replace("@EXTRA@", extra),
    );
}

/// Pids of the processes that imported the app so far.
fn imports(sandbox: &Sandbox) -> Vec<u32> {
    std::fs::read_to_string(sandbox.path("imports.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// `(slot, pid)` of every ready worker in `status --json`.
fn ready_workers(status: &serde_json::Value) -> Vec<(u64, u32)> {
    status["pool"]["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|worker| worker["state"] == "ready")
        .filter_map(|worker| {
            Some((
                worker["slot"].as_u64()?,
                u32::try_from(worker["pid"].as_u64()?).ok()?,
            ))
        })
        .collect()
}

fn wait_ready(running: &Running, count: usize) -> Vec<(u64, u32)> {
    let status = running.wait_for(
        Duration::from_secs(60),
        &format!("{count} ready workers"),
        |status| ready_workers(status).len() == count,
    );
    ready_workers(&status)
}

/// The parent pid of `pid`, from /proc.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The command line of `pid`, arguments separated by spaces.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .unwrap_or_default()
}

/// Asserts that every worker was forked by one template, the one process that imported the
/// app; returns the template's pid.
fn assert_forked_from_one_template(sandbox: &Sandbox, workers: &[(u64, u32)]) -> u32 {
    let parents: BTreeSet<u32> = workers
        .iter()
        .map(|(_, pid)| parent_of(*pid).unwrap_or_default())
        .collect();
    assert_eq!(
        parents.len(),
        1,
        "workers {workers:?} have parents {parents:?}"
    );
    let template = parents.into_iter().next().unwrap_or_default();
    assert!(
        cmdline(template).contains(" template "),
        "the workers' parent is not a template: {}",
        cmdline(template)
    );
    assert_eq!(
        imports(sandbox),
        [template],
        "only the template imports the app"
    );
    template
}

/// Sends as many concurrent `GET /?hold` (each holds its worker for half a second) as there
/// are workers, until every worker in `pids` answered once; returns each one's body.
fn answers_from_each(port: u16, pids: &[u32]) -> Vec<String> {
    let mut seen = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < pids.len() && Instant::now() < deadline {
        let requests: Vec<_> = pids
            .iter()
            .map(|_| thread::spawn(move || http_get(("127.0.0.1", port), "/?hold")))
            .collect();
        for body in requests
            .into_iter()
            .filter_map(|request| request.join().ok().flatten())
        {
            let pid: u32 = body
                .split_whitespace()
                .next()
                .and_then(|pid| pid.parse().ok())
                .unwrap_or_default();
            seen.entry(pid).or_insert(body);
        }
    }
    let mut expected = pids.to_vec();
    expected.sort_unstable();
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        expected,
        "not every worker answered"
    );
    seen.into_values().collect()
}

/// One answer of a framework app (`PID NAME`) comes from one of the forked `workers`.
fn assert_served_by_a_fork(port: u16, workers: &[(u64, u32)], name: &str) {
    let body = http_get(("127.0.0.1", port), "/").unwrap_or_default();
    let pid: u32 = body
        .strip_suffix(&format!(" {name}"))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {body:?}"));
    assert!(workers.iter().any(|(_, worker)| *worker == pid), "{body}");
}

#[test]
fn workers_are_forks_of_one_template_with_their_own_random_seeds() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(&sandbox, "");
    configure(&sandbox, port, "wsgi = \"app:application\"", "workers = 3");
    let running = sandbox.start();
    let workers = wait_ready(&running, 3);
    let template = assert_forked_from_one_template(&sandbox, &workers);
    let pids: Vec<u32> = workers.iter().map(|(_, pid)| *pid).collect();
    let bodies = answers_from_each(port, &pids);
    let randoms: BTreeSet<&str> = bodies
        .iter()
        .filter_map(|body| body.split_whitespace().nth(2))
        .collect();
    assert_eq!(randoms.len(), 3, "each worker has its own seed: {bodies:?}");
    for body in &bodies {
        assert_eq!(
            body.split_whitespace().nth(1),
            Some(template.to_string().as_str())
        );
    }
    // The template is a process of its own: status lists it apart from the slots, with its
    // memory; every worker shows RSS and PSS, and PSS is below RSS (pages shared with the
    // template count as their share).
    assert!(!pids.contains(&template));
    let status = running.wait_for(Duration::from_secs(10), "sampled PSS", |status| {
        status["pool"]["workers"].as_array().is_some_and(|workers| {
            workers
                .iter()
                .all(|worker| worker["pss_bytes"].as_u64().unwrap_or(0) > 0)
        })
    });
    for worker in status["pool"]["workers"].as_array().into_iter().flatten() {
        let rss = worker["rss_bytes"].as_u64().unwrap_or(0);
        let pss = worker["pss_bytes"].as_u64().unwrap_or(0);
        assert!(pss > 0 && pss < rss, "{worker}");
    }
    let templates = &status["pool"]["templates"];
    assert_eq!(
        templates[0]["pid"].as_u64(),
        Some(u64::from(template)),
        "{status}"
    );
    assert!(
        templates[0]["pss_bytes"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    let text = util::output_text(&sandbox.run(&["status"]));
    assert!(
        text.contains(&format!("template of generation 1 · pid {template} · RSS ")),
        "{text}"
    );
    let config = std::fs::read_to_string(sandbox.path("sauna.toml")).unwrap_or_default();
    let metrics_address = config
        .split("[metrics]")
        .nth(1)
        .and_then(|section| section.split('"').nth(1))
        .unwrap_or_default()
        .to_owned();
    let metrics = util::wait_until(Duration::from_secs(10), "PSS metrics", || {
        let mut stream = std::net::TcpStream::connect(&metrics_address).ok()?;
        std::io::Write::write_all(
            &mut stream,
            b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        )
        .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        (text.contains("sauna_worker_pss_bytes{worker=\"2\"}")
            && text.contains("sauna_template_pss_bytes"))
        .then_some(text)
    });
    let template_pss = metrics
        .lines()
        .find(|line| line.starts_with("sauna_template_pss_bytes "))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(template_pss > 0.0, "{metrics}");
}

#[test]
fn flask_is_preloaded() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    sandbox.write(
        "flask_app.py",
        &format!(
            "{COUNT_IMPORT}\nimport os\nfrom flask import Flask\napp = Flask(__name__)\n\n@app.route('/')\ndef index():\n    return '%d flask' % os.getpid()\n"
        ),
    );
    configure(&sandbox, port, "wsgi = \"flask_app:app\"", "workers = 2");
    let running = sandbox.start();
    let workers = wait_ready(&running, 2);
    assert_forked_from_one_template(&sandbox, &workers);
    assert_served_by_a_fork(port, &workers, "flask");
}

#[test]
fn django_is_preloaded() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    sandbox.write(
        "djapp.py",
        &format!(
            r#"{COUNT_IMPORT}
import os
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    SECRET_KEY="test-only",
    ALLOWED_HOSTS=["test"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.admin",
                    "django.contrib.sessions", "django.contrib.messages"],
    DATABASES={{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}}},
    MIDDLEWARE=["django.middleware.common.CommonMiddleware",
                "django.contrib.sessions.middleware.SessionMiddleware",
                "django.contrib.auth.middleware.AuthenticationMiddleware",
                "django.contrib.messages.middleware.MessageMiddleware"],
    TEMPLATES=[{{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
                "OPTIONS": {{"context_processors": ["django.contrib.auth.context_processors.auth",
                                                    "django.contrib.messages.context_processors.messages",
                                                    "django.template.context_processors.request"]}}}}],
)

def index(request):
    return HttpResponse("%d django" % os.getpid())

urlpatterns = [path("", index)]

from django.core.wsgi import get_wsgi_application
application = get_wsgi_application()
"#
        ),
    );
    configure(
        &sandbox,
        port,
        "wsgi = \"djapp:application\"",
        "workers = 2",
    );
    let running = sandbox.start();
    let workers = wait_ready(&running, 2);
    assert_forked_from_one_template(&sandbox, &workers);
    assert_served_by_a_fork(port, &workers, "django");
}

#[test]
fn pyramid_through_pastedeploy_is_preloaded() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    sandbox.write(
        "pyramid_app.py",
        &format!(
            "{COUNT_IMPORT}\nimport os\nfrom pyramid.config import Configurator\nfrom pyramid.response import Response\n\ndef index(request):\n    return Response('%d pyramid' % os.getpid())\n\ndef main(global_config, **settings):\n    with Configurator(settings=settings) as config:\n        config.add_route('index', '/')\n        config.add_view(index, route_name='index')\n        return config.make_wsgi_app()\n"
        ),
    );
    sandbox.write(
        "production.ini",
        "[app:main]\nuse = call:pyramid_app:main\n",
    );
    configure(&sandbox, port, "paste = \"production.ini\"", "workers = 2");
    let running = sandbox.start();
    let workers = wait_ready(&running, 2);
    assert_forked_from_one_template(&sandbox, &workers);
    assert_served_by_a_fork(port, &workers, "pyramid");
}

#[test]
fn a_thread_started_at_import_is_warned_about_and_post_fork_reopens_a_socket() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    // The "database": every connection the app opens is accepted and counted here.
    let database = TcpListener::bind("127.0.0.1:0").expect("bind");
    let database_port = database.local_addr().expect("address").port();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let accepted = std::sync::Arc::clone(&accepted);
        thread::spawn(move || {
            for stream in database.incoming().flatten() {
                accepted.lock().expect("lock").push(stream);
            }
        });
    }
    plain_app(
        &sandbox,
        &format!(
            "import socket, threading\n\
             CONNECTION = socket.create_connection((\"127.0.0.1\", {database_port}))\n\
             threading.Thread(target=time.sleep, args=(3600,), name=\"metrics-pusher\", daemon=True).start()\n"
        ),
    );
    sandbox.write(
        "hooks.py",
        &format!(
            "import socket\nimport app\n\ndef reopen():\n    app.CONNECTION.close()\n    app.CONNECTION = socket.create_connection((\"127.0.0.1\", {database_port}))\n    print(\"post_fork reopened the connection\", flush=True)\n"
        ),
    );
    configure(
        &sandbox,
        port,
        "wsgi = \"app:application\"",
        // Three slots and three rings per worker: descriptor numbers the socket opened at
        // import must not take.
        "workers = 2\nthreads = 3\npost_fork = \"hooks:reopen\"",
    );
    let running = sandbox.start();
    let workers = wait_ready(&running, 2);
    assert_forked_from_one_template(&sandbox, &workers);
    running.wait_for_log("the app started 1 thread(s) while it was imported (metrics-pusher); threads do not survive fork", Duration::from_secs(10));
    let log = running.log();
    assert_eq!(
        log.matches("post_fork reopened the connection").count(),
        2,
        "{log}"
    );
    // One connection from the template's import, one of its own from each worker.
    util::wait_until(Duration::from_secs(10), "three connections", || {
        (accepted.lock().expect("lock").len() == 3).then_some(())
    });
    let concurrent: Vec<_> = (0..6)
        .map(|_| thread::spawn(move || http_get(("127.0.0.1", port), "/?hold")))
        .collect();
    for request in concurrent {
        assert!(
            request.join().ok().flatten().is_some(),
            "every slot answers"
        );
    }
    assert_eq!(wait_ready(&running, 2), workers, "no worker broke");
}

#[test]
fn a_failing_post_fork_keeps_the_worker_from_serving() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(&sandbox, "");
    sandbox.write(
        "hooks.py",
        "def broken():\n    raise RuntimeError('cannot reach the database')\n",
    );
    configure(
        &sandbox,
        port,
        "wsgi = \"app:application\"",
        "workers = 1\npost_fork = \"hooks:broken\"",
    );
    let output = sandbox.run(&["run"]);
    let text = output_text(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("cannot reach the database"), "{text}");
}

#[test]
fn an_import_error_fails_the_start_with_its_traceback() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(
        &sandbox,
        "raise ImportError('no module named settings_prod')",
    );
    configure(&sandbox, port, "wsgi = \"app:application\"", "workers = 3");
    let output = sandbox.run(&["run"]);
    let text = output_text(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("no module named settings_prod"), "{text}");
    // One template imported, failed, and nothing was retried behind the failure's back.
    assert_eq!(imports(&sandbox).len(), 1, "{text}");
}

/// The `HH:MM:SS.ffffff` timestamp of the first log line containing `needle` after `from`, in
/// seconds since midnight.
fn log_time(log: &str, needle: &str, from: usize) -> Option<(f64, usize)> {
    let at = log[from..].find(needle)? + from;
    let line_start = log[..at].rfind('\n').map_or(0, |newline| newline + 1);
    let stamp = log[line_start..].split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some((hours * 3600.0 + minutes * 60.0 + seconds, at))
}

#[test]
fn a_crashed_worker_is_forked_again_far_faster_than_an_import() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    // An import of two seconds: a replacement that imported again could not be fast.
    plain_app(&sandbox, "time.sleep(2)");
    configure(&sandbox, port, "wsgi = \"app:application\"", "workers = 2");
    let running = sandbox.start();
    let workers = wait_ready(&running, 2);
    let template = assert_forked_from_one_template(&sandbox, &workers);
    let (slot, victim) = workers[0];
    let before = running.log().len();
    let killed = Instant::now();
    util::run(std::process::Command::new("kill").args(["-9", &victim.to_string()]));
    let status = running.wait_for(Duration::from_secs(10), "a replacement", |status| {
        ready_workers(status)
            .iter()
            .any(|(other, pid)| *other == slot && *pid != victim)
    });
    let waited = killed.elapsed();
    let replacement = ready_workers(&status)
        .into_iter()
        .find(|(other, _)| *other == slot)
        .map(|(_, pid)| pid)
        .unwrap_or_default();
    assert_eq!(parent_of(replacement), Some(template));
    assert_eq!(
        imports(&sandbox),
        [template],
        "the replacement did not import"
    );
    let log = running.log();
    let (crashed_at, at) = log_time(&log, "exited unexpectedly", before)
        .unwrap_or_else(|| panic!("no crash logged:\n{log}"));
    let (ready_at, _) = log_time(&log, &format!("pid={replacement}"), at)
        .unwrap_or_else(|| panic!("no replacement logged:\n{log}"));
    let took = ready_at - crashed_at;
    eprintln!(
        "crash to ready: {:.1} ms (seen by status after {waited:?})",
        took * 1000.0
    );
    assert!(
        took < 0.5 && waited < Duration::from_secs(2),
        "replacement took {took:.3} s from the crash (status saw it after {waited:?}); an import takes 2 s"
    );
    // An HTTP request reaches the replacement too.
    answers_from_each(
        port,
        &ready_workers(&status)
            .iter()
            .map(|(_, pid)| *pid)
            .collect::<Vec<_>>(),
    );
}

#[test]
fn a_timeout_logs_the_python_stack_of_a_forked_worker() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(&sandbox, "");
    configure(
        &sandbox,
        port,
        "wsgi = \"app:application\"",
        "workers = 1\ntimeout = \"1s\"",
    );
    let running = sandbox.start();
    wait_ready(&running, 1);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        b"GET /slow HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .expect("send");
    let mut response = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 504"), "{response}");
    running.wait_for_log("in application", Duration::from_secs(10));
    wait_ready(&running, 1);
}

#[test]
fn recycling_and_scaling_fork_from_the_template() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(&sandbox, "");
    configure(
        &sandbox,
        port,
        "wsgi = \"app:application\"",
        "workers = 1\nmax_requests = 2",
    );
    let running = sandbox.start();
    let first = wait_ready(&running, 1);
    let template = assert_forked_from_one_template(&sandbox, &first);
    // The worker keeps serving past its limit until its replacement is ready (capacity never
    // drops), so ask until another pid answers.
    let mut pids = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.len() < 2 && Instant::now() < deadline {
        if let Some(body) = http_get(("127.0.0.1", port), "/") {
            pids.extend(body.split_whitespace().next().map(str::to_owned));
        }
    }
    assert!(pids.len() >= 2, "no worker was recycled: {pids:?}");
    let now = wait_ready(&running, 1);
    assert_eq!(parent_of(now[0].1), Some(template));
    assert_eq!(imports(&sandbox), [template]);
    // SIGTTIN adds a worker: a fork too.
    running.signal("TTIN");
    let scaled = wait_ready(&running, 2);
    assert!(
        scaled
            .iter()
            .all(|(_, pid)| parent_of(*pid) == Some(template)),
        "{scaled:?}"
    );
    assert_eq!(imports(&sandbox), [template]);
}

#[test]
fn a_reload_imports_the_new_release_once_and_a_broken_one_rolls_back() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    let release = |name: &str, extra: &str| {
        sandbox.write(
            &format!("releases/{name}/app.py"),
            &PLAIN
                .replace("@COUNT@", COUNT_IMPORT)
                .replace("@EXTRA@", extra),
        );
    };
    let switch = |name: &str| {
        let staged = sandbox.path("current.new");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(sandbox.path(&format!("releases/{name}")), &staged)
            .expect("symlink");
        std::fs::rename(&staged, sandbox.path("current")).expect("switch");
    };
    let imports_of = |name: &str| {
        std::fs::read_to_string(sandbox.path(&format!("releases/{name}/imports.log")))
            .unwrap_or_default()
            .lines()
            .count()
    };
    release("v1", "");
    release("v2", "");
    release("v3", "raise RuntimeError('v3 is broken')");
    switch("v1");
    configure(
        &sandbox,
        port,
        "wsgi = \"app:application\"\ndirectory = \"current\"",
        "workers = 4\nreload_timeout = \"20s\"\ngraceful_timeout = \"5s\"",
    );
    let running = sandbox.start();
    let old = wait_ready(&running, 4);
    let old_template = parent_of(old[0].1).unwrap_or_default();
    assert_eq!(imports_of("v1"), 1);

    switch("v2");
    let reload = sandbox.run(&["reload"]);
    assert!(reload.status.success(), "{}", output_text(&reload));
    let new = wait_ready(&running, 4);
    assert_eq!(imports_of("v2"), 1, "eight workers, one import");
    let parents: BTreeSet<u32> = new
        .iter()
        .map(|(_, pid)| parent_of(*pid).unwrap_or_default())
        .collect();
    assert_eq!(parents.len(), 1, "{new:?}");
    let new_template = parents.into_iter().next().unwrap_or_default();
    assert_ne!(new_template, old_template);
    util::wait_until(Duration::from_secs(15), "the old template to go", || {
        (!alive(old_template)).then_some(())
    });

    switch("v3");
    let reload = sandbox.run(&["reload"]);
    let text = output_text(&reload);
    assert!(!reload.status.success(), "{text}");
    assert!(text.contains("v3 is broken"), "{text}");
    let after = wait_ready(&running, 4);
    assert_eq!(after, new, "the serving generation was not touched");
    assert!(alive(new_template));
    assert_eq!(imports_of("v3"), 1, "the canary is the one import");
}

#[test]
fn kill_9_of_the_supervisor_leaves_no_process_behind() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(
        &sandbox,
        "import threading\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()",
    );
    configure(&sandbox, port, "wsgi = \"app:application\"", "workers = 3");
    let mut running = sandbox.start();
    let workers = wait_ready(&running, 3);
    let template = assert_forked_from_one_template(&sandbox, &workers);
    let mut pids: Vec<u32> = workers.iter().map(|(_, pid)| *pid).collect();
    pids.push(template);
    running.signal("KILL");
    running.wait_exit(Duration::from_secs(10));
    util::wait_until(
        Duration::from_secs(10),
        "every app process to be gone",
        || pids.iter().all(|pid| !alive(pid)).then_some(()),
    );
}

#[test]
fn an_upgrade_hands_over_to_a_new_template_and_the_old_one_goes() {
    /// A successor supervisor is not the test's child: stop whoever serves when the test ends.
    struct StopOnDrop<'a>(&'a Sandbox);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["stop"]);
        }
    }
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(&sandbox, "");
    configure(&sandbox, port, "wsgi = \"app:application\"", "workers = 2");
    let running = sandbox.start();
    let _stop = StopOnDrop(&sandbox);
    let old_workers = wait_ready(&running, 2);
    let old_template = assert_forked_from_one_template(&sandbox, &old_workers);
    let old = running.pid();
    running.signal("USR2");
    util::wait_until(Duration::from_secs(30), "a new supervisor", || {
        running
            .try_status()
            .and_then(|status| status["pid"].as_u64())
            .filter(|pid| *pid != u64::from(old))
    });
    let mut old_processes: Vec<u32> = old_workers.iter().map(|(_, pid)| *pid).collect();
    old_processes.extend([old, old_template]);
    util::wait_until(
        Duration::from_secs(30),
        "the old supervisor, template and workers to go",
        || old_processes.iter().all(|pid| !alive(pid)).then_some(()),
    );
    let new_workers = wait_ready(&running, 2);
    let templates: BTreeSet<u32> = new_workers
        .iter()
        .map(|(_, pid)| parent_of(*pid).unwrap_or_default())
        .collect();
    assert_eq!(templates.len(), 1, "{new_workers:?}");
    let new_template = templates.into_iter().next().unwrap_or_default();
    assert!(cmdline(new_template).contains(" template "));
    assert_ne!(new_template, old_template);
    assert_eq!(imports(&sandbox), [old_template, new_template]);
    assert!(http_get(("127.0.0.1", port), "/").is_some());
}

#[test]
fn a_reload_turns_preload_on_and_off() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(&sandbox, "");
    let config = |preload: bool| {
        sandbox.write_config(&format!(
            "[app]\npython = \"{}\"\nwsgi = \"app:application\"\n\n[web]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 2\naccess_log = false\ngraceful_timeout = \"5s\"\npreload = {preload}\n\n[control]\nsocket = \"{}\"\n",
            util::python().display(),
            sandbox.control_socket().display(),
        ));
    };
    config(false);
    let running = sandbox.start();
    let spawned = wait_ready(&running, 2);
    let supervisor = running.pid();
    assert!(
        spawned
            .iter()
            .all(|(_, pid)| parent_of(*pid) == Some(supervisor))
    );
    assert_eq!(imports(&sandbox).len(), 2, "each spawned worker imports");

    config(true);
    let reload = sandbox.run(&["reload"]);
    assert!(reload.status.success(), "{}", output_text(&reload));
    let forked = running.wait_for(Duration::from_secs(20), "generation 2 ready", |status| {
        let workers = ready_workers(status);
        workers.len() == 2
            && workers
                .iter()
                .all(|(_, pid)| parent_of(*pid) != Some(supervisor))
    });
    let forked = ready_workers(&forked);
    let template = parent_of(forked[0].1).unwrap_or_default();
    assert!(
        forked
            .iter()
            .all(|(_, pid)| parent_of(*pid) == Some(template))
    );
    assert_eq!(parent_of(template), Some(supervisor));
    assert_eq!(
        imports(&sandbox).len(),
        3,
        "one more import: the template's"
    );

    config(false);
    let reload = sandbox.run(&["reload"]);
    assert!(reload.status.success(), "{}", output_text(&reload));
    running.wait_for(Duration::from_secs(20), "generation 3 spawned", |status| {
        let workers = ready_workers(status);
        workers.len() == 2
            && workers
                .iter()
                .all(|(_, pid)| parent_of(*pid) == Some(supervisor))
    });
    util::wait_until(Duration::from_secs(15), "the template to go", || {
        (!alive(template)).then_some(())
    });
    // The end of a generation is no crash of its template.
    let log = running.log();
    assert!(!log.contains("the web template exited"), "{log}");
}

#[test]
fn a_killed_template_takes_its_workers_and_a_new_one_is_imported() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(&sandbox, "");
    configure(&sandbox, port, "wsgi = \"app:application\"", "workers = 2");
    let running = sandbox.start();
    let workers = wait_ready(&running, 2);
    let template = assert_forked_from_one_template(&sandbox, &workers);
    util::run(std::process::Command::new("kill").args(["-9", &template.to_string()]));
    util::wait_until(
        Duration::from_secs(10),
        "the workers to die with it",
        || workers.iter().all(|(_, pid)| !alive(pid)).then_some(()),
    );
    let status = running.wait_for(Duration::from_secs(20), "two new workers", |status| {
        let now = ready_workers(status);
        now.len() == 2 && now.iter().all(|worker| !workers.contains(worker))
    });
    let replacements = ready_workers(&status);
    let parents: BTreeSet<u32> = replacements
        .iter()
        .map(|(_, pid)| parent_of(*pid).unwrap_or_default())
        .collect();
    assert_eq!(parents.len(), 1, "{replacements:?}");
    let new_template = parents.into_iter().next().unwrap_or_default();
    assert_ne!(new_template, template);
    assert_eq!(imports(&sandbox), [template, new_template]);
    running.wait_for_log(
        "the web template exited (signal 9 (SIGKILL))",
        Duration::from_secs(5),
    );
    assert!(http_get(("127.0.0.1", port), "/").is_some());
}

#[test]
fn check_imports_the_post_fork_hook_and_reports_a_bad_one_where_it_is_written() {
    let sandbox = Sandbox::new();
    let port = util::free_port();
    plain_app(&sandbox, "");
    sandbox.write("hooks.py", "def reopen():\n    pass\n");
    configure(
        &sandbox,
        port,
        "wsgi = \"app:application\"",
        "post_fork = \"hooks:reopn\"",
    );
    let output = sandbox.run(&["check"]);
    let text = output_text(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("has no attribute 'reopn'"), "{text}");

    configure(
        &sandbox,
        port,
        "wsgi = \"app:application\"",
        "post_fork = \"hooks:reopen\"",
    );
    let output = sandbox.run(&["check"]);
    assert!(output.status.success(), "{}", output_text(&output));

    // Not a module:callable at all: refused by the config check, at its line and column.
    configure(
        &sandbox,
        port,
        "wsgi = \"app:application\"",
        "post_fork = \"hooks\"",
    );
    let output = sandbox.run(&["check"]);
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains(
            "sauna.toml:9:13: web.post_fork: \"hooks\" has no \":\" between module and callable"
        ),
        "{text}"
    );
}
