//! `sauna-supervisor check`: validates the configuration, imports the app in a throwaway worker,
//! and with `--live` compares the running Redis and PostgreSQL with the file.

use std::process::ExitCode;

use super::{ConfigArg, EXIT_USAGE};
use crate::config::ConfigError;

/// `sauna-supervisor check`: prints every problem and exits 2, or says the file is valid. With
/// `--live`, also compares the running Redis and PostgreSQL with the file (`super::live`); every
/// contradiction is a warning line and makes the exit status 2.
pub fn check_command(arg: &ConfigArg, live: bool) -> anyhow::Result<ExitCode> {
    match arg.load() {
        Ok(loaded) => {
            if loaded.config.web.is_some() {
                match crate::web::pool::check_import(&loaded.config.app, &loaded.config_dir()) {
                    Ok(()) => {}
                    Err(crate::web::pool::ImportCheck::Failed(traceback)) => {
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
                let findings = super::live::check(&loaded.config, super::emit::machine().cpus);
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
