//! `[programs.NAME]` judged and typed: a command to run, counts that cannot be zero, the stop
//! signal by name, restart timings that make sense. Whether the user and group exist, or the
//! command is on `PATH`, depends on the machine and is found out when the program starts.

use super::Checker;
use crate::config::ProgramConfig;
use crate::schema::RawProgram;
use crate::signal::StopSignal;

impl Checker<'_> {
    /// One program; `name` is its key under `[programs]`.
    pub(crate) fn program(&mut self, name: &str, program: &RawProgram) -> ProgramConfig {
        let base = ["programs", name];
        if name.trim().is_empty() {
            self.report_key(&base, "a program needs a name, e.g. [programs.celery]");
        }
        let at = |key: &'static str| [base[0], base[1], key];
        if program.command.is_empty() {
            if !self.broken_under(&base) {
                self.report(
                    &at("command"),
                    "a program needs a command, e.g. command = [\"celery\", \"-A\", \"myapp\", \"worker\"]",
                );
            }
        } else if program.command[0].trim().is_empty() {
            self.report_element(&at("command"), 0, "the program to run must not be empty");
        }
        let instances = self.count(
            &at("instances"),
            program.instances,
            "must be at least 1; remove the program to not run it",
        );
        let stop_signal = match program.stop_signal.parse::<StopSignal>() {
            Ok(signal) => signal,
            Err(error) => {
                self.report(&at("stop_signal"), error);
                StopSignal::default()
            }
        };
        let max_rss_samples = self.count_u32(
            &at("max_rss_samples"),
            program.max_rss_samples,
            "must be at least 1",
        );
        let crash_limit = self.count_u32(
            &at("crash_limit"),
            program.crash_limit,
            "must be at least 1 (exits within crash_window before the program is given up)",
        );
        if program.crash_window.is_zero() {
            self.report(&at("crash_window"), "must be longer than 0s");
        }
        if program.backoff_max.get() < std::time::Duration::from_secs(1) {
            self.report(
                &at("backoff_max"),
                "must be at least \"1s\", the first restart delay",
            );
        }
        for (key, value) in [("user", &program.user), ("group", &program.group)] {
            if value.as_ref().is_some_and(|v| v.trim().is_empty()) {
                self.report(
                    &at(key),
                    "must not be empty; remove it to keep the supervisor's",
                );
            }
        }
        if program
            .directory
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            self.report(
                &at("directory"),
                "must not be empty; remove it to use [app].directory",
            );
        }
        if program.rlimits.nofile == Some(0) {
            self.report(
                &["programs", name, "rlimits", "nofile"],
                "must be at least 1: the program could not open any file",
            );
        }
        self.env(&at("env"), &program.env);
        ProgramConfig {
            command: program.command.clone(),
            instances,
            directory: program.directory.clone(),
            env: program.env.clone(),
            user: program.user.clone(),
            group: program.group.clone(),
            restart: program.restart,
            stop_signal,
            stop_timeout: program.stop_timeout,
            max_rss: program.max_rss,
            max_rss_samples,
            backoff_max: program.backoff_max,
            stable_after: program.stable_after,
            crash_limit,
            crash_window: program.crash_window,
            ready_after: program.ready_after,
            reload: program.reload,
            priority: program.priority,
            rlimits: program.rlimits.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_one, problems};
    use crate::load::load_str;
    use crate::signal::StopSignal;

    #[test]
    fn a_program_needs_a_command() {
        assert_one(
            "[programs.worker]\ninstances = 2\n",
            "1:1: programs.worker.command: a program needs a command, e.g. command = [\"celery\", \"-A\", \"myapp\", \"worker\"]",
        );
        assert_one(
            "[programs.worker]\ncommand = []\n",
            "2:11: programs.worker.command: a program needs a command, e.g. command = [\"celery\", \"-A\", \"myapp\", \"worker\"]",
        );
        assert_one(
            "[programs.worker]\ncommand = [\"\", \"x\"]\n",
            "2:12: programs.worker.command[0]: the program to run must not be empty",
        );
    }

    #[test]
    fn program_counts_and_signals_are_checked() {
        let text = "[programs.w]\ncommand = [\"x\"]\ninstances = 0\nstop_signal = \"TREM\"\nbackoff_max = \"500ms\"\n";
        assert_eq!(
            problems(text),
            [
                "3:13: programs.w.instances: must be at least 1; remove the program to not run it",
                "4:15: programs.w.stop_signal: unknown signal \"TREM\" (did you mean \"TERM\"?); expected one of: TERM, INT, QUIT, HUP, USR1, USR2, KILL",
                "5:15: programs.w.backoff_max: must be at least \"1s\", the first restart delay",
            ]
        );
        assert_eq!(
            problems("[programs.w]\ncommand = [\"x\"]\ncrash_limit = 0\nmax_rss_samples = 0\n"),
            [
                "3:15: programs.w.crash_limit: must be at least 1 (exits within crash_window before the program is given up)",
                "4:19: programs.w.max_rss_samples: must be at least 1",
            ]
        );
    }

    #[test]
    fn the_runtime_gets_the_signal_and_counts() {
        let config = load_str(
            "[programs.w]\ncommand = [\"x\"]\nstop_signal = \"sigquit\"\ninstances = 3\n",
            "sauna.toml",
        )
        .unwrap();
        let program = &config.programs["w"];
        assert_eq!(program.stop_signal, StopSignal::Quit);
        assert_eq!(program.instances.get(), 3);
    }

    #[test]
    fn environment_names_must_be_usable() {
        assert_one(
            "[app]\nenv = { \"A=B\" = \"1\" }\n",
            "2:9: app.env.\"A=B\": an environment variable name must not be empty or contain \"=\"",
        );
    }
}
