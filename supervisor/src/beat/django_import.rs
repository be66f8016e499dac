//! Migration from django-celery-beat: reads the enabled `PeriodicTask` rows of a Django database
//! (PostgreSQL) and turns each into a runtime job document, or into the reason it cannot be one.
//! Crontab rows keep Celery's crontab rule (every field must match) and their time zone;
//! interval rows become epoch-aligned `every` jobs (django-celery-beat counts from the last run
//! instead); `one_off` rows become one-off jobs. Solar and clocked schedules, an absolute
//! `expires`, a future `start_time`, a custom exchange or headers have no runtime-job
//! equivalent and are reported, never approximated. Writing the documents is the caller's.

use serde_json::Value;

use super::runtime::JobDoc;

/// Why the rows could not be read.
#[derive(Debug, thiserror::Error)]
#[error("django-celery-beat database {url}: {message}")]
pub struct ReadError {
    /// The URL without its password.
    pub url: String,
    /// What failed.
    pub message: String,
}

/// One enabled `PeriodicTask` row with its schedule, as read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// `name` (unique).
    pub name: String,
    /// `task`.
    pub task: String,
    /// `args`, JSON text.
    pub args: String,
    /// `kwargs`, JSON text.
    pub kwargs: String,
    /// `queue`.
    pub queue: Option<String>,
    /// `exchange`.
    pub exchange: Option<String>,
    /// `routing_key`.
    pub routing_key: Option<String>,
    /// `headers`, JSON text.
    pub headers: String,
    /// `priority`.
    pub priority: Option<i64>,
    /// `expires` (absolute), as text.
    pub expires_at: Option<String>,
    /// `expire_seconds`.
    pub expire_seconds: Option<i64>,
    /// `one_off`.
    pub one_off: bool,
    /// `start_time`, when it is still in the future.
    pub starts_later: Option<String>,
    /// The interval schedule: `every`, `period`.
    pub interval: Option<(i64, String)>,
    /// The crontab schedule: minute, hour, day of month, month, day of week, time zone.
    pub crontab: Option<[String; 6]>,
    /// A solar schedule: its event.
    pub solar: Option<String>,
    /// A clocked schedule: its time.
    pub clocked: Option<String>,
}

const QUERY: &str = "
SELECT t.name, t.task, t.args, t.kwargs, t.queue, t.exchange, t.routing_key, t.headers,
       t.priority::bigint, t.expires::text, t.expire_seconds::bigint, t.one_off,
       CASE WHEN t.start_time > now() THEN t.start_time::text END,
       i.every::bigint, i.period,
       c.minute, c.hour, c.day_of_month, c.month_of_year, c.day_of_week, c.timezone::text,
       s.event, k.clocked_time::text
FROM django_celery_beat_periodictask t
LEFT JOIN django_celery_beat_intervalschedule i ON i.id = t.interval_id
LEFT JOIN django_celery_beat_crontabschedule c ON c.id = t.crontab_id
LEFT JOIN django_celery_beat_solarschedule s ON s.id = t.solar_id
LEFT JOIN django_celery_beat_clockedschedule k ON k.id = t.clocked_id
WHERE t.enabled
ORDER BY t.name";

/// Reads every enabled periodic task at `url` (blocking; call it outside an async runtime).
pub fn read(url: &str) -> Result<Vec<Row>, ReadError> {
    let failed = |message: String| ReadError {
        url: proxy_conf::secrets::redact_url(url),
        message,
    };
    let mut config: postgres::Config = url
        .parse()
        .map_err(|error| failed(format!("not a PostgreSQL URL: {error}")))?;
    // As libpq does: a password missing from the URL comes from $PGPASSWORD, so it need not
    // be on the command line.
    if config.get_password().is_none() {
        if let Ok(password) = std::env::var("PGPASSWORD") {
            config.password(password);
        }
    }
    let mut client = config
        .connect(postgres::NoTls)
        .map_err(|error| failed(format!("cannot connect: {error}")))?;
    let rows = client.query(QUERY, &[]).map_err(|error| {
        let hint = if error.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) {
            " (is django_celery_beat installed and migrated in this database?)"
        } else {
            ""
        };
        failed(format!("{error}{hint}"))
    })?;
    rows.iter()
        .map(|row| {
            let text =
                |index: usize| -> Result<Option<String>, postgres::Error> { row.try_get(index) };
            let get = || -> Result<Row, postgres::Error> {
                let interval = match (row.try_get::<_, Option<i64>>(13)?, text(14)?) {
                    (Some(every), Some(period)) => Some((every, period)),
                    _ => None,
                };
                let crontab = match text(15)? {
                    Some(minute) => Some([
                        minute,
                        text(16)?.unwrap_or_default(),
                        text(17)?.unwrap_or_default(),
                        text(18)?.unwrap_or_default(),
                        text(19)?.unwrap_or_default(),
                        text(20)?.unwrap_or_default(),
                    ]),
                    None => None,
                };
                Ok(Row {
                    name: row.try_get(0)?,
                    task: row.try_get(1)?,
                    args: text(2)?.unwrap_or_default(),
                    kwargs: text(3)?.unwrap_or_default(),
                    queue: text(4)?,
                    exchange: text(5)?,
                    routing_key: text(6)?,
                    headers: text(7)?.unwrap_or_default(),
                    priority: row.try_get(8)?,
                    expires_at: text(9)?,
                    expire_seconds: row.try_get(10)?,
                    one_off: row.try_get(11)?,
                    starts_later: text(12)?,
                    interval,
                    crontab,
                    solar: text(21)?,
                    clocked: text(22)?,
                })
            };
            get().map_err(|error| failed(format!("unexpected table layout: {error}")))
        })
        .collect()
}

fn blank(value: &Option<String>) -> Option<&str> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|text| !text.is_empty())
}

fn json_field(what: &str, text: &str, empty: Value) -> Result<Value, String> {
    if text.trim().is_empty() {
        return Ok(empty);
    }
    serde_json::from_str(text).map_err(|error| format!("{what} {text:?} is not JSON: {error}"))
}

impl Row {
    /// The runtime job this row stands for, or why there is none.
    pub fn into_document(self) -> Result<JobDoc, String> {
        if let Some(event) = &self.solar {
            return Err(format!(
                "solar schedule ({event}) cannot be expressed as a runtime job"
            ));
        }
        if let Some(time) = &self.clocked {
            return Err(format!(
                "clocked schedule (once at {time}) cannot be expressed as a runtime job"
            ));
        }
        if let Some(at) = &self.expires_at {
            return Err(format!(
                "expires at {at} (an absolute expiry) cannot be expressed; runtime jobs expire each task relative to its publish (expire_seconds)"
            ));
        }
        if let Some(at) = &self.starts_later {
            return Err(format!(
                "start_time {at} is in the future; runtime jobs start at once (import it after then)"
            ));
        }
        let headers = json_field("headers", &self.headers, Value::Object(Default::default()))?;
        if headers.as_object().is_none_or(|map| !map.is_empty()) {
            return Err(format!(
                "headers {} cannot be expressed; runtime jobs send none of their own",
                self.headers
            ));
        }
        let queue = blank(&self.queue)
            .or_else(|| blank(&self.routing_key))
            .map(str::to_owned);
        if let Some(exchange) = blank(&self.exchange) {
            if Some(exchange) != queue.as_deref() {
                return Err(format!(
                    "exchange \"{exchange}\" cannot be expressed; runtime jobs publish to the queue directly"
                ));
            }
        }
        if let (Some(key), Some(queue)) = (blank(&self.routing_key), &queue) {
            if key != queue {
                return Err(format!(
                    "routing_key \"{key}\" differs from queue \"{queue}\"; runtime jobs route by queue only"
                ));
            }
        }
        let (cron, every, timezone) = match (&self.crontab, &self.interval) {
            (Some([minute, hour, dom, month, dow, tz]), _) => {
                let field = |text: &str| {
                    let text = text.replace(' ', "");
                    if text.is_empty() {
                        "*".to_owned()
                    } else {
                        text
                    }
                };
                let expr = [minute, hour, dom, month, dow]
                    .map(|text| field(text))
                    .join(" ");
                let tz = (!tz.trim().is_empty()).then(|| tz.trim().to_owned());
                (Some(expr), None, tz)
            }
            (None, Some((every, period))) => (None, Some(interval(*every, period)?), None),
            (None, None) => return Err("the row has no schedule".to_owned()),
        };
        Ok(JobDoc {
            task: self.task,
            cron,
            every,
            timezone,
            args: Some(json_field("args", &self.args, Value::Array(Vec::new()))?),
            kwargs: Some(json_field(
                "kwargs",
                &self.kwargs,
                Value::Object(Default::default()),
            )?),
            queue,
            priority: self.priority,
            expires: self.expire_seconds.map(|seconds| format!("{seconds}s")),
            catch_up: None,
            catch_up_window: None,
            one_off: self.one_off,
            celery_crontab: self.crontab.is_some(),
        })
    }
}

/// An `IntervalSchedule` as a duration string.
fn interval(every: i64, period: &str) -> Result<String, String> {
    if every < 1 {
        return Err(format!("interval of {every} {period} is not positive"));
    }
    match period {
        "days" => Ok(format!("{every}d")),
        "hours" => Ok(format!("{every}h")),
        "minutes" => Ok(format!("{every}m")),
        "seconds" => Ok(format!("{every}s")),
        "microseconds" if every % 1000 == 0 => Ok(format!("{}ms", every / 1000)),
        "microseconds" => Err(format!(
            "interval of {every} microseconds is finer than the 1 ms runtime jobs keep"
        )),
        other => Err(format!("interval period \"{other}\" is unknown")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row {
            name: "r".into(),
            task: "t".into(),
            args: "[1]".into(),
            kwargs: "{\"a\": 2}".into(),
            headers: "{}".into(),
            interval: Some((30, "seconds".into())),
            ..Row::default()
        }
    }

    #[test]
    fn intervals_and_crontabs_become_documents() {
        let doc = row().into_document().unwrap();
        assert_eq!(doc.every.as_deref(), Some("30s"));
        assert_eq!(doc.args, Some(serde_json::json!([1])));
        assert!(!doc.celery_crontab);
        let cron = Row {
            interval: None,
            crontab: Some([
                "0,30".into(),
                "8".into(),
                "*".into(),
                "*".into(),
                "1-5".into(),
                "Europe/Helsinki".into(),
            ]),
            queue: Some("hi".into()),
            routing_key: Some("hi".into()),
            exchange: Some("hi".into()),
            expire_seconds: Some(60),
            one_off: true,
            priority: Some(3),
            ..row()
        }
        .into_document()
        .unwrap();
        assert_eq!(cron.cron.as_deref(), Some("0,30 8 * * 1-5"));
        assert_eq!(cron.timezone.as_deref(), Some("Europe/Helsinki"));
        assert!(cron.celery_crontab && cron.one_off);
        assert_eq!(cron.queue.as_deref(), Some("hi"));
        assert_eq!(cron.expires.as_deref(), Some("60s"));
        cron.validate("r", chrono_tz::UTC).unwrap();
    }

    #[test]
    fn what_cannot_be_expressed_is_said() {
        let cases = [
            (
                Row {
                    interval: None,
                    solar: Some("sunset".into()),
                    ..row()
                },
                "solar schedule (sunset)",
            ),
            (
                Row {
                    interval: None,
                    clocked: Some("2030-01-01".into()),
                    ..row()
                },
                "clocked schedule",
            ),
            (
                Row {
                    expires_at: Some("2030-01-01".into()),
                    ..row()
                },
                "absolute expiry",
            ),
            (
                Row {
                    starts_later: Some("2030-01-01".into()),
                    ..row()
                },
                "start_time",
            ),
            (
                Row {
                    headers: "{\"x\": 1}".into(),
                    ..row()
                },
                "headers",
            ),
            (
                Row {
                    exchange: Some("fanout".into()),
                    ..row()
                },
                "exchange \"fanout\"",
            ),
            (
                Row {
                    interval: Some((5, "microseconds".into())),
                    ..row()
                },
                "finer than",
            ),
            (
                Row {
                    args: "nope".into(),
                    ..row()
                },
                "args \"nope\" is not JSON",
            ),
        ];
        for (row, expected) in cases {
            let error = row.into_document().unwrap_err();
            assert!(error.contains(expected), "{expected} in {error}");
        }
    }
}
