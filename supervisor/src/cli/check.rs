//! `sauna-supervisor check`: validates the configuration and the secrets it names, reports what
//! `emit` would refuse, imports the app in a throwaway worker, and with `--live` compares the
//! running Redis and PostgreSQL with the file.

use std::path::Path;

use proxy_conf::{Diagnostic, Diagnostics};

use super::{CommandError, ConfigArg};
use crate::config::ConfigError;

/// `sauna-supervisor check`: prints every problem and fails (exit 2), or says the file is
/// valid. The problems include a secret that cannot be read (as `run` would refuse to start)
/// and, once the file is otherwise valid, everything `emit` would refuse for the sections it
/// has. With `--live`, also compares the running Redis and PostgreSQL with the file
/// (`super::live`), logging in with the secrets; every contradiction or refused login is a
/// warning line and makes the exit status 2 ([`CommandError::LiveMismatch`]).
pub fn check_command(arg: &ConfigArg, live: bool) -> Result<(), CommandError> {
    let path = crate::config::config_path(arg.config.as_deref());
    match crate::config::load_with_secrets(&path) {
        Ok(loaded) => {
            let mut refused: Vec<Diagnostic> = proxy_conf::emit::refusals(&loaded.config)
                .into_iter()
                .map(|problem| loaded.diagnostic_at(&problem.key, problem.message))
                .collect();
            if !refused.is_empty() {
                refused.sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
                return Err(print_problems(&Diagnostics(refused), &loaded.path));
            }
            if let Some(web) = &loaded.config.web {
                match crate::web::pool::check_web_import(
                    &loaded.config.app,
                    web,
                    &loaded.config_dir(),
                ) {
                    Ok(()) => {}
                    Err(crate::web::pool::ImportCheck::Failed(traceback)) => {
                        println!("{traceback}");
                        return Err(CommandError::Rejected(format!(
                            "the app in {} does not import",
                            loaded.path.display()
                        )));
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
                let findings = super::live::check(
                    &loaded.config,
                    &loaded.secrets,
                    super::emit::machine().cpus,
                );
                for finding in &findings {
                    println!("warning: {finding}");
                }
                if !findings.is_empty() {
                    return Err(CommandError::LiveMismatch);
                }
                println!("live servers agree with {}", loaded.path.display());
            }
            Ok(())
        }
        Err(ConfigError::Invalid(diagnostics, path)) => Err(print_problems(&diagnostics, &path)),
        Err(other) => Err(other.into()),
    }
}

/// `check`'s report of problems: one `FILE:LINE:COL: message` per line on stdout; the count is
/// the error's message, for stderr (exit 2).
fn print_problems(diagnostics: &Diagnostics, path: &Path) -> CommandError {
    println!("{diagnostics}");
    CommandError::Rejected(format!(
        "{} problem(s) in {}",
        diagnostics.0.len(),
        path.display()
    ))
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
