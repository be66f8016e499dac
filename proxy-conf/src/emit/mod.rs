//! The renderers behind `sauna-supervisor emit`: pure functions from one [`Config`] (plus the
//! [`Machine`] facts and secrets the caller read) to the contents of nginx, Redis, PostgreSQL and
//! systemd files. Every value that two services must agree on is derived here from the one
//! configuration — the upstream from `[web].listen`, nginx's timeouts from the pool's, PostgreSQL's
//! `max_connections` from the pool and the Celery concurrency — so the files cannot drift apart.
//! [`install`] turns the files into the numbered steps a root shell pastes to put them in place.
//! Writing files, reading secrets and talking to live servers belong to the caller.

pub mod env;
pub mod htpasswd;
pub mod install;
pub mod nginx;
pub mod postgres;
pub mod redis;
pub mod systemd;

use std::fmt;
use std::path::PathBuf;

use crate::config::{Config, ProgramConfig};
use crate::stack::DeployConfig;

/// Facts about the machine the files are generated for; passed in so output is deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// Total memory in bytes.
    pub memory: u64,
    /// Number of CPUs (Celery's default concurrency).
    pub cpus: u32,
}

/// Secrets read by the caller from the environment variables or files the config names; only
/// the Redis password's SHA-256 ends up in the generated files.
pub use crate::secrets::Secrets;

/// One generated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Path relative to the `-o` directory, e.g. `nginx/sauna.conf`.
    pub path: String,
    /// The service whose install step puts it in place.
    pub service: Service,
    /// Where and how it is installed on the target machine.
    pub install: Install,
    /// The contents.
    pub contents: String,
}

impl File {
    /// The mode the file gets in the `-o` directory: private unless everyone may read the
    /// installed copy, so a hash or a secret is never more exposed there than where it goes.
    pub fn mode_in_dir(&self) -> u32 {
        match &self.install {
            Install::Copy { mode, .. } | Install::Prepend { mode, .. } if mode & 0o004 == 0 => {
                0o600
            }
            _ => 0o644,
        }
    }
}

/// The services the install steps set up, in the order they are installed: each step may rely on
/// the ones before it (the secrets before PostgreSQL's init script, the database before the app).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// The supervisor's user, binary, `sauna.toml` and secrets file.
    Base,
    /// The Redis instances and their units.
    Redis,
    /// The PostgreSQL cluster: conf.d, pg_hba.conf and the app's role and database.
    Postgres,
    /// The nginx site (and the first certificate).
    Nginx,
    /// The supervisor's own unit.
    Sauna,
    /// The Grafana dashboard, imported by hand.
    Grafana,
}

/// Where a generated file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Install {
    /// Copied to `to` with this mode, owner and group.
    Copy {
        /// The installed path.
        to: PathBuf,
        /// Permission bits.
        mode: u32,
        /// Owning user.
        owner: String,
        /// Owning group.
        group: String,
    },
    /// Put at the top of an existing file, replacing an earlier copy: the file's first and last
    /// lines are markers that find it again (`pg_hba.conf`, where the first match decides).
    Prepend {
        /// The file it goes into.
        to: PathBuf,
        /// Permission bits of the result.
        mode: u32,
        /// Owning user of the result.
        owner: String,
        /// Owning group of the result.
        group: String,
    },
    /// Not a file on the server: what a person does with it.
    ByHand(String),
}

impl fmt::Display for Install {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Install::Copy { to, .. } => write!(f, "install as {}", to.display()),
            Install::Prepend { to, .. } => write!(f, "insert at the top of {}", to.display()),
            Install::ByHand(what) => f.write_str(what),
        }
    }
}

/// What a renderer produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The files, in the order they should be printed.
    pub files: Vec<File>,
    /// Things that are allowed but probably not what the user wants; printed on stderr.
    pub warnings: Vec<String>,
}

impl Output {
    /// Appends another renderer's output.
    pub fn extend(&mut self, other: Output) {
        self.files.extend(other.files);
        self.warnings.extend(other.warnings);
    }
}

/// A file installed by `install -m MODE -o OWNER -g GROUP`.
pub(crate) fn copy(to: impl Into<PathBuf>, mode: u32, owner: &str, group: &str) -> Install {
    Install::Copy {
        to: to.into(),
        mode,
        owner: owner.to_owned(),
        group: group.to_owned(),
    }
}

/// One reason a configuration cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key at fault, e.g. `["deploy", "tls"]` (array elements by index), so that `check` and
    /// `emit` can point at its line and column; a missing section is named by itself.
    pub key: Vec<String>,
    /// What is wrong, naming the key, and what to write instead.
    pub message: String,
}

impl Problem {
    /// A problem about the key at `key`.
    pub(crate) fn at<S: AsRef<str>>(key: &[S], message: impl Into<String>) -> Problem {
        Problem {
            key: key.iter().map(|part| part.as_ref().to_owned()).collect(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The configuration cannot be rendered; every problem is listed, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct EmitError(pub Vec<Problem>);

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// What `emit` would refuse in `config`, for `check`: nginx (with `[web]`) and systemd when the
/// file has `[deploy]`, redis with `[redis]`, postgres with `[postgres]`. A file without those
/// sections is not meant for `emit`, so `check` does not hold it to what `emit` needs. Each
/// problem once, in the order the renderers find them.
pub fn refusals(config: &Config) -> Vec<Problem> {
    // The sizing depends on the machine, what is refused does not.
    let machine = Machine {
        memory: 1 << 30,
        cpus: 1,
    };
    let mut problems: Vec<Problem> = Vec::new();
    let mut add = |result: Result<Output, EmitError>| {
        if let Err(EmitError(found)) = result {
            for problem in found {
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
        }
    };
    if config.deploy.is_some() {
        if config.web.is_some() {
            add(nginx::render(config));
        }
        add(systemd::render(config));
    }
    if config.redis.is_some() {
        add(redis::render(config, &Secrets::default()));
    }
    if config.postgres.is_some() {
        add(postgres::render(config, &machine, None));
    }
    problems
}

/// The header every generated file starts with, in the file's comment syntax.
pub(crate) fn header(comment: &str, target: &str) -> String {
    format!(
        "{comment} Generated by `sauna-supervisor emit {target}` from sauna.toml; edit sauna.toml and emit again\n\
         {comment} instead of editing this file.\n"
    )
}

/// `[deploy]` with its defaults when the section is absent.
pub(crate) fn deploy(config: &Config) -> DeployConfig {
    config.deploy.clone().unwrap_or_default()
}

/// Checks that `[deploy].name` can name files, units and nginx zones.
pub(crate) fn check_name(deploy: &DeployConfig, problems: &mut Vec<Problem>) {
    let valid = !deploy.name.is_empty()
        && deploy
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        problems.push(Problem::at(
            &["deploy", "name"],
            format!(
                "[deploy].name = {:?}: use letters, digits, '_' and '-' only (it names files, units and nginx zones)",
                deploy.name
            ),
        ));
    }
}

/// How many tasks a program runs at once, for connection budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// A Celery worker with this many pool slots per instance.
    Celery(u32),
    /// Any other command: one process per instance.
    Plain,
}

/// Reads a Celery worker's concurrency from its command line: `-c N`, `-cN`, `--concurrency N`,
/// `--concurrency=N`, and `-P solo`/`--pool=solo` (always 1). Celery's own default is the number
/// of CPUs, so `cpus` is used when the command says nothing.
pub fn concurrency(program: &ProgramConfig, cpus: u32) -> Concurrency {
    let is_celery =
        program.command.iter().any(|arg| {
            arg.rsplit('/').next().is_some_and(|base| base == "celery") || arg == "celery"
        }) && program.command.iter().any(|arg| arg == "worker");
    if !is_celery {
        return Concurrency::Plain;
    }
    let mut explicit = None;
    let mut solo = false;
    let mut args = program.command.iter();
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-c" | "--concurrency" => args.next().map(String::as_str),
            "-P" | "--pool" => {
                solo |= args.next().is_some_and(|pool| pool == "solo");
                None
            }
            other => {
                if let Some(pool) = other.strip_prefix("--pool=") {
                    solo |= pool == "solo";
                    None
                } else {
                    other
                        .strip_prefix("--concurrency=")
                        .or_else(|| other.strip_prefix("-c").filter(|n| !n.is_empty()))
                }
            }
        };
        if let Some(n) = value.and_then(|n| n.parse::<u32>().ok()) {
            explicit = Some(n);
        }
    }
    if solo {
        return Concurrency::Celery(1);
    }
    Concurrency::Celery(explicit.unwrap_or(cpus).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(command: &[&str]) -> ProgramConfig {
        ProgramConfig {
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            ..ProgramConfig::default()
        }
    }

    fn refused(text: &str) -> Vec<(Vec<String>, String)> {
        let config = crate::load::load_str(text, "sauna.toml").unwrap();
        refusals(&config)
            .into_iter()
            .map(|problem| (problem.key, problem.message))
            .collect()
    }

    #[test]
    fn refusals_name_the_key_at_fault_for_the_sections_present() {
        let text = r#"[app]
wsgi = "app:application"
[web]
forwarded_allow_ips = ["10.0.0.1"]
[programs.celery]
command = ["celery", "worker", "-b", "redis://127.0.0.1:6390/4"]
[beat]
broker = "redis://127.0.0.1:6379/3"
[deploy]
websocket = ["ws"]
[deploy.tls]
[deploy.systemd]
binary = "bin/sauna"
[redis]
[postgres]
"#;
        let found = refused(text);
        let keys: Vec<String> = found.iter().map(|(key, _)| key.join(".")).collect();
        assert_eq!(
            keys,
            [
                "deploy.tls",
                "web.forwarded_allow_ips",
                "deploy.websocket.0",
                "deploy.systemd.binary",
                "programs.celery.command.3",
                "postgres",
            ],
            "{found:#?}"
        );
        assert!(
            found[4]
                .1
                .contains("every broker URL must name the same server")
        );
        // Without [deploy], nginx's and systemd's needs are not the file's business.
        let plain = "[app]\nwsgi = \"a:b\"\n[web]\nforwarded_allow_ips = [\"10.0.0.1\"]\n";
        assert!(refused(plain).is_empty());
    }

    #[test]
    fn celery_concurrency_comes_from_the_command_line() {
        let cases: &[(&[&str], Concurrency)] = &[
            (
                &["celery", "-A", "app", "worker", "-c", "3"],
                Concurrency::Celery(3),
            ),
            (&["celery", "worker", "-c7"], Concurrency::Celery(7)),
            (
                &["/venv/bin/celery", "worker", "--concurrency=5"],
                Concurrency::Celery(5),
            ),
            (
                &["celery", "worker", "--concurrency", "6"],
                Concurrency::Celery(6),
            ),
            (&["celery", "-A", "app", "worker"], Concurrency::Celery(4)),
            (
                &["celery", "worker", "-c", "8", "-P", "solo"],
                Concurrency::Celery(1),
            ),
            (&["celery", "worker", "--pool=solo"], Concurrency::Celery(1)),
            (
                &["python", "-m", "celery", "worker"],
                Concurrency::Celery(4),
            ),
            (&["celery", "flower"], Concurrency::Plain),
            (&["python", "manage.py", "rqworker"], Concurrency::Plain),
        ];
        for (command, expected) in cases {
            assert_eq!(concurrency(&program(command), 4), *expected, "{command:?}");
        }
    }
}
