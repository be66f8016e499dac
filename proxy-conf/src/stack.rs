//! The sections that describe the services around the supervisor — `[deploy]` (the nginx edge and
//! the systemd unit), `[redis]` and `[postgres]` — and the reading of the secrets they name. Only
//! what `emit` and `check --live` need lives here; how the files are written belongs to
//! [`crate::emit`]. Secrets are never stored in the file: a key names an environment variable or a
//! file, and [`crate::secrets`] (or [`read_secret`], for `emit`) fetches the value when a command
//! needs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, Duration};

/// `[deploy]`: the nginx edge in front of the web pool and the systemd unit that runs it all.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeployConfig {
    /// Names the upstream, the generated files and the units; letters, digits, `_` and `-`.
    pub name: String,
    /// nginx `server_name`s; the first one also names the Let's Encrypt certificate directory.
    pub server_names: Vec<String>,
    /// Scale-out: hosts running this same `sauna.toml`; the upstream lists each of them on the TCP
    /// port of `[web].listen`. Empty: the local `[web].listen` addresses.
    pub app_hosts: Vec<String>,
    /// Port of the plain HTTP server (the redirect and ACME server when TLS is on).
    pub http_port: u16,
    /// Port of the TLS server.
    pub https_port: u16,
    /// Also listen on IPv6 (`[::]:PORT`).
    pub ipv6: bool,
    /// URL prefix → directory served by nginx from disk, e.g. `"/static/" = "/srv/app/static"`.
    #[serde(rename = "static")]
    pub static_dirs: BTreeMap<String, PathBuf>,
    /// Cache lifetime of static files (`Cache-Control: max-age`).
    pub static_max_age: Duration,
    /// URL prefixes proxied with the WebSocket `Upgrade` handshake.
    pub websocket: Vec<String>,
    /// nginx access log; default `/var/log/nginx/NAME.access.log`.
    pub access_log: Option<PathBuf>,
    /// nginx error log; default `/var/log/nginx/NAME.error.log`.
    pub error_log: Option<PathBuf>,
    /// TLS; absent means plain HTTP only.
    pub tls: Option<TlsConfig>,
    /// A password in front of the whole site (staging); absent means none.
    pub staging: Option<StagingConfig>,
    /// nginx `proxy_cache` for responses the app marks cacheable; absent means no cache.
    pub cache: Option<CacheConfig>,
    /// The systemd unit.
    pub systemd: SystemdConfig,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            name: "sauna".to_owned(),
            server_names: vec!["_".to_owned()],
            app_hosts: Vec::new(),
            http_port: 80,
            https_port: 443,
            ipv6: true,
            static_dirs: BTreeMap::new(),
            static_max_age: Duration::from_secs(30 * 86400),
            websocket: Vec::new(),
            access_log: None,
            error_log: None,
            tls: None,
            staging: None,
            cache: None,
            systemd: SystemdConfig::default(),
        }
    }
}

/// `[deploy.tls]`: either a given certificate and key, or Let's Encrypt through an ACME webroot.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; default with `acme_webroot`:
    /// `/etc/letsencrypt/live/FIRST_SERVER_NAME/fullchain.pem`.
    pub certificate: Option<PathBuf>,
    /// PEM private key; default with `acme_webroot`: `…/privkey.pem` beside the certificate.
    pub key: Option<PathBuf>,
    /// Directory served at `/.well-known/acme-challenge/` on the HTTP port (certbot `--webroot`).
    pub acme_webroot: Option<PathBuf>,
    /// `Strict-Transport-Security` max-age; `"0"` turns HSTS off.
    pub hsts: Option<Duration>,
}

/// `[deploy.staging]`: HTTP basic authentication for the whole site.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagingConfig {
    /// The htpasswd file; `sauna-supervisor htpasswd USER >> FILE` adds entries.
    pub htpasswd: PathBuf,
    /// The realm shown by browsers.
    pub realm: String,
}

impl Default for StagingConfig {
    fn default() -> Self {
        StagingConfig {
            htpasswd: PathBuf::from("/etc/nginx/sauna.htpasswd"),
            realm: "Staging".to_owned(),
        }
    }
}

/// `[deploy.cache]`: where nginx keeps cached responses.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Cache directory; default `/var/cache/nginx/NAME`.
    pub path: Option<PathBuf>,
    /// Largest size of the cache on disk.
    pub max_size: ByteSize,
    /// Entries not requested for this long are removed whatever their freshness.
    pub inactive: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            path: None,
            max_size: ByteSize(1 << 30),
            inactive: Duration::from_secs(3600),
        }
    }
}

/// `[deploy.systemd]`: the unit that runs the supervisor.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SystemdConfig {
    /// The installed binary.
    pub binary: PathBuf,
    /// Where `sauna.toml` is installed.
    pub config: PathBuf,
    /// Unix user the supervisor runs as.
    pub user: String,
    /// Unix group the supervisor runs as.
    pub group: String,
    /// Paths the app may write (`ReadWritePaths`; everything else is read-only).
    pub writable_paths: Vec<PathBuf>,
    /// `LimitNOFILE`.
    pub limit_nofile: u64,
    /// `WatchdogSec`; `"0"` turns the watchdog off.
    pub watchdog: Duration,
}

impl Default for SystemdConfig {
    fn default() -> Self {
        SystemdConfig {
            binary: PathBuf::from("/usr/local/bin/sauna-supervisor"),
            config: PathBuf::from("/etc/sauna/sauna.toml"),
            user: "sauna".to_owned(),
            group: "sauna".to_owned(),
            writable_paths: Vec::new(),
            limit_nofile: 65536,
            watchdog: Duration::from_secs(30),
        }
    }
}

/// `[redis]`: the broker instance (and an optional cache instance) the Celery side relies on.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// The Celery broker URL; default `[beat].broker`.
    pub broker: Option<String>,
    /// Environment variable holding the Redis password.
    pub password_env: Option<String>,
    /// File holding the Redis password.
    pub password_file: Option<PathBuf>,
    /// Environment variable the supervisor sets, for the web workers and every program, to the
    /// full broker URL with the password (see `crate::secrets`).
    pub url_env: Option<String>,
    /// Parent of each instance's data directory (`DIR/NAME-broker`, `DIR/NAME-cache`).
    pub dir: PathBuf,
    /// The `redis-server` binary used by the generated units.
    pub server: PathBuf,
    /// Unix user and group the Redis units run as (Debian's package creates `redis`).
    pub user: String,
    /// Memory limit of the broker; `"0"` = none. The broker never evicts: when full, writes fail.
    pub broker_maxmemory: ByteSize,
    /// A separate instance for sessions and cache; absent means the app has no Redis cache.
    pub cache: Option<RedisCacheConfig>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            broker: None,
            password_env: None,
            password_file: None,
            url_env: None,
            dir: PathBuf::from("/var/lib/redis"),
            server: PathBuf::from("/usr/bin/redis-server"),
            user: "redis".to_owned(),
            broker_maxmemory: ByteSize(0),
            cache: None,
        }
    }
}

/// `[redis.cache]`: the sessions/cache instance.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisCacheConfig {
    /// The URL the app uses for sessions and cache.
    pub url: String,
    /// Memory limit; the policy evicts beyond it.
    pub maxmemory: ByteSize,
    /// An evicting `maxmemory-policy`, e.g. `allkeys-lru` or `allkeys-lfu`.
    pub policy: String,
}

impl Default for RedisCacheConfig {
    fn default() -> Self {
        RedisCacheConfig {
            url: "redis://127.0.0.1:6380/1".to_owned(),
            maxmemory: ByteSize(256 << 20),
            policy: "allkeys-lru".to_owned(),
        }
    }
}

/// `[postgres]`: the application database, its role and the server sizing.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Database name.
    pub database: String,
    /// The app's login role, owner of the database.
    pub user: String,
    /// Environment variable holding the app role's password.
    pub password_env: Option<String>,
    /// File holding the app role's password.
    pub password_file: Option<PathBuf>,
    /// Environment variable the supervisor sets, for the web workers and every program, to
    /// `postgres://USER:PASSWORD@127.0.0.1:PORT/DATABASE` (see `crate::secrets`).
    pub url_env: Option<String>,
    /// The server port.
    pub port: u16,
    /// Memory the sizing assumes; default the machine's total memory.
    pub memory: Option<ByteSize>,
    /// Connections beyond what the stack needs: migrations, shells, cron jobs, monitoring.
    pub extra_connections: u32,
    /// The administrative role, allowed over the local socket with `peer` authentication.
    pub admin: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            database: "sauna".to_owned(),
            user: "sauna".to_owned(),
            password_env: None,
            password_file: None,
            url_env: None,
            port: 5432,
            memory: None,
            extra_connections: 10,
            admin: "postgres".to_owned(),
        }
    }
}

/// A secret named by the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set (or not UTF-8).
    #[error("{key}: environment variable {var} is not set; export it or use a password file")]
    MissingEnv {
        /// The key that named it.
        key: String,
        /// The variable.
        var: String,
    },
    /// The file could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    File {
        /// The key that named it.
        key: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Reads a secret from the environment variable or the file (validation refuses naming both). The
/// line end of the file is not part of the secret. `section` names the table in messages, e.g.
/// `"[redis]"`. `emit` uses it for the one secret it needs; `run`, `reload` and `check` read every
/// secret at once with [`crate::secrets::read`], whose problems point at `FILE:LINE:COL`.
pub fn read_secret(
    section: &str,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<String>, SecretError> {
    if let Some(var) = env {
        return match std::env::var(var) {
            Ok(value) => Ok(Some(value)),
            Err(_) => Err(SecretError::MissingEnv {
                key: format!("{section} password_env"),
                var: var.to_owned(),
            }),
        };
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::File {
            key: format!("{section} password_file"),
            path: path.to_owned(),
            source,
        })?;
        return Ok(Some(crate::secrets::without_line_end(&text).to_owned()));
    }
    Ok(None)
}
