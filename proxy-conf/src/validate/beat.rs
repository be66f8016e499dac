//! `[beat]` and `[beat.jobs.NAME]` judged and typed: a Redis broker, IANA time zones, each job's
//! task, queue and priority, and exactly one schedule — a cron expression parsed here (see
//! `crate::cron`) or a non-zero interval. Whether the Celery app imports, and the schedule it
//! brings, is found out by the supervisor when beat starts.

use super::{Checker, check_python_target, is_dotted_name};
use crate::config::{BeatConfig, JobConfig, JobSchedule, Tz, parse_time_zone};
use crate::cron::Cron;
use crate::schema::{RawBeat, RawJob};

impl Checker<'_> {
    /// `[beat]` with its jobs; a job whose schedule is missing or wrong is left out (its problem
    /// is reported).
    pub(crate) fn beat(&mut self, beat: &RawBeat) -> BeatConfig {
        let broker = beat.broker.as_str();
        let schemes = ["redis://", "rediss://", "unix://", "redis+unix://"];
        if !schemes.iter().any(|scheme| broker.starts_with(scheme)) {
            self.report(
                &["beat", "broker"],
                format!("\"{broker}\" is not a Redis URL: beat publishes to Redis; expected \"redis://HOST:PORT/DB\", \"rediss://…\" or \"unix:///path/to/redis.sock\""),
            );
        }
        let timezone = self
            .timezone(&["beat", "timezone"], &beat.timezone)
            .unwrap_or(Tz::UTC);
        if beat.leader_lock && beat.lock_ttl.get() < std::time::Duration::from_secs(1) {
            self.report(
                &["beat", "lock_ttl"],
                "must be at least \"1s\"; it is renewed at a third of its length",
            );
        }
        if let Some(celery_app) = &beat.celery_app {
            let valid = if celery_app.contains(':') {
                check_python_target(celery_app).is_ok()
            } else {
                is_dotted_name(celery_app)
            };
            if !valid {
                self.report(
                    &["beat", "celery_app"],
                    format!("\"{celery_app}\" is not a Celery app; expected \"module:app\" or \"module\", e.g. \"myapp.celery:app\""),
                );
            }
        }
        let jobs = beat
            .jobs
            .iter()
            .filter_map(|(name, job)| Some((name.clone(), self.job(name, job, timezone)?)))
            .collect();
        BeatConfig {
            broker: beat.broker.clone(),
            timezone,
            leader_lock: beat.leader_lock,
            lock_ttl: beat.lock_ttl,
            key_prefix: beat.key_prefix.clone(),
            celery_app: beat.celery_app.clone(),
            jobs,
        }
    }

    /// One job, its time zone defaulting to `[beat]`'s; `None` without a usable schedule.
    fn job(&mut self, name: &str, job: &RawJob, default_tz: Tz) -> Option<JobConfig> {
        let base = ["beat", "jobs", name];
        let at = |key: &'static str| [base[0], base[1], base[2], key];
        let broken = self.broken_under(&base);
        if job.task.trim().is_empty() && !broken {
            self.report(
                &at("task"),
                "a job needs the Celery task to send, e.g. task = \"myapp.tasks.cleanup\"",
            );
        }
        let schedule = match (&job.cron, job.every) {
            (None, None) => {
                if !broken {
                    self.report(
                        &base,
                        "a job needs a schedule: cron = \"*/5 * * * *\" or every = \"30s\"",
                    );
                }
                None
            }
            (Some(_), Some(_)) => {
                self.report(&at("every"), "set either cron or every, not both");
                None
            }
            (None, Some(every)) if every.is_zero() => {
                self.report(&at("every"), "must be longer than 0s");
                None
            }
            (None, Some(every)) => Some(JobSchedule::Every(every)),
            (Some(expression), None) => match expression.parse::<Cron>() {
                Ok(cron) => Some(JobSchedule::Cron(cron)),
                Err(error) => {
                    self.report(&at("cron"), error);
                    None
                }
            },
        };
        if let Some(priority) = job.priority {
            if priority > 9 {
                self.report(
                    &at("priority"),
                    format!(
                        "{priority} is out of range; expected 0 to 9 (0 is the highest under Redis)"
                    ),
                );
            }
        }
        if job.expires.is_some_and(|expires| expires.is_zero()) {
            self.report(
                &at("expires"),
                "\"0s\" would expire every task at once; remove it for tasks that never expire",
            );
        }
        if job.queue.trim().is_empty() {
            self.report(&at("queue"), "must not be empty; the default is \"celery\"");
        }
        let timezone = match &job.timezone {
            Some(name) => self.timezone(&at("timezone"), name).unwrap_or(default_tz),
            None => default_tz,
        };
        Some(JobConfig {
            task: job.task.clone(),
            schedule: schedule?,
            args: job.args.clone(),
            kwargs: job.kwargs.clone(),
            queue: job.queue.clone(),
            priority: job.priority,
            expires: job.expires,
            timezone,
            catch_up: job.catch_up,
            catch_up_window: job.catch_up_window,
        })
    }

    /// An IANA zone name, reported at `path` when it is not one.
    fn timezone(&mut self, path: &[&str], name: &str) -> Option<Tz> {
        parse_time_zone(name)
            .map_err(|error| self.report(path, error))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_one, problems};
    use crate::config::{JobSchedule, Tz};
    use crate::load::load_str;

    #[test]
    fn a_job_needs_a_task_and_exactly_one_schedule() {
        assert_eq!(
            problems("[beat.jobs.j]\nqueue = \"q\"\n"),
            [
                "1:1: beat.jobs.j.task: a job needs the Celery task to send, e.g. task = \"myapp.tasks.cleanup\"",
                "1:1: beat.jobs.j: a job needs a schedule: cron = \"*/5 * * * *\" or every = \"30s\"",
            ]
        );
        assert_one(
            "[beat.jobs.j]\ntask = \"t\"\ncron = \"* * * * *\"\nevery = \"1m\"\n",
            "4:9: beat.jobs.j.every: set either cron or every, not both",
        );
        assert_one(
            "[beat.jobs.j]\ntask = \"t\"\nevery = \"0s\"\n",
            "3:9: beat.jobs.j.every: must be longer than 0s",
        );
    }

    #[test]
    fn a_misspelt_schedule_key_is_reported_once() {
        let found = problems("[beat.jobs.j]\ntask = \"t\"\ncorn = \"* * * * *\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0]
                .starts_with("3:1: unknown key \"corn\" in [beat.jobs.j]; did you mean \"cron\"?")
        );
    }

    #[test]
    fn cron_expressions_are_parsed_at_load() {
        assert_eq!(
            problems(
                "[beat.jobs.a]\ntask = \"t\"\ncron = \"0 0 30 2 *\"\n[beat.jobs.d]\ntask = \"t\"\ncron = \"61 * * * *\"\n"
            ),
            [
                "3:8: beat.jobs.a.cron: cron expression \"0 0 30 2 *\" can never fire (no month has such a day)",
                "6:8: beat.jobs.d.cron: minute field \"61\": 61 is outside 0-59",
            ]
        );
    }

    #[test]
    fn job_priority_expiry_and_time_zones_are_checked() {
        let text = "[beat]\ntimezone = \"Europe/Helsnki\"\n[beat.jobs.j]\ntask = \"t\"\nevery = \"1m\"\npriority = 10\nexpires = \"0s\"\ntimezone = \"Mars/Olympus\"\n";
        assert_eq!(
            problems(text),
            [
                "2:12: beat.timezone: unknown time zone \"Europe/Helsnki\" (did you mean \"Europe/Helsinki\"?); expected an IANA name such as \"UTC\" or \"Europe/Helsinki\"",
                "6:12: beat.jobs.j.priority: 10 is out of range; expected 0 to 9 (0 is the highest under Redis)",
                "7:11: beat.jobs.j.expires: \"0s\" would expire every task at once; remove it for tasks that never expire",
                "8:12: beat.jobs.j.timezone: unknown time zone \"Mars/Olympus\"; expected an IANA name such as \"UTC\" or \"Europe/Helsinki\"",
            ]
        );
        assert!(problems("[beat]\ntimezone = \"America/New_York\"\n").is_empty());
    }

    #[test]
    fn jobs_get_their_zone_or_beats() {
        let config = load_str(
            "[beat]\ntimezone = \"Europe/Helsinki\"\n[beat.jobs.a]\ntask = \"t\"\ncron = \"@daily\"\n[beat.jobs.b]\ntask = \"t\"\nevery = \"30s\"\ntimezone = \"America/New_York\"\n",
            "sauna.toml",
        )
        .unwrap();
        let beat = config.beat.unwrap();
        assert_eq!(beat.timezone, Tz::Europe__Helsinki);
        let a = &beat.jobs["a"];
        assert_eq!(a.timezone, Tz::Europe__Helsinki);
        assert!(matches!(&a.schedule, JobSchedule::Cron(cron) if cron.text == "@daily"));
        let b = &beat.jobs["b"];
        assert_eq!(b.timezone, Tz::America__New_York);
        assert_eq!(
            b.schedule,
            JobSchedule::Every(crate::Duration::from_secs(30))
        );
    }

    #[test]
    fn beat_publishes_to_redis_only() {
        assert_one(
            "[beat]\nbroker = \"amqp://guest@localhost//\"\n",
            "2:10: beat.broker: \"amqp://guest@localhost//\" is not a Redis URL: beat publishes to Redis; expected \"redis://HOST:PORT/DB\", \"rediss://…\" or \"unix:///path/to/redis.sock\"",
        );
        assert!(
            problems("[beat]\nbroker = \"rediss://h:6380/1\"\ncelery_app = \"proj.celery:app\"\n")
                .is_empty()
        );
    }
}
