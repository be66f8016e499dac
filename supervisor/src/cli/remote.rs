//! The commands that talk to a running supervisor over its control socket — `status`, `stop`,
//! `reload` and `upgrade` — and how their answers become output and exit statuses.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::{ConfigArg, EXIT_NOT_RUNNING, EXIT_USAGE};
use crate::control::{ControlError, ErrorKind, Request, ResponseBody};
use crate::supervisor::lifecycle::StopMode;

/// How long `status` and `stop` wait for each answer line.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// `sauna-supervisor status [--json]`.
pub fn status_command(config: &ConfigArg, json: bool) -> anyhow::Result<ExitCode> {
    let loaded = config.load()?;
    let socket = crate::config::control_socket(&loaded);
    let response = match crate::control::request(&socket, &Request::Status, Some(ANSWER_TIMEOUT))
        .and_then(|replies| replies.wait(|_| {}))
    {
        Ok(response) => response,
        Err(error @ ControlError::NotRunning { .. }) => {
            eprintln!("sauna-supervisor: {error}");
            return Ok(ExitCode::from(EXIT_NOT_RUNNING));
        }
        Err(error) => return Err(error.into()),
    };
    match response.body {
        ResponseBody::Ok { data } => {
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                print!("{}", crate::supervisor::status::render_text(&data));
            }
            Ok(ExitCode::SUCCESS)
        }
        body => Err(answer_error(body)),
    }
}

/// `sauna-supervisor stop`: asks for a graceful stop and waits until the process has exited.
pub fn stop_command(config: &ConfigArg) -> anyhow::Result<ExitCode> {
    let loaded = config.load()?;
    let socket = crate::config::control_socket(&loaded);
    let request = Request::Stop {
        mode: StopMode::Graceful,
    };
    // No per-line timeout: a graceful stop takes as long as the roles' own timeouts allow.
    let response = match crate::control::request(&socket, &request, None)
        .and_then(|replies| replies.wait(|line| eprintln!("{line}")))
    {
        Ok(response) => response,
        Err(error @ ControlError::NotRunning { .. }) => {
            eprintln!("sauna-supervisor: {error}; nothing to stop");
            return Ok(ExitCode::SUCCESS);
        }
        Err(error) => return Err(error.into()),
    };
    match response.body {
        ResponseBody::Ok { .. } => {
            wait_for_exit(response.pid, ANSWER_TIMEOUT);
            eprintln!("sauna-supervisor (pid {}) stopped", response.pid);
            Ok(ExitCode::SUCCESS)
        }
        body => Err(answer_error(body)),
    }
}

/// `sauna-supervisor reload`: validates the file locally first (exit 2 with every diagnostic),
/// then asks the running supervisor to roll and prints its progress until it is done.
pub fn reload_command(
    config: &ConfigArg,
    timeout: Option<proxy_conf::Duration>,
) -> anyhow::Result<ExitCode> {
    let loaded = config.load()?;
    let socket = crate::config::control_socket(&loaded);
    let request = Request::Reload {
        timeout_secs: timeout.map(|t| t.get().as_secs().max(1)),
    };
    let replies = crate::control::request(&socket, &request, timeout.map(|t| t.get()))?;
    let response = replies.wait(|line| eprintln!("{line}"))?;
    match response.body {
        ResponseBody::Ok { data } => {
            if let Some(summary) = data.get("summary").and_then(|s| s.as_str()) {
                eprintln!("{summary}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ResponseBody::Error {
            error,
            message,
            detail,
        } => {
            eprintln!("sauna-supervisor: reload: {message}");
            if let Some(detail) = detail {
                eprintln!("{detail}");
            }
            Ok(match error {
                ErrorKind::Config | ErrorKind::BadRequest => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::FAILURE,
            })
        }
        ResponseBody::Progress { .. } => Err(anyhow::anyhow!(
            "the supervisor ended the reload without a result"
        )),
    }
}

/// `sauna-supervisor upgrade`: asks the running supervisor to start a new binary and hand it
/// the sockets, prints the progress, and returns once the old process has exited.
pub fn upgrade_command(
    config: &ConfigArg,
    binary: Option<std::path::PathBuf>,
    timeout: Option<proxy_conf::Duration>,
) -> anyhow::Result<ExitCode> {
    let loaded = config.load()?;
    let socket = crate::config::control_socket(&loaded);
    // The supervisor may run in another directory: send an absolute path.
    let binary = binary.map(|path| std::path::absolute(&path).unwrap_or(path));
    let request = Request::Upgrade {
        binary,
        timeout_secs: timeout.map(|t| t.get().as_secs().max(1)),
    };
    // No per-line timeout: the supervisor enforces the deadline and always answers, and the
    // drain after it is bounded by the roles' own timeouts.
    let replies = crate::control::request(&socket, &request, None)?;
    let response = replies.wait(|line| eprintln!("{line}"))?;
    match response.body {
        ResponseBody::Ok { data } => {
            if let Some(old) = data.get("old_pid").and_then(serde_json::Value::as_u64) {
                wait_for_exit(u32::try_from(old).unwrap_or_default(), ANSWER_TIMEOUT);
            }
            if let Some(summary) = data.get("summary").and_then(|s| s.as_str()) {
                eprintln!("{summary}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ResponseBody::Error {
            message, detail, ..
        } => {
            eprintln!("sauna-supervisor: upgrade: {message}");
            if let Some(detail) = detail {
                eprintln!("{detail}");
            }
            Ok(ExitCode::FAILURE)
        }
        ResponseBody::Progress { .. } => Err(anyhow::anyhow!(
            "the supervisor ended the upgrade without a result"
        )),
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
    let proc_path = format!("/proc/{pid}");
    while std::path::Path::new(&proc_path).exists() && Instant::now() < deadline {
        // A zombie still has a /proc entry; its parent (not us) reaps it.
        if let Ok(stat) = std::fs::read_to_string(format!("{proc_path}/stat")) {
            if stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
