//! The Redis instances the stack relies on, derived from every broker URL the configuration
//! mentions, and their `redis.conf` files. The Celery broker holds queues, unacknowledged tasks and
//! beat's leader lock: nothing there may be evicted and all of it must survive a restart, so its
//! instance runs `noeviction` with AOF. Sessions and cache want the opposite (evict the least used
//! key when full), so `[redis.cache]` gets its own instance when it names its own port. When the
//! cache URL points at the broker's instance the broker's policy wins — the only safe choice, since
//! `volatile-*` policies would evict beat's lock, which has a TTL — and a warning says why.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{EmitError, File, Output, Problem, Secrets, Service, check_name, copy, deploy, header};
use crate::config::Config;
use crate::stack::RedisConfig;

/// Where a Redis server listens.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    /// A TCP host and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A parsed `redis://`, `redis+socket://` or `unix://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// The server.
    pub endpoint: Endpoint,
    /// Database index.
    pub db: u32,
    /// Password from the URL's user info, if any.
    pub password: Option<String>,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisUrl")
            .field("endpoint", &self.endpoint)
            .field("db", &self.db)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish()
    }
}

/// Parses the URL forms Celery, kombu and redis-py accept for a Redis server. The message names
/// the URL only by its endpoint, so a password in it never reaches a log.
pub fn parse_url(url: &str) -> Result<RedisUrl, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "is not a URL: expected redis://HOST:PORT/DB".to_owned())?;
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let query_db = query.and_then(|query| {
        query
            .split('&')
            .find_map(|pair| match pair.split_once('=') {
                Some(("db" | "virtual_host", value)) => Some(value),
                _ => None,
            })
    });
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, rest),
    };
    let password = userinfo
        .map(|info| info.split_once(':').map_or(info, |(_, pass)| pass))
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    let parse_db = |text: &str| -> Result<u32, String> {
        if text.is_empty() {
            Ok(0)
        } else {
            text.parse()
                .map_err(|_| format!("has database {text:?}: expected a number"))
        }
    };
    match scheme {
        "redis" => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| "has an unclosed '[' in its host".to_owned())?;
                (host.to_owned(), after.strip_prefix(':').unwrap_or(""))
            } else {
                match authority.rsplit_once(':') {
                    Some((host, port)) => (host.to_owned(), port),
                    None => (authority.to_owned(), ""),
                }
            };
            let port = if port.is_empty() {
                6379
            } else {
                port.parse()
                    .map_err(|_| format!("has port {port:?}: expected a number"))?
            };
            let host = if host.is_empty() {
                "localhost".to_owned()
            } else {
                host
            };
            let db = parse_db(query_db.unwrap_or(path))?;
            Ok(RedisUrl {
                endpoint: Endpoint::Tcp { host, port },
                db,
                password,
            })
        }
        "redis+socket" | "unix" | "socket" => {
            if rest.is_empty() {
                return Err("names no socket path".to_owned());
            }
            Ok(RedisUrl {
                endpoint: Endpoint::Unix(PathBuf::from(rest)),
                db: parse_db(query_db.unwrap_or(""))?,
                password,
            })
        }
        "rediss" => Err(
            "uses TLS (rediss://), which the generated Redis does not serve; use redis:// on loopback or a unix socket"
                .to_owned(),
        ),
        other => Err(format!("has scheme {other:?}: expected redis://, redis+socket:// or unix://")),
    }
}

/// What an instance is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The Celery broker (possibly shared with sessions and cache).
    Broker,
    /// Sessions and cache only.
    Cache,
}

/// One Redis server of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// What it is for.
    pub role: Role,
    /// `NAME-broker` or `NAME-cache`.
    pub name: String,
    /// Where it listens.
    pub endpoint: Endpoint,
    /// `databases`: one more than the highest index any URL uses, at least Redis' 16.
    pub databases: u32,
    /// `maxmemory` in bytes; 0 = none.
    pub maxmemory: u64,
    /// `maxmemory-policy`.
    pub policy: String,
    /// AOF persistence.
    pub appendonly: bool,
    /// Which keys use it and with which index, for the comment and for messages.
    pub users: Vec<(String, u32)>,
}

/// The policies Redis accepts.
const POLICIES: &[&str] = &[
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
];

/// The instances `[redis]` describes, with a warning when the cache shares the broker.
pub fn instances(config: &Config) -> Result<(Vec<Instance>, Vec<String>), EmitError> {
    let redis = config.redis.clone().unwrap_or_default();
    let name = deploy(config).name;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut urls: Vec<(BrokerUrl, RedisUrl)> = Vec::new();
    for found in broker_urls(config, &redis) {
        match parse_url(&found.url) {
            Ok(parsed) => urls.push((found, parsed)),
            Err(why) => problems.push(Problem::at(&found.key, format!("{} {why}", found.label))),
        }
    }
    let Some((first_found, first)) = urls.first().cloned() else {
        problems.push(Problem::at(
            &["redis"],
            "emit redis: no broker URL: set [beat].broker or [redis].broker (redis://127.0.0.1:6379/3)",
        ));
        return Err(EmitError(problems));
    };
    for (found, url) in &urls[1..] {
        if url.endpoint != first.endpoint {
            problems.push(Problem::at(
                &found.key,
                format!(
                    "{} points at {} but {} at {}: every broker URL must name the same server",
                    found.label, url.endpoint, first_found.label, first.endpoint
                ),
            ));
        }
    }
    let mut broker = Instance {
        role: Role::Broker,
        name: format!("{name}-broker"),
        endpoint: first.endpoint.clone(),
        databases: 16,
        maxmemory: redis.broker_maxmemory.bytes(),
        policy: "noeviction".to_owned(),
        appendonly: true,
        users: urls
            .iter()
            .map(|(found, url)| (found.label.clone(), url.db))
            .collect(),
    };
    let mut list = Vec::new();
    if let Some(cache) = &redis.cache {
        if !POLICIES.contains(&cache.policy.as_str()) {
            problems.push(Problem::at(
                &["redis", "cache", "policy"],
                format!(
                    "[redis.cache].policy {:?}: expected one of {}",
                    cache.policy,
                    POLICIES.join(", ")
                ),
            ));
        }
        match parse_url(&cache.url) {
            Err(why) => problems.push(Problem::at(
                &["redis", "cache", "url"],
                format!("[redis.cache].url {why}"),
            )),
            Ok(url) if url.endpoint == broker.endpoint => {
                warnings.push(format!(
                    "[redis.cache].url shares the broker's server {}: it keeps noeviction and AOF (an evicting policy would drop Celery queues, and volatile-* would drop beat's leader lock), so a full cache makes writes fail instead of evicting; give the cache its own port to let it evict",
                    broker.endpoint
                ));
                broker.users.push(("[redis.cache].url".to_owned(), url.db));
            }
            Ok(url) => list.push(Instance {
                role: Role::Cache,
                name: format!("{name}-cache"),
                endpoint: url.endpoint,
                databases: 16,
                maxmemory: cache.maxmemory.bytes(),
                policy: cache.policy.clone(),
                appendonly: false,
                users: vec![("[redis.cache].url".to_owned(), url.db)],
            }),
        }
    }
    list.insert(0, broker);
    for instance in &mut list {
        let highest = instance.users.iter().map(|(_, db)| *db).max().unwrap_or(0);
        instance.databases = instance.databases.max(highest + 1);
        if let Endpoint::Tcp { host, .. } = &instance.endpoint
            && !is_loopback(host)
        {
            warnings.push(format!(
                "redis {}: listens on {host}, which is not loopback; protected mode then needs a password ([redis].password_env or password_file) and a firewall",
                instance.name
            ));
        }
    }
    if problems.is_empty() {
        Ok((list, warnings))
    } else {
        Err(EmitError(problems))
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A broker URL the configuration mentions, and where.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// The key as messages name it, e.g. `[beat].broker`.
    pub label: String,
    /// The key's path, e.g. `["beat", "broker"]`, for `FILE:LINE:COL`.
    pub key: Vec<String>,
    /// The URL as written (it may hold a password).
    pub url: String,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUrl")
            .field("label", &self.label)
            .field("url", &crate::secrets::redact_url(&self.url))
            .finish()
    }
}

/// Every broker URL the configuration mentions: `[redis].broker`, `[beat].broker`,
/// `CELERY_BROKER_URL` in `[app].env` and programs' env, and `-b`/`--broker` on Celery command
/// lines. A `CELERY_BROKER_URL` that `[redis].url_env` sets is the broker URL itself and not
/// listed again.
pub fn broker_urls(config: &Config, redis: &RedisConfig) -> Vec<BrokerUrl> {
    let found = |label: String, key: &[&str], url: &str| BrokerUrl {
        label,
        key: key.iter().map(|part| (*part).to_owned()).collect(),
        url: url.to_owned(),
    };
    let env_name = "CELERY_BROKER_URL";
    let from_env = redis.url_env.as_deref() != Some(env_name);
    let mut urls = Vec::new();
    if let Some(url) = &redis.broker {
        urls.push(found(
            "[redis].broker".to_owned(),
            &["redis", "broker"],
            url,
        ));
    }
    if let Some(beat) = &config.beat {
        urls.push(found(
            "[beat].broker".to_owned(),
            &["beat", "broker"],
            &beat.broker,
        ));
    }
    if let Some(url) = config.app.env.get(env_name).filter(|_| from_env) {
        urls.push(found(
            format!("[app].env.{env_name}"),
            &["app", "env", env_name],
            url,
        ));
    }
    for (name, program) in &config.programs {
        if let Some(url) = program.env.get(env_name).filter(|_| from_env) {
            urls.push(found(
                format!("[programs.{name}].env.{env_name}"),
                &["programs", name, "env", env_name],
                url,
            ));
        }
        for (position, url) in command_brokers(&program.command) {
            urls.push(found(
                format!("[programs.{name}].command --broker"),
                &["programs", name, "command", &position.to_string()],
                url,
            ));
        }
    }
    urls
}

/// `-b URL`, `--broker URL` and `--broker=URL` on a command line, with the index of the
/// argument that holds the URL.
fn command_brokers(command: &[String]) -> Vec<(usize, &str)> {
    let mut found = Vec::new();
    let mut args = command.iter().enumerate();
    while let Some((position, arg)) = args.next() {
        match arg.as_str() {
            "-b" | "--broker" => {
                if let Some((position, url)) = args.next() {
                    found.push((position, url.as_str()));
                }
            }
            other => {
                if let Some(url) = other.strip_prefix("--broker=") {
                    found.push((position, url));
                }
            }
        }
    }
    found
}

/// Renders one `redis.conf` per instance and a note on the password.
pub fn render(config: &Config, secrets: &Secrets) -> Result<Output, EmitError> {
    let mut problems = Vec::new();
    check_name(&deploy(config), &mut problems);
    if !problems.is_empty() {
        return Err(EmitError(problems));
    }
    let redis = config.redis.clone().unwrap_or_default();
    let (instances, warnings) = instances(config)?;
    let mut output = Output {
        warnings,
        ..Output::default()
    };
    for instance in &instances {
        // Readable by the redis group only: it carries the password's hash.
        output.files.push(File {
            path: format!("redis/{}.conf", instance.name),
            service: Service::Redis,
            install: copy(conf_path(instance), 0o640, "root", &redis.user),
            contents: render_instance(instance, &redis, secrets),
        });
    }
    Ok(output)
}

/// Where an instance's `redis.conf` is installed (its unit reads it from there).
pub fn conf_path(instance: &Instance) -> PathBuf {
    PathBuf::from(format!("/etc/redis/{}.conf", instance.name))
}

/// The data directory of an instance.
pub fn data_dir(redis: &RedisConfig, instance: &Instance) -> PathBuf {
    redis.dir.join(&instance.name)
}

fn render_instance(instance: &Instance, redis: &RedisConfig, secrets: &Secrets) -> String {
    let mut out = header("#", "redis");
    match instance.role {
        Role::Broker => out.push_str(
            "# The Celery broker: queues, unacknowledged tasks and beat's leader lock. None of it may be\n\
             # evicted (noeviction: a full server refuses writes instead) and all of it must survive a\n\
             # restart (AOF, fsync every second).\n",
        ),
        Role::Cache => out.push_str(
            "# Sessions and cache: when full, the least recently used keys are evicted.\n",
        ),
    }
    out.push_str("# Used by:\n");
    for (key, db) in &instance.users {
        let _ = writeln!(out, "#   {key}: database {db}");
    }
    out.push('\n');
    match &instance.endpoint {
        Endpoint::Tcp { host, port } => {
            let bind = if host == "localhost" {
                "127.0.0.1 -::1".to_owned()
            } else {
                host.clone()
            };
            let _ = writeln!(out, "bind {bind}\nport {port}");
        }
        Endpoint::Unix(path) => {
            let _ = writeln!(
                out,
                "# Unix socket only: no TCP port.\nport 0\nunixsocket {}\nunixsocketperm 770",
                path.display()
            );
        }
    }
    out.push_str("protected-mode yes\ndaemonize no\nsupervised systemd\nlogfile \"\"\n");
    let _ = writeln!(out, "dir {}", data_dir(redis, instance).display());
    let _ = writeln!(
        out,
        "# One more than the highest database index used above (Redis' default is 16).\ndatabases {}",
        instance.databases
    );
    let _ = writeln!(
        out,
        "maxmemory {}\nmaxmemory-policy {}",
        instance.maxmemory, instance.policy
    );
    if instance.appendonly {
        out.push_str("appendonly yes\nappendfsync everysec\naof-use-rdb-preamble yes\n");
    } else {
        out.push_str("appendonly no\n");
    }
    out.push_str("save 3600 1 300 100 60 10000\n");
    if let Some(password) = &secrets.redis_password {
        let _ = writeln!(
            out,
            "# The password from {} as an ACL SHA-256 hash: this file holds no plain-text secret.\nuser default on #{} ~* &* +@all",
            secret_source(redis),
            sha256_hex(password.expose())
        );
    }
    out
}

fn secret_source(redis: &RedisConfig) -> String {
    match (&redis.password_env, &redis.password_file) {
        (Some(var), _) => format!("${var}"),
        (None, Some(file)) => file.display().to_string(),
        (None, None) => "the broker URL".to_owned(),
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().fold(String::new(), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

/// The password the stack's Redis uses: `[redis].password_env`/`password_file`, else the one in
/// the broker URL.
pub fn password(config: &Config) -> Result<Option<String>, crate::stack::SecretError> {
    let redis = config.redis.clone().unwrap_or_default();
    if let Some(secret) = crate::stack::read_secret(
        "[redis]",
        redis.password_env.as_deref(),
        redis.password_file.as_deref(),
    )? {
        return Ok(Some(secret));
    }
    Ok(url_password(config))
}

/// The first password written into a broker URL of the configuration, if any.
pub fn url_password(config: &Config) -> Option<String> {
    let redis = config.redis.clone().unwrap_or_default();
    broker_urls(config, &redis)
        .into_iter()
        .find_map(|found| parse_url(&found.url).ok().and_then(|url| url.password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_every_accepted_form_parse() {
        let url = parse_url("redis://:s3cret@127.0.0.1:6380/3").unwrap();
        assert_eq!(
            url.endpoint,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 6380
            }
        );
        assert_eq!((url.db, url.password.as_deref()), (3, Some("s3cret")));
        let url = parse_url("redis://localhost").unwrap();
        assert_eq!(url.db, 0);
        assert_eq!(url.endpoint.to_string(), "localhost:6379");
        let url = parse_url("redis://[::1]:7000/2").unwrap();
        assert_eq!(url.endpoint.to_string(), "[::1]:7000");
        let url = parse_url("redis+socket:///run/redis/broker.sock?virtual_host=5").unwrap();
        assert_eq!(
            url.endpoint,
            Endpoint::Unix(PathBuf::from("/run/redis/broker.sock"))
        );
        assert_eq!(url.db, 5);
        assert_eq!(parse_url("unix:///tmp/r.sock?db=4").unwrap().db, 4);
        assert!(parse_url("rediss://host/0").is_err());
        assert!(parse_url("redis://host:port/0").is_err());
        assert!(parse_url("127.0.0.1:6379").is_err());
    }

    #[test]
    fn a_url_password_never_shows_in_debug_output() {
        let url = parse_url("redis://user:hunter2@h/1").unwrap();
        assert!(!format!("{url:?}").contains("hunter2"));
    }
}
