//! The install steps `emit all -o DIR` prints: numbered blocks a root shell on Debian pastes in
//! order, one per service — packages; the supervisor's user, binary, `sauna.toml` and secrets;
//! Redis; PostgreSQL; nginx; the supervisor's unit; a final check — then what replaces the
//! `systemctl` lines on a machine without systemd. Every generated file is installed (or, for
//! the Grafana dashboard, named) by some step; the order is the one that works, each step relying
//! only on those before it.
//!
//! The steps are built as [`Line`]s and rendered for root as they are, or, for an emitting user
//! who is not root, through `sudo` (a plain command gets the prefix, a line with shell syntax is
//! wrapped in `sudo sh -c '…'`). Machine facts — who emits, whether systemd runs, the PostgreSQL
//! cluster, where the binary and the config are — come from the caller in a [`Host`]. No secret
//! is ever part of a step: commands that need one read the installed secrets file themselves.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::postgres::Cluster;
use super::redis::{Endpoint, instances};
use super::{File, Install, Service, deploy, nginx, postgres, systemd};
use crate::config::Config;
use crate::stack::DeployConfig;

/// What the steps depend on about the machine and the emitting process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The emitting user is root: commands are printed as they are, else through `sudo`.
    pub is_root: bool,
    /// systemd runs this machine (`/run/systemd/system` exists).
    pub systemd: bool,
    /// The running `sauna-supervisor` binary.
    pub binary: PathBuf,
    /// Its version.
    pub version: String,
    /// The `sauna.toml` that was read, as an absolute path.
    pub config: PathBuf,
    /// The `-o` directory, as an absolute path.
    pub dir: PathBuf,
    /// The PostgreSQL cluster found on this machine, if any.
    pub postgres: Option<Cluster>,
    /// The paths `sauna.toml` writes relative to its own directory, with their keys: they mean
    /// something else once the file is installed elsewhere.
    pub relative_paths: Vec<(String, PathBuf)>,
}

/// One line of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A comment saying why.
    Note(String),
    /// Commands run as root, joined by `&&` (each gets `sudo` when not root).
    Root(Vec<String>),
    /// A line with shell syntax (redirection, `||`, a subshell) run by root (`sudo sh -c` when
    /// not root).
    RootShell(String),
    /// A command any user runs as it is.
    User(String),
}

/// One numbered block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What it sets up.
    pub title: String,
    /// The lines, in order.
    pub lines: Vec<Line>,
    /// What replaces its `systemctl` lines on a machine without systemd; empty when nothing does.
    pub without_systemd: Vec<Line>,
}

/// The whole sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The numbered steps.
    pub steps: Vec<Step>,
    /// Whether systemd runs the machine that emitted (the note on the fallback section says so).
    pub systemd: bool,
}

/// The steps installing `files` (the output of `emit all`) for `config` on `host`.
pub fn plan(config: &Config, host: &Host, files: &[File]) -> Plan {
    let context = Context {
        config,
        host,
        files,
        deploy: deploy(config),
    };
    let mut steps = vec![context.packages()];
    if context.has(Service::Base) {
        steps.push(context.base());
    }
    if context.has(Service::Redis) {
        steps.push(context.redis());
    }
    if context.has(Service::Postgres) {
        steps.push(context.postgres());
    }
    if context.has(Service::Nginx) {
        if let Some(step) = context.first_certificate() {
            steps.push(step);
        }
        steps.push(context.nginx());
    }
    if context.has(Service::Sauna) {
        steps.push(context.sauna());
        steps.push(context.check());
    }
    if context.has(Service::Grafana) {
        steps.push(context.grafana());
    }
    Plan {
        steps,
        systemd: host.systemd,
    }
}

impl Plan {
    /// The steps as text: for root as they are, otherwise through `sudo`.
    pub fn render(&self, as_root: bool) -> String {
        let mut out = String::new();
        // Every line is shell: the whole text pastes as well as any block of it.
        if as_root {
            out.push_str("# Next steps: paste each block into a root shell, in order (every path is absolute).\n");
        } else {
            out.push_str("# Next steps: you are not root, so what needs root goes through sudo. Paste each block into\n# your shell, in order (every path is absolute).\n");
        }
        for (index, step) in self.steps.iter().enumerate() {
            let _ = writeln!(out, "\n# {}. {}", index + 1, step.title);
            for line in &step.lines {
                out.push_str(&render_line(line, as_root));
            }
        }
        let fallback: Vec<(usize, &Step)> = self
            .steps
            .iter()
            .enumerate()
            .filter(|(_, step)| !step.without_systemd.is_empty())
            .collect();
        if !fallback.is_empty() {
            out.push_str("\n# Without systemd (a container, sysvinit): these lines replace the systemctl lines of the\n# steps above. Nothing restarts a process that dies or starts it at boot unless your init does:\n# put the start lines into its start script, or run them under your process supervisor.\n");
            if !self.systemd {
                out.push_str("# This machine does not run systemd (/run/systemd/system is absent): use these.\n");
            }
            for (index, step) in fallback {
                let _ = writeln!(out, "# In step {}, {}:", index + 1, step.title);
                for line in &step.without_systemd {
                    out.push_str(&render_line(line, as_root));
                }
            }
        }
        out
    }
}

fn render_line(line: &Line, as_root: bool) -> String {
    match line {
        Line::Note(text) => text.lines().map(|l| format!("# {l}\n")).collect(),
        Line::Root(commands) if as_root => format!("{}\n", commands.join(" && ")),
        Line::Root(commands) => format!(
            "{}\n",
            commands
                .iter()
                .map(|c| format!("sudo {c}"))
                .collect::<Vec<_>>()
                .join(" && ")
        ),
        Line::RootShell(text) if as_root => format!("{text}\n"),
        Line::RootShell(text) => format!("sudo sh -c {}\n", quote(text)),
        Line::User(text) => format!("{text}\n"),
    }
}

/// `text` as one shell word: as it is when nothing in it is special, else in single quotes.
pub fn arg(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c));
    if plain { text.to_owned() } else { quote(text) }
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

fn path_arg(path: &Path) -> String {
    arg(&path.display().to_string())
}

struct Context<'a> {
    config: &'a Config,
    host: &'a Host,
    files: &'a [File],
    deploy: DeployConfig,
}

impl Context<'_> {
    fn has(&self, service: Service) -> bool {
        self.files.iter().any(|f| f.service == service)
    }

    fn of(&self, service: Service) -> impl Iterator<Item = &File> {
        self.files.iter().filter(move |f| f.service == service)
    }

    fn find(&self, path: &str) -> Option<&File> {
        self.files.iter().find(|f| f.path == path)
    }

    /// The file's path under the `-o` directory, as a shell word.
    fn source(&self, file: &File) -> String {
        path_arg(&self.host.dir.join(&file.path))
    }

    /// `install -m MODE -o OWNER -g GROUP DIR/FILE TARGET` for a copied file.
    fn copy_line(&self, file: &File) -> Option<Line> {
        match &file.install {
            Install::Copy {
                to,
                mode,
                owner,
                group,
            } => Some(Line::Root(vec![format!(
                "install -m {mode:04o} -o {owner} -g {group} {} {}",
                self.source(file),
                path_arg(to)
            )])),
            _ => None,
        }
    }

    fn user(&self) -> &str {
        &self.deploy.systemd.user
    }

    fn group(&self) -> &str {
        &self.deploy.systemd.group
    }

    fn binary(&self) -> String {
        path_arg(&self.deploy.systemd.binary)
    }

    fn config_path(&self) -> String {
        path_arg(&self.deploy.systemd.config)
    }

    /// The secrets file, installed by the base step, when there is one.
    fn env_file(&self) -> Option<String> {
        self.find(&format!("{}.env", self.deploy.name))
            .map(|_| path_arg(&super::env::path(&self.deploy)))
    }

    /// `(set -a && . ENV && exec COMMAND)`: the command gets the secrets, the shell does not
    /// keep them.
    fn with_secrets(&self, command: &str) -> String {
        match self.env_file() {
            Some(env) => format!("(set -a && . {env} && exec {command})"),
            None => command.to_owned(),
        }
    }

    fn packages(&self) -> Step {
        let mut packages = Vec::new();
        if self.has(Service::Nginx) {
            packages.push("nginx");
        }
        if self.has(Service::Redis) {
            packages.push("redis-server");
        }
        if self.has(Service::Postgres) {
            packages.push("postgresql");
        }
        if nginx::first_certificate_webroot(&self.deploy).is_some() {
            packages.push("certbot");
        }
        packages.push("curl");
        Step {
            title: "Packages".to_owned(),
            lines: vec![Line::Root(vec![
                "apt-get update".to_owned(),
                format!("apt-get install -y {}", packages.join(" ")),
            ])],
            without_systemd: Vec::new(),
        }
    }

    fn base(&self) -> Step {
        let unit = &self.deploy.systemd;
        let (user, group) = (self.user(), self.group());
        let mut lines = Vec::new();
        if user != "root" {
            lines.push(Line::Note(format!(
                "[deploy.systemd].user and group: the supervisor and the app run as {user}:{group}"
            )));
            lines.push(Line::RootShell(format!(
                "getent group {group} >/dev/null || groupadd --system {group}"
            )));
            lines.push(Line::RootShell(format!(
                "id -u {user} >/dev/null 2>&1 || useradd --system --gid {group} --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {user}"
            )));
        }
        // The directories of what this step installs.
        let mut installed = vec![super::env::path(&self.deploy)];
        if self.host.binary != unit.binary {
            installed.push(unit.binary.clone());
        }
        if self.host.config != unit.config {
            installed.push(unit.config.clone());
        }
        let dirs: BTreeSet<&Path> = installed.iter().filter_map(|p| p.parent()).collect();
        lines.push(Line::Root(vec![format!(
            "mkdir -p {}",
            dirs.iter()
                .map(|d| path_arg(d))
                .collect::<Vec<_>>()
                .join(" ")
        )]));
        if self.host.binary == unit.binary {
            lines.push(Line::Note(format!(
                "{} is this binary already (sauna-supervisor {}).",
                unit.binary.display(),
                self.host.version
            )));
        } else {
            lines.push(Line::Note(format!(
                "sauna-supervisor {}, the binary that printed these steps",
                self.host.version
            )));
            lines.push(Line::Root(vec![format!(
                "install -m 0755 -o root -g root {} {}",
                path_arg(&self.host.binary),
                self.binary()
            )]));
        }
        if self.host.config != unit.config {
            lines.push(Line::Note(
                "[deploy.systemd].config: the unit reads sauna.toml from there".to_owned(),
            ));
            let moved_from = self.host.config.parent().unwrap_or(Path::new("/"));
            let moved_to = unit.config.parent().unwrap_or(Path::new("/"));
            if moved_from != moved_to {
                for (key, path) in &self.host.relative_paths {
                    lines.push(Line::Note(format!(
                        "Careful: {key} = {:?} is relative, so it means {} there, not {}:\nwrite it as an absolute path in sauna.toml first.",
                        path.display(),
                        moved_to.join(path).display(),
                        moved_from.join(path).display()
                    )));
                }
            }
            lines.push(Line::Root(vec![format!(
                "install -m 0644 -o root -g root {} {}",
                path_arg(&self.host.config),
                self.config_path()
            )]));
        }
        for file in self.of(Service::Base) {
            let names: Vec<String> = super::env::variables(self.config)
                .into_iter()
                .map(|v| v.name)
                .collect();
            let which = if names.is_empty() {
                "no *_env key names one yet; the unit needs the file anyway".to_owned()
            } else {
                names.join(", ")
            };
            lines.push(Line::Note(format!(
                "The secrets the unit passes to the supervisor ({which}), root only"
            )));
            lines.extend(self.copy_line(file));
        }
        if !unit.writable_paths.is_empty() {
            lines.push(Line::Note(
                "[deploy.systemd].writable_paths: the app writes there".to_owned(),
            ));
            for path in &unit.writable_paths {
                lines.push(Line::Root(vec![format!(
                    "install -d -m 0755 -o {user} -g {group} {}",
                    path_arg(path)
                )]));
            }
        }
        if let Some(directory) = &self.config.app.directory {
            lines.push(Line::Note(format!(
                "The app itself is deployed to {} (readable by {user}) by you, not by these steps.",
                directory.display()
            )));
        }
        Step {
            title: "sauna-supervisor: its user, the binary, sauna.toml and the secrets".to_owned(),
            lines,
            without_systemd: Vec::new(),
        }
    }

    fn redis(&self) -> Step {
        let redis = self.config.redis.clone().unwrap_or_default();
        let list = instances(self.config)
            .map(|(list, _)| list)
            .unwrap_or_default();
        let mut lines = Vec::new();
        let mut without_systemd = Vec::new();
        let describe: Vec<String> = list
            .iter()
            .map(|i| format!("{} on {}", i.name, i.endpoint))
            .collect();
        let on_default_port = list
            .iter()
            .any(|i| matches!(&i.endpoint, Endpoint::Tcp { port: 6379, .. }));
        if on_default_port {
            lines.push(Line::Note(
                "Debian's own redis-server instance holds port 6379: stop it for good".to_owned(),
            ));
            lines.push(Line::Root(vec![
                "systemctl disable --now redis-server".to_owned(),
            ]));
            without_systemd.push(Line::Root(vec![
                "service redis-server stop".to_owned(),
                "update-rc.d redis-server disable".to_owned(),
            ]));
        }
        let mut units = Vec::new();
        for instance in &list {
            if let Some(file) = self.find(&format!("redis/{}.conf", instance.name)) {
                lines.extend(self.copy_line(file));
            }
            lines.push(Line::Root(vec![format!(
                "install -d -m 0750 -o {user} -g {user} {}",
                path_arg(&super::redis::data_dir(&redis, instance)),
                user = redis.user
            )]));
            if let Endpoint::Unix(socket) = &instance.endpoint
                && let Some(parent) = socket.parent()
            {
                lines.push(Line::Note(format!(
                    "The socket's directory; the socket is {user}'s group's (unixsocketperm 770), so {app} joins it",
                    user = redis.user,
                    app = self.user()
                )));
                lines.push(Line::Root(vec![
                    format!(
                        "install -d -m 0750 -o {user} -g {user} {}",
                        path_arg(parent),
                        user = redis.user
                    ),
                    format!("usermod -a -G {} {}", redis.user, self.user()),
                ]));
            }
            let unit = systemd::redis_unit(instance);
            if let Some(file) = self.find(&format!("systemd/{unit}.service")) {
                lines.extend(self.copy_line(file));
            }
            without_systemd.push(Line::Root(vec![format!(
                "start-stop-daemon --start --background --make-pidfile --pidfile /run/{unit}.pid --chuid {user}:{user} --output /var/log/redis/{name}.log --exec {server} -- {conf}",
                user = redis.user,
                name = instance.name,
                server = path_arg(&redis.server),
                conf = path_arg(&super::redis::conf_path(instance)),
            )]));
            units.push(unit);
        }
        lines.push(Line::Root(vec!["systemctl daemon-reload".to_owned()]));
        lines.push(Line::Root(vec![format!(
            "systemctl enable --now {}",
            units.join(" ")
        )]));
        Step {
            title: format!("Redis: {}", describe.join(", ")),
            lines,
            without_systemd,
        }
    }

    fn postgres(&self) -> Step {
        let pg = self.config.postgres.clone().unwrap_or_default();
        let name = &self.deploy.name;
        let files: Vec<&File> = self.of(Service::Postgres).collect();
        let Some(cluster) = &self.host.postgres else {
            return Step {
                title: "PostgreSQL (not installed on this machine)".to_owned(),
                lines: vec![
                    Line::Note(format!(
                        "Where {} go depends on the PostgreSQL version, and none is installed here:\ninstall it, run `sauna-supervisor emit all -c {} -o {}` again and go on with the\nPostgreSQL step it prints.",
                        files
                            .iter()
                            .map(|f| self.source(f))
                            .collect::<Vec<_>>()
                            .join(", "),
                        path_arg(&self.host.config),
                        path_arg(&self.host.dir)
                    )),
                    Line::Root(vec!["apt-get install -y postgresql".to_owned()]),
                ],
                without_systemd: Vec::new(),
            };
        };
        let dir = cluster.config_dir();
        let mut lines = Vec::new();
        if cluster.port != pg.port {
            lines.push(Line::Note(format!(
                "The cluster listens on port {} today; conf.d/{name}.conf moves it to [postgres].port {}.",
                cluster.port, pg.port
            )));
        }
        let main_conf = path_arg(&dir.join("postgresql.conf"));
        for file in &files {
            match &file.install {
                Install::Copy { to, .. } if to.starts_with(&dir) => {
                    lines.extend(self.copy_line(file));
                    lines.push(Line::Note(
                        "conf.d/ is read through include_dir = 'conf.d' (Debian's default; added if missing)"
                            .to_owned(),
                    ));
                    lines.push(Line::RootShell(format!(
                        "grep -qE \"^[[:space:]]*include_dir[[:space:]]*=[[:space:]]*'conf\\.d'\" {main_conf} || echo \"include_dir = 'conf.d'\" >> {main_conf}"
                    )));
                }
                Install::Prepend {
                    to,
                    mode,
                    owner,
                    group,
                } => {
                    let hba = path_arg(to);
                    let new = path_arg(&to.with_extension("conf.new"));
                    let orig = path_arg(&to.with_extension("conf.orig"));
                    lines.push(Line::Note(format!(
                        "pg_hba.conf: the first line matching a connection decides, so {name}'s lines go on top,\nfrom \"{}\" to \"{}\" (an earlier copy is replaced);\nthe distribution's lines stay below them. The original is kept as pg_hba.conf.orig.",
                        postgres::hba_begin(name),
                        postgres::hba_end(name)
                    )));
                    lines.push(Line::RootShell(format!(
                        "test -e {orig} || cp -p {hba} {orig}"
                    )));
                    lines.push(Line::RootShell(format!(
                        "{{ cat {}; sed \"/^{}$/,/^{}$/d\" {hba}; }} > {new}",
                        self.source(file),
                        postgres::hba_begin(name),
                        postgres::hba_end(name)
                    )));
                    lines.push(Line::Root(vec![
                        format!("install -m {mode:04o} -o {owner} -g {group} {new} {hba}"),
                        format!("rm {new}"),
                    ]));
                }
                _ => {}
            }
        }
        let init = postgres::init_sql_path(name);
        if let Some(file) = files
            .iter()
            .find(|f| matches!(&f.install, Install::Copy { to, .. } if *to == init))
        {
            lines.extend(self.copy_line(file));
        }
        lines.push(Line::Note(
            "max_connections and shared_buffers take effect at a restart".to_owned(),
        ));
        lines.push(Line::Root(vec![format!(
            "systemctl restart {}",
            cluster.unit()
        )]));
        let source = match (&pg.password_env, &pg.password_file) {
            (Some(var), _) => format!("psql reads {var} from the secrets file"),
            (None, Some(file)) => format!(
                "psql reads the password from {} ({} must be able to read it)",
                file.display(),
                pg.admin
            ),
            (None, None) => "psql reads the password".to_owned(),
        };
        lines.push(Line::Note(format!(
            "The app's role and database, created by the admin role {};\n{source}",
            pg.admin
        )));
        lines.push(Line::RootShell(format!(
            "{} < {}",
            self.with_secrets(&format!(
                "runuser -u {} -- psql -X -v ON_ERROR_STOP=1 -p {} -d postgres -f -",
                pg.admin, pg.port
            )),
            path_arg(&init)
        )));
        Step {
            title: format!(
                "PostgreSQL {}, cluster {} (from pg_lsclusters): {}",
                cluster.version,
                cluster.name,
                dir.display()
            ),
            lines,
            without_systemd: vec![Line::Root(vec![format!(
                "pg_ctlcluster {} {} restart",
                cluster.version, cluster.name
            )])],
        }
    }

    /// `nginx -t && (re)load`, with or without systemd.
    fn nginx_reload(systemd: bool) -> String {
        if systemd {
            "nginx -t && systemctl reload-or-restart nginx".to_owned()
        } else {
            "nginx -t && (nginx -s reload || service nginx start)".to_owned()
        }
    }

    fn first_certificate(&self) -> Option<Step> {
        let webroot = nginx::first_certificate_webroot(&self.deploy)?;
        let certificate = nginx::acme_certificate(&self.deploy)?;
        let file = self.find(&format!("nginx/{}-acme.conf", self.deploy.name))?;
        let Install::Copy { to, .. } = &file.install else {
            return None;
        };
        let names = &self.deploy.server_names;
        let fetch = |systemd: bool| {
            Line::RootShell(format!(
                "if [ ! -e {cert} ]; then install -m 0644 -o root -g root {source} {to} && {reload} && certbot certonly --webroot -w {webroot} --cert-name {first} {domains}; rm -f {to}; fi",
                cert = path_arg(&certificate),
                source = self.source(file),
                to = path_arg(to),
                reload = Self::nginx_reload(systemd),
                webroot = path_arg(webroot),
                first = names.first().map_or("", String::as_str),
                domains = names
                    .iter()
                    .map(|n| format!("-d {n}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ))
        };
        Some(Step {
            title: format!(
                "nginx: the first Let's Encrypt certificate for {}",
                names.join(" ")
            ),
            lines: vec![
                Line::Root(vec![format!("install -d -m 0755 {}", path_arg(webroot))]),
                Line::Note(format!(
                    "nginx refuses the site until its certificate exists, so a temporary site answers certbot's\nchallenge (skipped once {} exists). certbot asks for an\ne-mail address and agreement to its terms the first time: this line is the block's last.",
                    certificate.display()
                )),
                fetch(true),
            ],
            without_systemd: vec![fetch(false)],
        })
    }

    fn nginx(&self) -> Step {
        let mut lines = Vec::new();
        if self.deploy.server_names.iter().any(|n| n == "_") {
            lines.push(Line::Note(
                "server_names = [\"_\"]: Debian's default site is port 80's default_server and would answer first"
                    .to_owned(),
            ));
            lines.push(Line::Root(vec![
                "rm -f /etc/nginx/sites-enabled/default".to_owned(),
            ]));
        }
        let site = nginx::site_path(&self.deploy);
        for file in self.of(Service::Nginx) {
            if matches!(&file.install, Install::Copy { to, .. } if *to == site) {
                lines.extend(self.copy_line(file));
            }
        }
        if let Some(staging) = &self.deploy.staging {
            lines.push(Line::Note(
                "[deploy.staging]: the password file, readable by nginx's workers".to_owned(),
            ));
            let file = path_arg(&staging.htpasswd);
            lines.push(Line::RootShell(format!(
                "test -e {file} || install -m 0640 -o root -g www-data /dev/null {file}"
            )));
        }
        lines.push(Line::Root(vec![
            "nginx -t".to_owned(),
            "systemctl reload-or-restart nginx".to_owned(),
        ]));
        if let Some(staging) = &self.deploy.staging {
            lines.push(Line::Note(
                "The staging password of user \"staging\" (it asks for it; run it again with another name for\nanother user)"
                    .to_owned(),
            ));
            lines.push(Line::RootShell(format!(
                "{} htpasswd staging >> {}",
                self.binary(),
                path_arg(&staging.htpasswd)
            )));
        }
        Step {
            title: format!("nginx: the site for {}", self.deploy.server_names.join(" ")),
            lines,
            without_systemd: vec![Line::RootShell(Self::nginx_reload(false))],
        }
    }

    fn sauna(&self) -> Step {
        let name = &self.deploy.name;
        let (user, group) = (self.user(), self.group());
        let mut lines = Vec::new();
        for file in self.of(Service::Sauna) {
            lines.extend(self.copy_line(file));
        }
        lines.push(Line::Root(vec!["systemctl daemon-reload".to_owned()]));
        lines.push(Line::Root(vec![format!("systemctl enable --now {name}")]));
        lines.push(Line::Note(format!(
            "A new release later: `systemctl reload {name}` (or `{} reload -c {}`).",
            self.binary(),
            self.config_path()
        )));
        let chdir = self
            .config
            .app
            .directory
            .as_ref()
            .map(|d| format!(" --chdir {}", path_arg(d)))
            .unwrap_or_default();
        let run = format!(
            "start-stop-daemon --start --background --make-pidfile --pidfile /run/sauna/{name}.pid --chuid {user}:{group}{chdir} --output /var/log/sauna/{name}.log --exec {} -- run -c {}",
            self.binary(),
            self.config_path()
        );
        let without_systemd = vec![
            Line::Note(format!(
                "RUNTIME_DIRECTORY puts the control socket where the unit's RuntimeDirectory= would: /run/sauna.\nstop, status and reload need it too: RUNTIME_DIRECTORY=/run/sauna {} stop -c {}",
                self.binary(),
                self.config_path()
            )),
            Line::Root(vec![
                format!("install -d -m 0750 -o {user} -g {group} /run/sauna"),
                "install -d -m 0750 /var/log/sauna".to_owned(),
            ]),
            Line::RootShell(match self.env_file() {
                Some(env) => {
                    format!("(set -a && . {env} && RUNTIME_DIRECTORY=/run/sauna && exec {run})")
                }
                None => format!("RUNTIME_DIRECTORY=/run/sauna {run}"),
            }),
        ];
        Step {
            title: format!("sauna-supervisor: the unit {name}.service"),
            lines,
            without_systemd,
        }
    }

    fn check(&self) -> Step {
        let mut lines = vec![
            Line::Note(format!(
                "The supervisor compares the running servers with sauna.toml, as {} and with the secrets",
                self.user()
            )),
            Line::RootShell(self.with_secrets(&format!(
                "runuser -u {} -- {} check --live -c {}",
                self.user(),
                self.binary(),
                self.config_path()
            ))),
        ];
        if self.has(Service::Nginx) {
            let host = self
                .deploy
                .server_names
                .first()
                .filter(|n| n.as_str() != "_");
            let curl = "curl -sS -o /dev/null -w '%{http_code}\\n'";
            let request = match (&self.deploy.tls, host) {
                (Some(_), Some(host)) => {
                    let port = self.deploy.https_port;
                    let shown = if port == 443 {
                        String::new()
                    } else {
                        format!(":{port}")
                    };
                    format!("{curl} --resolve {host}:{port}:127.0.0.1 https://{host}{shown}/")
                }
                (None, Some(host)) => format!(
                    "{curl} -H 'Host: {host}' http://127.0.0.1:{}/",
                    self.deploy.http_port
                ),
                (_, None) => format!("{curl} http://127.0.0.1:{}/", self.deploy.http_port),
            };
            let expect = if self.deploy.staging.is_some() {
                "401 (the staging password), 200 with -u staging"
            } else {
                "200, or your app's answer to /"
            };
            lines.push(Line::Note(format!(
                "A request through nginx to the app: expect {expect}"
            )));
            lines.push(Line::User(request));
        }
        Step {
            title: "Check".to_owned(),
            lines,
            without_systemd: Vec::new(),
        }
    }

    fn grafana(&self) -> Step {
        let mut lines = Vec::new();
        let scraped = match &self.config.metrics.listen {
            None => "[metrics].listen is empty, so set it first".to_owned(),
            Some(listen) => format!("http://{listen}/metrics"),
        };
        for file in self.of(Service::Grafana) {
            lines.push(Line::Note(format!(
                "Import {} in Grafana (Dashboards → New → Import); its panels\nread the Prometheus that scrapes the supervisor's metrics ({scraped}).",
                self.source(file),
            )));
        }
        Step {
            title: "Grafana (optional)".to_owned(),
            lines,
            without_systemd: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_runs_commands_as_they_are_and_others_through_sudo() {
        let root = Line::Root(vec!["nginx -t".into(), "systemctl reload nginx".into()]);
        assert_eq!(
            render_line(&root, true),
            "nginx -t && systemctl reload nginx\n"
        );
        assert_eq!(
            render_line(&root, false),
            "sudo nginx -t && sudo systemctl reload nginx\n"
        );
        let shell = Line::RootShell("echo \"include_dir = 'conf.d'\" >> /etc/x".into());
        assert_eq!(
            render_line(&shell, false),
            "sudo sh -c 'echo \"include_dir = '\\''conf.d'\\''\" >> /etc/x'\n"
        );
        let user = Line::User("curl http://127.0.0.1/".into());
        assert_eq!(render_line(&user, false), "curl http://127.0.0.1/\n");
        assert_eq!(render_line(&Line::Note("a\nb".into()), false), "# a\n# b\n");
    }

    #[test]
    fn paths_are_quoted_only_when_the_shell_would_split_them() {
        assert_eq!(arg("/etc/sauna/myapp.env"), "/etc/sauna/myapp.env");
        assert_eq!(arg("/home/me/my app"), "'/home/me/my app'");
        assert_eq!(arg("it's"), "'it'\\''s'");
        assert_eq!(arg(""), "''");
    }
}
