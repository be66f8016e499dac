//! The configuration the runtime reads: every value of `sauna.toml` already checked and turned
//! into what it stands for — listen addresses as [`Listen`], time zones as [`Tz`], cron
//! expressions as parsed [`Cron`] specs, trusted proxies as [`Forwarders`], stop signals as
//! [`StopSignal`], the reload's warm-up as a [`WarmUp`] with its host chosen, counts that cannot
//! be zero as `NonZero*`, durations as [`Duration`]. Nothing
//! downstream parses a string from the file again, and nothing re-checks what the types already
//! guarantee.
//!
//! `load` builds a [`Config`] from the raw `schema` through `validate`, which is the one place
//! that judges values and reports each problem at its `FILE:LINE:COL`. The `Default` of each
//! struct is the raw default run through the same conversion, so the defaults live once, in
//! `schema`. Sections that `emit` alone reads (`[deploy]`, `[redis]`, `[postgres]`) keep their
//! `stack` types.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;

pub use chrono_tz::Tz;

use crate::cron::Cron;
use crate::diagnostics::did_you_mean;
use crate::forwarded::Forwarders;
use crate::listen::Listen;
use crate::schema::{CatchUp, ControlConfig, ProgramReload, RestartPolicy, Rlimits};
use crate::signal::StopSignal;
use crate::stack::{DeployConfig, PostgresConfig, RedisConfig};
use crate::units::{ByteSize, Duration};
use crate::validate::Checker;
use crate::warm_up::WarmUp;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// `[app]`: the Python application shared by the web pool and, by default, by programs.
    pub app: AppConfig,
    /// `[web]`: the WSGI web pool; `None` means no web role.
    pub web: Option<WebConfig>,
    /// `[programs.NAME]`: supervised commands by name, started by ascending `priority`, then in
    /// name order.
    pub programs: BTreeMap<String, ProgramConfig>,
    /// `[beat]`: the Celery beat replacement; `None` means no beat role.
    pub beat: Option<BeatConfig>,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[control]`: the control socket used by `status`, `stop` and `reload`.
    pub control: ControlConfig,
    /// `[deploy]`: the nginx edge and the systemd unit (`emit`).
    pub deploy: Option<DeployConfig>,
    /// `[redis]`: the Redis instances (`emit redis`, `check --live`).
    pub redis: Option<RedisConfig>,
    /// `[postgres]`: the PostgreSQL database (`emit postgres`, `check --live`).
    pub postgres: Option<PostgresConfig>,
    /// `[hooks]`: deploy steps run before the roles start and before each reload's canary.
    pub hooks: HooksConfig,
}

/// `[app]`: where the Python application lives and how to run it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    /// `directory`: working directory, first on `sys.path`; relative paths are already joined
    /// onto the config file's directory by `load_file`.
    pub directory: Option<PathBuf>,
    /// `python`: the interpreter for workers and the default for programs; a bare name is
    /// looked up on `PATH`.
    pub python: String,
    /// `wsgi` or `paste`: the application the web pool serves; `Some` whenever `[web]` is set.
    pub target: Option<AppTarget>,
    /// `env`: extra environment for workers and programs.
    pub env: BTreeMap<String, String>,
}

impl Default for AppConfig {
    fn default() -> Self {
        Checker::defaults(|checker| checker.app(&Default::default()))
    }
}

/// How the web pool finds the WSGI application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppTarget {
    /// `wsgi = "module:callable"`, the form Gunicorn and uWSGI take.
    Wsgi(String),
    /// `paste = "production.ini"` or `"production.ini#main"`: a PasteDeploy ini file.
    Paste(String),
}

impl AppTarget {
    /// The key it was given as: `"wsgi"` or `"paste"` (the worker's loading mode).
    pub fn kind(&self) -> &'static str {
        match self {
            AppTarget::Wsgi(_) => "wsgi",
            AppTarget::Paste(_) => "paste",
        }
    }

    /// The value as written.
    pub fn value(&self) -> &str {
        match self {
            AppTarget::Wsgi(target) | AppTarget::Paste(target) => target,
        }
    }
}

/// Smallest `[web].max_header_size`: below it a browser's ordinary head with a few cookies and a
/// long URL is refused (gunicorn's per-field limit and nginx's per-line buffer are 8 KiB too).
pub const MIN_HEADER_SIZE: u64 = 8 << 10;
/// Largest `[web].max_header_size`: every open connection may hold this much while its head
/// arrives, so it stays far below what a crowd of slow clients could turn into memory pressure.
pub const MAX_HEADER_SIZE: u64 = 1 << 20;

/// Most `threads` a worker can have with `preload`: a worker forked from the template gets all
/// its descriptors (3 per thread: slot, offer eventfd, ring; plus control, offer memfd, stdout,
/// stderr) in one `SCM_RIGHTS` message, and the kernel passes at most 253 (`SCM_MAX_FD`).
pub const MAX_PRELOAD_THREADS: usize = (253 - 4) / 3;

/// `[web]`: the HTTP front and its pool of Python workers.
#[derive(Debug, Clone, PartialEq)]
pub struct WebConfig {
    /// `listen`: addresses to listen on, at least one, none clashing with another.
    pub listen: Vec<Listen>,
    /// `workers`: number of worker processes.
    pub workers: NonZeroUsize,
    /// `threads`: request slots per worker.
    pub threads: NonZeroUsize,
    /// `timeout`: per-request deadline (stack logged, worker killed, 504); 0 = none.
    pub timeout: Duration,
    /// `max_requests`: recycle a worker after this many requests; 0 = never.
    pub max_requests: u64,
    /// `max_requests_jitter`: a random 0..=jitter added to `max_requests` per worker.
    pub max_requests_jitter: u64,
    /// `max_rss`: recycle a worker after its request when its RSS exceeds this; 0 = off.
    pub max_rss: ByteSize,
    /// `queue_size`: requests allowed to wait for a free worker; beyond that → 503.
    pub queue_size: NonZeroUsize,
    /// `queue_timeout`: a request that waited longer than this → 503; 0 = no limit.
    pub queue_timeout: Duration,
    /// `max_body`: largest accepted request body → 413 beyond.
    pub max_body: ByteSize,
    /// `body_buffer`: bodies larger than this are buffered in a temporary file.
    pub body_buffer: ByteSize,
    /// `max_header_size`: largest request head, request line and header fields together → 431
    /// beyond; between [`MIN_HEADER_SIZE`](crate::MIN_HEADER_SIZE) and
    /// [`MAX_HEADER_SIZE`](crate::MAX_HEADER_SIZE).
    pub max_header_size: ByteSize,
    /// `graceful_timeout`: time old workers get to finish in-flight requests.
    pub graceful_timeout: Duration,
    /// `reload_timeout`: longest time a new generation may take to become ready.
    pub reload_timeout: Duration,
    /// `warmup`: the request sent through the canary during `reload`, with the `Host` it
    /// names already chosen (the URL's, else `[deploy].server_names`', else `localhost`).
    pub warmup: Option<WarmUp>,
    /// `script_name`: mount prefix given to the app as `SCRIPT_NAME`; empty, or starting with
    /// `/` and not ending with one.
    pub script_name: String,
    /// `forwarded_allow_ips`: peers whose `X-Forwarded-For`/`-Proto` headers are trusted.
    pub forwarded_allow_ips: Forwarders,
    /// `access_log`: one log line per request.
    pub access_log: bool,
    /// `backlog`: kernel accept backlog of each listening socket.
    pub backlog: u32,
    /// `preload`: one template process per generation imports the app, `gc.freeze()`s it and
    /// forks the workers, which share its memory copy-on-write.
    pub preload: bool,
    /// `post_fork`: `module:callable` called in each worker forked from the template (with
    /// `preload`), before it serves, to reopen what must not be shared across processes.
    pub post_fork: Option<String>,
}

impl Default for WebConfig {
    fn default() -> Self {
        Checker::defaults(|checker| checker.web_values(&Default::default(), &[]))
    }
}

/// `[programs.NAME]`: a supervised command such as a Celery worker.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramConfig {
    /// `command`: argv, never empty; `"python"` first means `[app].python`.
    pub command: Vec<String>,
    /// `instances`: number of identical instances.
    pub instances: NonZeroUsize,
    /// `directory`: working directory; defaults to `[app].directory`.
    pub directory: Option<PathBuf>,
    /// `env`: extra environment, on top of `[app].env`.
    pub env: BTreeMap<String, String>,
    /// `user`: user to run as (only when the supervisor runs as root); resolved at spawn.
    pub user: Option<String>,
    /// `group`: group to run as (only when the supervisor runs as root); resolved at spawn.
    pub group: Option<String>,
    /// `restart`: when to start it again after an exit.
    pub restart: RestartPolicy,
    /// `stop_signal`: sent to the program's process group to stop it.
    pub stop_signal: StopSignal,
    /// `stop_timeout`: time between `stop_signal` and SIGKILL of the whole group.
    pub stop_timeout: Duration,
    /// `max_rss`: RSS of the whole process tree above which the program is restarted; 0 = off.
    pub max_rss: ByteSize,
    /// `max_rss_samples`: consecutive samples over `max_rss` before the restart.
    pub max_rss_samples: NonZeroU32,
    /// `backoff_max`: longest delay between restarts (at least 1 s, the first delay).
    pub backoff_max: Duration,
    /// `stable_after`: running this long resets the backoff and the crash counter.
    pub stable_after: Duration,
    /// `crash_limit`: this many exits within `crash_window` make the program `fatal`.
    pub crash_limit: NonZeroU32,
    /// `crash_window`: window over which `crash_limit` exits are counted; never zero.
    pub crash_window: Duration,
    /// `ready_after`: time a new instance must survive to count as started.
    pub ready_after: Duration,
    /// `reload`: how `reload` treats this program.
    pub reload: ProgramReload,
    /// `priority`: lower starts earlier and stops later; equal priorities go in name order.
    pub priority: i64,
    /// `rlimits`: resource limits.
    pub rlimits: Rlimits,
}

impl Default for ProgramConfig {
    /// The defaults of every key, with an empty `command` (which a loaded file never has).
    fn default() -> Self {
        Checker::defaults(|checker| checker.program("", &Default::default()))
    }
}

/// `[beat]`: the scheduler that publishes Celery tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct BeatConfig {
    /// `broker`: the Redis URL the Celery workers consume from (`redis://`, `rediss://`,
    /// `unix://`); the Redis client parses the rest.
    pub broker: String,
    /// `timezone`: default zone of cron jobs.
    pub timezone: Tz,
    /// `leader_lock`: elect one publisher among supervisors sharing the broker.
    pub leader_lock: bool,
    /// `lock_ttl`: lock time-to-live (at least 1 s with `leader_lock`); renewed at a third of it.
    pub lock_ttl: Duration,
    /// `key_prefix`: prefix of beat's Redis keys.
    pub key_prefix: String,
    /// `celery_app`: `module:app` of a Celery app whose `beat_schedule` is imported.
    pub celery_app: Option<String>,
    /// `[beat.jobs.NAME]`: jobs by name.
    pub jobs: BTreeMap<String, JobConfig>,
}

impl Default for BeatConfig {
    fn default() -> Self {
        Checker::defaults(|checker| checker.beat(&Default::default()))
    }
}

/// `[beat.jobs.NAME]`: one schedule entry.
#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    /// `task`: registered Celery task name, never empty.
    pub task: String,
    /// `cron` or `every`, exactly one of them.
    pub schedule: JobSchedule,
    /// `args`: positional arguments.
    pub args: Vec<toml::Value>,
    /// `kwargs`: keyword arguments.
    pub kwargs: toml::Table,
    /// `queue`: queue (routing key), never empty.
    pub queue: String,
    /// `priority`: 0..=9 (0 is the highest under Redis).
    pub priority: Option<u8>,
    /// `expires`: the worker discards the task when it starts later than this; never zero.
    pub expires: Option<Duration>,
    /// `timezone`, else `[beat].timezone`: the zone a cron schedule is read in.
    pub timezone: Tz,
    /// `catch_up`: missed-slot policy.
    pub catch_up: CatchUp,
    /// `catch_up_window`: how far back missed slots are considered; `None`: no limit (`once`
    /// publishes the latest missed slot, `all` every one, at most the newest 1000).
    pub catch_up_window: Option<Duration>,
}

/// When a job fires.
#[derive(Debug, Clone, PartialEq)]
pub enum JobSchedule {
    /// `cron = "…"`: a crontab read in the job's time zone.
    Cron(Cron),
    /// `every = "…"`: a fixed interval, never zero.
    Every(Duration),
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// `listen`: the TCP address to serve on; `None` when the file sets `""` (endpoint off).
    pub listen: Option<SocketAddr>,
    /// `token_file`: file holding the bearer token scrapes must present.
    pub token_file: Option<PathBuf>,
    /// `token_env`: environment variable holding the bearer token (never with `token_file`).
    pub token_env: Option<String>,
    /// `queues`: Celery queues whose length is exported, besides those derived from programs.
    pub queues: Vec<String>,
    /// `sample_interval`: how often queue lengths and RSS are sampled; never zero.
    pub sample_interval: Duration,
    /// `broker`: Redis URL whose Celery queue lengths are sampled; defaults to `[beat].broker`,
    /// then `[redis].broker`.
    pub broker: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Checker::defaults(|checker| checker.metrics(&Default::default()))
    }
}

/// `[hooks]`: commands a deploy needs run with the new release before it serves — migrations,
/// `collectstatic` — the way a Capistrano or Ansible deploy runs them before the restart.
#[derive(Debug, Clone, PartialEq)]
pub struct HooksConfig {
    /// `before_start`: run once by `run`, in order, before any role starts; a failure stops the
    /// start. Every command has a non-empty first word; `"python"` means `[app].python`.
    pub before_start: Vec<Vec<String>>,
    /// `before_reload`: run by each `reload`, in order, after the config is re-read and before
    /// the canary; a failure refuses the reload with nothing changed. Commands as above.
    pub before_reload: Vec<Vec<String>>,
    /// `hook_timeout`: longest time one command may run before its process group is killed;
    /// never zero.
    pub hook_timeout: Duration,
}

impl Default for HooksConfig {
    fn default() -> Self {
        Checker::defaults(|checker| checker.hooks(&Default::default()))
    }
}

/// Why a time zone name was refused; the text suggests the closest IANA name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimeZoneError(String);

/// Parses an IANA time zone name such as `"Europe/Helsinki"`, for `sauna.toml` and for the
/// `--timezone` flag alike.
pub fn parse_time_zone(name: &str) -> Result<Tz, TimeZoneError> {
    Tz::from_str(name).map_err(|_| {
        let suggestion = did_you_mean(name, chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()))
            .map(|s| format!(" (did you mean \"{s}\"?)"))
            .unwrap_or_default();
        TimeZoneError(format!(
            "unknown time zone \"{name}\"{suggestion}; expected an IANA name such as \"UTC\" or \"Europe/Helsinki\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_schema_defaults_typed() {
        let web = WebConfig::default();
        assert_eq!(web.listen, ["127.0.0.1:8000".parse().unwrap()]);
        assert_eq!(web.workers.get(), 2);
        assert_eq!(web.threads.get(), 1);
        assert_eq!(web.queue_size.get(), 1024);
        assert_eq!(web.forwarded_allow_ips.entries(), ["127.0.0.1", "::1"]);
        let program = ProgramConfig::default();
        assert_eq!(program.instances.get(), 1);
        assert_eq!(program.stop_signal, StopSignal::Term);
        assert_eq!(program.crash_limit.get(), 5);
        assert_eq!(program.priority, 999);
        assert_eq!(BeatConfig::default().timezone, Tz::UTC);
        assert_eq!(
            MetricsConfig::default().listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9808)))
        );
        assert_eq!(AppConfig::default().python, "python3");
        assert_eq!(AppConfig::default().target, None);
    }

    #[test]
    fn time_zones_are_iana_names() {
        assert_eq!(parse_time_zone("Europe/Helsinki"), Ok(Tz::Europe__Helsinki));
        assert_eq!(
            parse_time_zone("Europe/Helsnki").unwrap_err().to_string(),
            "unknown time zone \"Europe/Helsnki\" (did you mean \"Europe/Helsinki\"?); expected an IANA name such as \"UTC\" or \"Europe/Helsinki\""
        );
    }
}
