//! The `emit` and `htpasswd` commands: gather the machine facts and secrets the renderers in
//! `proxy_conf::emit` need, then print the generated files or write them under `-o DIR` with the
//! next steps. What the files contain is decided in `proxy-conf` (and the Grafana dashboard in
//! `crate::metrics::dashboard`), not here.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use proxy_conf::Config;
use proxy_conf::emit::{self, EmitError, Machine, Output, Secrets};
use proxy_conf::secrets::Secret;

use super::{ConfigArg, EXIT_USAGE, EmitTarget};
use crate::metrics::dashboard;

/// `sauna-supervisor emit TARGET [-c FILE] [-o DIR]`.
pub fn emit_command(
    target: EmitTarget,
    arg: &ConfigArg,
    output_dir: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    if target == EmitTarget::All && output_dir.is_none() {
        eprintln!("sauna-supervisor: `emit all` writes several files: pass -o DIR");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let loaded = arg.load()?;
    let config = &loaded.config;
    let rendered = match render(target, config) {
        Ok(rendered) => rendered,
        Err(RenderError::Config(EmitError(problems))) => {
            for problem in &problems {
                eprintln!("{}", loaded.diagnostic_at(&problem.key, &problem.message));
            }
            eprintln!(
                "sauna-supervisor: {} problem(s) in {}; nothing written",
                problems.len(),
                loaded.path.display()
            );
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Err(RenderError::Secret(error)) => {
            eprintln!("sauna-supervisor: {error}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    for warning in &rendered.output.warnings {
        eprintln!("warning: {warning}");
    }
    for skipped in &rendered.skipped {
        eprintln!("note: {skipped}");
    }
    match output_dir {
        None => print_files(&rendered.output)?,
        Some(dir) => {
            write_files(&rendered.output, dir)?;
            print_next_steps(&rendered.output, dir);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What rendering produced, and the targets `all` left out because their section is absent.
struct Rendered {
    output: Output,
    skipped: Vec<String>,
}

enum RenderError {
    Config(EmitError),
    Secret(proxy_conf::stack::SecretError),
}

fn render(target: EmitTarget, config: &Config) -> Result<Rendered, RenderError> {
    let machine = machine();
    let secrets = || -> Result<Secrets, RenderError> {
        Ok(Secrets {
            redis_password: emit::redis::password(config)
                .map_err(RenderError::Secret)?
                .map(Secret::new),
            ..Secrets::default()
        })
    };
    let mut output = Output::default();
    let mut skipped = Vec::new();
    match target {
        EmitTarget::Nginx => output = emit::nginx::render(config).map_err(RenderError::Config)?,
        EmitTarget::Redis => {
            output = emit::redis::render(config, &secrets()?).map_err(RenderError::Config)?;
        }
        EmitTarget::Postgres => {
            output = emit::postgres::render(config, &machine).map_err(RenderError::Config)?;
        }
        EmitTarget::Systemd => {
            output = emit::systemd::render(config).map_err(RenderError::Config)?
        }
        EmitTarget::Grafana => output.files.push(grafana_file()),
        EmitTarget::All => {
            // Collect every target's problems before giving up, so one run shows them all.
            let mut problems = Vec::new();
            let mut add = |result: Result<Output, EmitError>| match result {
                Ok(more) => output.extend(more),
                Err(EmitError(more)) => problems.extend(more),
            };
            if config.web.is_some() {
                add(emit::nginx::render(config));
            } else {
                skipped.push("nginx: no [web] section".to_owned());
            }
            if config.redis.is_some() {
                add(emit::redis::render(config, &secrets()?));
            } else {
                skipped.push("redis: no [redis] section".to_owned());
            }
            if config.postgres.is_some() {
                add(emit::postgres::render(config, &machine));
            } else {
                skipped.push("postgres: no [postgres] section".to_owned());
            }
            add(emit::systemd::render(config));
            output.files.push(grafana_file());
            if !problems.is_empty() {
                return Err(RenderError::Config(EmitError(problems)));
            }
        }
    }
    Ok(Rendered { output, skipped })
}

/// The Grafana dashboard, as one of `emit all`'s files.
fn grafana_file() -> emit::File {
    emit::File {
        path: dashboard::FILE_NAME.to_owned(),
        install_to: "Grafana (Dashboards → New → Import)".to_owned(),
        contents: dashboard::dashboard_text(),
    }
}

/// The machine the files are generated on: total memory and CPUs (Celery's default concurrency).
pub fn machine() -> Machine {
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(1 << 30, |kib| kib * 1024);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Machine { memory, cpus }
}

/// One file alone is printed as is (so `emit nginx > site.conf` works); several get a header
/// line each, in their own comment syntax.
fn print_files(output: &Output) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let single = output.files.len() == 1;
    for (index, file) in output.files.iter().enumerate() {
        if !single {
            let comment = if file.path.ends_with(".sql") {
                "--"
            } else {
                "#"
            };
            if index > 0 {
                writeln!(stdout)?;
            }
            writeln!(
                stdout,
                "{comment} ==> {} (install as {}) <==",
                file.path, file.install_to
            )?;
        }
        stdout.write_all(file.contents.as_bytes())?;
    }
    stdout.flush().context("cannot write to stdout")
}

fn write_files(output: &Output, dir: &Path) -> anyhow::Result<()> {
    for file in &output.files {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
        // Redis files may carry the password's hash: readable by the owner only.
        let mode = if file.path.starts_with("redis/") {
            0o600
        } else {
            0o644
        };
        let mut handle = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        handle
            .write_all(file.contents.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn print_next_steps(output: &Output, dir: &Path) {
    println!(
        "Wrote {} file(s) under {}:",
        output.files.len(),
        dir.display()
    );
    for file in &output.files {
        println!("  {:<40} → install as {}", file.path, file.install_to);
    }
    if !output.next_steps.is_empty() {
        println!("\nThen:");
        for (index, step) in output.next_steps.iter().enumerate() {
            println!("  {}. {step}", index + 1);
        }
    }
}

/// `sauna-supervisor emit grafana [-o DIR]`: prints the dashboard, or writes it into `DIR`.
pub fn grafana_command(output_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let text = dashboard::dashboard_text();
    match output_dir {
        None => print!("{text}"),
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the output directory {}", dir.display()))?;
            let path = dir.join(dashboard::FILE_NAME);
            std::fs::write(&path, &text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
            eprintln!(
                "next: in Grafana, Dashboards → New → Import, upload {} and pick the Prometheus data source that scrapes [metrics].listen",
                dashboard::FILE_NAME
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sauna-supervisor htpasswd USER`: reads the password from stdin, prints `USER:$6$…`.
pub fn htpasswd_command(user: &str) -> anyhow::Result<ExitCode> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Password for {user} (echoed; pipe it in to avoid that): ");
    }
    let mut password = String::new();
    if stdin.is_terminal() {
        stdin
            .read_line(&mut password)
            .context("cannot read the password from stdin")?;
    } else {
        stdin
            .lock()
            .read_to_string(&mut password)
            .context("cannot read the password from stdin")?;
    }
    let password = password.strip_suffix('\n').unwrap_or(&password);
    let password = password.strip_suffix('\r').unwrap_or(password);
    match emit::htpasswd::entry(user, password) {
        Ok(line) => {
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("sauna-supervisor: htpasswd: {error}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
    }
}
