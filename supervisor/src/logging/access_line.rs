//! The bytes of one access-log line, appended straight to the writer thread's buffer. They are
//! the bytes the `tracing` fmt layer writes for the event [`AccessRecord::emit`] sends — text
//! (with colours or without) and flattened JSON, as `logging` configures that layer — made
//! without its per-event dispatch, field visitors and `fmt` machinery, which cost the writer
//! thread more than the write itself. The tests compare both byte for byte, so a change of
//! the layer's format (a `tracing-subscriber` upgrade) fails them rather than going unnoticed.

use std::io::Write;
use std::time::SystemTime;

use chrono::{Datelike, Timelike};

use super::batch::{ACCESS_TARGET, AccessRecord};

/// The shape of the lines, as the rest of the log has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Style {
    /// Readable text; `ansi` colours it like the terminal's other lines.
    Text { ansi: bool },
    /// One JSON object per line.
    Json,
}

// The escape sequences of the fmt layer's text format with colours.
const DIM: &[u8] = b"\x1b[2m";
const ITALIC: &[u8] = b"\x1b[3m";
const GREEN: &[u8] = b"\x1b[32m";
const RESET: &[u8] = b"\x1b[0m";

/// Formats access lines; keeps the date and time of the last line's second, since consecutive
/// lines mostly share it.
#[derive(Debug)]
pub(super) struct LineFormatter {
    style: Style,
    /// Seconds since the epoch and `YYYY-MM-DDTHH:MM:SS` for them.
    second: Option<(i64, Vec<u8>)>,
}

impl LineFormatter {
    pub(super) fn new(style: Style) -> LineFormatter {
        LineFormatter {
            style,
            second: None,
        }
    }

    /// Appends `record`'s line, newline included, to `out`.
    pub(super) fn write(&mut self, record: &AccessRecord, out: &mut Vec<u8>) {
        match self.style {
            Style::Text { ansi } => self.write_text(record, ansi, out),
            Style::Json => self.write_json(record, out),
        }
    }

    fn write_text(&mut self, record: &AccessRecord, ansi: bool, out: &mut Vec<u8>) {
        let paint = |out: &mut Vec<u8>, style: &[u8], text: &[u8]| {
            if ansi {
                out.extend_from_slice(style);
                out.extend_from_slice(text);
                out.extend_from_slice(RESET);
            } else {
                out.extend_from_slice(text);
            }
        };
        if ansi {
            out.extend_from_slice(DIM);
            self.timestamp(record.at, out);
            out.extend_from_slice(RESET);
        } else {
            self.timestamp(record.at, out);
        }
        out.push(b' ');
        paint(out, GREEN, b" INFO");
        out.push(b' ');
        paint(out, DIM, ACCESS_TARGET.as_bytes());
        paint(out, DIM, b":");
        out.push(b' ');
        // The message is the one part the layer sanitizes; the fields go out as they are.
        push_sanitized(out, &record.method);
        out.push(b' ');
        push_sanitized(out, &record.path);
        out.push(b' ');
        push_integer(out, u64::from(record.status));
        let field = |out: &mut Vec<u8>, name: &str| {
            out.push(b' ');
            paint(out, ITALIC, name.as_bytes());
            paint(out, DIM, b"=");
        };
        field(out, "method");
        out.extend_from_slice(record.method.as_bytes());
        field(out, "path");
        out.extend_from_slice(record.path.as_bytes());
        field(out, "status");
        push_integer(out, u64::from(record.status));
        field(out, "bytes");
        push_integer(out, record.bytes);
        field(out, "duration_ms");
        push_debug_float(out, milliseconds(record.duration));
        field(out, "queue_ms");
        push_debug_float(out, record.queue_wait.map_or(0.0, milliseconds));
        field(out, "worker");
        push_signed(out, worker(record));
        field(out, "completed");
        out.extend_from_slice(if record.completed { b"true" } else { b"false" });
        out.push(b'\n');
    }

    fn write_json(&mut self, record: &AccessRecord, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        self.timestamp(record.at, out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"");
        push_json_contents(out, &record.method);
        out.push(b' ');
        push_json_contents(out, &record.path);
        out.push(b' ');
        push_integer(out, u64::from(record.status));
        out.extend_from_slice(b"\",\"method\":\"");
        push_json_contents(out, &record.method);
        out.extend_from_slice(b"\",\"path\":\"");
        push_json_contents(out, &record.path);
        out.extend_from_slice(b"\",\"status\":");
        push_integer(out, u64::from(record.status));
        out.extend_from_slice(b",\"bytes\":");
        push_integer(out, record.bytes);
        out.extend_from_slice(b",\"duration_ms\":");
        push_json_float(out, milliseconds(record.duration));
        out.extend_from_slice(b",\"queue_ms\":");
        push_json_float(out, record.queue_wait.map_or(0.0, milliseconds));
        out.extend_from_slice(b",\"worker\":");
        push_signed(out, worker(record));
        out.extend_from_slice(b",\"completed\":");
        out.extend_from_slice(if record.completed { b"true" } else { b"false" });
        out.extend_from_slice(b",\"target\":\"");
        out.extend_from_slice(ACCESS_TARGET.as_bytes());
        out.extend_from_slice(b"\"}\n");
    }

    /// RFC 3339 in UTC with microseconds, as `tracing_subscriber`'s default timer writes it.
    fn timestamp(&mut self, at: SystemTime, out: &mut Vec<u8>) {
        let at = chrono::DateTime::<chrono::Utc>::from(at);
        let second = at.timestamp();
        let prefix = match &mut self.second {
            Some((cached, prefix)) if *cached == second => prefix,
            slot => {
                let mut prefix = Vec::with_capacity(20);
                let year = at.year();
                // Writing to a Vec cannot fail.
                let _ = if year > 9999 {
                    write!(prefix, "+{year}")
                } else if year < 0 {
                    write!(prefix, "{year:05}")
                } else {
                    write!(prefix, "{year:04}")
                };
                let _ = write!(
                    prefix,
                    "-{:02}-{:02}T{:02}:{:02}:{:02}",
                    at.month(),
                    at.day(),
                    at.hour(),
                    at.minute(),
                    at.second()
                );
                &mut slot.insert((second, prefix)).1
            }
        };
        out.extend_from_slice(prefix);
        let micros = at.timestamp_subsec_micros().min(999_999);
        out.push(b'.');
        let digits = out.len();
        out.extend_from_slice(b"000000");
        let mut rest = micros;
        for index in (digits..digits + 6).rev() {
            out[index] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.push(b'Z');
    }
}

fn milliseconds(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn worker(record: &AccessRecord) -> i64 {
    record.worker.map_or(-1, |slot| slot as i64)
}

fn push_integer(out: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = value;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

fn push_signed(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    push_integer(out, value.unsigned_abs());
}

/// `{:?}` of an `f64`, which is how the text format writes float fields.
fn push_debug_float(out: &mut Vec<u8>, value: f64) {
    let _ = write!(out, "{value:?}");
}

/// A float as `serde_json` writes it (non-finite ones as `null`), as the JSON format does.
fn push_json_float(out: &mut Vec<u8>, value: f64) {
    if serde_json::to_writer(&mut *out, &value).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// `text` with the control characters a terminal could act on written as escapes, the way the
/// fmt layer sanitizes a message: ESC, BEL, BS, FF and DEL as `\xNN`, C1 controls as `\u{NN}`.
fn push_sanitized(out: &mut Vec<u8>, text: &str) {
    // C1 controls (U+0080..=U+009F) start with 0xC2 in UTF-8, like U+00A0..=U+00BF: a 0xC2
    // only sends the text down the slow path, which looks at each character.
    if !text
        .bytes()
        .any(|byte| matches!(byte, 0x07 | 0x08 | 0x0c | 0x1b | 0x7f | 0xc2))
    {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    for ch in text.chars() {
        // Writing to a Vec cannot fail.
        match ch {
            '\x07' | '\x08' | '\x0c' | '\x1b' | '\x7f' => {
                let _ = write!(out, "\\x{:02x}", ch as u32);
            }
            '\u{80}'..='\u{9f}' => {
                let _ = write!(out, "\\u{{{:x}}}", ch as u32);
            }
            _ => out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
}

/// `text` escaped as the inside of a JSON string, the way `serde_json` escapes it.
fn push_json_contents(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    let mut start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..index]);
        out.extend_from_slice(escape);
        start = index + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime;

    /// A timer for the reference layer: the record's instant, formatted by chrono.
    struct FixedTime(SystemTime);

    impl FormatTime for FixedTime {
        fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
            let at = chrono::DateTime::<chrono::Utc>::from(self.0);
            w.write_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the fmt layer, configured as `logging::build` configures it, writes for `record`.
    fn reference(style: Style, record: &AccessRecord) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let make = move || writer.clone();
        let timer = FixedTime(record.at);
        let dispatch = match style {
            Style::Text { ansi } => tracing::Dispatch::new(
                tracing_subscriber::fmt()
                    .with_ansi(ansi)
                    .with_timer(timer)
                    .with_writer(make)
                    .finish(),
            ),
            Style::Json => tracing::Dispatch::new(
                tracing_subscriber::fmt()
                    .json()
                    .flatten_event(true)
                    .with_ansi(false)
                    .with_timer(timer)
                    .with_writer(make)
                    .finish(),
            ),
        };
        tracing::dispatcher::with_default(&dispatch, || record.emit());
        let bytes = captured.0.lock().expect("buffer").clone();
        String::from_utf8(bytes).expect("UTF-8")
    }

    fn ours(style: Style, record: &AccessRecord) -> String {
        let mut out = Vec::new();
        LineFormatter::new(style).write(record, &mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    fn record(method: &str, path: &str) -> AccessRecord {
        AccessRecord {
            at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            method: method.to_owned(),
            path: path.to_owned(),
            status: 200,
            bytes: 13,
            duration: Duration::from_micros(1500),
            queue_wait: Some(Duration::from_nanos(41_700)),
            worker: Some(1),
            completed: true,
        }
    }

    /// Records covering every branch: odd methods and paths (escapes of both formats, non-ASCII,
    /// control characters), every kind of number, missing optional fields, odd instants.
    fn records() -> Vec<AccessRecord> {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.extend(['\u{80}', '\u{85}', '\u{9f}', '\u{a0}', 'é', '→', '😀']);
        let mut records = vec![
            record("GET", "/"),
            record("POST", "/a?x=1&y=\"two\"\\three"),
            record("PURGE", "/caf%C3%A9/é/→/😀"),
            record("M\x1bTHOD", &all),
            record("GET", "/\x1b[31mred\x07\x08\x0c\x7f\u{9b}\t\n\r\0"),
        ];
        let mut odd = record("DELETE", "/x");
        odd.status = 599;
        odd.bytes = u64::MAX;
        odd.duration = Duration::from_nanos(1);
        odd.queue_wait = None;
        odd.worker = None;
        odd.completed = false;
        records.push(odd);
        let mut slow = record("GET", "/slow");
        slow.duration = Duration::from_secs(123_456_789);
        slow.queue_wait = Some(Duration::from_millis(250));
        slow.worker = Some(usize::MAX >> 1);
        records.push(slow);
        for at in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::from_micros(86_400_000_001),
            UNIX_EPOCH + Duration::from_nanos(1_700_000_000_999_999_999),
            UNIX_EPOCH + Duration::from_secs(253_402_300_799), // 9999-12-31T23:59:59Z
        ] {
            let mut timed = record("GET", "/t");
            timed.at = at;
            records.push(timed);
        }
        records
    }

    #[test]
    fn lines_are_byte_for_byte_those_of_the_fmt_layer() {
        for style in [
            Style::Text { ansi: false },
            Style::Text { ansi: true },
            Style::Json,
        ] {
            for record in records() {
                assert_eq!(
                    ours(style, &record),
                    reference(style, &record),
                    "{style:?} {record:?}"
                );
            }
        }
    }

    #[test]
    fn consecutive_lines_in_one_second_and_across_seconds_keep_their_time() {
        let mut formatter = LineFormatter::new(Style::Text { ansi: false });
        let base = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let mut out = Vec::new();
        for offset in [0, 1, 876_543, 876_544, 2_000_000] {
            let mut entry = record("GET", "/");
            entry.at = base + Duration::from_micros(offset);
            formatter.write(&entry, &mut out);
        }
        let text = String::from_utf8(out).expect("UTF-8");
        let times: Vec<&str> = text
            .lines()
            .map(|line| line.split(' ').next().unwrap_or(line))
            .collect();
        assert_eq!(
            times,
            [
                "2023-11-14T22:13:20.123456Z",
                "2023-11-14T22:13:20.123457Z",
                "2023-11-14T22:13:20.999999Z",
                "2023-11-14T22:13:21.000000Z",
                "2023-11-14T22:13:22.123456Z",
            ]
        );
    }

    #[test]
    fn timestamps_have_the_default_timer_shape() {
        let mut ours = Vec::new();
        LineFormatter::new(Style::Json).timestamp(SystemTime::now(), &mut ours);
        let ours = String::from_utf8(ours).expect("UTF-8");
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .expect("format");
        // Both read the clock: compare the shape and the minute, not the microseconds.
        assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
        assert_eq!(ours[..16], theirs[..16], "{ours} / {theirs}");
    }
}
