//! One job as beat's actor holds it: its definition with the arguments already in message form,
//! its cursor (the last slot it is past), next slot, last run, the mark of the prepared set
//! holding its next message, and what `status` and the metrics show of it.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::beat::message::Arguments;
use crate::beat::{Job, Schedule};

pub(super) struct JobState {
    pub(super) job: Job,
    pub(super) cursor: DateTime<Utc>,
    pub(super) next: Option<DateTime<Utc>>,
    pub(super) last_run: Option<DateTime<Utc>>,
    pub(super) last_task_id: Option<String>,
    pub(super) published: u64,
    /// The value last written to the next-run gauge (`None`: never written).
    pub(super) shown_next: Option<Option<DateTime<Utc>>>,
    /// When a reload put the job's current schedule in force: Redis's mark of an older schedule
    /// never moves the cursor behind it. `None` for the jobs this supervisor started with.
    pub(super) since: Option<DateTime<Utc>>,
    /// Stored in Redis (`beat::runtime`) rather than in sauna.toml.
    pub(super) runtime: bool,
    /// A runtime job paused after its first publish.
    pub(super) one_off: bool,
    /// The job's arguments as its messages carry them (`job.args`/`kwargs` are then `null`).
    pub(super) arguments: Arguments,
    /// The mark of the [`Prepared`] set holding its messages for the next slot; any change to
    /// the job clears it (0: none), so a stale message is never sent.
    pub(super) prepared: u32,
}

impl JobState {
    pub(super) fn new(mut job: Job, cursor: DateTime<Utc>) -> JobState {
        let next = job.schedule.next_after(cursor);
        let arguments = take_arguments(&mut job);
        JobState {
            job,
            cursor,
            next,
            last_run: None,
            last_task_id: None,
            published: 0,
            shown_next: None,
            since: None,
            runtime: false,
            one_off: false,
            arguments,
            prepared: 0,
        }
    }

    pub(super) fn runtime(
        job: crate::beat::runtime::RuntimeJob,
        cursor: DateTime<Utc>,
    ) -> JobState {
        JobState {
            since: Some(cursor),
            runtime: true,
            one_off: job.one_off,
            ..JobState::new(job.job, cursor)
        }
    }

    /// Puts `job` (same name) in place of the job, its arguments prepared again.
    pub(super) fn replace_job(&mut self, mut job: Job) {
        self.arguments = take_arguments(&mut job);
        self.job = job;
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

/// Moves `job`'s arguments out into their message forms (leaving `null` behind).
fn take_arguments(job: &mut Job) -> Arguments {
    Arguments::new(
        &std::mem::take(&mut job.args),
        &std::mem::take(&mut job.kwargs),
    )
}
