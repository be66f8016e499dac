//! Finding and loading the configuration file for a command: `-c FILE`, else `$SAUNA_CONFIG`,
//! else `./sauna.toml`, with the secrets it names for the commands that use them (`run`, its
//! reloads, `check`). Parsing, diagnostics and reading the secrets belong to `proxy-conf`.

use std::path::{Path, PathBuf};

use proxy_conf::{LoadError, Loaded};

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

/// The file a command should read: `explicit` (`-c FILE`) when given.
pub fn config_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    match std::env::var_os("SAUNA_CONFIG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from("sauna.toml"),
    }
}

/// The file a command that talks to a running supervisor should read: `explicit` (`-c`) or
/// `$SAUNA_CONFIG`, else `./sauna.toml` when something is there (even a dangling symlink, so
/// that its error is reported). `None` when there is none: `status`, `stop`, `reload` and
/// `upgrade` then look for the supervisor on the default control socket
/// ([`proxy_conf::default_control_socket`]).
pub fn present_config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    let path = config_path(explicit);
    let named =
        explicit.is_some() || std::env::var_os("SAUNA_CONFIG").is_some_and(|path| !path.is_empty());
    (named || std::fs::symlink_metadata(&path).is_ok()).then_some(path)
}

/// Loads the configuration file a command should read (see [`config_path`]).
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    load_path(&config_path(explicit))
}

/// Loads the configuration at `path`: every value checked and typed by proxy-conf, each problem
/// reported at its `FILE:LINE:COL`.
pub fn load_path(path: &Path) -> Result<Loaded, ConfigError> {
    proxy_conf::load_file(path).map_err(|error| config_error(error, path))
}

/// Like [`load_path`], and also reads the secrets the file names (`[redis]` and `[postgres]`
/// `password_env`/`password_file`) from this process's environment and files: a variable that is
/// not set or a file that cannot be read is one more problem at the key that names it. On success
/// the secrets are installed (`proxy_conf::secrets::install`): beat, the queue sampler and
/// `check --live` log in with them, and the `url_env` variables reach every worker and program.
/// For `run`, each reload and `check`; the commands that only talk to the control socket use
/// [`load`] and need no secret.
pub fn load_with_secrets(path: &Path) -> Result<Loaded, ConfigError> {
    let mut secrets = None;
    let mut loaded = proxy_conf::load_file_with(path, |loaded| {
        match proxy_conf::secrets::read(loaded) {
            Ok(read) => secrets = Some(read),
            Err(problems) => return problems,
        }
        Vec::new()
    })
    .map_err(|error| config_error(error, path))?;
    if let Some(secrets) = secrets {
        proxy_conf::secrets::install(&mut loaded, secrets);
    }
    Ok(loaded)
}

fn config_error(error: LoadError, path: &Path) -> ConfigError {
    match error {
        LoadError::Io { path, source } => ConfigError::Unreadable {
            path,
            error: source,
        },
        LoadError::Invalid(diagnostics) => ConfigError::Invalid(diagnostics, path.to_owned()),
    }
}

/// The control socket of the supervisor configured by `loaded`: `[control].socket`, else
/// `$RUNTIME_DIRECTORY/control.sock` (systemd's `RuntimeDirectory=`), else `.sauna/control.sock`
/// next to the config file. Relative paths are taken from the config file's directory, so
/// `status` finds the same socket whatever directory it is run from.
pub fn control_socket(loaded: &Loaded) -> PathBuf {
    loaded.control_socket()
}
