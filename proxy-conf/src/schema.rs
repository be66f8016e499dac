//! The `sauna.toml` schema as serde reads it: one raw struct per section, keys and value types
//! exactly as written in the file, with the defaults users of uWSGI, Gunicorn and Celery expect.
//! Every section is optional so that a file with only `[programs.x]` or only `[beat]` is a valid
//! configuration. Unknown keys are refused (`deny_unknown_fields`) so a typo never silently falls
//! back to a default.
//!
//! The raw structs never leave the crate: `validate` checks them and turns them into the typed
//! [`crate::config::RawConfig`] the runtime reads (listen addresses, time zones, cron expressions,
//! counts that cannot be zero). The small value types both share — restart and reload policies,
//! `catch_up`, rlimits, `[control]` — are defined here and used by both.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, Duration};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// The Python application shared by the web pool and, by default, by programs.
    #[serde(default)]
    pub app: RawApp,
    /// The WSGI web pool; absent means no web role.
    pub web: Option<RawWeb>,
    /// Supervised commands, by name, started by ascending `priority`, then in name order.
    #[serde(default)]
    pub programs: BTreeMap<String, RawProgram>,
    /// The Celery beat replacement; absent means no beat role.
    pub beat: Option<RawBeat>,
    /// The Prometheus endpoint; absent means the default loopback listener.
    #[serde(default)]
    pub metrics: RawMetrics,
    /// The control socket used by `status`, `stop` and `reload`.
    #[serde(default)]
    pub control: ControlConfig,
    /// The nginx edge and the systemd unit (`emit`); absent means the defaults.
    pub deploy: Option<crate::stack::DeployConfig>,
    /// The Redis instances (`emit redis`, `check --live`); absent means none are managed.
    pub redis: Option<crate::stack::RedisConfig>,
    /// The PostgreSQL database (`emit postgres`, `check --live`); absent means none is managed.
    pub postgres: Option<crate::stack::PostgresConfig>,
    /// Deploy hooks (migrations, collectstatic) run before the roles start and before a reload.
    #[serde(default)]
    pub hooks: RawHooks,
}

/// `[app]`: where the Python application lives and how to run it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawApp {
    /// Working directory, first on `sys.path`. Relative paths are resolved against the config file.
    pub directory: Option<PathBuf>,
    /// The interpreter for workers and the default for programs; a relative path (one with a
    /// `/`) is resolved against the config file, a bare name is looked up on `PATH`.
    pub python: String,
    /// `module:callable` of a WSGI application.
    pub wsgi: Option<String>,
    /// A PasteDeploy ini file, optionally `file.ini#name`.
    pub paste: Option<String>,
    /// Extra environment for workers and programs.
    pub env: BTreeMap<String, String>,
}

impl Default for RawApp {
    fn default() -> Self {
        RawApp {
            directory: None,
            python: "python3".to_owned(),
            wsgi: None,
            paste: None,
            env: BTreeMap::new(),
        }
    }
}

/// `[web]`: the HTTP front and its pool of Python workers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawWeb {
    /// `"host:port"` or `"unix:/path"` addresses to listen on.
    pub listen: Vec<String>,
    /// Number of worker processes.
    pub workers: u32,
    /// Request slots (threads) per worker.
    pub threads: u32,
    /// Per-request deadline: the stack is logged, the worker killed, the client gets 504.
    pub timeout: Duration,
    /// Recycle a worker after this many requests; 0 = never.
    pub max_requests: u64,
    /// A random 0..=jitter added to `max_requests` per worker so recycles do not align.
    pub max_requests_jitter: u64,
    /// Recycle a worker after its current request when its RSS exceeds this; 0 = off.
    pub max_rss: ByteSize,
    /// Requests allowed to wait for a free worker; beyond that → 503.
    pub queue_size: u32,
    /// A request that waited longer than this → 503.
    pub queue_timeout: Duration,
    /// Largest accepted request body → 413 beyond.
    pub max_body: ByteSize,
    /// Bodies larger than this are buffered in a temporary file instead of memory.
    pub body_buffer: ByteSize,
    /// Largest request head (request line and header fields) → 431 beyond.
    pub max_header_size: ByteSize,
    /// Time old workers get to finish in-flight requests on reload and stop.
    pub graceful_timeout: Duration,
    /// Longest time a new generation may take to become ready during `reload`.
    pub reload_timeout: Duration,
    /// A path, or an absolute http(s) URL naming the host, requested through the canary worker
    /// during `reload`; it must answer 2xx/3xx.
    pub warmup: Option<String>,
    /// Mount prefix given to the app as `SCRIPT_NAME`.
    pub script_name: String,
    /// Peers whose `X-Forwarded-For`/`-Proto` headers are trusted (IPs or CIDRs, `"*"` for all).
    pub forwarded_allow_ips: Vec<String>,
    /// One log line per request.
    pub access_log: bool,
    /// Kernel accept backlog of each listening socket.
    pub backlog: u32,
    /// Import the app once per generation in a template process and fork the workers from it.
    pub preload: bool,
    /// `module:callable` run in each worker forked from the template, before its first request.
    pub post_fork: Option<String>,
}

impl Default for RawWeb {
    fn default() -> Self {
        RawWeb {
            listen: vec!["127.0.0.1:8000".to_owned()],
            workers: 2,
            threads: 1,
            timeout: Duration::from_secs(30),
            max_requests: 0,
            max_requests_jitter: 0,
            max_rss: ByteSize(0),
            queue_size: 1024,
            queue_timeout: Duration::from_secs(10),
            max_body: ByteSize(100 << 20),
            body_buffer: ByteSize(1 << 20),
            max_header_size: ByteSize(64 << 10),
            graceful_timeout: Duration::from_secs(30),
            reload_timeout: Duration::from_secs(60),
            warmup: None,
            script_name: String::new(),
            forwarded_allow_ips: vec!["127.0.0.1".to_owned(), "::1".to_owned()],
            access_log: true,
            backlog: 2048,
            preload: false,
            post_fork: None,
        }
    }
}

/// `[hooks]`: commands a deploy needs run with the new release before it serves — migrations,
/// `collectstatic` — the way a Capistrano or Ansible deploy runs them before the restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawHooks {
    /// Run once by `run`, in order, before any role starts; a failure stops the start.
    #[serde(deserialize_with = "hook_commands")]
    pub before_start: Vec<Vec<String>>,
    /// Run by each `reload`, in order, after the config is re-read and before the canary; a
    /// failure refuses the reload with nothing changed.
    #[serde(deserialize_with = "hook_commands")]
    pub before_reload: Vec<Vec<String>>,
    /// Longest time one hook command may run before its process group is killed.
    pub hook_timeout: Duration,
}

impl Default for RawHooks {
    fn default() -> Self {
        RawHooks {
            before_start: Vec::new(),
            before_reload: Vec::new(),
            hook_timeout: Duration::from_secs(600),
        }
    }
}

/// A list of commands, each an argv array. Written flat (`["python", "manage.py", "migrate"]`)
/// or as one string, which is the common slip, it is refused with the nested form to write.
fn hook_commands<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Vec<String>>, D::Error> {
    /// One element of the list: a command, or a word that should have been inside one.
    enum Element {
        Command(Vec<String>),
        Word(String),
    }

    impl<'de> Deserialize<'de> for Element {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Element, D::Error> {
            struct ElementVisitor;
            impl<'de> Visitor<'de> for ElementVisitor {
                type Value = Element;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a command as an array of strings, e.g. [\"python\", \"manage.py\", \"migrate\"]")
                }
                fn visit_str<E: de::Error>(self, word: &str) -> Result<Element, E> {
                    Ok(Element::Word(word.to_owned()))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                    let mut argv = Vec::new();
                    while let Some(word) = seq.next_element::<String>()? {
                        argv.push(word);
                    }
                    Ok(Element::Command(argv))
                }
            }
            deserializer.deserialize_any(ElementVisitor)
        }
    }

    struct CommandsVisitor;
    impl<'de> Visitor<'de> for CommandsVisitor {
        type Value = Vec<Vec<String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of commands, each an array of strings, e.g. [[\"python\", \"manage.py\", \"migrate\"]]")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            let words: Vec<&str> = text.split_whitespace().collect();
            Err(E::custom(format!(
                "expected a list of commands, found the string \"{text}\"; write [{}]",
                nested(&words)
            )))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut commands = Vec::new();
            let mut words = Vec::new();
            while let Some(element) = seq.next_element::<Element>()? {
                match element {
                    Element::Command(argv) => commands.push(argv),
                    Element::Word(word) => words.push(word),
                }
            }
            if words.is_empty() {
                return Ok(commands);
            }
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            Err(de::Error::custom(format!(
                "each command is an array of its own inside the list: write [{}]",
                nested(&words)
            )))
        }
    }

    /// `["a", "b"]`, for the messages above.
    fn nested(words: &[&str]) -> String {
        let quoted: Vec<String> = words.iter().map(|word| format!("\"{word}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    deserializer.deserialize_any(CommandsVisitor)
}

/// When a program that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status.
    #[default]
    Always,
    /// Only after a non-zero exit or a death by signal.
    OnFailure,
    /// Never; the program stays down.
    Never,
}

/// How `reload` treats a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProgramReload {
    /// On every reload, changed or not: start the new instance, wait for it, then stop the old
    /// one.
    #[default]
    Rolling,
    /// When its config changed: stop, then start.
    Restart,
    /// Leave it running.
    None,
}

/// Resource limits applied to a program before `exec` (see setrlimit(2)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rlimits {
    /// RLIMIT_NOFILE: open file descriptors.
    pub nofile: Option<u64>,
    /// RLIMIT_CORE: core dump size.
    pub core: Option<ByteSize>,
    /// RLIMIT_AS: address space.
    #[serde(rename = "as")]
    pub address_space: Option<ByteSize>,
}

/// `[programs.NAME]`: a supervised command such as a Celery worker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawProgram {
    /// argv; the first element is looked up on `PATH`. `"python"` means `[app].python`.
    pub command: Vec<String>,
    /// Number of identical instances.
    pub instances: u32,
    /// Working directory; defaults to `[app].directory`.
    pub directory: Option<PathBuf>,
    /// Extra environment, on top of `[app].env`.
    pub env: BTreeMap<String, String>,
    /// User to run as (only when the supervisor runs as root).
    pub user: Option<String>,
    /// Group to run as (only when the supervisor runs as root).
    pub group: Option<String>,
    /// When to start it again after an exit.
    pub restart: RestartPolicy,
    /// Signal sent to the program's process group to stop it, e.g. `"TERM"`, `"INT"`, `"QUIT"`.
    pub stop_signal: String,
    /// Time between `stop_signal` and SIGKILL of the whole group.
    pub stop_timeout: Duration,
    /// RSS of the whole process tree above which the program is restarted gracefully; 0 = off.
    pub max_rss: ByteSize,
    /// Consecutive samples over `max_rss` before the restart.
    pub max_rss_samples: u32,
    /// Longest delay between restarts; delays double from 1 s up to this.
    pub backoff_max: Duration,
    /// Running this long resets the backoff and the crash counter.
    pub stable_after: Duration,
    /// This many exits within `crash_window` make the program `fatal`.
    pub crash_limit: u32,
    /// Window over which `crash_limit` exits are counted.
    pub crash_window: Duration,
    /// Time a new instance must survive to count as started (reload readiness).
    pub ready_after: Duration,
    /// How `reload` treats this program.
    pub reload: ProgramReload,
    /// supervisord's `priority`: lower starts earlier and stops later; equal priorities go in
    /// name order.
    pub priority: i64,
    /// Resource limits.
    pub rlimits: Rlimits,
}

impl Default for RawProgram {
    fn default() -> Self {
        RawProgram {
            command: Vec::new(),
            instances: 1,
            directory: None,
            env: BTreeMap::new(),
            user: None,
            group: None,
            restart: RestartPolicy::Always,
            stop_signal: "TERM".to_owned(),
            stop_timeout: Duration::from_secs(10),
            max_rss: ByteSize(0),
            max_rss_samples: 3,
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            crash_limit: 5,
            crash_window: Duration::from_secs(60),
            ready_after: Duration::from_secs(3),
            reload: ProgramReload::Rolling,
            // supervisord's default, so a config ported from it keeps its order.
            priority: 999,
            rlimits: Rlimits::default(),
        }
    }
}

/// What happens to slots missed while no supervisor could publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CatchUp {
    /// Drop missed slots.
    Skip,
    /// Publish one run for any number of missed slots.
    #[default]
    Once,
    /// Publish every missed slot within the window.
    All,
}

/// `[beat]`: the scheduler that publishes Celery tasks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawBeat {
    /// The Redis broker URL the Celery workers consume from.
    pub broker: String,
    /// Default IANA time zone of cron jobs.
    pub timezone: String,
    /// Elect one publisher among supervisors sharing the broker.
    pub leader_lock: bool,
    /// Lock time-to-live; renewed at a third of it.
    pub lock_ttl: Duration,
    /// Prefix of beat's Redis keys (the lock and the last published slots); supervisors that
    /// share it share one schedule.
    pub key_prefix: String,
    /// `module:app` of a Celery app whose `beat_schedule` is imported.
    pub celery_app: Option<String>,
    /// Jobs by name.
    pub jobs: BTreeMap<String, RawJob>,
}

impl Default for RawBeat {
    fn default() -> Self {
        RawBeat {
            broker: "redis://127.0.0.1:6379/0".to_owned(),
            timezone: "UTC".to_owned(),
            leader_lock: true,
            lock_ttl: Duration::from_secs(10),
            key_prefix: "sauna:beat:".to_owned(),
            celery_app: None,
            jobs: BTreeMap::new(),
        }
    }
}

/// `[beat.jobs.NAME]`: one schedule entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawJob {
    /// Registered Celery task name.
    pub task: String,
    /// A 5-field crontab expression or an `@daily`-style shortcut.
    pub cron: Option<String>,
    /// A fixed interval.
    pub every: Option<Duration>,
    /// Positional arguments.
    pub args: Vec<toml::Value>,
    /// Keyword arguments.
    pub kwargs: toml::Table,
    /// Queue (routing key).
    pub queue: String,
    /// Priority 0..=9 (0 is the highest under Redis).
    pub priority: Option<u8>,
    /// The worker discards the task when it starts later than this after publishing.
    pub expires: Option<Duration>,
    /// IANA time zone; defaults to `[beat].timezone`.
    pub timezone: Option<String>,
    /// Missed-slot policy.
    pub catch_up: CatchUp,
    /// How far back missed slots are considered; no limit by default.
    pub catch_up_window: Option<Duration>,
}

impl Default for RawJob {
    fn default() -> Self {
        RawJob {
            task: String::new(),
            cron: None,
            every: None,
            args: Vec::new(),
            kwargs: toml::Table::new(),
            queue: "celery".to_owned(),
            priority: None,
            expires: None,
            timezone: None,
            catch_up: CatchUp::Once,
            catch_up_window: None,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawMetrics {
    /// `host:port`, loopback by default; an empty string disables the endpoint.
    pub listen: String,
    /// File holding the bearer token scrapes must present.
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token.
    pub token_env: Option<String>,
    /// Celery queues whose length is exported, besides those derived from programs.
    pub queues: Vec<String>,
    /// How often queue lengths and RSS are sampled.
    pub sample_interval: Duration,
    /// Redis URL whose Celery queue lengths are sampled; defaults to `[beat].broker`, then
    /// `[redis].broker`.
    pub broker: Option<String>,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: "127.0.0.1:9808".to_owned(),
            token_file: None,
            token_env: None,
            queues: Vec::new(),
            sample_interval: Duration::from_secs(5),
            broker: None,
        }
    }
}

/// `[control]`: the Unix socket of the running supervisor.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Socket path; default `$RUNTIME_DIRECTORY/control.sock`, else `.sauna/control.sock` next to
    /// the config file (see `Loaded::control_socket`).
    pub socket: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::fmt;

    use serde::de::{self, Visitor};

    use super::*;

    /// A deserializer that only records the field names serde asks a struct for.
    struct FieldNames<'a>(&'a RefCell<Vec<&'static str>>);

    #[derive(Debug)]
    struct Stop;

    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("stop")
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Stop
        }
    }

    impl<'de> de::Deserializer<'de> for FieldNames<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0.borrow_mut().extend_from_slice(fields);
            Err(Stop)
        }

        serde::forward_to_deserialize_any! {
            bool u8 u16 u32 u64 i8 i16 i32 i64 i128 u128 f32 f64 char str string seq bytes
            byte_buf map unit unit_struct tuple_struct tuple identifier ignored_any option
            newtype_struct enum
        }
    }

    fn fields<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        let names = RefCell::new(Vec::new());
        let _ = T::deserialize(FieldNames(&names));
        names.into_inner()
    }

    /// True when `text` sets `key` somewhere (commented out or not, as `key =` or `a.key =`), or
    /// opens it as a table (`[section.key]`, `[section.key.NAME]`).
    fn documents(text: &str, key: &str) -> bool {
        let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        let assigned = text.match_indices(key).any(|(at, _)| {
            let before = text[..at].chars().next_back();
            let after = text[at + key.len()..].trim_start_matches(' ');
            !before.is_some_and(is_key_char) && after.starts_with('=')
        });
        let opened = text.lines().any(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            line.starts_with('[')
                && (line.contains(&format!(".{key}]")) || line.contains(&format!(".{key}.")))
        });
        assigned || opened
    }

    #[test]
    fn every_key_is_documented_in_the_reference_example() {
        let example = include_str!("../../examples/sauna.toml");
        for section in fields::<RawConfig>() {
            let header = format!("[{section}");
            assert!(
                example.contains(&header),
                "examples/sauna.toml lacks [{section}]"
            );
        }
        let keyed = [
            ("[app]", fields::<RawApp>()),
            ("[web]", fields::<RawWeb>()),
            ("[programs.NAME]", fields::<RawProgram>()),
            ("[programs.NAME.rlimits]", fields::<Rlimits>()),
            ("[beat]", fields::<RawBeat>()),
            ("[beat.jobs.NAME]", fields::<RawJob>()),
            ("[metrics]", fields::<RawMetrics>()),
            ("[control]", fields::<ControlConfig>()),
            ("[deploy]", fields::<crate::stack::DeployConfig>()),
            ("[deploy.tls]", fields::<crate::stack::TlsConfig>()),
            ("[deploy.staging]", fields::<crate::stack::StagingConfig>()),
            ("[deploy.cache]", fields::<crate::stack::CacheConfig>()),
            ("[deploy.systemd]", fields::<crate::stack::SystemdConfig>()),
            ("[redis]", fields::<crate::stack::RedisConfig>()),
            ("[redis.cache]", fields::<crate::stack::RedisCacheConfig>()),
            ("[postgres]", fields::<crate::stack::PostgresConfig>()),
            ("[hooks]", fields::<RawHooks>()),
        ];
        for (section, keys) in keyed {
            assert!(!keys.is_empty(), "no fields found for {section}");
            for key in keys {
                assert!(
                    documents(example, key),
                    "examples/sauna.toml does not document {section} {key}"
                );
            }
        }
    }
}
