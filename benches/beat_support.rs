//! What both beat benchmarks need from Redis: a throwaway `redis-server` (a free loopback port,
//! its own temp dir, killed on drop) and a consumer that takes messages off a queue as a Celery
//! worker waits on it, stamping each batch with the instant it was taken.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub fn start() -> RedisServer {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: apt-get install -y redis-server");
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let client = redis::Client::open(server.url()).expect("url");
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.get_connection().is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Its database 0.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// Takes every message from `queue` as it lands, oldest first, until `until`, on a thread of its
/// own; each batch comes with the instant it was taken. Nothing is parsed before the time is up:
/// parsing between pops would delay the next pop.
pub fn take_until(
    url: String,
    queue: &'static str,
    until: DateTime<Utc>,
) -> std::thread::JoinHandle<Vec<(DateTime<Utc>, Vec<String>)>> {
    std::thread::spawn(move || {
        let mut connection = redis::Client::open(url.as_str())
            .and_then(|client| client.get_connection())
            .expect("connect");
        let mut taken = Vec::new();
        while Utc::now() < until {
            let popped: Option<(String, Vec<String>)> = redis::cmd("BLMPOP")
                .arg(0.05)
                .arg(1)
                .arg(queue)
                .arg("RIGHT")
                .arg("COUNT")
                .arg(100_000)
                .query(&mut connection)
                .expect("BLMPOP (Redis 7 or later)");
            if let Some((_, messages)) = popped {
                taken.push((Utc::now(), messages));
            }
        }
        taken
    })
}
