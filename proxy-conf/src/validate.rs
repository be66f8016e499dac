//! Checks that look at more than one value's type: zero workers, a `[web]` without an app, listen
//! addresses that clash, a job without a schedule, an unknown stop signal or time zone. Each
//! finding is pinned to the key or value at fault (or to its table's header when the culprit is a
//! missing key). What a single value's type is belongs to `de`; cron syntax and whether the app
//! imports are checked by the supervisor, which reports through `Loaded::diagnostic_at`.

use std::collections::BTreeSet;
use std::ops::Range;
use std::str::FromStr;

use crate::diagnostics::did_you_mean;
use crate::listen::{Listen, MAX_UNIX_SOCKET_PATH};
use crate::locate::{KeyIndex, display_path};
use crate::schema::{BeatConfig, Config, JobConfig, ProgramConfig, WebConfig};
use crate::secrets::is_env_name;

/// Signals accepted by `stop_signal`, in their canonical spelling (without `SIG`).
pub const STOP_SIGNALS: [&str; 7] = ["TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "KILL"];

/// The canonical name of a `stop_signal` value: `"sigterm"`, `"SIGTERM"` and `"TERM"` are all
/// `"TERM"`. `None` for a signal that cannot stop a program.
pub fn stop_signal_name(text: &str) -> Option<&'static str> {
    let upper = text.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    STOP_SIGNALS.iter().copied().find(|name| *name == bare)
}

/// One cross-field problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    /// Byte range of the offending value, key or table header.
    pub span: Range<usize>,
    /// What is wrong, naming the key, and what to write instead.
    pub message: String,
}

/// Runs every check. `broken` holds key paths whose value already failed to load: a check about
/// a table with such a key stays silent, since the user's real mistake is already reported and a
/// second message about the defaulted value would only mislead.
pub(crate) fn validate(
    config: &Config,
    index: &KeyIndex,
    broken: &BTreeSet<Vec<String>>,
) -> Vec<Finding> {
    let mut checker = Checker {
        index,
        broken,
        findings: Vec::new(),
    };
    checker.app(config);
    if let Some(web) = &config.web {
        checker.web(config, web);
    }
    for (name, program) in &config.programs {
        checker.program(name, program);
    }
    if let Some(beat) = &config.beat {
        checker.beat(beat);
    }
    checker.metrics(config);
    checker.control(config);
    checker.services(config);
    checker.hooks(config);
    checker.findings
}

struct Checker<'a> {
    index: &'a KeyIndex,
    broken: &'a BTreeSet<Vec<String>>,
    findings: Vec<Finding>,
}

impl Checker<'_> {
    /// Reports `message` at the value of `path` (or its table's header if the key is absent).
    fn report(&mut self, path: &[&str], message: impl std::fmt::Display) {
        self.findings.push(Finding {
            span: self.index.value_or_table(path),
            message: format!("{}: {message}", display_path(path)),
        });
    }

    /// Reports `message` at element `position` of the array at `path`, named `path[position]`.
    fn report_element(&mut self, path: &[&str], position: usize, message: impl std::fmt::Display) {
        let index = position.to_string();
        let mut element = path.to_vec();
        element.push(&index);
        self.findings.push(Finding {
            span: self.index.value_or_table(&element),
            message: format!("{}[{position}]: {message}", display_path(path)),
        });
    }

    /// Reports at the key itself (for problems with a name, not a value).
    fn report_key(&mut self, path: &[&str], message: impl std::fmt::Display) {
        let span = self.index.get(path).map_or_else(
            || self.index.value_or_table(path),
            |located| located.key.clone(),
        );
        self.findings.push(Finding {
            span,
            message: format!("{}: {message}", display_path(path)),
        });
    }

    /// True when some key in the table at `prefix` failed to load (see [`validate`]).
    fn broken_under(&self, prefix: &[&str]) -> bool {
        self.broken
            .iter()
            .any(|path| path.len() >= prefix.len() && path.iter().zip(prefix).all(|(a, b)| a == b))
    }

    fn app(&mut self, config: &Config) {
        let app = &config.app;
        if app.python.trim().is_empty() {
            self.report(
                &["app", "python"],
                "must not be empty; the default is \"python3\"",
            );
        }
        if app
            .directory
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            self.report(
                &["app", "directory"],
                "must not be empty; remove it to use the current directory",
            );
        }
        if let Some(wsgi) = &app.wsgi {
            if let Err(why) = check_python_target(wsgi) {
                self.report(
                    &["app", "wsgi"],
                    format!("\"{wsgi}\" {why}; expected \"module:callable\", e.g. \"myapp.wsgi:application\""),
                );
            }
            if app.paste.is_some() {
                self.report(
                    &["app", "paste"],
                    "set either wsgi or paste, not both: paste loads the app from an ini file, wsgi names it directly",
                );
            }
        }
        if let Some(paste) = &app.paste {
            let (file, name) = paste.split_once('#').unwrap_or((paste, "x"));
            if file.trim().is_empty() || name.trim().is_empty() {
                self.report(
                    &["app", "paste"],
                    format!("\"{paste}\" is not a PasteDeploy file; expected \"production.ini\" or \"production.ini#main\""),
                );
            }
        }
        self.env(&["app", "env"], &app.env);
    }

    fn env(&mut self, path: &[&str], env: &std::collections::BTreeMap<String, String>) {
        for (key, value) in env {
            let mut entry = path.to_vec();
            entry.push(key);
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                self.report_key(
                    &entry,
                    "an environment variable name must not be empty or contain \"=\"",
                );
            } else if value.contains('\0') {
                self.report(
                    &entry,
                    "an environment value cannot contain a NUL character",
                );
            }
        }
    }

    fn web(&mut self, config: &Config, web: &WebConfig) {
        let app = &config.app;
        if app.wsgi.is_none() && app.paste.is_none() && !self.broken_under(&["app"]) {
            self.report(
                &["web"],
                "the web pool needs an application: set [app].wsgi = \"module:callable\" or [app].paste = \"production.ini\"",
            );
        }
        if web.workers == 0 {
            self.report(
                &["web", "workers"],
                "must be at least 1; remove [web] to run without a web pool",
            );
        }
        if web.threads == 0 {
            self.report(
                &["web", "threads"],
                "must be at least 1 (1 = one request at a time per worker)",
            );
        }
        if web.max_requests_jitter > 0 && web.max_requests == 0 {
            self.report(
                &["web", "max_requests_jitter"],
                "has no effect without max_requests; set max_requests too, or remove it",
            );
        }
        if web.queue_size == 0 {
            self.report(
                &["web", "queue_size"],
                "must be at least 1: requests wait here for a free worker",
            );
        }
        if web.listen.is_empty() && !self.broken_under(&["web", "listen"]) {
            self.report(
                &["web", "listen"],
                "needs at least one address, e.g. [\"127.0.0.1:8000\"]",
            );
        }
        if let Some(warmup) = &web.warmup {
            if !warmup.starts_with('/') {
                self.report(
                    &["web", "warmup"],
                    format!(
                        "must be a path starting with \"/\", e.g. \"/health\", not \"{warmup}\""
                    ),
                );
            }
        }
        let script_name = &web.script_name;
        if !script_name.is_empty() && (!script_name.starts_with('/') || script_name.ends_with('/'))
        {
            self.report(
                &["web", "script_name"],
                format!("must start with \"/\" and not end with one, e.g. \"/app\", not \"{script_name}\""),
            );
        }
        for (position, peer) in web.forwarded_allow_ips.iter().enumerate() {
            if !is_ip_or_cidr(peer) {
                self.report_element(
                    &["web", "forwarded_allow_ips"],
                    position,
                    format!(
                        "\"{peer}\" is not an IP address, a CIDR like \"10.0.0.0/8\", or \"*\""
                    ),
                );
            }
        }
        self.listen_addresses(config, web);
    }

    /// Syntax of every `[web].listen` entry, duplicates among them, and a clash with `[metrics]`.
    fn listen_addresses(&mut self, config: &Config, web: &WebConfig) {
        let mut seen: Vec<(Listen, usize)> = Vec::new();
        let path = ["web", "listen"];
        for (position, text) in web.listen.iter().enumerate() {
            match text.parse::<Listen>() {
                Err(error) => self.report_element(&path, position, error),
                Ok(address) => {
                    if let Some((_, first)) = seen
                        .iter()
                        .find(|(other, _)| other.conflicts_with(&address))
                    {
                        self.report_element(
                            &path,
                            position,
                            format!("\"{text}\" clashes with \"{}\" listed before it; each address can be bound once", web.listen[*first]),
                        );
                    } else {
                        seen.push((address, position));
                    }
                }
            }
        }
        if let Ok(metrics) = config.metrics.listen.parse::<Listen>() {
            if let Some((_, first)) = seen
                .iter()
                .find(|(other, _)| other.conflicts_with(&metrics))
            {
                let listed = &web.listen[*first];
                self.report(
                    &["metrics", "listen"],
                    format!("\"{}\" clashes with [web].listen \"{listed}\"; give the metrics endpoint its own port", config.metrics.listen),
                );
            }
        }
    }

    fn program(&mut self, name: &str, program: &ProgramConfig) {
        let base = ["programs", name];
        if name.trim().is_empty() {
            self.report_key(&base, "a program needs a name, e.g. [programs.celery]");
        }
        let at = |key: &'static str| [base[0], base[1], key];
        if program.command.is_empty() {
            if !self.broken_under(&base) {
                self.report(
                    &at("command"),
                    "a program needs a command, e.g. command = [\"celery\", \"-A\", \"myapp\", \"worker\"]",
                );
            }
        } else if program.command[0].trim().is_empty() {
            self.report_element(&at("command"), 0, "the program to run must not be empty");
        }
        if program.instances == 0 {
            self.report(
                &at("instances"),
                "must be at least 1; remove the program to not run it",
            );
        }
        if stop_signal_name(&program.stop_signal).is_none() {
            let suggestion = did_you_mean(&program.stop_signal.to_ascii_uppercase(), STOP_SIGNALS)
                .map(|s| format!(" (did you mean \"{s}\"?)"))
                .unwrap_or_default();
            self.report(
                &at("stop_signal"),
                format!(
                    "unknown signal \"{}\"{suggestion}; expected one of: {}",
                    program.stop_signal,
                    STOP_SIGNALS.join(", ")
                ),
            );
        }
        if program.max_rss_samples == 0 {
            self.report(&at("max_rss_samples"), "must be at least 1");
        }
        if program.crash_limit == 0 {
            self.report(
                &at("crash_limit"),
                "must be at least 1 (exits within crash_window before the program is given up)",
            );
        }
        if program.crash_window.is_zero() {
            self.report(&at("crash_window"), "must be longer than 0s");
        }
        if program.backoff_max.get() < std::time::Duration::from_secs(1) {
            self.report(
                &at("backoff_max"),
                "must be at least \"1s\", the first restart delay",
            );
        }
        for (key, value) in [("user", &program.user), ("group", &program.group)] {
            if value.as_ref().is_some_and(|v| v.trim().is_empty()) {
                self.report(
                    &at(key),
                    "must not be empty; remove it to keep the supervisor's",
                );
            }
        }
        if program
            .directory
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            self.report(
                &at("directory"),
                "must not be empty; remove it to use [app].directory",
            );
        }
        if program.rlimits.nofile == Some(0) {
            self.report(
                &["programs", name, "rlimits", "nofile"],
                "must be at least 1: the program could not open any file",
            );
        }
        self.env(&at("env"), &program.env);
    }

    fn beat(&mut self, beat: &BeatConfig) {
        let broker = beat.broker.as_str();
        let schemes = ["redis://", "rediss://", "unix://", "redis+unix://"];
        if !schemes.iter().any(|scheme| broker.starts_with(scheme)) {
            self.report(
                &["beat", "broker"],
                format!("\"{broker}\" is not a Redis URL: beat publishes to Redis; expected \"redis://HOST:PORT/DB\", \"rediss://…\" or \"unix:///path/to/redis.sock\""),
            );
        }
        self.timezone(&["beat", "timezone"], &beat.timezone);
        if beat.leader_lock && beat.lock_ttl.get() < std::time::Duration::from_secs(1) {
            self.report(
                &["beat", "lock_ttl"],
                "must be at least \"1s\"; it is renewed at a third of its length",
            );
        }
        if let Some(celery_app) = &beat.celery_app {
            let valid = if celery_app.contains(':') {
                check_python_target(celery_app).is_ok()
            } else {
                is_dotted_name(celery_app)
            };
            if !valid {
                self.report(
                    &["beat", "celery_app"],
                    format!("\"{celery_app}\" is not a Celery app; expected \"module:app\" or \"module\", e.g. \"myapp.celery:app\""),
                );
            }
        }
        for (name, job) in &beat.jobs {
            self.job(name, job);
        }
    }

    fn job(&mut self, name: &str, job: &JobConfig) {
        let base = ["beat", "jobs", name];
        let at = |key: &'static str| [base[0], base[1], base[2], key];
        let broken = self.broken_under(&base);
        if job.task.trim().is_empty() && !broken {
            self.report(
                &at("task"),
                "a job needs the Celery task to send, e.g. task = \"myapp.tasks.cleanup\"",
            );
        }
        match (&job.cron, &job.every) {
            (None, None) if !broken => self.report(
                &base,
                "a job needs a schedule: cron = \"*/5 * * * *\" or every = \"30s\"",
            ),
            (Some(_), Some(_)) => {
                self.report(&at("every"), "set either cron or every, not both");
            }
            (_, Some(every)) if every.is_zero() => {
                self.report(&at("every"), "must be longer than 0s");
            }
            _ => {}
        }
        if let Some(priority) = job.priority {
            if priority > 9 {
                self.report(
                    &at("priority"),
                    format!(
                        "{priority} is out of range; expected 0 to 9 (0 is the highest under Redis)"
                    ),
                );
            }
        }
        if job.expires.is_some_and(|expires| expires.is_zero()) {
            self.report(
                &at("expires"),
                "\"0s\" would expire every task at once; remove it for tasks that never expire",
            );
        }
        if job.queue.trim().is_empty() {
            self.report(&at("queue"), "must not be empty; the default is \"celery\"");
        }
        if let Some(timezone) = &job.timezone {
            self.timezone(&at("timezone"), timezone);
        }
    }

    fn timezone(&mut self, path: &[&str], name: &str) {
        if chrono_tz::Tz::from_str(name).is_ok() {
            return;
        }
        let suggestion = did_you_mean(name, chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()))
            .map(|s| format!(" (did you mean \"{s}\"?)"))
            .unwrap_or_default();
        self.report(
            path,
            format!("unknown time zone \"{name}\"{suggestion}; expected an IANA name such as \"UTC\" or \"Europe/Helsinki\""),
        );
    }

    fn metrics(&mut self, config: &Config) {
        let metrics = &config.metrics;
        if !metrics.listen.is_empty() {
            match metrics.listen.parse::<Listen>() {
                Ok(Listen::Unix(_)) => self.report(
                    &["metrics", "listen"],
                    "Prometheus scrapes over TCP: expected \"host:port\", e.g. \"127.0.0.1:9808\" (or \"\" to turn the endpoint off)",
                ),
                Ok(Listen::Tcp { .. }) => {}
                Err(error) => self.report(&["metrics", "listen"], format!("{error} (or \"\" to turn the endpoint off)")),
            }
        }
        if metrics.token_file.is_some() && metrics.token_env.is_some() {
            self.report(
                &["metrics", "token_env"],
                "set either token_file or token_env, not both",
            );
        }
        if metrics
            .token_env
            .as_ref()
            .is_some_and(|name| name.trim().is_empty())
        {
            self.report(
                &["metrics", "token_env"],
                "must name an environment variable",
            );
        }
        if metrics.sample_interval.is_zero() {
            self.report(
                &["metrics", "sample_interval"],
                "must be longer than 0s, e.g. \"5s\"",
            );
        }
        for (position, queue) in metrics.queues.iter().enumerate() {
            if queue.trim().is_empty() {
                let position = position.to_string();
                self.report(
                    &["metrics", "queues", &position],
                    "a queue name must not be empty",
                );
            }
        }
    }

    /// `[redis]` and `[postgres]`: where their passwords come from, and the variables `url_env`
    /// asks the supervisor to set. Whether the secrets can be read is `secrets::read`'s concern.
    fn services(&mut self, config: &Config) {
        // (section, variable) of each valid `url_env`.
        let mut url_envs: Vec<(&str, &str)> = Vec::new();
        if let Some(redis) = &config.redis {
            self.password_source(
                "redis",
                redis.password_env.as_deref(),
                redis.password_file.is_some(),
            );
            if let Some(name) = &redis.url_env {
                if self.env_name(&["redis", "url_env"], name) {
                    url_envs.push(("redis", name));
                }
                if crate::secrets::broker_url(config).is_none() {
                    self.report(
                        &["redis", "url_env"],
                        "has no broker URL to hand out: set [redis].broker or [beat].broker",
                    );
                }
            }
        }
        if let Some(postgres) = &config.postgres {
            self.password_source(
                "postgres",
                postgres.password_env.as_deref(),
                postgres.password_file.is_some(),
            );
            if let Some(name) = &postgres.url_env {
                if self.env_name(&["postgres", "url_env"], name) {
                    url_envs.push(("postgres", name));
                }
            }
        }
        if let [(_, redis), (_, postgres)] = url_envs[..]
            && redis == postgres
        {
            self.report(
                &["postgres", "url_env"],
                format!(
                    "\"{postgres}\" is [redis].url_env already; give each URL its own variable"
                ),
            );
        }
        // One source of truth: a variable the supervisor sets from [redis]/[postgres] may not
        // also be written by hand, where a password could drift from the real one.
        for (section, name) in url_envs {
            let message = format!(
                "{name} is set twice: [{section}].url_env already sets it (the URL with the password); remove it here"
            );
            if config.app.env.contains_key(name) {
                self.report_key(&["app", "env", name], &message);
            }
            for (program, settings) in &config.programs {
                if settings.env.contains_key(name) {
                    self.report_key(&["programs", program, "env", name], &message);
                }
            }
        }
    }

    /// A section's `password_env` names a variable, and at most one source is given.
    fn password_source(&mut self, section: &str, variable: Option<&str>, has_file: bool) {
        if let Some(name) = variable {
            self.env_name(&[section, "password_env"], name);
            if has_file {
                self.report(
                    &[section, "password_file"],
                    "set either password_env or password_file, not both",
                );
            }
        }
    }

    /// Reports `name` unless it can name an environment variable; true when it can.
    fn env_name(&mut self, path: &[&str], name: &str) -> bool {
        if is_env_name(name) {
            return true;
        }
        self.report(
            path,
            format!("\"{name}\" is not an environment variable name: use letters, digits and \"_\", not starting with a digit, e.g. \"REDIS_PASSWORD\""),
        );
        false
    }

    /// `[hooks]`: every command has something to run, and the timeout can be met.
    fn hooks(&mut self, config: &Config) {
        let hooks = &config.hooks;
        for (key, commands) in [
            ("before_start", &hooks.before_start),
            ("before_reload", &hooks.before_reload),
        ] {
            for (position, argv) in commands.iter().enumerate() {
                match argv.first() {
                    None => self.report_element(
                        &["hooks", key],
                        position,
                        "an empty command runs nothing; write its argv, e.g. [\"python\", \"manage.py\", \"migrate\", \"--noinput\"], or remove it",
                    ),
                    Some(program) if program.trim().is_empty() => self.report_element(
                        &["hooks", key],
                        position,
                        "the program to run must not be empty",
                    ),
                    Some(_) => {}
                }
            }
        }
        if hooks.hook_timeout.is_zero() {
            self.report(
                &["hooks", "hook_timeout"],
                "must be longer than 0s: it bounds each hook command, e.g. \"10m\"",
            );
        }
    }

    fn control(&mut self, config: &Config) {
        if let Some(socket) = &config.control.socket {
            let length = socket.as_os_str().len();
            if length == 0 {
                self.report(
                    &["control", "socket"],
                    "must not be empty; remove it for the default",
                );
            } else if length > MAX_UNIX_SOCKET_PATH {
                self.report(
                    &["control", "socket"],
                    format!("a Unix socket path can be at most {MAX_UNIX_SOCKET_PATH} bytes, this one has {length}; choose a shorter path"),
                );
            }
        }
    }
}

/// Checks `module.path:callable.path`, the form Gunicorn and uWSGI take.
fn check_python_target(text: &str) -> Result<(), &'static str> {
    let Some((module, callable)) = text.split_once(':') else {
        return Err("has no \":\" between module and callable");
    };
    if !is_dotted_name(module) {
        return Err("does not start with a Python module path");
    }
    if !is_dotted_name(callable) {
        return Err("does not end with a Python name");
    }
    Ok(())
}

/// `a.b_c.d`: dot-separated Python identifiers.
fn is_dotted_name(text: &str) -> bool {
    text.split('.').all(|part| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|first| first == '_' || first.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric())
    })
}

/// `"*"`, an IP address, or an IP network in CIDR form.
fn is_ip_or_cidr(text: &str) -> bool {
    if text == "*" {
        return true;
    }
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let Ok(ip) = address.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|prefix| prefix.parse::<u8>().is_ok_and(|bits| bits <= max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::load_str;

    /// `LINE:COL: message` of every problem in `text`.
    fn problems(text: &str) -> Vec<String> {
        match load_str(text, "sauna.toml") {
            Ok(_) => Vec::new(),
            Err(diagnostics) => diagnostics
                .0
                .iter()
                .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                .collect(),
        }
    }

    fn assert_one(text: &str, expected: &str) {
        assert_eq!(problems(text), [expected], "in:\n{text}");
    }

    const APP: &str = "[app]\nwsgi = \"myapp.wsgi:application\"\n";

    #[test]
    fn zero_workers_and_threads_are_refused() {
        let text = format!("{APP}[web]\nworkers = 0\nthreads = 0\n");
        assert_eq!(
            problems(&text),
            [
                "4:11: web.workers: must be at least 1; remove [web] to run without a web pool",
                "5:11: web.threads: must be at least 1 (1 = one request at a time per worker)",
            ]
        );
    }

    #[test]
    fn web_needs_exactly_one_application() {
        assert_one(
            "[web]\nworkers = 2\n",
            "1:1: web: the web pool needs an application: set [app].wsgi = \"module:callable\" or [app].paste = \"production.ini\"",
        );
        assert_one(
            "[app]\nwsgi = \"a:b\"\npaste = \"x.ini\"\n",
            "3:9: app.paste: set either wsgi or paste, not both: paste loads the app from an ini file, wsgi names it directly",
        );
        assert!(problems("[app]\npaste = \"production.ini#main\"\n[web]\n").is_empty());
        assert_one(
            "[app]\npaste = \"x.ini#\"\n",
            "2:9: app.paste: \"x.ini#\" is not a PasteDeploy file; expected \"production.ini\" or \"production.ini#main\"",
        );
    }

    #[test]
    fn a_mistyped_wsgi_is_not_also_reported_as_missing() {
        assert_eq!(
            problems("[app]\nwsgi = 5\n[web]\n"),
            ["2:8: app.wsgi: expected a string, found the integer 5"]
        );
    }

    #[test]
    fn wsgi_must_be_module_colon_callable() {
        assert_one(
            "[app]\nwsgi = \"myapp.wsgi\"\n",
            "2:8: app.wsgi: \"myapp.wsgi\" has no \":\" between module and callable; expected \"module:callable\", e.g. \"myapp.wsgi:application\"",
        );
        assert_one(
            "[app]\nwsgi = \"my-app:app\"\n",
            "2:8: app.wsgi: \"my-app:app\" does not start with a Python module path; expected \"module:callable\", e.g. \"myapp.wsgi:application\"",
        );
        assert!(problems("[app]\nwsgi = \"pkg.sub_mod:make.app\"\n").is_empty());
    }

    #[test]
    fn listen_addresses_are_parsed_and_must_not_clash() {
        let text = format!(
            "{APP}[web]\nlisten = [\"127.0.0.1:8000\", \"unix:/run/a.sock\", \"0.0.0.0:8000\", \"8001\", \"unix:/run/a.sock\"]\n[metrics]\nlisten = \"127.0.0.1:8000\"\n"
        );
        assert_eq!(
            problems(&text),
            [
                "4:49: web.listen[2]: \"0.0.0.0:8000\" clashes with \"127.0.0.1:8000\" listed before it; each address can be bound once",
                "4:65: web.listen[3]: invalid listen address \"8001\": the port is missing; expected \"host:port\", \"[v6]:port\" or \"unix:/absolute/path\"",
                "4:73: web.listen[4]: \"unix:/run/a.sock\" clashes with \"unix:/run/a.sock\" listed before it; each address can be bound once",
                "6:10: metrics.listen: \"127.0.0.1:8000\" clashes with [web].listen \"127.0.0.1:8000\"; give the metrics endpoint its own port",
            ]
        );
        assert_one(
            &format!("{APP}[web]\nlisten = []\n"),
            "4:10: web.listen: needs at least one address, e.g. [\"127.0.0.1:8000\"]",
        );
        assert!(problems(&format!("{APP}[web]\nlisten = [\"[::1]:8000\"]\n")).is_empty());
    }

    #[test]
    fn the_metrics_endpoint_is_tcp_or_off() {
        assert!(problems("[metrics]\nlisten = \"\"\n").is_empty());
        assert_one(
            "[metrics]\nlisten = \"unix:/run/m.sock\"\n",
            "2:10: metrics.listen: Prometheus scrapes over TCP: expected \"host:port\", e.g. \"127.0.0.1:9808\" (or \"\" to turn the endpoint off)",
        );
        assert_one(
            "[metrics]\ntoken_file = \"t\"\ntoken_env = \"T\"\n",
            "3:13: metrics.token_env: set either token_file or token_env, not both",
        );
    }

    #[test]
    fn jitter_needs_max_requests_and_the_queue_needs_room() {
        let text = format!("{APP}[web]\nmax_requests_jitter = 50\nqueue_size = 0\n");
        assert_eq!(
            problems(&text),
            [
                "4:23: web.max_requests_jitter: has no effect without max_requests; set max_requests too, or remove it",
                "5:14: web.queue_size: must be at least 1: requests wait here for a free worker",
            ]
        );
        assert!(
            problems(&format!(
                "{APP}[web]\nmax_requests = 1000\nmax_requests_jitter = 50\n"
            ))
            .is_empty()
        );
    }

    #[test]
    fn a_program_needs_a_command() {
        assert_one(
            "[programs.worker]\ninstances = 2\n",
            "1:1: programs.worker.command: a program needs a command, e.g. command = [\"celery\", \"-A\", \"myapp\", \"worker\"]",
        );
        assert_one(
            "[programs.worker]\ncommand = []\n",
            "2:11: programs.worker.command: a program needs a command, e.g. command = [\"celery\", \"-A\", \"myapp\", \"worker\"]",
        );
        assert_one(
            "[programs.worker]\ncommand = [\"\", \"x\"]\n",
            "2:12: programs.worker.command[0]: the program to run must not be empty",
        );
    }

    #[test]
    fn program_counts_and_signals_are_checked() {
        let text = "[programs.w]\ncommand = [\"x\"]\ninstances = 0\nstop_signal = \"TREM\"\nbackoff_max = \"500ms\"\n";
        assert_eq!(
            problems(text),
            [
                "3:13: programs.w.instances: must be at least 1; remove the program to not run it",
                "4:15: programs.w.stop_signal: unknown signal \"TREM\" (did you mean \"TERM\"?); expected one of: TERM, INT, QUIT, HUP, USR1, USR2, KILL",
                "5:15: programs.w.backoff_max: must be at least \"1s\", the first restart delay",
            ]
        );
        assert!(
            problems("[programs.w]\ncommand = [\"x\"]\nstop_signal = \"sigquit\"\n").is_empty()
        );
    }

    #[test]
    fn stop_signals_are_named_canonically() {
        assert_eq!(stop_signal_name("SIGTERM"), Some("TERM"));
        assert_eq!(stop_signal_name("int"), Some("INT"));
        assert_eq!(stop_signal_name("usr2"), Some("USR2"));
        assert_eq!(stop_signal_name("SIGSEGV"), None);
        assert_eq!(stop_signal_name("15"), None);
    }

    #[test]
    fn environment_names_must_be_usable() {
        assert_one(
            "[app]\nenv = { \"A=B\" = \"1\" }\n",
            "2:9: app.env.\"A=B\": an environment variable name must not be empty or contain \"=\"",
        );
    }

    #[test]
    fn a_job_needs_a_task_and_exactly_one_schedule() {
        assert_eq!(
            problems("[beat.jobs.j]\nqueue = \"q\"\n"),
            [
                "1:1: beat.jobs.j.task: a job needs the Celery task to send, e.g. task = \"myapp.tasks.cleanup\"",
                "1:1: beat.jobs.j: a job needs a schedule: cron = \"*/5 * * * *\" or every = \"30s\"",
            ]
        );
        assert_one(
            "[beat.jobs.j]\ntask = \"t\"\ncron = \"* * * * *\"\nevery = \"1m\"\n",
            "4:9: beat.jobs.j.every: set either cron or every, not both",
        );
        assert_one(
            "[beat.jobs.j]\ntask = \"t\"\nevery = \"0s\"\n",
            "3:9: beat.jobs.j.every: must be longer than 0s",
        );
    }

    #[test]
    fn a_misspelt_schedule_key_is_reported_once() {
        let found = problems("[beat.jobs.j]\ntask = \"t\"\ncorn = \"* * * * *\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0]
                .starts_with("3:1: unknown key \"corn\" in [beat.jobs.j]; did you mean \"cron\"?")
        );
    }

    #[test]
    fn job_priority_expiry_and_time_zones_are_checked() {
        let text = "[beat]\ntimezone = \"Europe/Helsnki\"\n[beat.jobs.j]\ntask = \"t\"\nevery = \"1m\"\npriority = 10\nexpires = \"0s\"\ntimezone = \"Mars/Olympus\"\n";
        assert_eq!(
            problems(text),
            [
                "2:12: beat.timezone: unknown time zone \"Europe/Helsnki\" (did you mean \"Europe/Helsinki\"?); expected an IANA name such as \"UTC\" or \"Europe/Helsinki\"",
                "6:12: beat.jobs.j.priority: 10 is out of range; expected 0 to 9 (0 is the highest under Redis)",
                "7:11: beat.jobs.j.expires: \"0s\" would expire every task at once; remove it for tasks that never expire",
                "8:12: beat.jobs.j.timezone: unknown time zone \"Mars/Olympus\"; expected an IANA name such as \"UTC\" or \"Europe/Helsinki\"",
            ]
        );
        assert!(problems("[beat]\ntimezone = \"America/New_York\"\n").is_empty());
    }

    #[test]
    fn beat_publishes_to_redis_only() {
        assert_one(
            "[beat]\nbroker = \"amqp://guest@localhost//\"\n",
            "2:10: beat.broker: \"amqp://guest@localhost//\" is not a Redis URL: beat publishes to Redis; expected \"redis://HOST:PORT/DB\", \"rediss://…\" or \"unix:///path/to/redis.sock\"",
        );
        assert!(
            problems("[beat]\nbroker = \"rediss://h:6380/1\"\ncelery_app = \"proj.celery:app\"\n")
                .is_empty()
        );
    }

    #[test]
    fn web_paths_and_trusted_peers_are_checked() {
        let text = format!(
            "{APP}[web]\nwarmup = \"health\"\nscript_name = \"/app/\"\nforwarded_allow_ips = [\"10.0.0.0/8\", \"*\", \"10.0.0.0/33\"]\n"
        );
        assert_eq!(
            problems(&text),
            [
                "4:10: web.warmup: must be a path starting with \"/\", e.g. \"/health\", not \"health\"",
                "5:15: web.script_name: must start with \"/\" and not end with one, e.g. \"/app\", not \"/app/\"",
                "6:43: web.forwarded_allow_ips[2]: \"10.0.0.0/33\" is not an IP address, a CIDR like \"10.0.0.0/8\", or \"*\"",
            ]
        );
    }

    #[test]
    fn secret_sources_and_url_variables_are_checked() {
        let text = "[redis]\npassword_env = \"REDIS-PW\"\npassword_file = \"/etc/pw\"\nurl_env = \"BROKER URL\"\n[postgres]\nurl_env = \"DATABASE_URL\"\n";
        assert_eq!(
            problems(text),
            [
                "2:16: redis.password_env: \"REDIS-PW\" is not an environment variable name: use letters, digits and \"_\", not starting with a digit, e.g. \"REDIS_PASSWORD\"",
                "3:17: redis.password_file: set either password_env or password_file, not both",
                "4:11: redis.url_env: \"BROKER URL\" is not an environment variable name: use letters, digits and \"_\", not starting with a digit, e.g. \"REDIS_PASSWORD\"",
                "4:11: redis.url_env: has no broker URL to hand out: set [redis].broker or [beat].broker",
            ]
        );
        assert!(
            problems("[beat]\n[redis]\npassword_file = \"pw\"\nurl_env = \"CELERY_BROKER_URL\"\n")
                .is_empty()
        );
    }

    #[test]
    fn a_url_variable_set_by_hand_too_is_set_twice() {
        let text = "[app]\nenv = { CELERY_BROKER_URL = \"redis://h/1\" }\n[programs.w]\ncommand = [\"x\"]\nenv = { DATABASE_URL = \"postgres://x\" }\n[beat]\n[redis]\nurl_env = \"CELERY_BROKER_URL\"\n[postgres]\nurl_env = \"DATABASE_URL\"\n";
        assert_eq!(
            problems(text),
            [
                "2:9: app.env.CELERY_BROKER_URL: CELERY_BROKER_URL is set twice: [redis].url_env already sets it (the URL with the password); remove it here",
                "5:9: programs.w.env.DATABASE_URL: DATABASE_URL is set twice: [postgres].url_env already sets it (the URL with the password); remove it here",
            ]
        );
        assert_one(
            "[beat]\n[redis]\nurl_env = \"URL\"\n[postgres]\nurl_env = \"URL\"\n",
            "5:11: postgres.url_env: \"URL\" is [redis].url_env already; give each URL its own variable",
        );
    }

    #[test]
    fn hooks_are_lists_of_commands() {
        let text = "[hooks]\nbefore_start = [[\"python\", \"manage.py\", \"migrate\"]]\nbefore_reload = [[\"python\", \"manage.py\", \"migrate\", \"--noinput\"], [\"python\", \"manage.py\", \"collectstatic\", \"--noinput\"]]\nhook_timeout = \"90s\"\n";
        let config = load_str(text, "sauna.toml").unwrap();
        assert_eq!(
            config.hooks.before_start,
            [["python", "manage.py", "migrate"]]
        );
        assert_eq!(config.hooks.before_reload.len(), 2);
        assert_eq!(config.hooks.before_reload[1][2], "collectstatic");
        assert_eq!(config.hooks.hook_timeout.get().as_secs(), 90);
        let defaults = load_str("", "sauna.toml").unwrap().hooks;
        assert!(defaults.before_start.is_empty() && defaults.before_reload.is_empty());
        assert_eq!(defaults.hook_timeout.get().as_secs(), 600);
        assert!(problems("[hooks]\nbefore_reload = []\n").is_empty());
    }

    #[test]
    fn empty_hook_commands_and_a_zero_timeout_are_refused() {
        assert_eq!(
            problems(
                "[hooks]\nbefore_start = [[\"true\"], []]\nbefore_reload = [[\"\", \"x\"]]\nhook_timeout = \"0s\"\n"
            ),
            [
                "2:27: hooks.before_start[1]: an empty command runs nothing; write its argv, e.g. [\"python\", \"manage.py\", \"migrate\", \"--noinput\"], or remove it",
                "3:18: hooks.before_reload[0]: the program to run must not be empty",
                "4:16: hooks.hook_timeout: must be longer than 0s: it bounds each hook command, e.g. \"10m\"",
            ]
        );
    }

    #[test]
    fn hook_types_are_checked_where_they_are_written() {
        assert_eq!(
            problems(
                "[hooks]\nbefore_reload = [\"python\", \"manage.py\", \"migrate\"]\nbefore_start = \"python manage.py migrate\"\nhook_timeout = 600\n"
            ),
            [
                "2:17: hooks.before_reload: each command is an array of its own inside the list: write [[\"python\", \"manage.py\", \"migrate\"]]",
                "3:16: hooks.before_start: expected a list of commands, found the string \"python manage.py migrate\"; write [[\"python\", \"manage.py\", \"migrate\"]]",
                "4:16: hooks.hook_timeout: a bare number is ambiguous here: write a unit, e.g. \"600s\"",
            ]
        );
        assert_eq!(
            problems(
                "[hooks]\nbefore_reload = [[\"python\", 5]]\nhook_timeout = \"ten minutes\"\n"
            ),
            [
                "2:29: hooks.before_reload: expected a string, found the integer 5",
                "3:16: hooks.hook_timeout: invalid duration \"ten minutes\": expected a number with a unit, like \"500ms\", \"30s\", \"5m\", \"1h30m\" or \"1d\"",
            ]
        );
        let unknown = problems("[hooks]\nbefore_deploy = [[\"true\"]]\n");
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert!(
            unknown[0].starts_with("2:1: unknown key \"before_deploy\" in [hooks]"),
            "{unknown:?}"
        );
    }

    #[test]
    fn a_control_socket_path_must_fit_in_sun_path() {
        let long = format!("/{}", "s".repeat(120));
        let found = problems(&format!("[control]\nsocket = \"{long}\"\n"));
        assert_eq!(found.len(), 1);
        assert!(
            found[0]
                .starts_with("2:10: control.socket: a Unix socket path can be at most 107 bytes")
        );
    }
}
