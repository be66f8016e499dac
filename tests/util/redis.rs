//! A real `redis-server` for tests: a free loopback port, data in a temp dir, append-only so a
//! stop and restart keeps the data (outage tests), optionally with a password, stopped on drop.
//! It can also run inside a network namespace (partition tests), listening on that namespace's
//! address for the supervisors and on a Unix socket in its directory for the test itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, require_tool};

/// A `redis-server` on a free loopback port, with its data in a temp dir; stopped on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    password: Option<String>,
    /// (namespace, address) when it runs inside a network namespace.
    inside: Option<(String, String)>,
}

impl RedisServer {
    /// Starts a server with its data in `dir` and waits until it answers PING.
    pub fn start(dir: &Path) -> RedisServer {
        Self::start_with(dir, None)
    }

    /// Starts a server that requires `password` (`requirepass`), like the one `emit redis`
    /// generates with `[redis].password_env`.
    pub fn start_with_password(dir: &Path, password: &str) -> RedisServer {
        Self::start_with(dir, Some(password.to_owned()))
    }

    fn start_with(dir: &Path, password: Option<String>) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            password,
            inside: None,
        };
        server.spawn();
        server
    }

    /// Starts a server inside network namespace `namespace`, on `address` port 6379 (the
    /// namespace is its own), with its data and a Unix socket for [`RedisServer::client`] in
    /// `dir`. Protected mode is off: only the namespaces of the test can reach it.
    pub fn start_in_namespace(dir: &Path, namespace: &str, address: &str) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: 6379,
            dir: dir.to_path_buf(),
            password: None,
            inside: Some((namespace.to_owned(), address.to_owned())),
        };
        server.spawn();
        server
    }

    /// The Unix socket of a server inside a namespace.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// (Re)starts the process on the same port and directory, e.g. after [`RedisServer::stop`].
    pub fn spawn(&mut self) {
        let binary = require_tool("redis-server", "apt-get install -y redis-server");
        std::fs::create_dir_all(&self.dir).expect("redis dir");
        let (mut command, bind) = match &self.inside {
            Some((namespace, address)) => {
                let mut command = super::netns::Star::exec(namespace, binary);
                command
                    .args(["--protected-mode", "no", "--unixsocketperm", "700"])
                    .arg("--unixsocket")
                    .arg(self.socket());
                (command, address.as_str())
            }
            None => (Command::new(binary), "127.0.0.1"),
        };
        let child = command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                bind,
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(
                self.password
                    .iter()
                    .flat_map(|password| ["--requirepass", password.as_str()]),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let client = self.client(0);
        super::wait_until(Duration::from_secs(10), "redis-server to answer", || {
            let mut connection = client.get_connection().ok()?;
            ::redis::cmd("PING").query::<String>(&mut connection).ok()
        });
    }

    /// `redis://127.0.0.1:PORT/DB` (inside a namespace: its address instead of 127.0.0.1).
    pub fn url(&self, db: u8) -> String {
        let host = self
            .inside
            .as_ref()
            .map_or("127.0.0.1", |(_, address)| address.as_str());
        format!("redis://{host}:{}/{db}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client for database `db`, logging in with the password if the server has one.
    pub fn client(&self, db: u8) -> ::redis::Client {
        use ::redis::IntoConnectionInfo as _;
        let url = match self.inside {
            Some(_) => format!("redis+unix://{}?db={db}", self.socket().display()),
            None => self.url(db),
        };
        let mut info = url.into_connection_info().expect("redis url");
        if let Some(password) = &self.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        ::redis::Client::open(info).expect("redis client")
    }

    /// A connection to database 0.
    pub fn connection(&self) -> ::redis::Connection {
        self.client(0)
            .get_connection()
            .expect("connect to test redis")
    }

    /// Stops the server (SIGTERM, data kept in its AOF).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
