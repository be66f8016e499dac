//! Beat's side of Redis: one connection with short timeouts, the leader-lock commands, and the
//! fenced publish. It owns the key names and the Lua scripts; *when* to call them (lease timing,
//! backoff, catch-up) belongs to `leader` and the actor in `mod.rs`.
//!
//! Keys, under `[beat].key_prefix` (default `sauna:beat:`):
//! - `<prefix>lock`: the leader lock, a string `host:pid:uuid` with a TTL of `lock_ttl`;
//! - `<prefix>last`: a hash, job name → the last published slot (Unix milliseconds).
//!
//! The publish is one Lua script, so Redis runs it atomically: it checks that this supervisor
//! still holds the lock (when the lock is on), that the slot is newer than the job's last
//! published slot, then LPUSHes the message and records the slot. A leader paused past its TTL
//! wakes up to a refused script instead of a duplicate, and a new leader continues exactly after
//! the last slot the old one published.
//!
//! The actor publishes what is due in batches: one call of the same checks over a batch (one lock
//! check, then per message the slot check, `LPUSH` and `HSET`), each batch sent while the next is
//! prepared, so thousands of jobs due at one minute boundary cost a few round trips.

use std::time::Duration;

use proxy_conf::secrets::{Secret, redact_url};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};

/// Redis failed, could not be reached or refused the login; the actor backs off and retries.
#[derive(Debug, thiserror::Error)]
#[error("Redis at {url}: {}", crate::broker::describe(.source, *.sent_password))]
pub struct BrokerError {
    /// The broker URL without its password.
    pub url: String,
    /// Whether the connection logged in with a password (it tells a wrong password from a
    /// missing one).
    pub sent_password: bool,
    /// What Redis or the connection said.
    #[source]
    pub source: redis::RedisError,
}

impl BrokerError {
    /// True when Redis refused the login rather than failed.
    pub fn is_auth_failure(&self) -> bool {
        crate::broker::is_auth_failure(&self.source)
    }
}

/// The outcome of one fenced publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The message is in the queue and the slot recorded.
    Sent,
    /// The slot (or a later one) was already published, by us or by another supervisor.
    AlreadySent,
    /// This supervisor no longer holds the lock; nothing was pushed.
    NotLeader,
}

/// What a failed lock acquisition learned about the current holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's `host:pid` (the token without its secret part), if any.
    pub name: Option<String>,
    /// Milliseconds until the lock expires, if it has a TTL.
    pub ttl_ms: Option<u64>,
}

const PUBLISH_LUA: &str = r"
-- KEYS: lock, last-slot hash, queue list. ARGV: token ('' = unfenced), job, slot ms, message.
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local last = redis.call('HGET', KEYS[2], ARGV[2])
if last and tonumber(last) >= tonumber(ARGV[3]) then return 0 end
redis.call('LPUSH', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
";

const PUBLISH_MANY_LUA: &str = r"
-- The publish script over a batch, in order, under one lock check.
-- KEYS: lock, last-slot hash, one queue list per message. ARGV: token ('' = unfenced), then
-- job, slot ms, message per message. Returns 1 (sent), 0 (already sent) or -1 (not leader) each.
local count = #KEYS - 2
local out = {}
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  for i = 1, count do out[i] = -1 end
  return out
end
for i = 1, count do
  local job, slot = ARGV[i * 3 - 1], ARGV[i * 3]
  local last = redis.call('HGET', KEYS[2], job)
  if last and tonumber(last) >= tonumber(slot) then
    out[i] = 0
  else
    redis.call('LPUSH', KEYS[i + 2], ARGV[i * 3 + 1])
    redis.call('HSET', KEYS[2], job, slot)
    out[i] = 1
  end
end
return out
";

const RENEW_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The broker as beat uses it.
pub struct Broker {
    client: Client,
    url: String,
    sent_password: bool,
    prefix: String,
    timeout: Duration,
    connection: Option<MultiplexedConnection>,
    publish: Script,
    publish_many: Script,
    renew: Script,
    release: Script,
}

impl Broker {
    /// Prepares a broker for `url`, logging in with `password` when the URL has none; nothing is
    /// connected until the first command. `timeout` bounds connecting and every reply, so a hung
    /// Redis cannot outlive the lease.
    pub fn new(
        url: &str,
        password: Option<&Secret>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Broker, BrokerError> {
        let failed = |source| BrokerError {
            url: redact_url(url),
            sent_password: password.is_some(),
            source,
        };
        let info = crate::broker::connection_info(url, password).map_err(failed)?;
        let sent_password = crate::broker::sends_password(&info);
        let client = Client::open(info).map_err(failed)?;
        Ok(Broker {
            client,
            url: redact_url(url),
            sent_password,
            prefix: prefix.to_owned(),
            timeout,
            connection: None,
            publish: Script::new(PUBLISH_LUA),
            publish_many: Script::new(PUBLISH_MANY_LUA),
            renew: Script::new(RENEW_LUA),
            release: Script::new(RELEASE_LUA),
        })
    }

    /// The URL without password.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runtime jobs' reads and writes on this broker's connection.
    pub(super) async fn store(&mut self) -> Result<super::runtime::Store, BrokerError> {
        let connection = self.connection().await?;
        Ok(super::runtime::Store::on(
            connection,
            &self.url,
            self.sent_password,
            &self.prefix,
        ))
    }

    pub(super) fn fail(&mut self, source: redis::RedisError) -> BrokerError {
        // Drop the connection on any error so the next command reconnects from scratch.
        self.connection = None;
        BrokerError {
            url: self.url.clone(),
            sent_password: self.sent_password,
            source,
        }
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, BrokerError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(connection) => {
                self.connection = Some(connection.clone());
                Ok(connection)
            }
            Err(error) => Err(self.fail(error)),
        }
    }

    /// Tries to take the lock with `token` for `ttl`; `Ok(None)` when taken, else who holds it.
    pub async fn acquire(
        &mut self,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<Holder>, BrokerError> {
        let mut connection = self.connection().await?;
        let lock = self.key("lock");
        let set: Result<Option<String>, _> = redis::cmd("SET")
            .arg(&lock)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut connection)
            .await;
        if set.map_err(|error| self.fail(error))?.is_some() {
            return Ok(None);
        }
        let found: Result<(Option<String>, i64), _> = redis::pipe()
            .cmd("GET")
            .arg(&lock)
            .cmd("PTTL")
            .arg(&lock)
            .query_async(&mut connection)
            .await;
        let (value, ttl_ms) = found.map_err(|error| self.fail(error))?;
        Ok(Some(Holder {
            name: value.map(|value| holder_name(&value)),
            ttl_ms: u64::try_from(ttl_ms).ok(),
        }))
    }

    /// Extends the lock to `ttl` if `token` still holds it; false when it was lost.
    pub async fn renew(&mut self, token: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let mut connection = self.connection().await?;
        let result: Result<i64, _> = self
            .renew
            .key(self.key("lock"))
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut connection)
            .await;
        result
            .map(|done| done == 1)
            .map_err(|error| self.fail(error))
    }

    /// Deletes the lock if `token` holds it, so a successor need not wait for the TTL.
    pub async fn release(&mut self, token: &str) -> Result<(), BrokerError> {
        let mut connection = self.connection().await?;
        let result: Result<i64, _> = self
            .release
            .key(self.key("lock"))
            .arg(token)
            .invoke_async(&mut connection)
            .await;
        result.map(drop).map_err(|error| self.fail(error))
    }

    /// The last published slot (Unix ms) of each job, in the order given.
    pub async fn last_slots(&mut self, jobs: &[&str]) -> Result<Vec<Option<i64>>, BrokerError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection().await?;
        let result: Result<Vec<Option<i64>>, _> = redis::cmd("HMGET")
            .arg(self.key("last"))
            .arg(jobs)
            .query_async(&mut connection)
            .await;
        result.map_err(|error| self.fail(error))
    }

    /// Starts publishing every message of `batch` in one call of the fenced batch script, in
    /// order, on a task of its own (so the caller can prepare the next batch while
    /// Redis works); [`Broker::finish_publish`] reads the outcome. The script is loaded in the
    /// same pipeline, so a Redis that restarted (and lost its script cache) is no error.
    pub async fn start_publish(
        &mut self,
        token: Option<&str>,
        batch: Vec<Outgoing>,
    ) -> Result<PublishTask, BrokerError> {
        let mut connection = self.connection().await?;
        let (lock, last) = (self.key("lock"), self.key("last"));
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(PUBLISH_MANY_LUA)
            .ignore();
        let call = pipe
            .cmd("EVALSHA")
            .arg(self.publish_many.get_hash())
            .arg(batch.len() + 2)
            .arg(&lock)
            .arg(&last);
        for outgoing in &batch {
            call.arg(&outgoing.queue_key);
        }
        call.arg(token.unwrap_or(""));
        for outgoing in &batch {
            call.arg(&*outgoing.job)
                .arg(outgoing.slot_ms)
                .arg(&outgoing.message);
        }
        Ok(tokio::spawn(async move {
            let (outcomes,): (Vec<i64>,) = pipe.query_async(&mut connection).await?;
            Ok(outcomes)
        }))
    }

    /// One outcome per message of a batch [`Broker::start_publish`] sent.
    pub fn finish_publish(
        &mut self,
        joined: Result<redis::RedisResult<Vec<i64>>, tokio::task::JoinError>,
    ) -> Result<Vec<Published>, BrokerError> {
        let result = joined.unwrap_or_else(|error| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "publish task",
                error.to_string(),
            )))
        });
        Ok(result
            .map_err(|error| self.fail(error))?
            .into_iter()
            .map(|outcome| match outcome {
                1 => Published::Sent,
                0 => Published::AlreadySent,
                _ => Published::NotLeader,
            })
            .collect())
    }

    /// Pushes `message` to `queue_key` for `job`'s `slot_ms`, atomically fenced by `token`
    /// (`None` when the lock is off: the slot check alone keeps publishers from doubling).
    pub async fn publish(
        &mut self,
        token: Option<&str>,
        job: &str,
        slot_ms: i64,
        queue_key: &str,
        message: &str,
    ) -> Result<Published, BrokerError> {
        let mut connection = self.connection().await?;
        let result: Result<i64, _> = self
            .publish
            .key(self.key("lock"))
            .key(self.key("last"))
            .key(queue_key)
            .arg(token.unwrap_or(""))
            .arg(job)
            .arg(slot_ms)
            .arg(message)
            .invoke_async(&mut connection)
            .await;
        match result.map_err(|error| self.fail(error))? {
            1 => Ok(Published::Sent),
            0 => Ok(Published::AlreadySent),
            _ => Ok(Published::NotLeader),
        }
    }
}

/// A batch on its way to Redis (see [`Broker::start_publish`]).
pub type PublishTask = tokio::task::JoinHandle<redis::RedisResult<Vec<i64>>>;

/// One message of a pipelined publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The job it is for.
    pub job: std::sync::Arc<str>,
    /// Its slot, Unix ms.
    pub slot_ms: i64,
    /// The queue list it goes to.
    pub queue_key: String,
    /// The envelope.
    pub message: String,
}

/// `host:pid` from a lock token `host:pid:uuid`.
pub fn holder_name(token: &str) -> String {
    match token.rsplit_once(':') {
        Some((name, _secret)) => name.to_owned(),
        None => token.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_broker_without_its_password() {
        let broker = Broker::new(
            "redis://:inline@127.0.0.1:1/0",
            None,
            "p:",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(broker.url(), "redis://:***@127.0.0.1:1/0");
        let error = Broker::new(
            "redis://:inline@127.0.0.1:port/0",
            None,
            "p:",
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(!error.to_string().contains("inline"), "{error}");
    }

    #[test]
    fn holder_name_hides_the_secret() {
        assert_eq!(holder_name("web1:4242:0f3a"), "web1:4242");
    }
}
