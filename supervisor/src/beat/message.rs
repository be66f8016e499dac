//! The Celery task message a job publishes: the protocol-v2 envelope exactly as kombu's Redis
//! transport stores it in a queue list, and the Redis key it goes to. Sources: Celery's "Message
//! Protocol" (docs.celeryq.dev, internals/protocol.html, version 2) and kombu's
//! `kombu/transport/redis.py` (`Channel._put` LPUSHes the JSON envelope; `_q_for_pri` names the
//! priority lists), checked against messages a real `celery call` left in Redis (celery 5.7).
//! It owns the shape of the message only; sending it belongs to `publisher`.
//!
//! Every field a worker requires is always present (`headers.task`, `headers.id`, a unique
//! `properties.delivery_tag`, `delivery_info.exchange`/`routing_key`, `content-type`, and a body
//! that decodes to a 3-element array): a worker that meets a malformed message exits, and the
//! message is put back at the head of the queue for the next worker to crash on. There is never
//! an ETA (an ETA beyond Redis's visibility timeout is redelivered in a loop), `ignore_result` is
//! null so the task's own setting wins, and every timestamp carries an offset.

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

/// kombu's separator between a queue name and its priority step.
const PRIORITY_SEP: &str = "\x06\x16";
/// kombu's default priority steps for Redis.
const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// What one publish carries; everything a job decides, plus the per-message identifiers.
#[derive(Debug, Clone)]
pub struct TaskMessage<'a> {
    /// Registered Celery task name.
    pub task: &'a str,
    /// Fresh task id (a UUID string).
    pub id: &'a str,
    /// Fresh delivery tag (a UUID string), the key of the worker's `unacked` entry.
    pub delivery_tag: &'a str,
    /// Positional and keyword arguments, serialized ahead.
    pub arguments: &'a Arguments,
    /// Queue name (routing key on the anonymous exchange).
    pub queue: &'a str,
    /// Priority 0..=9, 0 highest under Redis.
    pub priority: Option<u8>,
    /// Absolute expiry, or none.
    pub expires: Option<DateTime<Utc>>,
    /// `pid@host` of the publisher.
    pub origin: &'a str,
    /// The job and slot this message stands for, sent as the extra headers `sauna_beat_job`
    /// and `sauna_beat_slot` (custom headers are merged flat, as `apply_async(headers=…)` does;
    /// workers ignore them) so operators and tests can see which slot a task belongs to.
    pub slot: Option<(&'a str, DateTime<Utc>)>,
}

impl TaskMessage<'_> {
    /// The Redis list the message is pushed to: the queue, suffixed with its priority step.
    pub fn queue_key(&self) -> String {
        let priority = self.priority.unwrap_or(0).min(9);
        let step = PRIORITY_STEPS
            .iter()
            .rev()
            .find(|step| **step <= priority)
            .copied()
            .unwrap_or(0);
        if step == 0 {
            self.queue.to_owned()
        } else {
            format!("{}{PRIORITY_SEP}{step}", self.queue)
        }
    }

    /// The JSON text pushed to the queue list (keys in sorted order, as kombu's own JSON has
    /// them once it went through a dict). Typed structs rather than a `json!` tree: beat builds
    /// thousands of these at a minute boundary, and the tree cost a few microseconds each.
    pub fn envelope(&self) -> String {
        let arguments = self.arguments;
        // `[args,kwargs,embed]` as serde_json writes the tuple: compact, no spaces.
        let mut body = String::with_capacity(
            arguments.args_json().len() + arguments.kwargs_json().len() + EMBED.len() + 4,
        );
        body.push('[');
        body.push_str(arguments.args_json());
        body.push(',');
        body.push_str(arguments.kwargs_json());
        body.push(',');
        body.push_str(EMBED);
        body.push(']');
        let envelope = Envelope {
            body: base64::engine::general_purpose::STANDARD.encode(body),
            content_encoding: "utf-8",
            content_type: "application/json",
            headers: Headers {
                argsrepr: arguments.args_repr(),
                eta: None,
                expires: self
                    .expires
                    .map(|time| time.to_rfc3339_opts(SecondsFormat::Micros, false)),
                group: None,
                group_index: None,
                id: self.id,
                ignore_result: None,
                kwargsrepr: arguments.kwargs_repr(),
                lang: "py",
                origin: self.origin,
                parent_id: None,
                replaced_task_nesting: 0,
                retries: 0,
                root_id: self.id,
                sauna_beat_job: self.slot.map(|(job, _)| job),
                sauna_beat_slot: self
                    .slot
                    .map(|(_, slot)| slot.to_rfc3339_opts(SecondsFormat::Millis, false)),
                shadow: None,
                stamped_headers: None,
                stamps: Empty {},
                task: self.task,
                timelimit: (None, None),
            },
            properties: Properties {
                body_encoding: "base64",
                correlation_id: self.id,
                delivery_info: DeliveryInfo {
                    exchange: "",
                    routing_key: self.queue,
                },
                delivery_mode: 2,
                delivery_tag: self.delivery_tag,
                priority: self.priority.unwrap_or(0).min(9),
                reply_to: "",
            },
        };
        serde_json::to_string(&envelope).unwrap_or_default()
    }
}

// The envelope's shape; fields in sorted order, so the text is what a sorted JSON tree gives.

#[derive(Serialize)]
struct Envelope<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'static str,
    #[serde(rename = "content-type")]
    content_type: &'static str,
    headers: Headers<'a>,
    properties: Properties<'a>,
}

#[derive(Serialize)]
struct Headers<'a> {
    argsrepr: &'a str,
    eta: Option<()>,
    expires: Option<String>,
    group: Option<()>,
    group_index: Option<()>,
    id: &'a str,
    ignore_result: Option<()>,
    kwargsrepr: &'a str,
    lang: &'static str,
    origin: &'a str,
    parent_id: Option<()>,
    replaced_task_nesting: u8,
    retries: u8,
    root_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sauna_beat_job: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sauna_beat_slot: Option<String>,
    shadow: Option<()>,
    stamped_headers: Option<()>,
    stamps: Empty,
    task: &'a str,
    timelimit: (Option<()>, Option<()>),
}

#[derive(Serialize)]
struct Properties<'a> {
    body_encoding: &'static str,
    correlation_id: &'a str,
    delivery_info: DeliveryInfo<'a>,
    delivery_mode: u8,
    delivery_tag: &'a str,
    priority: u8,
    reply_to: &'static str,
}

#[derive(Serialize)]
struct DeliveryInfo<'a> {
    exchange: &'static str,
    routing_key: &'a str,
}

/// The body's third element: no callbacks, errbacks, chain or chord.
const EMBED: &str = r#"{"callbacks":null,"chain":null,"chord":null,"errbacks":null}"#;

/// A job's arguments in the forms every message of it repeats: their compact JSON (the body)
/// and their Python reprs (`argsrepr`/`kwargsrepr`), made once when the job is loaded or
/// changed rather than at each publish (thousands fall due at one minute boundary). One
/// allocation for all four: 100 000 runtime jobs are held at once, and a parsed one-key object
/// would cost some 700 bytes (a B-tree node) where its text costs a few dozen.
#[derive(Debug, Clone, PartialEq)]
pub struct Arguments {
    /// args JSON, kwargs JSON, args repr, kwargs repr, back to back.
    text: Box<str>,
    /// Where the second, third and fourth part start.
    splits: [u32; 3],
}

impl Arguments {
    /// `args` (a JSON array) and `kwargs` (a JSON object) prepared for messages.
    pub fn new(args: &Value, kwargs: &Value) -> Arguments {
        let parts = [
            serde_json::to_string(args).unwrap_or_default(),
            serde_json::to_string(kwargs).unwrap_or_default(),
            args_repr(args),
            python_repr(kwargs),
        ];
        let mut text = String::with_capacity(parts.iter().map(String::len).sum());
        let mut splits = [0u32; 3];
        for (index, part) in parts.iter().enumerate() {
            if index > 0 {
                // Arguments come from a document Redis accepted (512 MiB at most per value).
                splits[index - 1] = u32::try_from(text.len()).unwrap_or(u32::MAX);
            }
            text.push_str(part);
        }
        Arguments {
            text: text.into_boxed_str(),
            splits,
        }
    }

    fn part(&self, index: usize) -> &str {
        let start = if index == 0 {
            0
        } else {
            self.splits[index - 1] as usize
        };
        let end = self
            .splits
            .get(index)
            .map_or(self.text.len(), |end| *end as usize);
        self.text.get(start..end).unwrap_or_default()
    }

    /// The positional arguments' compact JSON.
    pub fn args_json(&self) -> &str {
        self.part(0)
    }

    /// The keyword arguments' compact JSON.
    pub fn kwargs_json(&self) -> &str {
        self.part(1)
    }

    /// The positional arguments as Python shows a tuple.
    pub fn args_repr(&self) -> &str {
        self.part(2)
    }

    /// The keyword arguments as Python shows a dict.
    pub fn kwargs_repr(&self) -> &str {
        self.part(3)
    }
}

/// `{}`.
#[derive(Serialize)]
struct Empty {}

/// Positional arguments as Python shows a tuple, e.g. `(1, 'x')`, for `argsrepr`.
fn args_repr(args: &Value) -> String {
    match args.as_array() {
        Some(items) if items.len() == 1 => format!("({},)", python_repr(&items[0])),
        Some(items) => format!(
            "({})",
            items.iter().map(python_repr).collect::<Vec<_>>().join(", ")
        ),
        None => python_repr(args),
    }
}

/// A JSON value as Python's `repr` would show the decoded object (`argsrepr`/`kwargsrepr` are
/// only displayed, in worker logs, events and Flower).
fn python_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(number) => number.to_string(),
        Value::String(text) => {
            let quote = if text.contains('\'') && !text.contains('"') {
                '"'
            } else {
                '\''
            };
            let mut out = String::from(quote);
            for c in text.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push(quote);
            out
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(python_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(key, value)| format!(
                    "{}: {}",
                    python_repr(&Value::String(key.clone())),
                    python_repr(value)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Converts a TOML value (args/kwargs from sauna.toml) to JSON; datetimes become RFC 3339 text.
pub fn toml_to_json(value: &toml::Value) -> Value {
    match value {
        toml::Value::String(text) => Value::String(text.clone()),
        toml::Value::Integer(number) => Value::from(*number),
        toml::Value::Float(number) => Value::from(*number),
        toml::Value::Boolean(flag) => Value::Bool(*flag),
        toml::Value::Datetime(time) => Value::String(time.to_string()),
        toml::Value::Array(items) => Value::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table
                .iter()
                .map(|(key, value)| (key.clone(), toml_to_json(value)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(arguments: &Arguments, priority: Option<u8>) -> TaskMessage<'_> {
        TaskMessage {
            task: "proj.add",
            id: "660ef087-854b-400d-a13c-6ad8f2cddf9e",
            delivery_tag: "a53d1ac6-3c5d-42b8-a134-d9fb00ac3d95",
            arguments,
            queue: "celery",
            priority,
            expires: None,
            origin: "4242@host",
            slot: None,
        }
    }

    #[test]
    fn envelope_golden() {
        let arguments = Arguments::new(&json!([2, 3]), &json!({"z": "é"}));
        let mut msg = message(&arguments, Some(7));
        msg.expires = Some(
            DateTime::parse_from_rfc3339("2026-11-24T17:23:44.967701+00:00")
                .unwrap()
                .with_timezone(&Utc),
        );
        let expected = r#"{"body":"W1syLDNdLHsieiI6IsOpIn0seyJjYWxsYmFja3MiOm51bGwsImNoYWluIjpudWxsLCJjaG9yZCI6bnVsbCwiZXJyYmFja3MiOm51bGx9XQ==","content-encoding":"utf-8","content-type":"application/json","headers":{"argsrepr":"(2, 3)","eta":null,"expires":"2026-11-24T17:23:44.967701+00:00","group":null,"group_index":null,"id":"660ef087-854b-400d-a13c-6ad8f2cddf9e","ignore_result":null,"kwargsrepr":"{'z': 'é'}","lang":"py","origin":"4242@host","parent_id":null,"replaced_task_nesting":0,"retries":0,"root_id":"660ef087-854b-400d-a13c-6ad8f2cddf9e","shadow":null,"stamped_headers":null,"stamps":{},"task":"proj.add","timelimit":[null,null]},"properties":{"body_encoding":"base64","correlation_id":"660ef087-854b-400d-a13c-6ad8f2cddf9e","delivery_info":{"exchange":"","routing_key":"celery"},"delivery_mode":2,"delivery_tag":"a53d1ac6-3c5d-42b8-a134-d9fb00ac3d95","priority":7,"reply_to":""}}"#;
        assert_eq!(msg.envelope(), expected);
        let parsed: Value = serde_json::from_str(&msg.envelope()).unwrap();
        let body = base64::engine::general_purpose::STANDARD
            .decode(parsed["body"].as_str().unwrap())
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body.as_array().unwrap().len(), 3);
        assert_eq!(body[1]["z"], "é");
    }

    #[test]
    fn priority_steps_pick_the_queue_key() {
        let arguments = Arguments::new(&json!([]), &json!({}));
        let keys: Vec<String> = [
            None,
            Some(0),
            Some(2),
            Some(3),
            Some(5),
            Some(6),
            Some(8),
            Some(9),
            Some(200),
        ]
        .into_iter()
        .map(|priority| message(&arguments, priority).queue_key())
        .collect();
        assert_eq!(
            keys,
            [
                "celery",
                "celery",
                "celery",
                "celery\x06\x163",
                "celery\x06\x163",
                "celery\x06\x166",
                "celery\x06\x166",
                "celery\x06\x169",
                "celery\x06\x169"
            ]
        );
    }

    #[test]
    fn the_body_is_the_tuple_serde_json_writes() {
        let (args, kwargs) = (
            json!([1, "é\"\n", [null, 1.5], {"b": 1, "a": true}]),
            json!({"z": {"y": []}, "a": "it's"}),
        );
        let arguments = Arguments::new(&args, &kwargs);
        let envelope: Value = serde_json::from_str(&message(&arguments, None).envelope()).unwrap();
        let body = base64::engine::general_purpose::STANDARD
            .decode(envelope["body"].as_str().unwrap())
            .unwrap();
        let embed = json!({"callbacks": null, "chain": null, "chord": null, "errbacks": null});
        assert_eq!(
            body,
            serde_json::to_vec(&(&args, &kwargs, &embed)).unwrap(),
            "byte for byte"
        );
        assert_eq!(envelope["headers"]["argsrepr"], args_repr(&args));
        assert_eq!(envelope["headers"]["kwargsrepr"], python_repr(&kwargs));
        let empty = Arguments::new(&json!([]), &json!({}));
        assert_eq!(
            [
                empty.args_json(),
                empty.kwargs_json(),
                empty.args_repr(),
                empty.kwargs_repr()
            ],
            ["[]", "{}", "()", "{}"]
        );
    }

    #[test]
    fn reprs_look_like_python() {
        assert_eq!(args_repr(&json!([2, 3])), "(2, 3)");
        assert_eq!(args_repr(&json!(["x"])), "('x',)");
        assert_eq!(args_repr(&json!([])), "()");
        assert_eq!(
            python_repr(&json!({"a": [true, null, 1.5], "b": "it's \"q\"\n"})),
            r#"{'a': [True, None, 1.5], 'b': 'it\'s "q"\n'}"#
        );
        assert_eq!(python_repr(&json!("it's")), r#""it's""#);
    }

    #[test]
    fn toml_values_become_json() {
        let table: toml::Table = toml::from_str("a = 1\nb = [true, 'x']\nc = { d = 1.5 }").unwrap();
        assert_eq!(
            toml_to_json(&toml::Value::Table(table)),
            json!({"a": 1, "b": [true, "x"], "c": {"d": 1.5}})
        );
    }
}
