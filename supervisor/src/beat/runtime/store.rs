//! The Redis side of runtime jobs (layout in the module above): the writes through the scripts,
//! the change stream, and the reads — by name, by `HSCAN` step, or all at once for `beat list`.

use std::time::Duration;

use proxy_conf::secrets::{Secret, redact_url};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};

use super::{CHANGES_MAXLEN, JobDoc, PAUSE_LUA, PUT_LUA, REMOVE_LUA};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or could not be reached.
    #[error("Redis at {url}: {}", crate::broker::describe(.source, *.sent_password))]
    Redis {
        /// The broker URL without its password.
        url: String,
        /// Whether a password was sent.
        sent_password: bool,
        /// What Redis said.
        #[source]
        source: redis::RedisError,
    },
    /// The name belongs to a `sauna.toml` job.
    #[error(
        "job \"{0}\" is defined in sauna.toml (or the Celery app's beat_schedule); a runtime job cannot replace it; rename it or edit the file"
    )]
    TomlJob(String),
    /// No runtime job has this name.
    #[error("no runtime job named \"{0}\"")]
    NoSuchJob(String),
}

/// One runtime job as `beat list` shows it.
#[derive(Debug, Clone)]
pub struct StoredJob {
    /// Its name.
    pub name: String,
    /// The raw document.
    pub document: String,
    /// Unix ms of its last write or resume.
    pub since: Option<i64>,
    /// Paused.
    pub paused: bool,
    /// Its last published slot (Unix ms).
    pub last: Option<i64>,
}

/// What the Redis side of runtime jobs looks like to a writer or a reader.
pub struct Store {
    connection: MultiplexedConnection,
    url: String,
    sent_password: bool,
    prefix: String,
}

/// Stream entries as Redis returns them: (id, [field, value, …]).
type StreamEntries = Vec<(String, Vec<String>)>;
/// Per name: document, since, paused, last slot.
type JobColumns = (
    Vec<Option<String>>,
    Vec<Option<i64>>,
    Vec<bool>,
    Vec<Option<i64>>,
);
/// Per name: since, paused, last slot.
type MetaColumns = (Vec<Option<i64>>, Vec<bool>, Vec<Option<i64>>);
/// The last job-document writes as stream entries: (entry id, job name).
pub type Changes = Vec<(String, String)>;

impl Store {
    /// Connects to the broker at `url` (logging in with `password` when the URL has none).
    pub async fn connect(
        url: &str,
        password: Option<&Secret>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Store, StoreError> {
        let failed = |source| StoreError::Redis {
            url: redact_url(url),
            sent_password: password.is_some(),
            source,
        };
        let info = crate::broker::connection_info(url, password).map_err(failed)?;
        let sent_password = crate::broker::sends_password(&info);
        let client = Client::open(info).map_err(failed)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(failed)?;
        Ok(Store {
            connection,
            url: redact_url(url),
            sent_password,
            prefix: prefix.to_owned(),
        })
    }

    /// A store on an open connection (the leader's).
    pub fn on(
        connection: MultiplexedConnection,
        url: &str,
        sent_password: bool,
        prefix: &str,
    ) -> Store {
        Store {
            connection,
            url: url.to_owned(),
            sent_password,
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn fail(&self, source: redis::RedisError) -> StoreError {
        StoreError::Redis {
            url: self.url.clone(),
            sent_password: self.sent_password,
            source,
        }
    }

    /// Stores `doc` under `name` (validated by the caller); true when the job is new.
    pub async fn put(&mut self, name: &str, doc: &JobDoc) -> Result<bool, StoreError> {
        let result: Result<i64, _> = Script::new(PUT_LUA)
            .key(self.key("jobs"))
            .key(self.key("since"))
            .key(self.key("changes"))
            .key(self.key("static"))
            .key(self.key("paused"))
            .arg(name)
            .arg(doc.to_json())
            .arg(CHANGES_MAXLEN)
            .invoke_async(&mut self.connection)
            .await;
        match result {
            Ok(created) => Ok(created == 1),
            Err(error) if error.code() == Some("TOMLJOB") => {
                Err(StoreError::TomlJob(name.to_owned()))
            }
            Err(error) => Err(self.fail(error)),
        }
    }

    /// Removes `name`; [`StoreError::NoSuchJob`] when there is none.
    pub async fn remove(&mut self, name: &str) -> Result<(), StoreError> {
        let result: Result<i64, _> = Script::new(REMOVE_LUA)
            .key(self.key("jobs"))
            .key(self.key("since"))
            .key(self.key("changes"))
            .key(self.key("paused"))
            .key(self.key("last"))
            .arg(name)
            .arg(CHANGES_MAXLEN)
            .invoke_async(&mut self.connection)
            .await;
        match result.map_err(|error| self.fail(error))? {
            1 => Ok(()),
            _ => Err(StoreError::NoSuchJob(name.to_owned())),
        }
    }

    /// Pauses or resumes `name`; false when it already was in that state.
    pub async fn set_paused(&mut self, name: &str, paused: bool) -> Result<bool, StoreError> {
        let result: Result<i64, _> = Script::new(PAUSE_LUA)
            .key(self.key("jobs"))
            .key(self.key("since"))
            .key(self.key("changes"))
            .key(self.key("paused"))
            .arg(name)
            .arg(CHANGES_MAXLEN)
            .arg(if paused { "1" } else { "0" })
            .invoke_async(&mut self.connection)
            .await;
        match result.map_err(|error| self.fail(error))? {
            -1 => Err(StoreError::NoSuchJob(name.to_owned())),
            changed => Ok(changed == 1),
        }
    }

    /// Names of the `sauna.toml` jobs, as the leader last wrote them.
    pub async fn static_names(&mut self) -> Result<Vec<String>, StoreError> {
        let result: Result<Vec<String>, _> = redis::cmd("SMEMBERS")
            .arg(self.key("static"))
            .query_async(&mut self.connection)
            .await;
        result.map_err(|error| self.fail(error))
    }

    /// Replaces the set of `sauna.toml` job names writers must refuse.
    pub async fn set_static_names(&mut self, names: &[&str]) -> Result<(), StoreError> {
        let key = self.key("static");
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        if !names.is_empty() {
            pipe.cmd("SADD").arg(&key).arg(names).ignore();
        }
        let result: Result<(), _> = pipe.query_async(&mut self.connection).await;
        result.map_err(|error| self.fail(error))
    }

    /// The id of the newest change entry (`0-0` when there is none): reading from it on sees
    /// every later write.
    pub async fn newest_change(&mut self) -> Result<String, StoreError> {
        let result: Result<Vec<(String, Vec<String>)>, _> = redis::cmd("XREVRANGE")
            .arg(self.key("changes"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.connection)
            .await;
        let entries = result.map_err(|error| self.fail(error))?;
        Ok(entries
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }

    /// Up to `count` changes after `after`, and whether the stream was trimmed past `after`
    /// (then changes were lost and the caller must reload everything).
    pub async fn changes_after(
        &mut self,
        after: &str,
        count: usize,
    ) -> Result<(Changes, bool), StoreError> {
        let key = self.key("changes");
        let result: Result<(StreamEntries, StreamEntries), _> = redis::pipe()
            .cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XRANGE")
            .arg(&key)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.connection)
            .await;
        let (first, entries) = result.map_err(|error| self.fail(error))?;
        let trimmed = after != "0-0"
            && first
                .first()
                .is_some_and(|(id, _)| stream_id(id) > stream_id(after));
        let changes = entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let name = fields
                    .chunks(2)
                    .find(|pair| pair[0] == "name")
                    .and_then(|pair| pair.get(1).cloned())?;
                Some((id, name))
            })
            .collect();
        Ok((changes, trimmed))
    }

    /// The stored state of `names`, in order (`None`: no such job).
    pub async fn get_many(
        &mut self,
        names: &[String],
    ) -> Result<Vec<Option<StoredJob>>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let result: Result<JobColumns, _> = redis::pipe()
            .cmd("HMGET")
            .arg(self.key("jobs"))
            .arg(names)
            .cmd("HMGET")
            .arg(self.key("since"))
            .arg(names)
            .cmd("SMISMEMBER")
            .arg(self.key("paused"))
            .arg(names)
            .cmd("HMGET")
            .arg(self.key("last"))
            .arg(names)
            .query_async(&mut self.connection)
            .await;
        let (documents, since, paused, last) = result.map_err(|error| self.fail(error))?;
        Ok(names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let document = documents.get(index).cloned().flatten()?;
                Some(StoredJob {
                    name: name.clone(),
                    document,
                    since: since.get(index).copied().flatten(),
                    paused: paused.get(index).copied().unwrap_or(false),
                    last: last.get(index).copied().flatten(),
                })
            })
            .collect())
    }

    /// The last published slot (Unix ms) of each of `names`, in order.
    pub async fn last_slots(&mut self, names: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let result: Result<Vec<Option<i64>>, _> = redis::cmd("HMGET")
            .arg(self.key("last"))
            .arg(names)
            .query_async(&mut self.connection)
            .await;
        result.map_err(|error| self.fail(error))
    }

    /// One step of a full scan of the runtime jobs (`HSCAN` from `cursor`, about `count` of them),
    /// with the next cursor (0 when done). A job may come twice; one present throughout comes
    /// at least once.
    pub async fn scan(
        &mut self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<StoredJob>), StoreError> {
        let result: Result<(u64, Vec<String>), _> = redis::cmd("HSCAN")
            .arg(self.key("jobs"))
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.connection)
            .await;
        let (next, flat) = result.map_err(|error| self.fail(error))?;
        let mut names = Vec::with_capacity(flat.len() / 2);
        let mut documents = Vec::with_capacity(flat.len() / 2);
        let mut pairs = flat.into_iter();
        while let (Some(name), Some(document)) = (pairs.next(), pairs.next()) {
            names.push(name);
            documents.push(document);
        }
        Ok((next, self.with_meta(names, documents).await?))
    }

    /// Jobs `names` with their `documents`, completed with their `since`, pause and last slot
    /// (one pipelined read).
    async fn with_meta(
        &mut self,
        names: Vec<String>,
        documents: Vec<String>,
    ) -> Result<Vec<StoredJob>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let result: Result<MetaColumns, _> = redis::pipe()
            .cmd("HMGET")
            .arg(self.key("since"))
            .arg(&names)
            .cmd("SMISMEMBER")
            .arg(self.key("paused"))
            .arg(&names)
            .cmd("HMGET")
            .arg(self.key("last"))
            .arg(&names)
            .query_async(&mut self.connection)
            .await;
        let (since, paused, last) = result.map_err(|error| self.fail(error))?;
        Ok(names
            .into_iter()
            .zip(documents)
            .enumerate()
            .map(|(index, (name, document))| StoredJob {
                name,
                document,
                since: since.get(index).copied().flatten(),
                paused: paused.get(index).copied().unwrap_or(false),
                last: last.get(index).copied().flatten(),
            })
            .collect())
    }

    /// Every runtime job, in name order, in two round trips: the documents, then the rest of
    /// each job by name (aligned lists rather than whole-hash maps: at 100 000 jobs the maps' key
    /// comparisons were a third of `beat list`, and under CPU contention every further round
    /// trip costs a wake-up).
    pub async fn all(&mut self) -> Result<Vec<StoredJob>, StoreError> {
        let result: Result<Vec<String>, _> = redis::cmd("HGETALL")
            .arg(self.key("jobs"))
            .query_async(&mut self.connection)
            .await;
        let flat = result.map_err(|error| self.fail(error))?;
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(flat.len() / 2);
        let mut flat = flat.into_iter();
        while let (Some(name), Some(document)) = (flat.next(), flat.next()) {
            pairs.push((name, document));
        }
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let (names, documents) = pairs.into_iter().unzip();
        self.with_meta(names, documents).await
    }
}

/// A stream id `ms-seq` as a comparable pair (malformed parts count as 0).
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(stream_id("1700000000000-10") > stream_id("1700000000000-9"));
        assert!(stream_id("1700000000001-0") > stream_id("1700000000000-99"));
    }
}
