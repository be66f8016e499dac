//! Celery queue lengths: which queues to watch, and the sampler task that reads their lengths
//! from the Redis broker into `sauna_celery_queue_length{queue}`.
//!
//! The queues are derived from the configuration alone: those the programs' Celery worker
//! commands consume (`-Q`/`--queues`, minus `-X`/`--exclude-queues`; `celery` without `-Q`),
//! those beat jobs publish to, and `[metrics].queues`. The broker is `[metrics].broker`, else
//! `[beat].broker`, else `[redis].broker`, logged in to with `[redis]`'s password when the URL
//! has none. A queue's length is the sum of LLEN over its kombu keys — the queue name and
//! its priority keys `<queue>\x06\x16{3,6,9}` (kombu's `kombu/transport/redis.py`:
//! `PRIORITY_STEPS` and the `\x06\x16` separator in `_q_for_pri`). This module neither publishes
//! nor consumes messages, and does not know about apps that rename Celery's default queue
//! (`task_default_queue`): such queues belong in `[metrics].queues`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proxy_conf::Config;
use proxy_conf::secrets::{Secret, redact_url};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// The separator kombu puts between a queue name and its priority step.
const PRIORITY_SEPARATOR: &str = "\x06\x16";

/// The priority steps above 0 that get their own key (kombu's default `priority_steps`).
const PRIORITY_STEPS: [u8; 3] = [3, 6, 9];

/// The queue a Celery worker consumes when its command has no `-Q`.
const DEFAULT_QUEUE: &str = "celery";

/// Celery's global options (before the subcommand) that take a separate value.
const GLOBAL_OPTIONS_WITH_VALUE: [&str; 8] = [
    "-A",
    "--app",
    "-b",
    "--broker",
    "--result-backend",
    "--loader",
    "--config",
    "--workdir",
];

/// Connecting to and answering from the broker must each finish within this.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Sampling faster than this is a configuration mistake, not a wish.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Retries after broker errors back off up to at least this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What the sampler reads, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplerPlan {
    /// Redis URL of the broker.
    pub broker: String,
    /// The password to log in with when the URL has none (`[redis]`'s).
    pub password: Option<Secret>,
    /// Queue names, sorted, without duplicates.
    pub queues: Vec<String>,
    /// Time between two samples.
    pub interval: Duration,
}

/// The queues to sample and the broker to read them from, with `password` for a broker URL
/// without one; `None` when the metrics endpoint is off (`[metrics] listen = ""`: nobody could
/// read the lengths, so Redis is not asked), when there is no queue, or no broker to read them
/// from (see [`spawn_for`], which says so in the log).
pub fn plan(config: &Config, password: Option<&Secret>) -> Option<SamplerPlan> {
    config.metrics.listen?;
    let queues = watched_queues(config);
    let broker = config
        .metrics
        .broker
        .clone()
        .or_else(|| config.beat.as_ref().map(|beat| beat.broker.clone()))
        .or_else(|| config.redis.as_ref().and_then(|redis| redis.broker.clone()))?;
    if queues.is_empty() {
        return None;
    }
    Some(SamplerPlan {
        broker,
        password: password.cloned(),
        queues: queues.into_iter().collect(),
        interval: config.metrics.sample_interval.get().max(MIN_INTERVAL),
    })
}

/// Every queue worth a length: consumed by a program, published to by a beat job, or listed in
/// `[metrics].queues`.
pub fn watched_queues(config: &Config) -> BTreeSet<String> {
    let mut queues: BTreeSet<String> = config
        .programs
        .values()
        .filter_map(|program| worker_queues(&program.command))
        .flatten()
        .collect();
    if let Some(beat) = &config.beat {
        queues.extend(beat.jobs.values().map(|job| job.queue.clone()));
    }
    queues.extend(config.metrics.queues.iter().cloned());
    queues.retain(|queue| !queue.is_empty());
    queues
}

/// The queues a command consumes if it runs a Celery worker (`celery … worker …`, also through
/// `python -m celery` or a wrapper such as `uv run celery`), else `None`.
pub fn worker_queues(command: &[String]) -> Option<BTreeSet<String>> {
    let start = command.iter().enumerate().position(|(index, arg)| {
        // `celery` right after another option (`-A celery`) is that option's value.
        let after_option =
            index > 0 && command[index - 1].starts_with('-') && command[index - 1] != "-m";
        (Path::new(arg)
            .file_name()
            .is_some_and(|name| name == "celery")
            && !after_option)
            || arg == "-mcelery"
    })?;
    let mut args = command[start + 1..].iter();
    // The first positional argument after the global options is the subcommand.
    loop {
        let arg = args.next()?;
        if GLOBAL_OPTIONS_WITH_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            if arg != "worker" {
                return None;
            }
            break;
        }
    }
    let mut included: Option<BTreeSet<String>> = None;
    let mut excluded = BTreeSet::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (list, value) = match option_value(arg, "-Q", "--queues") {
            Some(value) => (&mut included, value),
            None => match option_value(arg, "-X", "--exclude-queues") {
                Some(value) => {
                    let value = value.or_else(|| args.next().cloned()).unwrap_or_default();
                    excluded.extend(split_queues(&value));
                    continue;
                }
                None => continue,
            },
        };
        let value = value.or_else(|| args.next().cloned()).unwrap_or_default();
        list.get_or_insert_with(BTreeSet::new)
            .extend(split_queues(&value));
    }
    let mut queues = included.unwrap_or_else(|| BTreeSet::from([DEFAULT_QUEUE.to_owned()]));
    queues.retain(|queue| !excluded.contains(queue));
    Some(queues)
}

/// `Some(Some(value))` for `-Qa,b`, `--queues=a,b`; `Some(None)` when the value is the next
/// argument; `None` for another argument.
fn option_value(arg: &str, short: &str, long: &str) -> Option<Option<String>> {
    if arg == short || arg == long {
        Some(None)
    } else if let Some(value) = arg.strip_prefix(&format!("{long}=")) {
        Some(Some(value.to_owned()))
    } else {
        arg.strip_prefix(short)
            .map(|value| Some(value.trim_start_matches('=').to_owned()))
    }
}

fn split_queues(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(str::trim)
        .filter(|queue| !queue.is_empty())
        .map(str::to_owned)
}

/// The Redis keys holding a queue's messages: the name itself, then one per priority step.
pub fn queue_keys(queue: &str) -> [String; 4] {
    let [a, b, c] = PRIORITY_STEPS.map(|step| format!("{queue}{PRIORITY_SEPARATOR}{step}"));
    [queue.to_owned(), a, b, c]
}

/// Delay before the next attempt after `failures` consecutive broker errors: the sample interval,
/// doubling per failure, up to the larger of the interval and a minute.
pub fn retry_delay(failures: u32, interval: Duration) -> Duration {
    let cap = interval.max(MAX_BACKOFF);
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    interval.saturating_mul(factor).min(cap)
}

/// The broker link as far as logging is concerned: one line per change, not one per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No sample attempted yet.
    Starting,
    /// The last sample succeeded.
    Up,
    /// The last sample failed.
    Down,
}

/// What a sample outcome means for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Nothing to say.
    Same,
    /// The first sample worked.
    Started,
    /// The broker stopped answering (or never did).
    Lost,
    /// The broker answers again.
    Recovered,
}

impl Link {
    fn after(self, ok: bool) -> (Link, Change) {
        match (self, ok) {
            (Link::Starting, true) => (Link::Up, Change::Started),
            (Link::Up, true) => (Link::Up, Change::Same),
            (Link::Down, true) => (Link::Up, Change::Recovered),
            (Link::Starting | Link::Up, false) => (Link::Down, Change::Lost),
            (Link::Down, false) => (Link::Down, Change::Same),
        }
    }
}

/// The running sampler; dropping it stops sampling and removes its queues' series, so a reload
/// that watches other queues does not leave stale ones behind. Only its own series are touched,
/// so the old and the new sampler of a reload may overlap.
pub struct QueueSampler {
    task: JoinHandle<()>,
    metrics: Arc<Metrics>,
    queues: Vec<String>,
}

impl Drop for QueueSampler {
    fn drop(&mut self) {
        self.task.abort();
        forget(&self.metrics, &self.queues);
    }
}

/// Removes the series of `queues` (absent ones are fine).
fn forget(metrics: &Metrics, queues: &[String]) {
    for queue in queues {
        let _ = metrics
            .celery_queue_length
            .remove_label_values(&[queue.as_str()]);
    }
}

/// Starts sampling what [`plan`] finds in `config`, logging in with `password` (`[redis]`'s)
/// when the broker URL has none; `None` (with a log line when queues exist but no broker is
/// known) when there is nothing to sample.
pub fn spawn_for(
    config: &Config,
    password: Option<&Secret>,
    metrics: Arc<Metrics>,
) -> Option<QueueSampler> {
    match plan(config, password) {
        Some(plan) => Some(spawn(plan, metrics)),
        None => {
            let queues = watched_queues(config);
            if config.metrics.listen.is_some() && !queues.is_empty() {
                tracing::info!(
                    ?queues,
                    "Celery queue lengths are not sampled: no broker (set [metrics].broker, [beat].broker or [redis].broker)"
                );
            }
            None
        }
    }
}

/// Starts the sampler task for `plan`.
pub fn spawn(plan: SamplerPlan, metrics: Arc<Metrics>) -> QueueSampler {
    let queues = plan.queues.clone();
    let task = tokio::spawn(run(plan, Arc::clone(&metrics)));
    QueueSampler {
        task,
        metrics,
        queues,
    }
}

async fn run(plan: SamplerPlan, metrics: Arc<Metrics>) {
    let broker = redact_url(&plan.broker);
    let client = match crate::broker::connection_info(&plan.broker, plan.password.as_ref())
        .and_then(redis::Client::open)
    {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(%broker, %error, "Celery queue lengths are not sampled: the broker URL is invalid");
            return;
        }
    };
    let sent_password = crate::broker::sends_password(client.get_connection_info());
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT));
    let mut connection: Option<MultiplexedConnection> = None;
    let mut link = Link::Starting;
    let mut failures = 0;
    // Whether the failing samples are refused logins, so a change of cause is logged too.
    let mut refused = false;
    loop {
        let result = sample(&client, &config, &mut connection, &plan.queues).await;
        let (next, change) = link.after(result.is_ok());
        link = next;
        let delay = match result {
            Ok(lengths) => {
                for (queue, length) in plan.queues.iter().zip(lengths) {
                    metrics
                        .celery_queue_length
                        .with_label_values(&[queue.as_str()])
                        .set(length);
                }
                match change {
                    Change::Started => {
                        tracing::info!(%broker, queues = ?plan.queues, "sampling Celery queue lengths")
                    }
                    Change::Recovered => {
                        tracing::info!(%broker, "Celery broker answers again; queue lengths are sampled")
                    }
                    Change::Same | Change::Lost => {}
                }
                failures = 0;
                refused = false;
                plan.interval
            }
            Err(error) => {
                // A stale length is worse than none: the series disappear until Redis answers.
                connection = None;
                forget(&metrics, &plan.queues);
                failures += 1;
                let delay = retry_delay(failures, plan.interval);
                // Once per outage (and per change of its cause), not once per sample: a refused
                // login would repeat forever.
                let now_refused = crate::broker::is_auth_failure(&error);
                if change == Change::Lost || now_refused != refused {
                    refused = now_refused;
                    let error = crate::broker::describe(&error, sent_password);
                    tracing::warn!(%broker, %error, "cannot read Celery queue lengths; retrying with backoff");
                } else {
                    tracing::debug!(%broker, ?delay, failures, "Celery queue sample failed again");
                }
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// One sample: LLEN of every key of every queue in one pipeline, summed per queue.
async fn sample(
    client: &redis::Client,
    config: &AsyncConnectionConfig,
    connection: &mut Option<MultiplexedConnection>,
    queues: &[String],
) -> redis::RedisResult<Vec<i64>> {
    let connection = match connection {
        Some(connection) => connection,
        None => connection.insert(
            client
                .get_multiplexed_async_connection_with_config(config)
                .await?,
        ),
    };
    let mut pipeline = redis::pipe();
    for queue in queues {
        for key in queue_keys(queue) {
            pipeline.cmd("LLEN").arg(key);
        }
    }
    let lengths: Vec<i64> = pipeline.query_async(connection).await?;
    Ok(lengths
        .chunks(PRIORITY_STEPS.len() + 1)
        .map(|keys| keys.iter().sum())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn queues(line: &str) -> Option<Vec<String>> {
        worker_queues(&argv(line)).map(|set| set.into_iter().collect())
    }

    #[test]
    fn a_worker_without_queues_consumes_celery() {
        assert_eq!(
            queues("celery -A app worker -c 2"),
            Some(vec!["celery".into()])
        );
        assert_eq!(
            queues("/srv/venv/bin/celery worker"),
            Some(vec!["celery".into()])
        );
    }

    #[test]
    fn queue_options_in_every_spelling() {
        let expected = Some(vec!["default".into(), "hi".into()]);
        for line in [
            "celery -A app worker -Q hi,default",
            "celery -A app worker -Qhi,default",
            "celery -A app worker --queues hi,default",
            "celery -A app worker --queues=hi,default",
            "celery -A app worker -Q hi -Q default",
            "celery -A app worker -Q hi,,default, --loglevel INFO",
            "python -m celery -A app worker -Q hi,default",
            "python3 -mcelery --app=app worker -Q hi,default",
            "uv run celery -A app worker -Q hi,default",
            "celery --broker redis://x -A app --workdir /srv worker -l INFO -Q hi,default",
        ] {
            assert_eq!(queues(line), expected, "{line}");
        }
    }

    #[test]
    fn excluded_queues_are_dropped() {
        assert_eq!(
            queues("celery worker -Q a,b,c -X b"),
            Some(vec!["a".into(), "c".into()])
        );
        assert_eq!(
            queues("celery worker --exclude-queues=celery"),
            Some(vec![])
        );
    }

    #[test]
    fn other_commands_are_not_workers() {
        assert_eq!(queues("celery -A app beat"), None);
        assert_eq!(queues("celery -A app flower"), None);
        assert_eq!(queues("gunicorn app:wsgi -w 4"), None);
        assert_eq!(queues("celery"), None);
        assert_eq!(queues(""), None);
        // An app module called "worker" is a value, not the subcommand.
        assert_eq!(queues("celery -A worker beat"), None);
        assert_eq!(queues("python manage.py celery_cleanup"), None);
    }

    #[test]
    fn watched_queues_merge_programs_jobs_and_config() {
        let config = proxy_conf::load_str(
            r#"
            [programs.default]
            command = ["celery", "-A", "app", "worker"]
            [programs.fast]
            command = ["celery", "-A", "app", "worker", "-Q", "hi,lo"]
            [programs.web2]
            command = ["python", "serve.py", "-Q", "nope"]
            [beat]
            broker = "redis://127.0.0.1:6390/3"
            [beat.jobs.report]
            task = "app.report"
            every = "1m"
            queue = "reports"
            [metrics]
            queues = ["monitoring"]
            sample_interval = "2s"
            "#,
            "sauna.toml",
        )
        .unwrap();
        assert_eq!(
            plan(&config, Some(&Secret::new("pw"))),
            Some(SamplerPlan {
                broker: "redis://127.0.0.1:6390/3".into(),
                password: Some(Secret::new("pw")),
                queues: vec![
                    "celery".into(),
                    "hi".into(),
                    "lo".into(),
                    "monitoring".into(),
                    "reports".into()
                ],
                interval: Duration::from_secs(2),
            })
        );
    }

    #[test]
    fn the_metrics_broker_wins_and_no_broker_means_no_plan() {
        let mut config = proxy_conf::load_str(
            "[metrics]\nqueues = [\"a\"]\nbroker = \"redis://127.0.0.1:1/0\"\n",
            "sauna.toml",
        )
        .unwrap();
        assert_eq!(
            plan(&config, None).map(|plan| plan.broker),
            Some("redis://127.0.0.1:1/0".into())
        );
        config.metrics.broker = None;
        assert_eq!(plan(&config, None), None);
        config.beat = Some(proxy_conf::BeatConfig::default());
        config.metrics.queues.clear();
        assert_eq!(plan(&config, None), None, "no queues, nothing to sample");
    }

    #[test]
    fn nothing_is_sampled_when_the_endpoint_is_off() {
        let config = proxy_conf::load_str(
            "[metrics]\nlisten = \"\"\nqueues = [\"a\"]\nbroker = \"redis://127.0.0.1:1/0\"\n",
            "sauna.toml",
        )
        .unwrap();
        assert_eq!(plan(&config, None), None);
    }

    #[test]
    fn keys_follow_kombu_priority_steps() {
        assert_eq!(
            queue_keys("hi"),
            ["hi", "hi\x06\x163", "hi\x06\x166", "hi\x06\x169"].map(String::from)
        );
    }

    #[test]
    fn retries_back_off_from_the_interval_to_a_minute() {
        let five = Duration::from_secs(5);
        let delays: Vec<u64> = (1..=6).map(|n| retry_delay(n, five).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
        assert_eq!(retry_delay(1000, five), Duration::from_secs(60));
        let slow = Duration::from_secs(120);
        assert_eq!(retry_delay(3, slow), slow, "never faster than the interval");
    }

    #[test]
    fn one_log_line_per_change() {
        let mut link = Link::Starting;
        let mut changes = Vec::new();
        for ok in [false, false, true, true, false, true] {
            let (next, change) = link.after(ok);
            link = next;
            changes.push(change);
        }
        assert_eq!(
            changes,
            [
                Change::Lost,
                Change::Same,
                Change::Recovered,
                Change::Same,
                Change::Lost,
                Change::Recovered
            ]
        );
        assert_eq!(Link::Starting.after(true), (Link::Up, Change::Started));
    }
}
