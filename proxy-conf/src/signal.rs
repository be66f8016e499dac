//! `[programs.NAME] stop_signal`: the signals that may stop a program, by name. `"TERM"`,
//! `"SIGTERM"` and `"term"` all name [`StopSignal::Term`]. Sending it belongs to the supervisor,
//! which maps each variant to the OS signal.

use std::fmt;
use std::str::FromStr;

use crate::diagnostics::did_you_mean;

/// A signal that stops a program's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StopSignal {
    /// SIGTERM, the default: most programs finish their work and exit.
    #[default]
    Term,
    /// SIGINT.
    Int,
    /// SIGQUIT: Celery's warm shutdown… and a core dump for many others.
    Quit,
    /// SIGHUP.
    Hup,
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
    /// SIGKILL: no chance to clean up.
    Kill,
}

impl StopSignal {
    /// Every stop signal, in the order messages list them.
    pub const ALL: [StopSignal; 7] = [
        StopSignal::Term,
        StopSignal::Int,
        StopSignal::Quit,
        StopSignal::Hup,
        StopSignal::Usr1,
        StopSignal::Usr2,
        StopSignal::Kill,
    ];

    /// The canonical name, without `SIG`: `"TERM"`.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "TERM",
            StopSignal::Int => "INT",
            StopSignal::Quit => "QUIT",
            StopSignal::Hup => "HUP",
            StopSignal::Usr1 => "USR1",
            StopSignal::Usr2 => "USR2",
            StopSignal::Kill => "KILL",
        }
    }
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a `stop_signal` was refused; the text lists the accepted names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StopSignalError(String);

impl FromStr for StopSignal {
    type Err = StopSignalError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let upper = text.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        if let Some(signal) = StopSignal::ALL.into_iter().find(|s| s.name() == bare) {
            return Ok(signal);
        }
        let names = StopSignal::ALL.map(StopSignal::name);
        let suggestion = did_you_mean(&text.to_ascii_uppercase(), names)
            .map(|s| format!(" (did you mean \"{s}\"?)"))
            .unwrap_or_default();
        Err(StopSignalError(format!(
            "unknown signal \"{text}\"{suggestion}; expected one of: {}",
            names.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_in_any_spelling() {
        assert_eq!("SIGTERM".parse(), Ok(StopSignal::Term));
        assert_eq!("int".parse(), Ok(StopSignal::Int));
        assert_eq!(" usr2 ".parse(), Ok(StopSignal::Usr2));
        assert_eq!(StopSignal::Quit.to_string(), "QUIT");
    }

    #[test]
    fn unknown_names_get_a_suggestion_and_the_list() {
        let error = |text: &str| text.parse::<StopSignal>().unwrap_err().to_string();
        assert_eq!(
            error("TREM"),
            "unknown signal \"TREM\" (did you mean \"TERM\"?); expected one of: TERM, INT, QUIT, HUP, USR1, USR2, KILL"
        );
        assert!(error("SIGSEGV").starts_with("unknown signal \"SIGSEGV\""));
        assert!(error("15").starts_with("unknown signal \"15\";"));
    }
}
