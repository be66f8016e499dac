//! Judging a raw `sauna.toml` and turning it into the typed [`Config`] the runtime reads, in one
//! pass: every check of a value or of several values together lives here, and each value that
//! passes comes out as its type (`Listen`, `Tz`, `Cron`, `NonZeroUsize`…). Each finding is pinned
//! to the key or value at fault (or to its table's header when the culprit is a missing key). A
//! value that fails is reported and replaced by a harmless stand-in, so that the rest can still
//! be judged; `load` never hands out a config that had findings. What a single value's TOML type
//! is belongs to `de`; whether the app imports, or the secrets can be read, is found out later.
//!
//! The sections with many rules have their own file: `web`, `programs`, `beat`.

mod beat;
mod programs;
mod web;

use std::collections::{BTreeMap, BTreeSet};
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;

use crate::config::{AppConfig, AppTarget, Config, HooksConfig, MetricsConfig};
use crate::listen::{Listen, MAX_UNIX_SOCKET_PATH};
use crate::locate::{KeyIndex, display_path};
use crate::schema::{ControlConfig, RawApp, RawConfig, RawHooks, RawMetrics};
use crate::secrets::is_env_name;

/// One problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    /// Byte range of the offending value, key or table header.
    pub span: Range<usize>,
    /// What is wrong, naming the key, and what to write instead.
    pub message: String,
}

/// Runs every check on `raw` and builds the typed configuration. `broken` holds key paths whose
/// value already failed to load: a check about a table with such a key stays silent, since the
/// user's real mistake is already reported and a second message about the defaulted value would
/// only mislead.
pub(crate) fn validate(
    raw: &RawConfig,
    index: &KeyIndex,
    broken: &BTreeSet<Vec<String>>,
) -> (Config, Vec<Finding>) {
    let mut checker = Checker {
        index,
        broken,
        findings: Vec::new(),
    };
    let app = checker.app(&raw.app);
    let metrics = checker.metrics(&raw.metrics);
    let server_names = raw
        .deploy
        .as_ref()
        .map_or(&[][..], |deploy| &deploy.server_names[..]);
    let web = raw.web.as_ref().map(|web| {
        checker.web(
            web,
            &app,
            (&raw.metrics.listen, metrics.listen),
            server_names,
        )
    });
    let programs = raw
        .programs
        .iter()
        .map(|(name, program)| (name.clone(), checker.program(name, program)))
        .collect();
    let beat = raw.beat.as_ref().map(|beat| checker.beat(beat));
    checker.control(&raw.control);
    let hooks = checker.hooks(&raw.hooks);
    let config = Config {
        app,
        web,
        programs,
        beat,
        metrics,
        control: raw.control.clone(),
        deploy: raw.deploy.clone(),
        redis: raw.redis.clone(),
        postgres: raw.postgres.clone(),
        hooks,
    };
    checker.services(&config);
    (config, checker.findings)
}

/// Collects findings while the typed values are built.
pub(crate) struct Checker<'a> {
    index: &'a KeyIndex,
    broken: &'a BTreeSet<Vec<String>>,
    findings: Vec<Finding>,
}

impl Checker<'_> {
    /// The typed value `build` makes from a raw default: the `Default` of the typed structs, so
    /// that every default is written once, in `schema`. The defaults are valid (the config tests
    /// check them), and there is no file to point into, so findings are dropped.
    pub(crate) fn defaults<T>(build: impl FnOnce(&mut Checker<'_>) -> T) -> T {
        let index = KeyIndex::default();
        let broken = BTreeSet::new();
        let mut checker = Checker {
            index: &index,
            broken: &broken,
            findings: Vec::new(),
        };
        build(&mut checker)
    }

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

    /// A count of at least 1; zero is reported with `why` (and read as 1).
    fn count(&mut self, path: &[&str], value: u32, why: &str) -> NonZeroUsize {
        match usize::try_from(value).ok().and_then(NonZeroUsize::new) {
            Some(count) => count,
            None => {
                self.report(path, why);
                NonZeroUsize::MIN
            }
        }
    }

    /// [`Checker::count`] for a count kept as `u32`.
    fn count_u32(&mut self, path: &[&str], value: u32, why: &str) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap_or_else(|| {
            self.report(path, why);
            NonZeroU32::MIN
        })
    }

    /// `[app]`. The application is taken as written even when its syntax is reported, so that
    /// `[web]` does not also say it is missing.
    pub(crate) fn app(&mut self, app: &RawApp) -> AppConfig {
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
        let target = match (&app.wsgi, &app.paste) {
            (Some(wsgi), _) => Some(AppTarget::Wsgi(wsgi.clone())),
            (None, Some(paste)) => Some(AppTarget::Paste(paste.clone())),
            (None, None) => None,
        };
        AppConfig {
            directory: app.directory.clone(),
            python: app.python.clone(),
            target,
            env: app.env.clone(),
        }
    }

    fn env(&mut self, path: &[&str], env: &BTreeMap<String, String>) {
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

    /// `[metrics]`; `listen = ""` turns the endpoint off.
    pub(crate) fn metrics(&mut self, metrics: &RawMetrics) -> MetricsConfig {
        let listen = if metrics.listen.is_empty() {
            None
        } else {
            match metrics.listen.parse::<Listen>() {
                Ok(Listen::Tcp(address)) => Some(address),
                Ok(Listen::Unix(_)) => {
                    self.report(
                        &["metrics", "listen"],
                        "Prometheus scrapes over TCP: expected \"host:port\", e.g. \"127.0.0.1:9808\" (or \"\" to turn the endpoint off)",
                    );
                    None
                }
                Err(error) => {
                    self.report(
                        &["metrics", "listen"],
                        format!("{error} (or \"\" to turn the endpoint off)"),
                    );
                    None
                }
            }
        };
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
        MetricsConfig {
            listen,
            token_file: metrics.token_file.clone(),
            token_env: metrics.token_env.clone(),
            queues: metrics.queues.clone(),
            sample_interval: metrics.sample_interval,
            broker: metrics.broker.clone(),
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
    pub(crate) fn hooks(&mut self, raw: &RawHooks) -> HooksConfig {
        for (key, commands) in [
            ("before_start", &raw.before_start),
            ("before_reload", &raw.before_reload),
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
        if raw.hook_timeout.is_zero() {
            self.report(
                &["hooks", "hook_timeout"],
                "must be longer than 0s: it bounds each hook command, e.g. \"10m\"",
            );
        }
        HooksConfig {
            before_start: raw.before_start.clone(),
            before_reload: raw.before_reload.clone(),
            hook_timeout: raw.hook_timeout,
        }
    }

    fn control(&mut self, control: &ControlConfig) {
        if let Some(socket) = &control.socket {
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
pub(super) fn check_python_target(text: &str) -> Result<(), &'static str> {
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

#[cfg(test)]
mod tests {
    use crate::load::load_str;

    /// `LINE:COL: message` of every problem in `text`.
    pub(super) fn problems(text: &str) -> Vec<String> {
        match load_str(text, "sauna.toml") {
            Ok(_) => Vec::new(),
            Err(diagnostics) => diagnostics
                .0
                .iter()
                .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                .collect(),
        }
    }

    pub(super) fn assert_one(text: &str, expected: &str) {
        assert_eq!(problems(text), [expected], "in:\n{text}");
    }

    pub(super) const APP: &str = "[app]\nwsgi = \"myapp.wsgi:application\"\n";

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
    fn the_metrics_endpoint_is_tcp_or_off() {
        assert!(problems("[metrics]\nlisten = \"\"\n").is_empty());
        let off = load_str("[metrics]\nlisten = \"\"\n", "sauna.toml").unwrap();
        assert_eq!(off.metrics.listen, None);
        let on = load_str("[metrics]\nlisten = \"[::1]:9100\"\n", "sauna.toml").unwrap();
        assert_eq!(on.metrics.listen, Some("[::1]:9100".parse().unwrap()));
        assert_one(
            "[metrics]\nlisten = \"localhost:9808\"\n",
            "2:10: metrics.listen: invalid listen address \"localhost:9808\": \"localhost\" is not an IP address (the socket is bound without DNS; write \"127.0.0.1\" for localhost); expected \"host:port\", \"[v6]:port\" or \"unix:/absolute/path\" (or \"\" to turn the endpoint off)",
        );
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
    fn a_control_socket_path_must_fit_in_sun_path() {
        let long = format!("/{}", "s".repeat(120));
        let found = problems(&format!("[control]\nsocket = \"{long}\"\n"));
        assert_eq!(found.len(), 1);
        assert!(
            found[0]
                .starts_with("2:10: control.socket: a Unix socket path can be at most 107 bytes")
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
}
