//! PostgreSQL for the app: a `postgresql.conf` fragment sized from the machine and from the
//! connections the stack opens, `pg_hba.conf` lines, and an init script that creates the app role
//! and its database. The init script holds no secret: psql reads the password when it runs, from
//! the environment variable or file `[postgres]` names (a backtick `\set`), and the statements that
//! carry it are kept out of the server log. Where the files go is the cluster's ([`Cluster`], found
//! by the caller with Debian's `pg_lsclusters`).

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use super::{
    Concurrency, EmitError, File, Install, Machine, Output, Problem, Service, concurrency, copy,
    deploy, header,
};
use crate::config::Config;
use crate::stack::PostgresConfig;

/// A PostgreSQL cluster of the machine, as Debian's postgresql-common lays it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The major version, e.g. `15`.
    pub version: String,
    /// The cluster name, e.g. `main`.
    pub name: String,
    /// The port it is configured with today.
    pub port: u16,
    /// The Unix user owning it (and its configuration files).
    pub owner: String,
}

impl Cluster {
    /// `/etc/postgresql/VERSION/NAME`: `postgresql.conf`, `conf.d/` and `pg_hba.conf`.
    pub fn config_dir(&self) -> PathBuf {
        PathBuf::from(format!("/etc/postgresql/{}/{}", self.version, self.name))
    }

    /// The systemd unit of the cluster (`postgresql@15-main`).
    pub fn unit(&self) -> String {
        format!("postgresql@{}-{}", self.version, self.name)
    }
}

/// The clusters `pg_lsclusters --no-header` lists: `VERSION NAME PORT STATUS OWNER DATADIR LOG`
/// per line. Lines that do not fit are skipped.
pub fn parse_lsclusters(text: &str) -> Vec<Cluster> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let version = fields.next()?;
            let name = fields.next()?;
            let port = fields.next()?.parse().ok()?;
            let _status = fields.next()?;
            let owner = fields.next()?;
            version
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.')
                .then(|| Cluster {
                    version: version.to_owned(),
                    name: name.to_owned(),
                    port,
                    owner: owner.to_owned(),
                })
        })
        .collect()
}

/// The cluster the app's database belongs in: the one already on `[postgres].port`, else the
/// newest `main` (Debian's default), else the newest.
pub fn choose(clusters: &[Cluster], port: u16) -> Option<&Cluster> {
    fn newest<'a>(list: impl Iterator<Item = &'a Cluster>) -> Option<&'a Cluster> {
        let key = |c: &Cluster| -> Vec<u32> {
            c.version
                .split('.')
                .map(|n| n.parse().unwrap_or(0))
                .collect()
        };
        list.max_by(|a, b| key(a).cmp(&key(b)))
    }
    newest(clusters.iter().filter(|c| c.port == port))
        .or_else(|| newest(clusters.iter().filter(|c| c.name == "main")))
        .or_else(|| newest(clusters.iter()))
}

/// The first line of the generated `pg_hba.conf` lines; with [`hba_end`] it finds them again.
pub fn hba_begin(name: &str) -> String {
    format!("# BEGIN sauna-supervisor {name}")
}

/// The last line of the generated `pg_hba.conf` lines.
pub fn hba_end(name: &str) -> String {
    format!("# END sauna-supervisor {name}")
}

/// Where the init script is installed (it holds no secret).
pub fn init_sql_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/etc/sauna/{name}-init.sql"))
}

/// PostgreSQL's default `superuser_reserved_connections`: slots ordinary roles can never use.
pub const SUPERUSER_RESERVED: u32 = 3;

/// The connections the stack needs, term by term, so the sum can be printed next to the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// `(what, connections)` per app host.
    pub per_host: Vec<(String, u32)>,
    /// Hosts running this configuration (`[deploy].app_hosts`, at least 1).
    pub hosts: u32,
    /// `[postgres].extra_connections`.
    pub extra: u32,
}

impl Budget {
    /// Connections one app host opens at most.
    pub fn host_total(&self) -> u32 {
        self.per_host.iter().map(|(_, n)| n).sum()
    }

    /// Connections the app side needs, without the superuser slots.
    pub fn needed(&self) -> u32 {
        self.host_total() * self.hosts + self.extra
    }

    /// The `max_connections` to configure.
    pub fn max_connections(&self) -> u32 {
        self.needed() + SUPERUSER_RESERVED
    }

    /// The sum written out, one term per line, each line prefixed by `prefix`.
    pub fn explain(&self, prefix: &str) -> String {
        let mut out = String::new();
        for (what, n) in &self.per_host {
            let _ = writeln!(out, "{prefix}  {what} = {n}");
        }
        let _ = writeln!(out, "{prefix}  per app host: {}", self.host_total());
        if self.hosts > 1 {
            let _ = writeln!(
                out,
                "{prefix}  × {} app hosts ([deploy].app_hosts) = {}",
                self.hosts,
                self.host_total() * self.hosts
            );
        }
        let _ = writeln!(
            out,
            "{prefix}  + [postgres].extra_connections {}\n{prefix}  + superuser_reserved_connections {SUPERUSER_RESERVED}",
            self.extra
        );
        out
    }
}

/// A process or thread count as the budget adds it up (counts are read as `u32` from the file).
fn count(n: NonZeroUsize) -> u32 {
    u32::try_from(n.get()).unwrap_or(u32::MAX)
}

/// What the web pool, the programs and beat may hold open at once.
pub fn budget(config: &Config, cpus: u32) -> Budget {
    let mut per_host = Vec::new();
    if let Some(web) = &config.web {
        per_host.push((
            format!("web: {} workers × {} threads", web.workers, web.threads),
            count(web.workers).saturating_mul(count(web.threads)),
        ));
    }
    for (name, program) in &config.programs {
        match concurrency(program, cpus) {
            Concurrency::Celery(n) => per_host.push((
                format!(
                    "programs.{name}: Celery concurrency {n} × {} instances",
                    program.instances
                ),
                n.saturating_mul(count(program.instances)),
            )),
            Concurrency::Plain => per_host.push((
                format!("programs.{name}: {} instances", program.instances),
                count(program.instances),
            )),
        }
    }
    if config.beat.is_some() {
        per_host.push(("beat".to_owned(), 1));
    }
    let hosts = deploy(config).app_hosts.len().max(1) as u32;
    let extra = config
        .postgres
        .as_ref()
        .map_or(PostgresConfig::default().extra_connections, |p| {
            p.extra_connections
        });
    Budget {
        per_host,
        hosts,
        extra,
    }
}

/// Renders the conf fragment, the hba lines and the init script, installed into `cluster`'s
/// directory (`None`: no cluster on this machine, so where they go is left to the user).
pub fn render(
    config: &Config,
    machine: &Machine,
    cluster: Option<&Cluster>,
) -> Result<Output, EmitError> {
    let Some(pg) = &config.postgres else {
        return Err(EmitError(vec![Problem::at(
            &["postgres"],
            "emit postgres: there is no [postgres] section; add one with database, user and password_env or password_file",
        )]));
    };
    let mut problems = Vec::new();
    super::check_name(&deploy(config), &mut problems);
    for (key, value) in [
        ("database", &pg.database),
        ("user", &pg.user),
        ("admin", &pg.admin),
    ] {
        if value.is_empty()
            || value
                .chars()
                .any(|c| c.is_control() || c == '"' || c == ' ')
        {
            problems.push(Problem::at(
                &["postgres", key],
                format!(
                    "[postgres].{key} = {value:?}: use a plain name (no spaces, quotes or control characters)"
                ),
            ));
        }
    }
    // Loading has checked that password_env names a variable and that at most one is set.
    let source = match (&pg.password_env, &pg.password_file) {
        (Some(var), _) => PasswordSource::Env(var.clone()),
        (None, Some(file)) => PasswordSource::File(file.display().to_string()),
        (None, None) => {
            problems.push(Problem::at(
                &["postgres"],
                "[postgres]: set password_env or password_file; the init script reads the app role's password from it",
            ));
            PasswordSource::Env(String::new())
        }
    };
    if !problems.is_empty() {
        return Err(EmitError(problems));
    }
    let name = deploy(config).name;
    let budget = budget(config, machine.cpus);
    let mut output = Output::default();
    if budget.hosts > 1 {
        output.warnings.push(
            "[deploy].app_hosts: PostgreSQL listens on localhost only; remote app hosts need listen_addresses and hostssl lines added by hand".to_owned(),
        );
    }
    let (conf_to, hba_to) = match cluster {
        Some(cluster) => {
            let dir = cluster.config_dir();
            let owner = &cluster.owner;
            (
                copy(dir.join(format!("conf.d/{name}.conf")), 0o644, owner, owner),
                Install::Prepend {
                    to: dir.join("pg_hba.conf"),
                    mode: 0o640,
                    owner: owner.clone(),
                    group: owner.clone(),
                },
            )
        }
        None => {
            let missing =
                "no PostgreSQL cluster on this machine: install PostgreSQL and emit again";
            (
                Install::ByHand(format!("conf.d/ of the cluster ({missing})")),
                Install::ByHand(format!("top of the cluster's pg_hba.conf ({missing})")),
            )
        }
    };
    output.files.push(File {
        path: format!("postgres/{name}.conf"),
        service: Service::Postgres,
        install: conf_to,
        contents: conf(pg, machine, &budget),
    });
    output.files.push(File {
        path: format!("postgres/{name}-pg_hba.conf"),
        service: Service::Postgres,
        install: hba_to,
        contents: hba(pg, &name),
    });
    output.files.push(File {
        path: format!("postgres/{name}-init.sql"),
        service: Service::Postgres,
        install: copy(init_sql_path(&name), 0o644, "root", "root"),
        contents: init_sql(pg, &source),
    });
    Ok(output)
}

enum PasswordSource {
    Env(String),
    File(String),
}

const MIB: u64 = 1 << 20;

/// Size in whole MiB, as PostgreSQL reads `MB`.
fn mb(bytes: u64) -> String {
    format!("{}MB", (bytes / MIB).max(1))
}

fn conf(pg: &PostgresConfig, machine: &Machine, budget: &Budget) -> String {
    let memory = pg.memory.map_or(machine.memory, |m| m.bytes());
    let connections = budget.max_connections();
    // The usual split for a dedicated database server with a web workload (as pgtune): a quarter
    // of memory for PostgreSQL's own cache, the rest left to the OS page cache.
    let shared_buffers = memory / 4;
    let effective_cache_size = memory / 4 * 3;
    let maintenance_work_mem = (memory / 16).min(2 << 30);
    // Each connection may run a few sorts at once; keep them within what shared_buffers leaves.
    let work_mem = ((memory - shared_buffers) / (u64::from(connections) * 3)).max(MIB);
    let mut out = header("#", "postgres");
    let _ = writeln!(
        out,
        "# Read through postgresql.conf's include_dir = 'conf.d' (Debian's default).\n\n\
         listen_addresses = 'localhost'\nport = {}\npassword_encryption = scram-sha-256\n",
        pg.port
    );
    let _ = write!(
        out,
        "# max_connections = {connections}: what the stack may hold open at once\n{}",
        budget.explain("#")
    );
    let _ = writeln!(
        out,
        "max_connections = {connections}\nsuperuser_reserved_connections = {SUPERUSER_RESERVED}\n"
    );
    let source = if pg.memory.is_some() {
        "[postgres].memory"
    } else {
        "this machine's memory"
    };
    let _ = writeln!(
        out,
        "# Sized for {} ({source}).\n# shared_buffers = memory / 4\nshared_buffers = {}\n# effective_cache_size = memory × 3/4\neffective_cache_size = {}\n# maintenance_work_mem = memory / 16, at most 2GB\nmaintenance_work_mem = {}\n# work_mem = (memory − shared_buffers) / (max_connections × 3)\nwork_mem = {}",
        mb(memory),
        mb(shared_buffers),
        mb(effective_cache_size),
        mb(maintenance_work_mem),
        mb(work_mem)
    );
    out
}

fn hba(pg: &PostgresConfig, name: &str) -> String {
    // The markers are the first and the last line, so the install step finds and replaces an
    // earlier copy; the header goes between them.
    let mut out = hba_begin(name);
    out.push('\n');
    out.push_str(&header("#", "postgres"));
    let _ = writeln!(
        out,
        "# Goes at the top of pg_hba.conf, above the distribution's lines: the first line matching a\n\
         # connection decides. The admin through the local socket as the same Unix user; the app role\n\
         # only to its own database, only over loopback, only with a SCRAM password.\n\
         # TYPE  DATABASE  USER  ADDRESS  METHOD\n\
         local   all   {admin}   peer\n\
         host    {db}   {user}   127.0.0.1/32   scram-sha-256\n\
         host    {db}   {user}   ::1/128   scram-sha-256\n\
         # Nothing else for the app role, whatever the lines below would allow.\n\
         host    all   {user}   all   reject\n\
         local   all   {user}   reject\n\
         {end}",
        admin = pg.admin,
        db = pg.database,
        user = pg.user,
        end = hba_end(name),
    );
    out
}

/// `"name"` with embedded quotes doubled.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Quotes for a POSIX shell.
fn shell(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

fn init_sql(pg: &PostgresConfig, source: &PasswordSource) -> String {
    let (read, from) = match source {
        PasswordSource::Env(var) => (
            format!("\\set app_password `printf '%s' \"${var}\"`"),
            format!("environment variable {var}"),
        ),
        PasswordSource::File(path) => (
            format!("\\set app_password `cat {}`", shell(path)),
            format!("file {path}"),
        ),
    };
    let role = ident(&pg.user);
    let db = ident(&pg.database);
    let mut out = header("--", "postgres");
    let _ = writeln!(
        out,
        "-- Creates the app role and its database; safe to run again (it resets the password).\n\
         -- Run it as the admin role. psql reads the password from the {from}\n\
         -- when it runs, so this file holds no secret:\n\
         --   runuser -u {admin} -- psql -X -v ON_ERROR_STOP=1 -d postgres -f - < THIS_FILE\n\
         \\set ON_ERROR_STOP on\n\
         {read}\n\
         SELECT :'app_password' = '' AS app_password_missing \\gset\n\
         \\if :app_password_missing\n\
         DO $$ BEGIN RAISE EXCEPTION 'the app password is empty: set the {from}'; END $$;\n\
         \\endif\n\n\
         -- The password travels in the next statements: keep them out of the server log, even on error.\n\
         SET log_statement = 'none';\n\
         SET log_min_error_statement = 'panic';\n\
         SET password_encryption = 'scram-sha-256';\n\
         SELECT format('CREATE ROLE %I LOGIN', {user}) WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {user}) \\gexec\n\
         SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', {user}, :'app_password') \\gexec\n\
         \\unset app_password\n\
         RESET log_min_error_statement;\n\
         RESET log_statement;\n\n\
         -- CREATE DATABASE cannot run in a transaction block or a DO body, hence \\gexec.\n\
         SELECT format('CREATE DATABASE %I OWNER %I', {dbname}, {user}) WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {dbname}) \\gexec\n\
         ALTER DATABASE {db} OWNER TO {role};\n\
         -- Only the app role (and superusers) may connect to it.\n\
         REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC;\n\
         GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role};",
        admin = pg.admin,
        user = literal(&pg.user),
        dbname = literal(&pg.database),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BeatConfig, ProgramConfig, WebConfig};
    use crate::stack::DeployConfig;

    #[test]
    fn max_connections_adds_every_holder_and_the_reserved_slots() {
        let mut config = Config {
            web: Some(WebConfig {
                workers: 4.try_into().unwrap(),
                threads: 2.try_into().unwrap(),
                ..WebConfig::default()
            }),
            beat: Some(BeatConfig::default()),
            ..Config::default()
        };
        config.programs.insert(
            "celery".into(),
            ProgramConfig {
                command: vec!["celery".into(), "worker".into(), "-c".into(), "3".into()],
                instances: 2.try_into().unwrap(),
                ..ProgramConfig::default()
            },
        );
        config.programs.insert(
            "default_c".into(),
            ProgramConfig {
                command: vec!["celery".into(), "worker".into()],
                ..ProgramConfig::default()
            },
        );
        let budget = budget(&config, 5);
        // 8 web + 6 celery + 5 (CPU count) + 1 beat = 20; + 10 extra + 3 reserved.
        assert_eq!(budget.host_total(), 20);
        assert_eq!(budget.max_connections(), 33);
        config.deploy = Some(DeployConfig {
            app_hosts: vec!["a".into(), "b".into()],
            ..DeployConfig::default()
        });
        assert_eq!(super::budget(&config, 5).max_connections(), 53);
    }

    #[test]
    fn clusters_come_from_pg_lsclusters_and_the_one_on_the_port_wins() {
        let listed = parse_lsclusters(
            "Ver Cluster Port Status Owner Data directory Log file\n\
             13  main    5433 down   postgres /var/lib/postgresql/13/main /var/log/x.log\n\
             15  main    5432 online postgres /var/lib/postgresql/15/main /var/log/y.log\n\
             15  extra   5434 down   pgadmin  /srv/pg/extra /var/log/z.log\n",
        );
        assert_eq!(
            listed.len(),
            3,
            "the header line is not a cluster: {listed:?}"
        );
        let on = |port| choose(&listed, port).map(|c| (c.version.as_str(), c.name.as_str()));
        assert_eq!(on(5434), Some(("15", "extra")));
        assert_eq!(on(5433), Some(("13", "main")));
        // Nothing on the port: the newest main.
        assert_eq!(on(6000), Some(("15", "main")));
        let extra = choose(&listed, 5434).unwrap();
        assert_eq!(
            extra.config_dir(),
            PathBuf::from("/etc/postgresql/15/extra")
        );
        assert_eq!(extra.unit(), "postgresql@15-extra");
        assert_eq!(extra.owner, "pgadmin");
        assert_eq!(choose(&[], 5432), None);
    }

    #[test]
    fn quoting_doubles_embedded_quotes() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(shell("/x/it's"), "'/x/it'\\''s'");
    }
}
