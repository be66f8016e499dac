//! PostgreSQL for tests: a cluster made by the installed server's `initdb` in a sandbox
//! directory, started on a free port with its socket there too. PostgreSQL refuses to run as
//! root, so as root (CI) every server-side command runs as the `postgres` user, who must be
//! able to reach the directory (the caller makes the sandbox 0755).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Daemon, assert_success, is_root, require_tool, run, wait_until};

/// How to install it on Debian.
pub const APT: &str = "apt-get install -y postgresql";

/// The newest installed PostgreSQL server binaries (`/usr/lib/postgresql/VERSION/bin`).
pub fn bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|bin| bin.join("initdb").is_file());
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("no PostgreSQL server under /usr/lib/postgresql: run `{APT}`"))
}

/// `psql`, or a test failure naming the install command.
pub fn psql() -> PathBuf {
    require_tool("psql", "apt-get install -y postgresql-client")
}

/// `program` run as the `postgres` user when the tests run as root, else as is.
pub fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let setpriv = require_tool("setpriv", "apt-get install -y util-linux");
        let mut command = Command::new(setpriv);
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// The Unix user the server runs as, which peer authentication admits as the role of that name.
pub fn os_user() -> String {
    if is_root() {
        "postgres".to_owned()
    } else {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .expect("the current user has a name")
    }
}

/// Hands `path` (recursively) to the `postgres` user when the tests run as root.
pub fn give_to_pg_user(path: &Path) {
    if is_root() {
        let chown = run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path));
        assert_success(&chown, "chown");
    }
}

/// A cluster in `DIR/data` with its socket directory `DIR/sock`.
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
}

impl Cluster {
    /// Runs `initdb` with `args` (the superuser, authentication) into `dir/data`.
    pub fn init(dir: &Path, args: &[&str]) -> Cluster {
        let cluster = Cluster {
            bin: bin(),
            dir: dir.to_path_buf(),
        };
        std::fs::create_dir_all(cluster.socket_dir()).expect("pg dirs");
        give_to_pg_user(dir);
        let initdb = run(as_pg_user(&cluster.bin.join("initdb"))
            .arg("-D")
            .arg(cluster.data())
            .args(["-E", "UTF8", "--no-instructions"])
            .args(args));
        assert_success(&initdb, "initdb");
        cluster
    }

    /// The data directory (postgresql.conf, pg_hba.conf).
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Where the server puts its Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// Starts the server (its port comes from its configuration) and waits until it accepts
    /// connections on 127.0.0.1:`port`.
    pub fn start(&self, port: u16) -> Daemon {
        let mut server = Daemon::spawn(
            "postgres",
            as_pg_user(&self.bin.join("postgres"))
                .arg("-D")
                .arg(self.data())
                .arg("-k")
                .arg(self.socket_dir()),
        );
        let pg_isready = self.bin.join("pg_isready");
        wait_until(
            Duration::from_secs(30),
            "postgres to accept connections",
            || {
                server.assert_running();
                let ready = Command::new(&pg_isready)
                    .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                    .output()
                    .ok()?;
                ready.status.success().then_some(())
            },
        );
        server
    }

    /// `psql` as the server's own user through the socket, peer-authenticated, to database
    /// `postgres` on `port`; arguments and the SQL come from the caller.
    pub fn admin_psql(&self, port: u16) -> Command {
        let mut command = as_pg_user(&psql());
        command
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &port.to_string(), "-d", "postgres"]);
        command
    }
}
