//! One job as beat's actor holds it: its definition in the compact form the actor runs it in
//! (names shared, arguments already in message form), its cursor (the last slot it is past), next
//! slot, last run, the mark of the prepared set holding its next message, and what `status` and
//! the metrics show of it. A leader holds 100 000 runtime jobs at once, so every byte of a
//! [`JobState`] counts a hundred thousand times.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use proxy_conf::CatchUp;

use crate::beat::message::Arguments;
use crate::beat::{Job, Schedule};

/// A [`Job`] as the actor runs it: its arguments live in [`JobState::arguments`], and its task,
/// queue and cron text are shared with every other job that has the same ones.
pub(super) struct Definition {
    /// Shared with the runtime-job index.
    pub(super) name: Arc<str>,
    pub(super) task: Arc<str>,
    pub(super) schedule: Schedule,
    pub(super) queue: Arc<str>,
    pub(super) priority: Option<u8>,
    pub(super) expires: Option<Duration>,
    pub(super) catch_up: CatchUp,
    pub(super) catch_up_window: Option<Duration>,
}

/// One copy of each task name, queue name and cron expression the jobs use: thousands of runtime
/// jobs share a handful of them, and a copy of each per job was megabytes at 100 000 jobs.
#[derive(Default)]
pub(super) struct Shared {
    texts: HashSet<Arc<str>>,
    /// Size after the last prune: the set is pruned when it doubles.
    pruned_at: usize,
}

impl Shared {
    /// The shared copy of `text`.
    fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.texts.get(text) {
            return shared.clone();
        }
        if self.texts.len() >= 2 * self.pruned_at + 64 {
            self.prune();
        }
        let shared: Arc<str> = Arc::from(text);
        self.texts.insert(shared.clone());
        shared
    }

    /// Forgets the texts no job uses any more (replaced jobs leave theirs behind).
    pub(super) fn prune(&mut self) {
        self.texts.retain(|text| Arc::strong_count(text) > 1);
        self.texts.shrink_to_fit();
        self.pruned_at = self.texts.len();
    }

    /// `job` in the actor's form, and its arguments in message form.
    fn definition(&mut self, job: Job) -> (Definition, Arguments) {
        let arguments = Arguments::new(&job.args, &job.kwargs);
        let schedule = match job.schedule {
            Schedule::Cron { spec, tz, text } => Schedule::Cron {
                spec,
                tz,
                text: self.get(&text),
            },
            every @ Schedule::Every { .. } => every,
        };
        let definition = Definition {
            name: Arc::from(job.name),
            task: self.get(&job.task),
            schedule,
            queue: self.get(&job.queue),
            priority: job.priority,
            expires: job.expires,
            catch_up: job.catch_up,
            catch_up_window: job.catch_up_window,
        };
        (definition, arguments)
    }
}

/// What `status` and the metrics show of a `sauna.toml` job. Runtime jobs have none: `status`
/// lists only the TOML jobs, their metrics share one series, and `beat list` reads a runtime
/// job's last run from Redis.
#[derive(Default)]
pub(super) struct Shown {
    pub(super) last_run: Option<DateTime<Utc>>,
    pub(super) last_task_id: Option<uuid::Uuid>,
    pub(super) published: u64,
    /// The value last written to the next-run gauge (`None`: never written).
    pub(super) next: Option<Option<DateTime<Utc>>>,
}

pub(super) struct JobState {
    pub(super) job: Definition,
    pub(super) cursor: DateTime<Utc>,
    pub(super) next: Option<DateTime<Utc>>,
    /// `None` for a runtime job (see [`Shown`]).
    pub(super) shown: Option<Box<Shown>>,
    /// When a reload put the job's current schedule in force: Redis's mark of an older schedule
    /// never moves the cursor behind it. `None` for the jobs this supervisor started with.
    pub(super) since: Option<DateTime<Utc>>,
    /// Stored in Redis (`beat::runtime`) rather than in sauna.toml.
    pub(super) runtime: bool,
    /// A runtime job paused after its first publish.
    pub(super) one_off: bool,
    /// Found again by the full load under way (runtime jobs not found are removed after it).
    pub(super) seen: bool,
    /// The job's arguments as its messages carry them.
    pub(super) arguments: Arguments,
    /// The mark of the [`Prepared`] set holding its messages for the next slot; any change to
    /// the job clears it (0: none), so a stale message is never sent.
    pub(super) prepared: u32,
}

impl JobState {
    pub(super) fn new(job: Job, cursor: DateTime<Utc>, shared: &mut Shared) -> JobState {
        let (job, arguments) = shared.definition(job);
        let next = job.schedule.next_after(cursor);
        JobState {
            job,
            cursor,
            next,
            shown: Some(Box::default()),
            since: None,
            runtime: false,
            one_off: false,
            seen: true,
            arguments,
            prepared: 0,
        }
    }

    pub(super) fn runtime(
        job: crate::beat::runtime::RuntimeJob,
        cursor: DateTime<Utc>,
        shared: &mut Shared,
    ) -> JobState {
        JobState {
            since: Some(cursor),
            shown: None,
            runtime: true,
            one_off: job.one_off,
            ..JobState::new(job.job, cursor, shared)
        }
    }

    /// Puts `job` (same name) in place of the job, its arguments prepared again.
    pub(super) fn replace_job(&mut self, job: Job, shared: &mut Shared) {
        (self.job, self.arguments) = shared.definition(job);
        self.prepared = 0;
    }

    /// The `job` label of its metrics: runtime jobs share one, so that thousands of them do
    /// not become thousands of series.
    pub(super) fn metric_label(&self) -> &str {
        if self.runtime {
            "(runtime)"
        } else {
            &self.job.name
        }
    }

    /// Continues from `mark`, the last slot any supervisor published for the job, so every
    /// supervisor sees the same missed slots after it whenever it started (bounded by `since`).
    pub(super) fn resume(&mut self, mark: DateTime<Utc>) {
        self.cursor = self.since.map_or(mark, |since| mark.max(since));
        self.next = self.job.schedule.next_after(self.cursor);
        self.prepared = 0;
    }

    /// Marks every slot up to `cursor` handled and recomputes the next one from the cursor.
    pub(super) fn advance(&mut self, cursor: DateTime<Utc>) {
        self.cursor = self.cursor.max(cursor);
        self.next = self.job.schedule.next_after(self.cursor);
        self.prepared = 0;
    }

    pub(super) fn show(&self, time: DateTime<Utc>) -> String {
        match &self.job.schedule {
            Schedule::Cron { tz, .. } => time
                .with_timezone(tz)
                .to_rfc3339_opts(SecondsFormat::AutoSi, false),
            Schedule::Every { .. } => time.to_rfc3339_opts(SecondsFormat::AutoSi, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, task: &str, cron: &str) -> Job {
        Job {
            name: name.to_owned(),
            task: task.to_owned(),
            schedule: Schedule::cron(cron, chrono_tz::UTC).unwrap(),
            args: serde_json::json!([name]),
            kwargs: serde_json::json!({}),
            queue: "celery".to_owned(),
            priority: None,
            expires: None,
            catch_up: CatchUp::Once,
            catch_up_window: None,
        }
    }

    fn cron_text(state: &JobState) -> Arc<str> {
        match &state.job.schedule {
            Schedule::Cron { text, .. } => text.clone(),
            Schedule::Every { .. } => panic!("a cron job"),
        }
    }

    #[test]
    fn jobs_share_one_copy_of_equal_texts_and_forget_unused_ones() {
        let mut shared = Shared::default();
        let now = Utc::now();
        let a = JobState::new(job("a", "t.report", "* * * * *"), now, &mut shared);
        let mut b = JobState::new(job("b", "t.report", "* * * * *"), now, &mut shared);
        assert!(Arc::ptr_eq(&a.job.task, &b.job.task));
        assert!(Arc::ptr_eq(&a.job.queue, &b.job.queue));
        assert!(Arc::ptr_eq(&cron_text(&a), &cron_text(&b)));
        assert_eq!(b.arguments.args_json(), "[\"b\"]");

        b.replace_job(job("b", "t.other", "0 3 * * *"), &mut shared);
        assert_eq!(&*b.job.task, "t.other");
        assert_eq!(b.job.schedule.to_string(), "cron \"0 3 * * *\" (UTC)");
        assert_eq!(shared.texts.len(), 5);
        shared.prune();
        // Both crons and tasks are still in use, and the queue.
        assert_eq!(shared.texts.len(), 5);
        drop(a);
        shared.prune();
        let mut left: Vec<&str> = shared.texts.iter().map(|text| &**text).collect();
        left.sort_unstable();
        assert_eq!(left, ["0 3 * * *", "celery", "t.other"]);
    }
}
