//! Finding and loading the configuration file for a command: `-c FILE`, else `$SAUNA_CONFIG`,
//! else `./sauna.toml`; and the `check` command. Parsing and diagnostics belong to `proxy-conf`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use proxy_conf::{LoadError, Loaded};

use crate::cli::{ConfigArg, EXIT_USAGE};

/// The configuration could not be used; commands exit 2 on it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}; pass -c FILE or set SAUNA_CONFIG")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error; part of the message rather than a `source`, so that `{:#}` does not
        /// print it twice.
        error: std::io::Error,
    },
    /// The file has problems; each is a `FILE:LINE:COL: message` line.
    #[error("{0}\n{count} problem(s) in {path}", count = .0.0.len(), path = .1.display())]
    Invalid(proxy_conf::Diagnostics, PathBuf),
}

/// The file a command should read.
pub fn config_path(arg: &ConfigArg) -> PathBuf {
    if let Some(path) = &arg.config {
        return path.clone();
    }
    match std::env::var_os("SAUNA_CONFIG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from("sauna.toml"),
    }
}

/// Loads the configuration named by `arg`.
pub fn load(arg: &ConfigArg) -> Result<Loaded, ConfigError> {
    load_path(&config_path(arg))
}

/// Loads the configuration at `path`, with the checks that need the supervisor's own parsers
/// (cron expressions) reported beside proxy-conf's, in file order.
pub fn load_path(path: &Path) -> Result<Loaded, ConfigError> {
    proxy_conf::load_file_with(path, crate::beat::jobs::config_diagnostics).map_err(|error| {
        match error {
            LoadError::Io { path, source } => ConfigError::Unreadable {
                path,
                error: source,
            },
            LoadError::Invalid(diagnostics) => ConfigError::Invalid(diagnostics, path.to_owned()),
        }
    })
}

/// `sauna-supervisor check`: prints every problem and exits 2, or says the file is valid. With
/// `--live`, also compares the running Redis and PostgreSQL with the file (`crate::live`); every
/// contradiction is a warning line and makes the exit status 2.
pub fn check_command(arg: &ConfigArg, live: bool) -> anyhow::Result<ExitCode> {
    match load(arg) {
        Ok(loaded) => {
            if loaded.config.web.is_some() {
                match crate::pool::check_import(&loaded.config.app, &loaded.config_dir()) {
                    Ok(()) => {}
                    Err(crate::pool::ImportCheck::Failed(traceback)) => {
                        println!("{traceback}");
                        eprintln!(
                            "sauna-supervisor: the app in {} does not import",
                            loaded.path.display()
                        );
                        return Ok(ExitCode::from(EXIT_USAGE));
                    }
                    Err(not_run) => eprintln!("warning: {not_run}"),
                }
            }
            println!(
                "{}: ok ({})",
                loaded.path.display(),
                roles_summary(&loaded.config)
            );
            if live {
                let findings = crate::live::check(&loaded.config, crate::emit::machine().cpus);
                for finding in &findings {
                    println!("warning: {finding}");
                }
                if !findings.is_empty() {
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
                println!("live servers agree with {}", loaded.path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid(diagnostics, path)) => {
            println!("{diagnostics}");
            eprintln!(
                "sauna-supervisor: {} problem(s) in {}",
                diagnostics.0.len(),
                path.display()
            );
            Ok(ExitCode::from(EXIT_USAGE))
        }
        Err(other) => Err(other.into()),
    }
}

/// `web: 4 workers, 2 programs, beat: 3 jobs` — what `run` would start, for `check`'s success line.
fn roles_summary(config: &proxy_conf::Config) -> String {
    let mut roles = Vec::new();
    if let Some(web) = &config.web {
        roles.push(format!("web: {} worker(s)", web.workers));
    }
    if !config.programs.is_empty() {
        roles.push(format!("{} program(s)", config.programs.len()));
    }
    if let Some(beat) = &config.beat {
        roles.push(format!("beat: {} job(s)", beat.jobs.len()));
    }
    if roles.is_empty() {
        "nothing to run yet: add [web], [programs.NAME] or [beat]".to_owned()
    } else {
        roles.join(", ")
    }
}

/// The control socket of the supervisor configured by `loaded`: `[control].socket`, else
/// `$RUNTIME_DIRECTORY/control.sock` (systemd's `RuntimeDirectory=`), else `.sauna/control.sock`
/// next to the config file. Relative paths are taken from the config file's directory, so
/// `status` finds the same socket whatever directory it is run from.
pub fn control_socket(loaded: &Loaded) -> PathBuf {
    loaded.control_socket()
}
