//! How a command fails, and so how the process exits. Every command returns
//! `Result<(), CommandError>`; [`CommandError::exit_code`] is the one place that picks an exit
//! status, and [`CommandError::report`] the one place that prints the failure. Commands print
//! what they found (diagnostics on stdout, progress on stderr) and leave the verdict to these two.

use crate::config::ConfigError;
use crate::control::{ControlError, ErrorKind};
use crate::supervisor::RunError;

/// A runtime failure.
const EXIT_FAILURE: u8 = 1;
/// A usage or configuration error.
const EXIT_USAGE: u8 = 2;
/// `status`: no supervisor is running.
const EXIT_NOT_RUNNING: u8 = 3;

/// Why a command failed. The exit statuses, as the README's "Exit status" paragraph and each
/// command's `--help` document them:
///
/// - **0** — done. Also `stop` when no supervisor runs (nothing to stop), and `--help` or
///   `--version`.
/// - **1** — a runtime failure: `run` could not start (a control socket another supervisor
///   answers on, a port in use, an app whose workers cannot start…) or stopped because it could
///   no longer serve; `reload` rolled back or failed; `upgrade` failed, the old supervisor still
///   serving; `reload` or `upgrade` found no supervisor; the control socket failed or answered
///   something unreadable.
/// - **2** — a usage or configuration error: a command line that does not parse; a config file
///   that cannot be read or has problems, or a secret it names that cannot be read (`run`,
///   `check`, `emit`, `beat next`, and `status`/`stop`/`reload`/`upgrade` when they read one);
///   what `check` finds (problems, an app that does not import, `--live` contradictions); what
///   `emit` refuses, and `emit all` without `-o`; a bad `beat next` flag; a password `htpasswd`
///   refuses; a `reload` the supervisor refused because its config has problems.
/// - **3** — `status` found no supervisor running (or it stopped before answering).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command line does not parse, or asks for `--help` or `--version`: clap prints it, and
    /// says whether that is an error (exit 2) or not (exit 0).
    #[error("{0}")]
    Args(#[from] clap::Error),
    /// The config file cannot be read, has problems, or names a secret that cannot be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A flag's value or what the command read cannot be used (`emit all` without `-o`, a bad
    /// `beat next` expression, a password `htpasswd` refuses); the message says which and why.
    #[error("{0}")]
    Usage(String),
    /// The config was checked and refused, its problems already printed (`check`'s diagnostics,
    /// `emit`'s refusals, the traceback of an app that does not import); the message sums up.
    #[error("{0}")]
    Rejected(String),
    /// `check --live`: the running servers contradict the config. Each finding was printed as a
    /// warning; nothing more is said.
    #[error("the running servers contradict the config")]
    LiveMismatch,
    /// `status`: no supervisor answers; the message names every socket tried.
    #[error("{0}")]
    NotRunning(String),
    /// The running supervisor answered `reload` with an error: it refused the config or the
    /// request (exit 2), or the reload rolled back or failed (exit 1).
    #[error("reload: {message}{}", detail_lines(detail))]
    Reload {
        /// What kind of failure the supervisor reported.
        kind: ErrorKind,
        /// What failed.
        message: String,
        /// The diagnostics or the traceback behind it.
        detail: Option<String>,
    },
    /// The running supervisor answered `upgrade` with an error; it keeps serving.
    #[error("upgrade: {message}{}", detail_lines(detail))]
    Upgrade {
        /// What failed.
        message: String,
        /// The diagnostics or the traceback behind it.
        detail: Option<String>,
    },
    /// `run`: the supervisor stopped because it could no longer serve. The reason was logged;
    /// nothing more is said.
    #[error("the supervisor stopped because it could no longer serve")]
    Stopped,
    /// Anything else, with its chain of causes.
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl CommandError {
    /// The process's exit status for this failure (see the type's documentation).
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Args(error) => {
                // 0 for --help and --version, 2 for a bad command line.
                u8::try_from(error.exit_code()).unwrap_or(EXIT_USAGE)
            }
            CommandError::Config(_)
            | CommandError::Usage(_)
            | CommandError::Rejected(_)
            | CommandError::LiveMismatch => EXIT_USAGE,
            CommandError::NotRunning(_) => EXIT_NOT_RUNNING,
            CommandError::Reload {
                kind: ErrorKind::Config | ErrorKind::BadRequest,
                ..
            } => EXIT_USAGE,
            CommandError::Reload { .. }
            | CommandError::Upgrade { .. }
            | CommandError::Stopped
            | CommandError::Other(_) => EXIT_FAILURE,
        }
    }

    /// Prints the failure: clap's own text for the command line, nothing when the command has
    /// already said everything, else one `sauna-supervisor: …` paragraph on stderr.
    pub fn report(&self) {
        match self {
            CommandError::Args(error) => {
                // Help goes to stdout, errors to stderr; clap knows which.
                let _ = error.print();
            }
            CommandError::LiveMismatch | CommandError::Stopped => {}
            _ => eprintln!("sauna-supervisor: {self}"),
        }
    }
}

impl From<ControlError> for CommandError {
    fn from(error: ControlError) -> CommandError {
        CommandError::Other(error.into())
    }
}

impl From<RunError> for CommandError {
    fn from(error: RunError) -> CommandError {
        match error {
            RunError::Config(error) => CommandError::Config(error),
            RunError::Stopped => CommandError::Stopped,
            RunError::Other(error) => CommandError::Other(error),
        }
    }
}

/// The supervisor's detail (diagnostics, a traceback) on the lines after the message.
fn detail_lines(detail: &Option<String>) -> String {
    detail
        .as_ref()
        .map(|detail| format!("\n{detail}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::Cli;

    fn reload(kind: ErrorKind) -> CommandError {
        CommandError::Reload {
            kind,
            message: "rolled back".to_owned(),
            detail: None,
        }
    }

    #[test]
    fn every_kind_of_failure_has_its_documented_exit_status() {
        let help = Cli::try_parse_from(["sauna-supervisor", "--help"]).unwrap_err();
        let bad = Cli::try_parse_from(["sauna-supervisor", "--no-such-flag"]).unwrap_err();
        let unreadable = ConfigError::Unreadable {
            path: "sauna.toml".into(),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let cases = [
            (CommandError::Args(help), 0),
            (CommandError::Args(bad), 2),
            (CommandError::Config(unreadable), 2),
            (CommandError::Usage("beat next: --cron: bad".into()), 2),
            (
                CommandError::Rejected("1 problem(s) in sauna.toml".into()),
                2,
            ),
            (CommandError::LiveMismatch, 2),
            (CommandError::NotRunning("no sauna-supervisor".into()), 3),
            (reload(ErrorKind::Config), 2),
            (reload(ErrorKind::BadRequest), 2),
            (reload(ErrorKind::Failed), 1),
            (reload(ErrorKind::Unavailable), 1),
            (reload(ErrorKind::Refused), 1),
            (
                CommandError::Upgrade {
                    message: "the new process exited".into(),
                    detail: None,
                },
                1,
            ),
            (CommandError::Stopped, 1),
            (CommandError::Other(anyhow::anyhow!("cannot bind")), 1),
        ];
        for (error, code) in cases {
            assert_eq!(error.exit_code(), code, "{error:?}");
        }
    }

    #[test]
    fn a_supervisor_error_prints_its_detail_on_the_following_lines() {
        let error = CommandError::Reload {
            kind: ErrorKind::Failed,
            message: "rolled back".into(),
            detail: Some("Traceback (most recent call last):\n  ImportError".into()),
        };
        assert_eq!(
            error.to_string(),
            "reload: rolled back\nTraceback (most recent call last):\n  ImportError"
        );
        let error = CommandError::Upgrade {
            message: "not ready".into(),
            detail: None,
        };
        assert_eq!(error.to_string(), "upgrade: not ready");
    }

    #[test]
    fn other_errors_print_their_whole_chain() {
        let error: CommandError = anyhow::anyhow!("permission denied")
            .context("cannot write out/nginx.conf")
            .into();
        assert_eq!(
            error.to_string(),
            "cannot write out/nginx.conf: permission denied"
        );
    }
}
