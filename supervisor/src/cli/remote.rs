//! The commands that talk to a running supervisor over its control socket — `status`, `stop`,
//! `reload` and `upgrade` — how they find it (`reach`), and how its answers become output and
//! [`CommandError`]s.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{CommandError, ConfigArg};
use crate::control::{ControlError, Replies, Request, ResponseBody};
use crate::process::procfs;
use crate::supervisor::lifecycle::StopMode;

/// How long `status` and `stop` wait for each answer line.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a command found where it looked for the running supervisor.
enum Reached {
    /// A supervisor took the request: its response lines.
    Answer(Replies),
    /// Nobody answers; the message names every socket tried.
    NotRunning(String),
}

/// Sends `request` to the running supervisor, found this way:
///
/// - With a config file ([`crate::config::present_config_path`]: `-c FILE`, `$SAUNA_CONFIG` or
///   `./sauna.toml`), it is loaded (its problems are the command's, exit 2) and its control
///   socket used. When the file leaves the socket to its default and this shell has no
///   `$RUNTIME_DIRECTORY`, a supervisor started by systemd (which had one) is not on
///   `.sauna/control.sock` next to the file but on `/run/sauna/control.sock`: that one is
///   used when nobody answers on the first, provided it runs this same file — `stop` must
///   never reach another app's supervisor.
/// - Without a config file, the default socket ([`proxy_conf::default_control_socket`]):
///   `$RUNTIME_DIRECTORY/control.sock`, else `/run/sauna/control.sock`.
fn reach(
    arg: &ConfigArg,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Reached, CommandError> {
    let runtime = std::env::var_os("RUNTIME_DIRECTORY");
    let runtime = runtime.as_deref().filter(|dirs| !dirs.is_empty());
    let Some(path) = crate::config::present_config_path(arg.config.as_deref()) else {
        let socket = proxy_conf::default_control_socket(runtime);
        return Ok(match send(&socket, request, timeout)? {
            Reached::NotRunning(message) => Reached::NotRunning(format!(
                "{message} (the default control socket; no config file names another: no -c \
                 FILE, no $SAUNA_CONFIG, no ./sauna.toml)"
            )),
            answer => answer,
        });
    };
    let loaded = crate::config::load_path(&path)?;
    let socket = crate::config::control_socket(&loaded);
    let not_here = match send(&socket, request, timeout)? {
        Reached::NotRunning(message) => message,
        answer => return Ok(answer),
    };
    if loaded.config.control.socket.is_some() || runtime.is_some() {
        return Ok(Reached::NotRunning(not_here));
    }
    let fallback = proxy_conf::default_control_socket(None);
    let Some(theirs) = running_config(&fallback)? else {
        return Ok(Reached::NotRunning(format!(
            "{not_here}, nor on {}",
            fallback.display()
        )));
    };
    if !same_file(&theirs, &loaded.path) {
        return Ok(Reached::NotRunning(format!(
            "{not_here}; the one on {} runs {}, not {}",
            fallback.display(),
            theirs.display(),
            loaded.path.display()
        )));
    }
    Ok(match send(&fallback, request, timeout)? {
        Reached::NotRunning(message) => Reached::NotRunning(format!("{not_here}; {message}")),
        answer => answer,
    })
}

/// Sends `request` on `socket`, telling "nobody listens there" apart from other failures.
fn send(
    socket: &Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Reached, ControlError> {
    match crate::control::request(socket, request, timeout) {
        Ok(replies) => Ok(Reached::Answer(replies)),
        Err(error @ ControlError::NotRunning { .. }) => Ok(Reached::NotRunning(error.to_string())),
        Err(error) => Err(error),
    }
}

/// The config file of the supervisor on `socket` (absolute, as its status reports it), or
/// `None` when nobody listens there.
fn running_config(socket: &Path) -> Result<Option<PathBuf>, CommandError> {
    let Reached::Answer(replies) = send(socket, &Request::Status, Some(ANSWER_TIMEOUT))? else {
        return Ok(None);
    };
    match replies.wait(|_| {})?.body {
        ResponseBody::Ok { data } => Ok(data
            .get("config_path")
            .or_else(|| data.get("config"))
            .and_then(serde_json::Value::as_str)
            .map(PathBuf::from)),
        body => Err(answer_error(body).into()),
    }
}

/// Whether two names of a config file are the same file (symlinks such as `current` resolved).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

/// `sauna-supervisor status [--json]`: [`CommandError::NotRunning`] when no supervisor answers.
pub fn status_command(config: &ConfigArg, json: bool) -> Result<(), CommandError> {
    let replies = match reach(config, &Request::Status, Some(ANSWER_TIMEOUT))? {
        Reached::Answer(replies) => replies,
        Reached::NotRunning(message) => return Err(CommandError::NotRunning(message)),
    };
    let response = match replies.wait(|_| {}) {
        Ok(response) => response,
        // It stopped between the connect and the answer.
        Err(error @ ControlError::Closed { .. }) => {
            return Err(CommandError::NotRunning(error.to_string()));
        }
        Err(error) => return Err(error.into()),
    };
    match response.body {
        ResponseBody::Ok { data } => {
            if json {
                let text = serde_json::to_string_pretty(&data).map_err(anyhow::Error::from)?;
                println!("{text}");
            } else {
                print!(
                    "{}",
                    crate::supervisor::status::render_text(&data, now_unix())
                );
            }
            Ok(())
        }
        body => Err(answer_error(body).into()),
    }
}

/// Seconds since the Unix epoch, for "… ago" in `status`.
fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// `sauna-supervisor stop`: asks for a graceful stop and waits until the process has exited.
pub fn stop_command(config: &ConfigArg) -> Result<(), CommandError> {
    let request = Request::Stop {
        mode: StopMode::Graceful,
    };
    // No per-line timeout: a graceful stop takes as long as the roles' own timeouts allow.
    let replies = match reach(config, &request, None)? {
        Reached::Answer(replies) => replies,
        Reached::NotRunning(message) => {
            eprintln!("sauna-supervisor: {message}; nothing to stop");
            return Ok(());
        }
    };
    let response = replies.wait(|line| eprintln!("{line}"))?;
    match response.body {
        ResponseBody::Ok { .. } => {
            wait_for_exit(response.pid, ANSWER_TIMEOUT);
            eprintln!("sauna-supervisor (pid {}) stopped", response.pid);
            Ok(())
        }
        body => Err(answer_error(body).into()),
    }
}

/// `sauna-supervisor reload`: validates the file locally first when there is one (exit 2 with
/// every diagnostic), then asks the running supervisor to roll and prints its progress until
/// it is done. Without a config file the supervisor's own check of its file decides (its
/// diagnostics come back in [`CommandError::Reload`], exit 2 as well).
pub fn reload_command(
    config: &ConfigArg,
    timeout: Option<proxy_conf::Duration>,
) -> Result<(), CommandError> {
    let request = Request::Reload {
        timeout_secs: timeout.map(|t| t.get().as_secs().max(1)),
    };
    let replies = match reach(config, &request, timeout.map(|t| t.get()))? {
        Reached::Answer(replies) => replies,
        Reached::NotRunning(message) => {
            return Err(anyhow::anyhow!("{message}; nothing to reload").into());
        }
    };
    let response = replies.wait(|line| eprintln!("{line}"))?;
    match response.body {
        ResponseBody::Ok { data } => {
            if let Some(summary) = data.get("summary").and_then(|s| s.as_str()) {
                eprintln!("{summary}");
            }
            Ok(())
        }
        ResponseBody::Error {
            error,
            message,
            detail,
        } => Err(CommandError::Reload {
            kind: error,
            message,
            detail,
        }),
        ResponseBody::Progress { .. } => {
            Err(anyhow::anyhow!("the supervisor ended the reload without a result").into())
        }
    }
}

/// `sauna-supervisor upgrade`: asks the running supervisor to start a new binary and hand it
/// the sockets, prints the progress, and returns once the old process has exited.
pub fn upgrade_command(
    config: &ConfigArg,
    binary: Option<std::path::PathBuf>,
    timeout: Option<proxy_conf::Duration>,
) -> Result<(), CommandError> {
    // The supervisor may run in another directory: send an absolute path.
    let binary = binary.map(|path| std::path::absolute(&path).unwrap_or(path));
    let request = Request::Upgrade {
        binary,
        timeout_secs: timeout.map(|t| t.get().as_secs().max(1)),
    };
    // No per-line timeout: the supervisor enforces the deadline and always answers, and the
    // drain after it is bounded by the roles' own timeouts.
    let replies = match reach(config, &request, None)? {
        Reached::Answer(replies) => replies,
        Reached::NotRunning(message) => {
            return Err(anyhow::anyhow!("{message}; nothing to upgrade").into());
        }
    };
    let response = replies.wait(|line| eprintln!("{line}"))?;
    match response.body {
        ResponseBody::Ok { data } => {
            if let Some(old) = data.get("old_pid").and_then(serde_json::Value::as_u64) {
                wait_for_exit(u32::try_from(old).unwrap_or_default(), ANSWER_TIMEOUT);
            }
            if let Some(summary) = data.get("summary").and_then(|s| s.as_str()) {
                eprintln!("{summary}");
            }
            Ok(())
        }
        ResponseBody::Error {
            message, detail, ..
        } => Err(CommandError::Upgrade { message, detail }),
        ResponseBody::Progress { .. } => {
            Err(anyhow::anyhow!("the supervisor ended the upgrade without a result").into())
        }
    }
}

fn answer_error(body: ResponseBody) -> anyhow::Error {
    match body {
        ResponseBody::Error {
            message, detail, ..
        } => match detail {
            Some(detail) => anyhow::anyhow!("{message}\n{detail}"),
            None => anyhow::anyhow!("{message}"),
        },
        other => anyhow::anyhow!("unexpected answer from the supervisor: {other:?}"),
    }
}

/// The supervisor answers `stop` just before it exits; wait for the process to be gone so that
/// a deploy script can start a new one right after.
fn wait_for_exit(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    // A zombie still has a /proc entry; its parent (not us) reaps it.
    while procfs::stat(pid).is_some_and(|process| process.state != 'Z') && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}
