//! The leader's side of runtime jobs (layout in `beat::runtime`): loading them all when it starts
//! publishing, then following the change stream — at every publishing wake-up, so a change
//! stored before a slot's instant applies to that slot, and at least every [`POLL`] so a new job
//! is seen before its first slot is late. Runtime jobs live in the actor's job table after the
//! TOML ones and follow the same cursor and catch-up rules; a standby holds none of them.
//!
//! Cursors: a job's slots after its `since` (the instant Redis stored the current definition)
//! are its own. A changed schedule continues from `since` — unless the old schedule's next slot
//! fell due at or before the change and was not yet published (the change raced the publish by
//! milliseconds); then that slot is still considered, so a change never skips a slot. The
//! fenced publish keeps any slot from going out twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::{Actor, JobState};
use crate::beat::publisher::BrokerError;
use crate::beat::runtime::{JobDoc, Store, StoreError, StoredJob};

/// Longest time between two reads of the change stream while publishing.
pub(super) const POLL: Duration = Duration::from_millis(500);
/// Change entries read per round trip.
const CHANGE_BATCH: usize = 10_000;
/// Jobs read per round trip when loading them all.
const LOAD_BATCH: usize = 2_000;

/// What the leader knows about the runtime jobs beyond their table entries.
pub(super) struct Follower {
    /// The last change entry applied; `None`: load everything at the next publishing wake-up.
    last_id: Option<String>,
    /// When the change stream is read next.
    pub(super) next_poll: Instant,
    /// Job name (shared with the job's state) → position in the actor's table.
    index: HashMap<Arc<str>, usize>,
    /// Stored jobs the leader refuses, with the reason (shown by `status`).
    pub(super) invalid: BTreeMap<String, String>,
    /// The `sauna.toml` job names have been written for writers to refuse.
    static_written: bool,
    /// One-off jobs that have published and are to be paused.
    pub(super) one_offs_done: Vec<String>,
}

impl Follower {
    pub(super) fn new() -> Follower {
        Follower {
            last_id: None,
            next_poll: Instant::now(),
            index: HashMap::new(),
            invalid: BTreeMap::new(),
            static_written: false,
            one_offs_done: Vec::new(),
        }
    }

    /// Forget the stream position (after a Redis error or a lost lease): reload at the next sync.
    pub(super) fn reset(&mut self) {
        self.last_id = None;
    }

    /// The `sauna.toml` jobs changed: write their names again.
    pub(super) fn toml_changed(&mut self) {
        self.static_written = false;
    }

    /// Number of runtime jobs in the table.
    pub(super) fn count(&self) -> usize {
        self.index.len()
    }

    /// Where the runtime job `name` is in the table.
    pub(super) fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
}

fn from_ms(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::from_timestamp_millis)
}

impl Actor {
    async fn store(&mut self) -> Result<Store, BrokerError> {
        self.broker.store().await
    }

    fn store_failed(&mut self, error: StoreError) -> BrokerError {
        match error {
            StoreError::Redis { source, .. } => self.broker.fail(source),
            other => self.broker.fail(redis::RedisError::from((
                redis::ErrorKind::Client,
                "runtime job store",
                other.to_string(),
            ))),
        }
    }

    /// Loads every runtime job (when needed), writing the TOML names first; then cursors are
    /// synced from the last published slots by the caller.
    pub(super) async fn load_runtime(&mut self) -> Result<(), BrokerError> {
        if self.runtime.last_id.is_some() && self.runtime.static_written {
            return Ok(());
        }
        let mut store = self.store().await?;
        if !self.runtime.static_written {
            let names: Vec<&str> = self
                .jobs
                .iter()
                .filter(|state| !state.runtime)
                .map(|state| &*state.job.name)
                .collect();
            if let Err(error) = store.set_static_names(&names).await {
                return Err(self.store_failed(error));
            }
            self.runtime.static_written = true;
        }
        if self.runtime.last_id.is_some() {
            return Ok(());
        }
        // The position is read before the jobs: a write in between is applied twice, never lost.
        let position = match store.newest_change().await {
            Ok(position) => position,
            Err(error) => return Err(self.store_failed(error)),
        };
        // The jobs already in the table stay there while the stored ones are read, each found
        // one continuing from its state (set aside in a map, they were a second copy of the
        // table at the peak); those not found are removed after the scan.
        let toml = self.jobs.len() - self.runtime.count();
        for state in &mut self.jobs[toml..] {
            state.seen = false;
        }
        self.runtime.invalid.clear();
        self.earliest = None;
        self.prepared = None;
        // In steps, so that memory for the documents in flight stays small.
        let mut cursor = 0;
        loop {
            let (next, stored) = match store.scan(cursor, LOAD_BATCH).await {
                Ok(step) => step,
                Err(error) => return Err(self.store_failed(error)),
            };
            for job in stored {
                let previous = self.take_runtime(&job.name);
                self.apply(job.name.clone(), Some(job), previous);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut at = toml;
        while let Some(state) = self.jobs.get(at) {
            let name = (!state.seen).then(|| state.job.name.clone());
            // Each turn moves on or shrinks the table, so the scan ends even should the index
            // miss a name (it never should: the table's runtime part is what it indexes).
            if name.is_none_or(|name| self.take_runtime(&name).is_none()) {
                at += 1;
            }
        }
        self.jobs.shrink_to_fit();
        self.shared.prune();
        tracing::info!(
            jobs = self.runtime.count(),
            invalid = self.runtime.invalid.len(),
            "beat: runtime jobs loaded"
        );
        self.runtime.last_id = Some(position);
        self.runtime.next_poll = Instant::now() + POLL;
        Ok(())
    }

    /// Applies every change stored since the last one applied.
    pub(super) async fn poll_runtime(&mut self) -> Result<(), BrokerError> {
        let Some(mut after) = self.runtime.last_id.clone() else {
            return Ok(());
        };
        self.runtime.next_poll = Instant::now() + POLL;
        let mut store = self.store().await?;
        loop {
            let (changes, trimmed) = match store.changes_after(&after, CHANGE_BATCH).await {
                Ok(read) => read,
                Err(error) => return Err(self.store_failed(error)),
            };
            if trimmed {
                tracing::warn!(
                    "beat: runtime job changes were trimmed before this leader read them; reloading every runtime job"
                );
                self.runtime.last_id = None;
                self.load_runtime().await?;
                return self.sync_cursors().await;
            }
            let Some((last, _)) = changes.last() else {
                return Ok(());
            };
            after = last.clone();
            let mut names: Vec<String> = changes.into_iter().map(|(_, name)| name).collect();
            names.sort();
            names.dedup();
            let stored = match store.get_many(&names).await {
                Ok(stored) => stored,
                Err(error) => return Err(self.store_failed(error)),
            };
            for (name, job) in names.into_iter().zip(stored) {
                let previous = self.take_runtime(&name);
                self.apply(name, job, previous);
            }
            self.runtime.last_id = Some(after.clone());
        }
    }

    /// Pauses every one-off job that has published, so it runs once.
    pub(super) async fn finish_one_offs(&mut self) -> Result<(), BrokerError> {
        if self.runtime.one_offs_done.is_empty() {
            return Ok(());
        }
        let mut store = self.store().await?;
        while let Some(name) = self.runtime.one_offs_done.last().cloned() {
            match store.set_paused(&name, true).await {
                Ok(_) | Err(StoreError::NoSuchJob(_)) => {}
                Err(error) => return Err(self.store_failed(error)),
            }
            tracing::info!(job = %name, "beat: one-off job published; paused");
            self.take_runtime(&name);
            self.runtime.one_offs_done.pop();
        }
        Ok(())
    }

    /// Brings the name index up to date after the TOML jobs before the runtime ones changed in
    /// number.
    pub(super) fn reindex_runtime(&mut self) {
        let toml = self.jobs.len() - self.runtime.count();
        for (position, state) in self.jobs.iter().enumerate().skip(toml) {
            if let Some(indexed) = self.runtime.index.get_mut(&*state.job.name) {
                *indexed = position;
            }
        }
        self.earliest = None;
        self.moves += 1;
    }

    /// Takes `name`'s state out of the table.
    fn take_runtime(&mut self, name: &str) -> Option<JobState> {
        let position = self.runtime.index.remove(name)?;
        self.earliest = None;
        self.moves += 1;
        let state = self.jobs.swap_remove(position);
        if let Some(moved) = self.jobs.get(position) {
            self.runtime.index.insert(moved.job.name.clone(), position);
        }
        Some(state)
    }

    /// Puts the stored `job` (or its absence) in the table, continuing from `previous`.
    fn apply(&mut self, name: String, job: Option<StoredJob>, previous: Option<JobState>) {
        self.runtime.invalid.remove(&name);
        let Some(stored) = job else {
            if previous.is_some() {
                tracing::info!(job = %name, "beat: runtime job removed");
            }
            return;
        };
        if stored.paused {
            if previous.is_some() {
                tracing::info!(job = %name, "beat: runtime job paused");
            }
            return;
        }
        // The TOML jobs come first in the table, the runtime ones after them.
        let toml = self.jobs.len() - self.runtime.index.len();
        if self.jobs[..toml]
            .iter()
            .any(|state| *state.job.name == *name)
        {
            self.refuse(
                name,
                "a sauna.toml job has this name; the runtime job is ignored".to_owned(),
            );
            return;
        }
        let judged = JobDoc::parse(&stored.document)
            .and_then(|doc| doc.into_job(&name, self.settings.timezone));
        let runtime = match judged {
            Ok(runtime) => runtime,
            Err(reason) => return self.refuse(name, reason),
        };
        let now = Utc::now();
        let since = from_ms(stored.since).unwrap_or(now);
        let state = match previous {
            Some(mut state) if state.job.schedule == runtime.job.schedule => {
                state.replace_job(runtime.job, &mut self.shared);
                state.one_off = runtime.one_off;
                state.seen = true;
                state
            }
            Some(old) => {
                let cursor = match old.next {
                    Some(next) if next <= since => {
                        (next - chrono::Duration::milliseconds(1)).max(old.cursor)
                    }
                    _ => old.cursor.max(since),
                };
                tracing::info!(job = %name, schedule = %runtime.job.schedule, "beat: runtime job changed");
                JobState::runtime(runtime, cursor, &mut self.shared)
            }
            None => {
                let cursor = since.max(from_ms(stored.last).unwrap_or(since));
                let state = JobState::runtime(runtime, cursor, &mut self.shared);
                // A one-off job published after its definition was stored has run (its leader
                // stopped before pausing it): it is paused now rather than run again.
                if state.one_off
                    && stored
                        .last
                        .zip(stored.since)
                        .is_some_and(|(last, since)| last >= since)
                {
                    self.runtime.one_offs_done.push(name.clone());
                }
                state
            }
        };
        self.runtime
            .index
            .insert(state.job.name.clone(), self.jobs.len());
        self.jobs.push(state);
        self.earliest = None;
        self.moves += 1;
    }

    fn refuse(&mut self, name: String, reason: String) {
        tracing::warn!(job = %name, reason = %reason, "beat: runtime job refused; it does not run");
        self.runtime.invalid.insert(name, reason);
    }
}
