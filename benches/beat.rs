//! Beat's cost and precision against a real `redis-server` (issue #5, point 6):
//! - **publish lag**: 50 jobs due every second for 20 s; lag = the instant a consumer took the
//!   message from the queue (`BLMPOP`, as a worker waits on it) − its slot (beat builds a slot's
//!   messages ahead of it, so what the message says is not when it landed); target p99 < 50 ms;
//! - **idle cost**: 10 000 cron jobs none of which is due during the measurement; the process's
//!   CPU time (getrusage) over 30 s of wall time; target < 1 %.
//!
//! Run with `cargo bench --bench beat` (needs `redis-server`: `apt-get install -y redis-server`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike, Utc};
use sauna_supervisor::metrics::Metrics;

mod beat_support;
use beat_support::RedisServer;

fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let user = usage.user_time();
    let system = usage.system_time();
    Duration::from_micros(
        (user.tv_sec() * 1_000_000
            + user.tv_usec()
            + system.tv_sec() * 1_000_000
            + system.tv_usec()) as u64,
    )
}

async fn lag(redis: &RedisServer) {
    let mut text = format!("[beat]\nbroker = \"redis://127.0.0.1:{}/0\"\n", redis.port);
    for index in 0..50 {
        text.push_str(&format!(
            "[beat.jobs.j{index}]\ntask = \"t\"\nevery = \"1s\"\nqueue = \"lag\"\nexpires = \"1h\"\n"
        ));
    }
    let config = proxy_conf::load_str(&text, "sauna.toml").expect("config");
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let handle = sauna_supervisor::beat::start(
        config.beat.as_ref().expect("beat"),
        None,
        &config.app,
        std::path::Path::new("."),
        metrics,
    )
    .await
    .expect("beat starts");
    let until = Utc::now() + chrono::Duration::seconds(20);
    // Takes the messages as they land, oldest first, stamped with the instant they were taken.
    let taking = beat_support::take_until(redis.url(), "lag", until);
    let consumer = std::thread::spawn(move || {
        let taken = taking.join().expect("consumer");
        let mut lags = Vec::new();
        for (at, messages) in taken {
            for text in messages {
                let slot = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|message| {
                        DateTime::parse_from_rfc3339(
                            message["headers"]["sauna_beat_slot"].as_str()?,
                        )
                        .ok()
                    });
                if let Some(slot) = slot {
                    let lag = at - slot.with_timezone(&Utc);
                    lags.push(lag.num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0);
                }
            }
        }
        lags
    });
    let mut lags = tokio::task::spawn_blocking(move || consumer.join().expect("consumer"))
        .await
        .expect("consumer");
    handle.shutdown().await;
    lags.sort_by(f64::total_cmp);
    let quantile = |q: f64| lags[((lags.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "publish lag over {} publishes (50 jobs every 1s, 20s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 < 50 ms)",
        lags.len(),
        quantile(0.5),
        quantile(0.99),
        quantile(1.0)
    );
}

async fn idle(redis: &RedisServer) {
    // Daily jobs at an hour 12 h away: nothing is due while we measure.
    let hour = (Utc::now().hour() + 12) % 24;
    let mut text = format!("[beat]\nbroker = \"redis://127.0.0.1:{}/0\"\n", redis.port);
    for index in 0..10_000 {
        text.push_str(&format!(
            "[beat.jobs.j{index}]\ntask = \"t\"\ncron = \"{} {hour} * * *\"\n",
            index % 60
        ));
    }
    let config = proxy_conf::load_str(&text, "sauna.toml").expect("config");
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let handle = sauna_supervisor::beat::start(
        config.beat.as_ref().expect("beat"),
        None,
        &config.app,
        std::path::Path::new("."),
        metrics,
    )
    .await
    .expect("beat starts");
    // Let it become leader and settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu, wall) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let used = cpu_time() - cpu;
    let elapsed = wall.elapsed();
    let status = handle.status().await.expect("status");
    handle.shutdown().await;
    println!(
        "idle cost with {} jobs (leader: {}): {:.3} % CPU ({:?} CPU in {:?}) (target < 1 %)",
        status.jobs.len(),
        status.leader,
        used.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        used,
        elapsed
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let redis = RedisServer::start();
    runtime.block_on(async {
        lag(&redis).await;
        idle(&redis).await;
    });
}
