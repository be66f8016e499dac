//! The `emit` and `htpasswd` commands: gather the machine facts and secrets the renderers in
//! `proxy_conf::emit` need — memory and CPUs, the PostgreSQL cluster (`pg_lsclusters`), who runs
//! emit and whether systemd runs the machine, the values of the `*_env` secrets — then print the
//! generated files or write them under `-o DIR` with the install steps. What the files and the
//! steps contain is decided in `proxy-conf` (the Grafana dashboard in `crate::metrics::dashboard`),
//! not here. A secret's value goes only into the secrets file (mode 0600), never to stdout.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use proxy_conf::emit::install::{self, Host};
use proxy_conf::emit::postgres::{self, Cluster};
use proxy_conf::emit::{self, EmitError, Install, Machine, Output, Problem, Secrets, Service};
use proxy_conf::secrets::Secret;
use proxy_conf::{Config, Loaded};

use super::{CommandError, ConfigArg, EmitTarget};
use crate::metrics::dashboard;

/// `sauna-supervisor emit TARGET [-c FILE] [-o DIR]`.
pub fn emit_command(
    target: EmitTarget,
    arg: &ConfigArg,
    output_dir: Option<&Path>,
) -> Result<(), CommandError> {
    if target == EmitTarget::All && output_dir.is_none() {
        return Err(CommandError::Usage(
            "`emit all` writes several files: pass -o DIR".to_owned(),
        ));
    }
    let loaded = arg.load()?;
    let config = &loaded.config;
    let cluster = config
        .postgres
        .as_ref()
        .and_then(|pg| postgres_cluster(pg.port));
    let rendered = match render(target, config, &machine(), cluster.as_ref(), read_env) {
        Ok(rendered) => rendered,
        Err(EmitError(problems)) => {
            for problem in &problems {
                eprintln!("{}", loaded.diagnostic_at(&problem.key, &problem.message));
            }
            return Err(CommandError::Rejected(format!(
                "{} problem(s) in {}; nothing written",
                problems.len(),
                loaded.path.display()
            )));
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
            print_listing(&rendered.output, dir);
            if target == EmitTarget::All {
                let host = host(&loaded, dir, cluster);
                let plan = install::plan(config, &host, &rendered.output.files);
                println!("\n{}", plan.render(host.is_root));
            } else {
                println!("\n`emit all -o DIR` prints the steps that install the whole stack.");
            }
        }
    }
    Ok(())
}

/// What rendering produced, and the targets `all` left out because their section is absent.
struct Rendered {
    output: Output,
    skipped: Vec<String>,
}

/// An environment variable's value, or `None` when it is unset or not UTF-8.
fn read_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Renders `target`; `env` reads the variables the `*_env` keys name (Redis' password, and for
/// `all` the secrets file). Every problem of every target is collected before giving up, so one
/// run shows them all.
fn render(
    target: EmitTarget,
    config: &Config,
    machine: &Machine,
    cluster: Option<&Cluster>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Rendered, EmitError> {
    let mut problems = Vec::new();
    let mut secrets = || -> Secrets {
        let from_env = config.redis.as_ref().and_then(|r| r.password_env.as_ref());
        let password = match from_env {
            Some(var) => match env(var) {
                Some(value) => Ok(Some(value)),
                // `all` says so once, for the secrets file.
                None if target == EmitTarget::All => Ok(None),
                None => Err(Problem {
                    key: vec!["redis".to_owned(), "password_env".to_owned()],
                    message: format!(
                        "[redis].password_env names {var}, which is not set: export it, or use password_file"
                    ),
                }),
            },
            None => emit::redis::password(config).map_err(|error| Problem {
                key: vec!["redis".to_owned(), "password_file".to_owned()],
                message: error.to_string(),
            }),
        };
        match password {
            Ok(redis_password) => Secrets {
                redis_password: redis_password.map(Secret::new),
                ..Secrets::default()
            },
            Err(problem) => {
                problems.push(problem);
                Secrets::default()
            }
        }
    };
    let mut output = Output::default();
    let mut skipped = Vec::new();
    let mut results = Vec::new();
    match target {
        EmitTarget::Nginx => results.push(emit::nginx::render(config)),
        EmitTarget::Redis => {
            let secrets = secrets();
            results.push(emit::redis::render(config, &secrets));
        }
        EmitTarget::Postgres => results.push(emit::postgres::render(config, machine, cluster)),
        EmitTarget::Systemd => results.push(emit::systemd::render(config)),
        EmitTarget::Grafana => output.files.push(grafana_file()),
        EmitTarget::All => {
            if config.web.is_some() {
                results.push(emit::nginx::render(config).map(|mut output| {
                    output
                        .files
                        .extend(emit::nginx::first_certificate_site(config));
                    output
                }));
            } else {
                skipped.push("nginx: no [web] section".to_owned());
            }
            if config.redis.is_some() {
                let secrets = secrets();
                results.push(emit::redis::render(config, &secrets));
            } else {
                skipped.push("redis: no [redis] section".to_owned());
            }
            if config.postgres.is_some() {
                results.push(emit::postgres::render(config, machine, cluster));
            } else {
                skipped.push("postgres: no [postgres] section".to_owned());
            }
            results.push(emit::systemd::render(config));
            let values: Vec<(String, String)> = emit::env::variables(config)
                .into_iter()
                .filter_map(|variable| env(&variable.name).map(|value| (variable.name, value)))
                .collect();
            results.push(emit::env::render(config, &values).map(|file| Output {
                files: vec![file],
                ..Output::default()
            }));
            results.push(Ok(Output {
                files: vec![grafana_file()],
                ..Output::default()
            }));
        }
    }
    for result in results {
        match result {
            Ok(more) => output.extend(more),
            Err(EmitError(more)) => problems.extend(more),
        }
    }
    if !problems.is_empty() {
        return Err(EmitError(problems));
    }
    if target == EmitTarget::All {
        // Listed in the order the steps install them (a stable sort keeps each service's order).
        output.files.sort_by_key(|file| file.service);
    }
    Ok(Rendered { output, skipped })
}

/// The Grafana dashboard, as one of `emit all`'s files.
fn grafana_file() -> emit::File {
    emit::File {
        path: dashboard::FILE_NAME.to_owned(),
        service: Service::Grafana,
        install: Install::ByHand("import it in Grafana (Dashboards → New → Import)".to_owned()),
        contents: dashboard::dashboard_text(),
    }
}

/// The machine the files are generated on: total memory and CPUs (Celery's default concurrency).
pub fn machine() -> Machine {
    let memory = crate::process::procfs::mem_total().unwrap_or(1 << 30);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Machine { memory, cpus }
}

/// The PostgreSQL cluster of this machine the app's database goes into: from Debian's
/// `pg_lsclusters`, else from the `/etc/postgresql/VERSION/NAME/postgresql.conf` files.
fn postgres_cluster(port: u16) -> Option<Cluster> {
    let listed = std::process::Command::new("pg_lsclusters")
        .arg("--no-header")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| postgres::parse_lsclusters(&String::from_utf8_lossy(&out.stdout)))
        .unwrap_or_default();
    let clusters = if listed.is_empty() {
        scan_clusters(Path::new("/etc/postgresql"))
    } else {
        listed
    };
    postgres::choose(&clusters, port).cloned()
}

/// The clusters whose `postgresql.conf` sits under `root/VERSION/NAME/`, with the port it sets
/// (PostgreSQL's 5432 when it sets none) and the owner of its directory.
fn scan_clusters(root: &Path) -> Vec<Cluster> {
    let mut clusters = Vec::new();
    let Ok(versions) = std::fs::read_dir(root) else {
        return clusters;
    };
    for version in versions.flatten() {
        let Ok(names) = std::fs::read_dir(version.path()) else {
            continue;
        };
        for name in names.flatten() {
            let conf = name.path().join("postgresql.conf");
            let Ok(text) = std::fs::read_to_string(&conf) else {
                continue;
            };
            // The last setting wins, as in PostgreSQL.
            let port = text
                .lines()
                .rev()
                .filter_map(|line| line.split('#').next())
                .filter_map(|line| line.split_once('='))
                .filter(|(key, _)| key.trim() == "port")
                .find_map(|(_, value)| value.trim().parse().ok())
                .unwrap_or(5432);
            let owner = std::fs::metadata(name.path())
                .ok()
                .and_then(|meta| {
                    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(meta.uid())).ok()
                })
                .flatten()
                .map_or_else(|| "postgres".to_owned(), |user| user.name);
            clusters.push(Cluster {
                version: version.file_name().to_string_lossy().into_owned(),
                name: name.file_name().to_string_lossy().into_owned(),
                port,
                owner,
            });
        }
    }
    clusters
}

/// Who emits and where: the facts the install steps depend on.
fn host(loaded: &Loaded, dir: &Path, postgres: Option<Cluster>) -> Host {
    let unit = loaded.config.deploy.clone().unwrap_or_default().systemd;
    let config_path = &loaded.path;
    // The paths as written: loading resolved them against the file's directory already.
    let relative_paths = proxy_conf::load_str(&loaded.source, "sauna.toml")
        .map(|raw| proxy_conf::load::relative_paths(&raw))
        .unwrap_or_default();
    let running = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .unwrap_or_else(|_| PathBuf::from("sauna-supervisor"));
    // Installed already when the unit's binary is this very file (perhaps through a symlink).
    let binary = if std::fs::canonicalize(&unit.binary).is_ok_and(|path| path == running) {
        unit.binary
    } else {
        running
    };
    Host {
        is_root: nix::unistd::geteuid().is_root(),
        systemd: Path::new("/run/systemd/system").is_dir(),
        binary,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        config: std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_owned()),
        dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()),
        postgres,
        relative_paths,
    }
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
            writeln!(stdout, "{comment} ==> {} ({}) <==", file.path, file.install)?;
        }
        stdout.write_all(file.contents.as_bytes())?;
    }
    stdout.flush().context("cannot write to stdout")
}

/// Writes each file under `dir` with [`emit::File::mode_in_dir`]; an existing file gets that
/// mode before its new contents, so a secret never sits in a file others may read.
fn write_files(output: &Output, dir: &Path) -> anyhow::Result<()> {
    for file in &output.files {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
        let mode = file.mode_in_dir();
        let mut handle = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        handle
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        handle
            .write_all(file.contents.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn print_listing(output: &Output, dir: &Path) {
    println!(
        "Wrote {} file(s) under {}:",
        output.files.len(),
        dir.display()
    );
    for file in &output.files {
        println!("  {:<40} → {}", file.path, file.install);
    }
}

/// `sauna-supervisor emit grafana [-o DIR]`: prints the dashboard, or writes it into `DIR`.
pub fn grafana_command(output_dir: Option<&Path>) -> Result<(), CommandError> {
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
    Ok(())
}

/// `sauna-supervisor htpasswd USER`: reads the password from stdin, prints `USER:$6$…`.
pub fn htpasswd_command(user: &str) -> Result<(), CommandError> {
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
    let line = emit::htpasswd::entry(user, password)
        .map_err(|error| CommandError::Usage(format!("htpasswd: {error}")))?;
    println!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration of the golden files in tests/golden, shared with tests/emit.rs.
    const CONFIG: &str = include_str!("../../../tests/golden/all.toml");

    /// The steps `emit all` prints for [`CONFIG`] on a pinned machine, as root or not.
    fn steps(is_root: bool) -> String {
        let config = proxy_conf::load_str(CONFIG, "sauna.toml").expect("the golden config loads");
        let cluster = Cluster {
            version: "15".into(),
            name: "main".into(),
            port: 5432,
            owner: "postgres".into(),
        };
        let machine = Machine {
            memory: 8 << 30,
            cpus: 4,
        };
        let rendered = render(
            EmitTarget::All,
            &config,
            &machine,
            Some(&cluster),
            |name: &str| Some(format!("secret of {name}")),
        )
        .expect("the golden config renders");
        let host = Host {
            is_root,
            systemd: true,
            binary: "/home/deploy/build/sauna-supervisor".into(),
            version: "9.9.9".into(),
            config: "/home/deploy/myapp/sauna.toml".into(),
            dir: "/home/deploy/myapp/deploy".into(),
            postgres: Some(cluster),
            relative_paths: vec![("[programs.celery].directory".into(), "src".into())],
        };
        let text = install::plan(&config, &host, &rendered.output.files).render(is_root);
        assert!(!text.contains("secret of"), "a secret reached the steps");
        for file in &rendered.output.files {
            let path = host.dir.join(&file.path).display().to_string();
            assert!(text.contains(&path), "no step names {path}:\n{text}");
        }
        text
    }

    fn golden(name: &str, actual: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/steps")
            .join(name);
        if std::env::var_os("SAUNA_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("golden dir");
            std::fs::write(&path, actual).expect("write golden");
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "no golden file {}: run with SAUNA_UPDATE_GOLDEN=1 to create it",
                path.display()
            )
        });
        assert_eq!(
            actual,
            expected,
            "the steps differ from {}; if the change is intended, run with SAUNA_UPDATE_GOLDEN=1",
            path.display()
        );
    }

    /// `sh -n`: the text parses as shell, comments and all.
    fn assert_shell_syntax(text: &str) {
        let mut child = std::process::Command::new("sh")
            .arg("-n")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run sh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to sh");
        let output = child.wait_with_output().expect("sh -n");
        assert!(
            output.status.success(),
            "not valid shell: {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn root_gets_the_steps_without_sudo() {
        let text = steps(true);
        assert!(!text.contains("sudo"), "{text}");
        assert_shell_syntax(&text);
        golden("root.txt", &text);
    }

    #[test]
    fn another_user_gets_every_root_command_through_sudo() {
        let text = steps(false);
        for line in text.lines() {
            let needs_root = [
                "install ",
                "systemctl ",
                "useradd",
                "groupadd",
                "getent ",
                "mkdir ",
                "apt-get ",
                "runuser ",
                "rm ",
                "nginx ",
                "certbot ",
                "pg_ctlcluster ",
            ]
            .iter()
            .any(|command| line.contains(command));
            if line.starts_with('#') || line.starts_with("curl ") || !needs_root {
                continue;
            }
            assert!(
                line.starts_with("sudo "),
                "{line:?} does not go through sudo"
            );
        }
        assert!(
            text.contains(
                "sudo sh -c '(set -a && . /etc/sauna/myapp.env && exec runuser -u postgres -- psql"
            ),
            "{text}"
        );
        assert_shell_syntax(&text);
        golden("sudo.txt", &text);
    }

    #[test]
    fn without_postgresql_here_the_step_installs_it_and_asks_to_emit_again() {
        let config = proxy_conf::load_str(CONFIG, "sauna.toml").expect("the golden config loads");
        let machine = Machine {
            memory: 1 << 30,
            cpus: 1,
        };
        let rendered = render(EmitTarget::All, &config, &machine, None, |name: &str| {
            Some(format!("secret of {name}"))
        })
        .expect("renders without a cluster");
        let host = Host {
            is_root: true,
            systemd: true,
            binary: "/usr/local/bin/sauna-supervisor".into(),
            version: "9.9.9".into(),
            config: "/etc/sauna/sauna.toml".into(),
            dir: "/root/deploy".into(),
            postgres: None,
            relative_paths: Vec::new(),
        };
        let text = install::plan(&config, &host, &rendered.output.files).render(true);
        assert!(
            text.contains("# 4. PostgreSQL (not installed on this machine)\n"),
            "{text}"
        );
        assert!(text.contains("\napt-get install -y postgresql\n"), "{text}");
        assert!(
            text.contains(
                "`sauna-supervisor emit all -c /etc/sauna/sauna.toml -o /root/deploy` again"
            ),
            "{text}"
        );
        for file in ["myapp.conf", "myapp-pg_hba.conf", "myapp-init.sql"] {
            assert!(
                text.contains(&format!("/root/deploy/postgres/{file}")),
                "{text}"
            );
        }
        assert!(!text.contains("/etc/postgresql/"), "{text}");
        // Nothing to install or copy: the binary and the config are where the unit wants them.
        assert!(text.contains("# /usr/local/bin/sauna-supervisor is this binary already (sauna-supervisor 9.9.9).\n"), "{text}");
        assert!(
            !text.contains("/etc/sauna/sauna.toml /etc/sauna/sauna.toml"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_secret_is_refused_naming_the_variable() {
        let config = proxy_conf::load_str(CONFIG, "sauna.toml").expect("the golden config loads");
        let machine = Machine {
            memory: 1 << 30,
            cpus: 1,
        };
        let Err(EmitError(problems)) = render(EmitTarget::All, &config, &machine, None, |name| {
            (name == "REDIS_PASSWORD").then(|| "set".to_owned())
        }) else {
            panic!("rendered without MYAPP_DB_PASSWORD");
        };
        assert!(
            problems.iter().any(|p| p
                .message
                .starts_with("[postgres].password_env names MYAPP_DB_PASSWORD, which is not set")),
            "{problems:?}"
        );
    }

    #[test]
    fn clusters_are_found_from_their_configuration_files_without_pg_lsclusters() {
        let root = std::env::temp_dir().join(format!("sauna-scan-{}", std::process::id()));
        let main = root.join("16/main");
        std::fs::create_dir_all(&main).expect("dirs");
        std::fs::write(
            main.join("postgresql.conf"),
            "#port = 1\nport = 5433  # moved\n",
        )
        .expect("conf");
        std::fs::create_dir_all(root.join("16/empty")).expect("dirs");
        let clusters = scan_clusters(&root);
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(clusters.len(), 1, "{clusters:?}");
        assert_eq!(
            (
                clusters[0].version.as_str(),
                clusters[0].name.as_str(),
                clusters[0].port
            ),
            ("16", "main", 5433)
        );
    }
}
