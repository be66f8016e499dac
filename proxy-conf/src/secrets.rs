//! The secrets `sauna.toml` names but never holds — the Redis password (`[redis].password_env` or
//! `password_file`) and the PostgreSQL password (`[postgres].password_env` or `password_file`) —
//! read once per configuration load (`run` at start, each `reload`, `check`) into [`Secrets`],
//! and what is built from them: the URLs handed to the app and the programs through
//! `[redis].url_env` and `[postgres].url_env`, with the password percent-encoded. Also
//! [`redact_url`], the one way a URL that may carry a password is printed.
//!
//! A [`Secret`] never shows its value through `Debug` or `Display`; code that needs the value asks
//! for it by name ([`Secret::expose`]), so every use can be found. Connecting to Redis or
//! PostgreSQL with the passwords belongs to the supervisor; this module only reads and formats.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::config::Config;
use crate::diagnostics::Diagnostic;
use crate::load::Loaded;
use crate::stack::PostgresConfig;

/// A password, or a URL that holds one. Its `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value read from a secret source.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that must send it (a connection, a child's
    /// environment). Never for a log line, a status field or a command line.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Every secret the configuration names, read from this process's environment and files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// `[redis].password_env` / `password_file`: beat, the queue sampler and `check --live`
    /// authenticate with it when a broker URL carries no password of its own; `emit redis`
    /// writes its hash.
    pub redis_password: Option<Secret>,
    /// `[postgres].password_env` / `password_file`: the app role's password.
    pub postgres_password: Option<Secret>,
}

impl Secrets {
    /// The variables `[redis].url_env` and `[postgres].url_env` ask for, with their values: the
    /// broker URL (`[redis].broker`, else `[beat].broker`) with the Redis password added, and
    /// `postgres://USER:PASSWORD@127.0.0.1:PORT/DATABASE`.
    pub fn environment(&self, config: &Config) -> Vec<(String, Secret)> {
        let mut variables = Vec::new();
        if let Some(redis) = &config.redis
            && let Some(name) = &redis.url_env
            && let Some(broker) = broker_url(config)
        {
            let url = with_password(broker, self.redis_password.as_ref());
            variables.push((name.clone(), Secret(url)));
        }
        if let Some(postgres) = &config.postgres
            && let Some(name) = &postgres.url_env
        {
            let url = database_url(postgres, self.postgres_password.as_ref());
            variables.push((name.clone(), Secret(url)));
        }
        variables
    }
}

/// The broker URL `[redis].url_env` hands out: `[redis].broker`, else `[beat].broker`.
pub fn broker_url(config: &Config) -> Option<&str> {
    config
        .redis
        .as_ref()
        .and_then(|redis| redis.broker.as_deref())
        .or_else(|| config.beat.as_ref().map(|beat| beat.broker.as_str()))
}

/// Reads every secret `loaded` names from this process's environment and from files. Each
/// problem is a diagnostic pointing at the key that named the source.
pub fn read(loaded: &Loaded) -> Result<Secrets, Vec<Diagnostic>> {
    read_with(loaded, |name| std::env::var_os(name))
}

/// [`read`] with the environment given as a lookup function, so tests need not change the
/// process's own.
fn read_with(
    loaded: &Loaded,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Secrets, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    let config = &loaded.config;
    let mut secrets = Secrets::default();
    if let Some(redis) = &config.redis {
        secrets.redis_password = read_one(
            loaded,
            "redis",
            redis.password_env.as_deref(),
            redis.password_file.as_deref(),
            &env,
            &mut problems,
        );
    }
    if let Some(postgres) = &config.postgres {
        secrets.postgres_password = read_one(
            loaded,
            "postgres",
            postgres.password_env.as_deref(),
            postgres.password_file.as_deref(),
            &env,
            &mut problems,
        );
    }
    if problems.is_empty() {
        Ok(secrets)
    } else {
        Err(problems)
    }
}

/// One section's password: the variable when one is named (validation refuses naming both),
/// else the file.
fn read_one(
    loaded: &Loaded,
    section: &str,
    variable: Option<&str>,
    file: Option<&Path>,
    env: &impl Fn(&str) -> Option<OsString>,
    problems: &mut Vec<Diagnostic>,
) -> Option<Secret> {
    let mut problem = |key: &str, message: String| {
        problems.push(loaded.diagnostic_at(&[section, key], format!("{section}.{key}: {message}")));
    };
    if let Some(name) = variable {
        // A name validation refuses is reported there; looking it up would only add noise.
        if !is_env_name(name) {
            return None;
        }
        return match env(name).map(OsString::into_string) {
            None => {
                problem(
                    "password_env",
                    format!(
                        "{name} is not set in the supervisor's environment; set it (under systemd, in the unit's EnvironmentFile=) or name a password_file instead"
                    ),
                );
                None
            }
            Some(Err(_)) => {
                problem("password_env", format!("{name} is not valid UTF-8"));
                None
            }
            Some(Ok(value)) if value.is_empty() => {
                problem("password_env", format!("{name} is set but empty"));
                None
            }
            Some(Ok(value)) => Some(Secret(value)),
        };
    }
    let path = file?;
    match std::fs::read_to_string(path) {
        Err(error) => {
            problem(
                "password_file",
                format!("cannot read {}: {error}", path.display()),
            );
            None
        }
        Ok(text) => {
            let value = without_line_end(&text);
            if value.is_empty() {
                problem("password_file", format!("{} is empty", path.display()));
                None
            } else {
                Some(Secret(value.to_owned()))
            }
        }
    }
}

/// The contents of a password file without the one line end an editor or `echo` leaves
/// (`\n` or `\r\n`); anything else is part of the password.
pub fn without_line_end(text: &str) -> &str {
    let text = text.strip_suffix('\n').unwrap_or(text);
    text.strip_suffix('\r').unwrap_or(text)
}

/// Makes `secrets` part of `loaded`: kept in [`Loaded::secrets`] for the supervisor's own
/// connections, and each `url_env` variable added to `[app].env`, which every web worker,
/// program and Celery schedule import inherits. Validation has made sure that neither `[app].env`
/// nor any `[programs.NAME].env` sets one of these variables itself, so nothing is overwritten.
pub fn install(loaded: &mut Loaded, secrets: Secrets) {
    for (name, value) in secrets.environment(&loaded.config) {
        loaded.config.app.env.insert(name, value.0);
    }
    loaded.secrets = secrets;
}

/// Characters left as they are in a URL's user info or path segment: RFC 3986's unreserved ones.
/// Everything else (`@`, `:`, `/`, `%`, `#`, spaces, non-ASCII) is percent-encoded, which
/// redis-py, kombu, redis-rs, dj-database-url and libpq all decode.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// `url` (`redis://`, `rediss://`, `unix://`, `redis+socket://`) with `password` in its user
/// info, percent-encoded: `redis://:PASSWORD@host:port/db`, `unix://:PASSWORD@/path.sock`. A URL
/// that already carries a password keeps it as written; a user name in it is kept.
pub fn with_password(url: &str, password: Option<&Secret>) -> String {
    let Some(password) = password else {
        return url.to_owned();
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let encoded = encode(password.expose());
    // The last '@' ends the user info, as in `emit::redis::parse_url`.
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((_, own)) if !own.is_empty() => url.to_owned(),
            Some((user, _)) => format!("{scheme}://{user}:{encoded}@{host}"),
            None => format!("{scheme}://{userinfo}:{encoded}@{host}"),
        },
        None => format!("{scheme}://:{encoded}@{rest}"),
    }
}

/// The app role's connection URL, `postgres://USER:PASSWORD@127.0.0.1:PORT/DATABASE` (no
/// `:PASSWORD` without one): loopback, where the generated `pg_hba.conf` admits the role.
pub fn database_url(postgres: &PostgresConfig, password: Option<&Secret>) -> String {
    let password = password
        .map(|password| format!(":{}", encode(password.expose())))
        .unwrap_or_default();
    format!(
        "postgres://{}{password}@127.0.0.1:{}/{}",
        encode(&postgres.user),
        postgres.port,
        encode(&postgres.database)
    )
}

/// A URL fit for a log line, a status field or an error: the password in its user info, if any,
/// replaced by `***` (`redis://:***@host/3`, `redis://user:***@host/3`). User info without a
/// `:` is hidden whole (`redis://***@host`), since some clients read it as a password.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:***@{host}"),
            None => format!("{scheme}***@{host}"),
        },
        None => url.to_owned(),
    }
}

/// A POSIX environment variable name: a letter or `_`, then letters, digits and `_`.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::load::load_str;

    fn loaded(text: &str) -> Loaded {
        Loaded {
            config: load_str(text, "sauna.toml").unwrap(),
            path: PathBuf::from("sauna.toml"),
            source: text.to_owned(),
            secrets: Secrets::default(),
        }
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: BTreeMap<String, OsString> = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), OsString::from(value)))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn secrets_never_print_their_value() {
        let secrets = Secrets {
            redis_password: Some(Secret::new("hunter2")),
            postgres_password: Some(Secret::new("swordfish")),
        };
        let shown = format!("{secrets:?} {}", Secret::new("hunter2"));
        assert!(
            !shown.contains("hunter2") && !shown.contains("swordfish"),
            "{shown}"
        );
        assert_eq!(secrets.redis_password.unwrap().expose(), "hunter2");
    }

    #[test]
    fn passwords_come_from_the_variable_or_the_file() {
        let dir = std::env::temp_dir().join(format!("proxy-conf-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("db.password");
        std::fs::write(&file, "line one\r\n").unwrap();
        let text = format!(
            "[redis]\npassword_env = \"REDIS_PW\"\n[postgres]\npassword_file = \"{}\"\n",
            file.display()
        );
        let secrets = read_with(&loaded(&text), env(&[("REDIS_PW", "p@ss\n")])).unwrap();
        assert_eq!(secrets.redis_password.unwrap().expose(), "p@ss\n");
        assert_eq!(secrets.postgres_password.unwrap().expose(), "line one");
        std::fs::write(&file, "two\n\n").unwrap();
        let secrets = read_with(&loaded(&text), env(&[("REDIS_PW", "x")])).unwrap();
        assert_eq!(
            secrets.postgres_password.unwrap().expose(),
            "two\n",
            "only one line end is dropped"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_secret_points_at_the_key_that_names_it() {
        let text = "[redis]\npassword_env = \"REDIS_PW\"\n\n[postgres]\npassword_file = \"/nonexistent/db.pw\"\n";
        let problems: Vec<String> = read_with(&loaded(text), env(&[]))
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "sauna.toml:2:16: redis.password_env: REDIS_PW is not set in the supervisor's environment"
            ),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with(
                "sauna.toml:5:17: postgres.password_file: cannot read /nonexistent/db.pw: "
            ),
            "{problems:?}"
        );
        let empty = read_with(&loaded(text), env(&[("REDIS_PW", "")])).unwrap_err();
        assert_eq!(
            empty[0].to_string(),
            "sauna.toml:2:16: redis.password_env: REDIS_PW is set but empty"
        );
        assert_eq!(
            read_with(&loaded("[redis]\n"), env(&[])).unwrap(),
            Secrets::default(),
            "nothing named, nothing needed"
        );
    }

    #[test]
    fn passwords_are_percent_encoded_into_urls_that_have_none() {
        let password = Secret::new("p@ss:w/rd%?#é ~");
        let encoded = "p%40ss%3Aw%2Frd%25%3F%23%C3%A9%20~";
        assert_eq!(
            with_password("redis://127.0.0.1:6379/3", Some(&password)),
            format!("redis://:{encoded}@127.0.0.1:6379/3")
        );
        assert_eq!(
            with_password("redis://celery@127.0.0.1/0", Some(&password)),
            format!("redis://celery:{encoded}@127.0.0.1/0")
        );
        assert_eq!(
            with_password("unix:///run/redis.sock?db=2", Some(&password)),
            format!("unix://:{encoded}@/run/redis.sock?db=2")
        );
        assert_eq!(
            with_password("redis://:own@h/1", Some(&password)),
            "redis://:own@h/1",
            "a password in the URL is kept"
        );
        assert_eq!(with_password("redis://h/1", None), "redis://h/1");
    }

    #[test]
    fn the_database_url_names_the_role_port_and_database() {
        let postgres = PostgresConfig {
            database: "shop db".to_owned(),
            user: "shop".to_owned(),
            port: 5433,
            ..PostgresConfig::default()
        };
        assert_eq!(
            database_url(&postgres, Some(&Secret::new("a:b@c"))),
            "postgres://shop:a%3Ab%40c@127.0.0.1:5433/shop%20db"
        );
        assert_eq!(
            database_url(&postgres, None),
            "postgres://shop@127.0.0.1:5433/shop%20db"
        );
    }

    #[test]
    fn url_env_variables_are_installed_into_the_app_environment() {
        let text = "[beat]\nbroker = \"redis://127.0.0.1:6390/3\"\n[redis]\nurl_env = \"CELERY_BROKER_URL\"\n[postgres]\nuser = \"u\"\ndatabase = \"d\"\nurl_env = \"DATABASE_URL\"\n";
        let mut loaded = loaded(text);
        let secrets = Secrets {
            redis_password: Some(Secret::new("r/1")),
            postgres_password: Some(Secret::new("p 2")),
        };
        install(&mut loaded, secrets.clone());
        let env = &loaded.config.app.env;
        assert_eq!(env["CELERY_BROKER_URL"], "redis://:r%2F1@127.0.0.1:6390/3");
        assert_eq!(env["DATABASE_URL"], "postgres://u:p%202@127.0.0.1:5432/d");
        assert_eq!(loaded.secrets, secrets);
    }

    #[test]
    fn redaction_hides_every_password_form() {
        for (url, shown) in [
            ("redis://:s3cret@host:6379/3", "redis://:***@host:6379/3"),
            ("redis://user:s3cret@host/0", "redis://user:***@host/0"),
            ("redis://:pa/ss@word@host/0", "redis://:***@host/0"),
            ("redis://s3cret@host/0", "redis://***@host/0"),
            (
                "unix://:s3cret@/run/redis.sock",
                "unix://:***@/run/redis.sock",
            ),
            ("redis://host:6379/0", "redis://host:6379/0"),
            ("unix:///run/redis.sock", "unix:///run/redis.sock"),
            (":s3cret@host", ":***@host"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn environment_names_are_posix() {
        assert!(is_env_name("CELERY_BROKER_URL") && is_env_name("_x1"));
        assert!(!is_env_name("") && !is_env_name("1A") && !is_env_name("A-B"));
        assert!(!is_env_name("A=B") && !is_env_name("DATABASE URL"));
    }
}
