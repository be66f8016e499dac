//! How one program's instances are started and stopped, resolved once from `[programs.NAME]` and
//! `[app]`: the argv (`python` means `[app].python`), the working directory, the environment,
//! identity, rlimits, the stop signal and the timing keys the actor needs.
//!
//! It builds [`ChildSpec`]s; spawning them is `child::spawn`'s job, and deciding when belongs to
//! the actor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use proxy_conf::{AppConfig, ProgramConfig, Rlimits};

use crate::process::spawn::ChildSpec;
use crate::programs::state::RestartRules;

/// Environment variable holding the instance index (0-based) of a program instance.
pub const INSTANCE_ENV: &str = "SAUNA_INSTANCE";
/// Environment variable holding the program's name.
pub const PROGRAM_ENV: &str = "SAUNA_PROGRAM";

/// Everything the actor needs to know about one program, resolved from the config.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The program's name (`[programs.NAME]`).
    pub name: String,
    /// Number of instances.
    pub instances: u32,
    argv: Vec<String>,
    cwd: PathBuf,
    env: BTreeMap<String, String>,
    user: Option<String>,
    group: Option<String>,
    rlimits: Rlimits,
    /// Sent to the process group to stop an instance.
    pub stop_signal: Signal,
    /// Time between the stop signal and SIGKILL of the group.
    pub stop_timeout: Duration,
    /// Time an instance must survive to count as running.
    pub ready_after: Duration,
    /// RSS limit of an instance's tree in bytes; 0 = off.
    pub max_rss: u64,
    /// Consecutive samples over `max_rss` before a restart.
    pub max_rss_samples: u32,
    /// How often RSS is sampled.
    pub rss_interval: Duration,
    /// What happens after an exit.
    pub rules: RestartRules,
}

impl Launch {
    /// Resolves `program` against `app`; relative paths are taken from `base_dir` (the config
    /// file's directory). An unknown `stop_signal` falls back to SIGTERM with an error logged
    /// (`check` refuses it before it gets here).
    pub fn new(
        name: &str,
        program: &ProgramConfig,
        app: &AppConfig,
        base_dir: &Path,
        rss_interval: Duration,
    ) -> Launch {
        let mut argv = program.command.clone();
        if let Some(first) = argv.first_mut() {
            if first == "python" {
                *first = resolve_command(&app.python, base_dir);
            }
        }
        let cwd = program
            .directory
            .as_ref()
            .or(app.directory.as_ref())
            .map_or_else(|| base_dir.to_path_buf(), |dir| base_dir.join(dir));
        let mut env = app.env.clone();
        env.extend(program.env.clone());
        env.insert(PROGRAM_ENV.to_owned(), name.to_owned());
        let stop_signal = parse_signal(&program.stop_signal).unwrap_or_else(|error| {
            tracing::error!("program \"{name}\": {error}; using TERM");
            Signal::SIGTERM
        });
        Launch {
            name: name.to_owned(),
            instances: program.instances,
            argv,
            cwd,
            env,
            user: program.user.clone(),
            group: program.group.clone(),
            rlimits: program.rlimits.clone(),
            stop_signal,
            stop_timeout: program.stop_timeout.get(),
            ready_after: program.ready_after.get(),
            max_rss: program.max_rss.bytes(),
            max_rss_samples: program.max_rss_samples.max(1),
            rss_interval,
            rules: RestartRules::from(program),
        }
    }

    /// The name used in log lines and log labels: `celery`, or `celery:1` when the program has
    /// several instances.
    pub fn label(&self, index: usize) -> String {
        if self.instances > 1 {
            format!("{}:{index}", self.name)
        } else {
            self.name.clone()
        }
    }

    /// What a reload compares to decide whether this program must be replaced: its own keys and
    /// what it takes from `[app]` (the interpreter, the directory, the environment), with
    /// symlinks resolved. A release deployed by pointing a `current` symlink at a new directory
    /// changes no key but does change the resolved working directory (or interpreter path), so
    /// its programs are replaced too. Reads the filesystem; a path that cannot be resolved
    /// counts as itself.
    pub fn fingerprint(&self, config: &ProgramConfig) -> Fingerprint {
        let command_dir = self
            .argv
            .first()
            .map(Path::new)
            .filter(|command| command.components().count() > 1)
            .and_then(Path::parent)
            .and_then(|dir| std::fs::canonicalize(dir).ok());
        Fingerprint {
            // `priority` only orders programs among each other: a new one is applied by the
            // reload (the facade re-sorts) without replacing the running instances.
            config: ProgramConfig {
                priority: ProgramConfig::default().priority,
                ..config.clone()
            },
            argv: self.argv.clone(),
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            resolved_cwd: std::fs::canonicalize(&self.cwd).ok(),
            resolved_command_dir: command_dir,
        }
    }

    /// The child to spawn for instance `index`.
    pub fn spec(&self, index: usize) -> ChildSpec {
        let mut env = self.env.clone();
        env.insert(INSTANCE_ENV.to_owned(), index.to_string());
        ChildSpec {
            argv: self.argv.clone(),
            cwd: Some(self.cwd.clone()),
            env,
            user: self.user.clone(),
            group: self.group.clone(),
            rlimits: self.rlimits.clone(),
            pass_fds: Vec::new(),
            merge_stderr: false,
        }
    }
}

/// See [`Launch::fingerprint`]: equal fingerprints mean a reload leaves the program alone.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    config: ProgramConfig,
    argv: Vec<String>,
    cwd: PathBuf,
    env: BTreeMap<String, String>,
    resolved_cwd: Option<PathBuf>,
    resolved_command_dir: Option<PathBuf>,
}

/// A relative interpreter path with a `/` (`venv/bin/python`) is taken from the config file's
/// directory; a bare name (`python3`) is looked up on `PATH`.
fn resolve_command(command: &str, base_dir: &Path) -> String {
    let path = Path::new(command);
    if command.contains('/') && path.is_relative() {
        base_dir.join(path).display().to_string()
    } else {
        command.to_owned()
    }
}

/// Parses a signal name as written in `stop_signal`: `"TERM"`, `"SIGTERM"` or `"term"`.
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).map_err(|_| {
        format!("unknown stop_signal \"{name}\": use a signal name such as \"TERM\", \"INT\", \"QUIT\" or \"HUP\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_means_the_app_interpreter_and_env_layers() {
        let app = AppConfig {
            directory: Some("app".into()),
            python: "venv/bin/python".to_owned(),
            env: BTreeMap::from([
                ("A".to_owned(), "app".to_owned()),
                ("B".to_owned(), "app".to_owned()),
            ]),
            ..AppConfig::default()
        };
        let program = ProgramConfig {
            command: vec!["python".into(), "-m".into(), "celery".into()],
            instances: 2,
            env: BTreeMap::from([("B".to_owned(), "program".to_owned())]),
            stop_signal: "int".to_owned(),
            ..ProgramConfig::default()
        };
        let launch = Launch::new(
            "celery",
            &program,
            &app,
            Path::new("/srv/site"),
            Duration::from_secs(5),
        );
        let spec = launch.spec(1);
        assert_eq!(spec.argv, ["/srv/site/venv/bin/python", "-m", "celery"]);
        assert_eq!(spec.cwd.as_deref(), Some(Path::new("/srv/site/app")));
        assert_eq!(spec.env["A"], "app");
        assert_eq!(spec.env["B"], "program");
        assert_eq!(spec.env[INSTANCE_ENV], "1");
        assert_eq!(spec.env[PROGRAM_ENV], "celery");
        assert_eq!(launch.stop_signal, Signal::SIGINT);
        assert_eq!(launch.label(1), "celery:1");
    }

    #[test]
    fn program_directory_wins_and_one_instance_has_a_plain_label() {
        let app = AppConfig {
            directory: Some("/srv/app".into()),
            ..AppConfig::default()
        };
        let program = ProgramConfig {
            command: vec!["python3".into()],
            directory: Some("/tmp".into()),
            ..ProgramConfig::default()
        };
        let launch = Launch::new("x", &program, &app, Path::new("/etc"), Duration::ZERO);
        let spec = launch.spec(0);
        assert_eq!(spec.argv, ["python3"]);
        assert_eq!(spec.cwd.as_deref(), Some(Path::new("/tmp")));
        assert_eq!(launch.label(0), "x");
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("TERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGQUIT"), Ok(Signal::SIGQUIT));
        let error = parse_signal("TERMINATE").unwrap_err();
        assert!(error.contains("\"TERMINATE\""), "{error}");
    }
}
