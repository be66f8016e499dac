//! Turning the spanned TOML tree into a [`Config`](crate::Config) while collecting *every* type
//! and unknown-key problem, not just the first.
//!
//! serde stops at the first error, so the schema is deserialized repeatedly: each failure carries
//! the key path of the value that failed, that key is then skipped (its struct falls back to the
//! default for it) and the whole tree is deserialized again, until it succeeds. A file with N
//! problems costs N+1 passes over a tree of a few hundred nodes. Because the deserializer is ours,
//! the messages are ours too: "expected an integer, found the string \"4\"", unknown keys with the
//! allowed ones and a "did you mean", enum values with the allowed values. Syntax errors and
//! checks that span several keys belong to `load` and `validate`.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostics::did_you_mean;
use crate::locate::display_path;

/// One value that did not fit the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// Where it is: the key for unknown keys, the value otherwise.
    pub span: Option<Range<usize>>,
    /// The key path of the value that failed; skipped on the next pass.
    pub path: Option<Vec<String>>,
    /// What is wrong.
    pub kind: ProblemKind,
}

/// What kind of problem a [`Problem`] is; unknown keys are worded once their table is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProblemKind {
    /// A key the table does not have.
    UnknownKey {
        /// The key as written.
        key: String,
        /// The keys the table accepts.
        expected: &'static [&'static str],
    },
    /// A value of the wrong type or out of range; the message says what was expected.
    Invalid(String),
}

impl Problem {
    fn invalid(message: String) -> Self {
        Problem {
            span: None,
            path: None,
            kind: ProblemKind::Invalid(message),
        }
    }

    /// Fills in the location if a deeper level has not already.
    fn located(mut self, span: Range<usize>, path: &[String]) -> Self {
        if self.span.is_none() {
            self.span = Some(span);
        }
        if self.path.is_none() {
            self.path = Some(path.to_vec());
        }
        self
    }

    fn with_span(mut self, span: Range<usize>) -> Self {
        if self.span.is_none() {
            self.span = Some(span);
        }
        self
    }

    /// The full message, naming the key path.
    pub(crate) fn message(&self) -> String {
        let path = self.path.as_deref().unwrap_or_default();
        match &self.kind {
            ProblemKind::UnknownKey { key, expected } => {
                let table = match path.split_last() {
                    Some((_, parent)) if !parent.is_empty() => {
                        format!("in [{}]", display_path(parent))
                    }
                    _ => "at the top level".to_owned(),
                };
                let allowed = expected.join(", ");
                match did_you_mean(key, expected.iter().copied()) {
                    Some(close) => format!(
                        "unknown key \"{key}\" {table}; did you mean \"{close}\"? Expected one of: {allowed}"
                    ),
                    None => {
                        format!("unknown key \"{key}\" {table}; expected one of: {allowed}")
                    }
                }
            }
            ProblemKind::Invalid(message) if path.is_empty() => message.clone(),
            ProblemKind::Invalid(message) => format!("{}: {message}", display_path(path)),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for Problem {}

impl de::Error for Problem {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Problem::invalid(msg.to_string())
    }

    fn invalid_type(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        let wanted = expected_text(expected, false);
        Problem::invalid(format!(
            "expected {wanted}, found {}{}",
            found_text(&unexpected),
            hint(&unexpected, &wanted)
        ))
    }

    fn invalid_value(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Problem::invalid(format!(
            "expected {}, found {}",
            expected_text(expected, true),
            found_text(&unexpected)
        ))
    }

    fn invalid_length(len: usize, expected: &dyn Expected) -> Self {
        Problem::invalid(format!(
            "expected {}, found an array of {len} element(s)",
            expected_text(expected, true)
        ))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let suggestion = did_you_mean(variant, expected.iter().copied())
            .map(|s| format!(" (did you mean \"{s}\"?)"))
            .unwrap_or_default();
        Problem::invalid(format!(
            "unknown value \"{variant}\"{suggestion}; expected one of: {}",
            quoted_list(expected)
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Problem {
            span: None,
            path: None,
            kind: ProblemKind::UnknownKey {
                key: field.to_owned(),
                expected,
            },
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Problem::invalid(format!("missing key \"{field}\""))
    }

    fn duplicate_field(field: &'static str) -> Self {
        Problem::invalid(format!("key \"{field}\" is given twice"))
    }
}

/// `"a", "b", "c"`.
fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|item| format!("\"{item}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// serde's names for what a visitor wanted ("u32", "a sequence", "struct WebConfig"), in the
/// words of a TOML file. `with_range` adds the bounds of integers, for out-of-range values.
fn expected_text(expected: &dyn Expected, with_range: bool) -> String {
    let raw = expected.to_string();
    let range = |min: i128, max: i128| {
        if with_range {
            format!("an integer from {min} to {max}")
        } else {
            "an integer".to_owned()
        }
    };
    match raw.as_str() {
        "u8" => range(0, u8::MAX.into()),
        "u16" => range(0, u16::MAX.into()),
        "u32" => range(0, u32::MAX.into()),
        // 18446744073709551615 tells nobody anything.
        "u64" | "usize" if with_range => "an integer of at least 0".to_owned(),
        "u64" | "usize" => "an integer".to_owned(),
        "i8" => range(i8::MIN.into(), i8::MAX.into()),
        "i16" => range(i16::MIN.into(), i16::MAX.into()),
        "i32" => range(i32::MIN.into(), i32::MAX.into()),
        "i64" | "isize" => range(i64::MIN.into(), i64::MAX.into()),
        "f32" | "f64" => "a number".to_owned(),
        "a string" | "a borrowed string" | "path string" => "a string".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a sequence" => "an array".to_owned(),
        "a map" => "a table".to_owned(),
        "any valid TOML value" => "a value".to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other => other.to_owned(),
    }
}

/// What was found instead, with its value where that helps.
fn found_text(unexpected: &Unexpected<'_>) -> String {
    match unexpected {
        Unexpected::Bool(b) => format!("the boolean {b}"),
        Unexpected::Unsigned(n) => format!("the integer {n}"),
        Unexpected::Signed(n) => format!("the integer {n}"),
        Unexpected::Float(x) => format!("the float {x}"),
        Unexpected::Str(s) => format!("the string \"{s}\""),
        Unexpected::Seq => "an array".to_owned(),
        Unexpected::Map => "a table".to_owned(),
        other => other.to_string(),
    }
}

/// A fix for the mistakes people make most: quoting numbers, writing a command as one string.
fn hint(unexpected: &Unexpected<'_>, wanted: &str) -> String {
    match unexpected {
        Unexpected::Str(s) if wanted == "an integer" && s.trim().parse::<i64>().is_ok() => {
            format!("; write {} without quotes", s.trim())
        }
        Unexpected::Str(s) if wanted == "true or false" && matches!(*s, "true" | "false") => {
            format!("; write {s} without quotes")
        }
        Unexpected::Str(s) if wanted == "an array" => {
            let words: Vec<String> = s.split_whitespace().map(|w| format!("\"{w}\"")).collect();
            format!("; write it as an array, e.g. [{}]", words.join(", "))
        }
        _ => String::new(),
    }
}

/// Deserializes `T` from the tree, skipping each value that fails and trying again, so that every
/// problem is found. Returns the value built from everything that fitted, and the problems.
pub(crate) fn deserialize_collecting<T: DeserializeOwned + Default>(
    root: &Spanned<DeTable<'_>>,
) -> (T, Vec<Problem>) {
    let root_value = DeValue::Table(root.get_ref().clone());
    let mut skip = BTreeSet::new();
    let mut problems = Vec::new();
    loop {
        let deserializer = ValueDe {
            value: &root_value,
            span: root.span(),
            path: Vec::new(),
            skip: &skip,
        };
        match T::deserialize(deserializer) {
            Ok(value) => return (value, problems),
            Err(problem) => {
                let path = problem.path.clone().unwrap_or_default();
                problems.push(problem);
                // A problem that cannot be skipped (no key to blame, or one already skipped) would
                // repeat forever: stop with what was found so far.
                if path.is_empty() || !skip.insert(path) {
                    return (T::default(), problems);
                }
            }
        }
    }
}

/// A deserializer over one spanned value of the tree.
struct ValueDe<'a, 'i> {
    value: &'a DeValue<'i>,
    span: Range<usize>,
    /// Key path of this value from the root.
    path: Vec<String>,
    /// Key paths that failed on an earlier pass.
    skip: &'a BTreeSet<Vec<String>>,
}

impl ValueDe<'_, '_> {
    fn unexpected(&self) -> Unexpected<'_> {
        match self.value {
            DeValue::String(s) => Unexpected::Str(s),
            DeValue::Integer(_) => Unexpected::Other("an integer"),
            DeValue::Float(_) => Unexpected::Other("a float"),
            DeValue::Boolean(b) => Unexpected::Bool(*b),
            DeValue::Datetime(_) => Unexpected::Other("a date-time"),
            DeValue::Array(_) => Unexpected::Seq,
            DeValue::Table(_) => Unexpected::Map,
        }
    }
}

impl<'de> de::Deserializer<'de> for ValueDe<'_, '_> {
    type Error = Problem;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Problem> {
        let span = self.span.clone();
        match self.value {
            DeValue::String(s) => visitor.visit_str(s),
            DeValue::Integer(integer) => {
                let digits = integer.as_str();
                if let Ok(n) = i64::from_str_radix(digits, integer.radix()) {
                    visitor.visit_i64(n)
                } else if let Ok(n) = u64::from_str_radix(digits, integer.radix()) {
                    visitor.visit_u64(n)
                } else {
                    Err(Problem::invalid(format!(
                        "the integer {integer} is too large"
                    )))
                }
            }
            DeValue::Float(float) => match float.as_str().parse::<f64>() {
                Ok(x) => visitor.visit_f64(x),
                Err(_) => Err(Problem::invalid(format!("invalid float {float}"))),
            },
            DeValue::Boolean(b) => visitor.visit_bool(*b),
            DeValue::Datetime(_) => Err(Problem::invalid(
                "dates and times are not supported here; write it as a string, e.g. \"2025-01-31T12:00:00Z\""
                    .to_owned(),
            )),
            DeValue::Array(items) => visitor.visit_seq(SeqDe {
                items: items.iter(),
                path: &self.path,
                skip: self.skip,
            }),
            DeValue::Table(table) => {
                let entries = table
                    .iter()
                    .filter(|(key, _)| {
                        let mut path = self.path.clone();
                        path.push(key.get_ref().to_string());
                        !self.skip.contains(&path)
                    })
                    .collect::<Vec<_>>();
                visitor.visit_map(MapDe {
                    entries: entries.into_iter(),
                    current: None,
                    path: &self.path,
                    skip: self.skip,
                })
            }
        }
        .map_err(|problem| problem.with_span(span))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Problem> {
        // A present key is always `Some`; absence is handled by the struct's defaults.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Problem> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Problem> {
        // serde's derived struct visitors also accept arrays (fields by position), which would
        // turn `web = ["a"]` into confusing messages about `listen`; a section is a table.
        if !matches!(self.value, DeValue::Table(_)) {
            return Err(
                <Problem as de::Error>::invalid_type(self.unexpected(), &"a table")
                    .with_span(self.span.clone()),
            );
        }
        self.deserialize_any(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Problem> {
        if !matches!(self.value, DeValue::Table(_)) {
            return Err(
                <Problem as de::Error>::invalid_type(self.unexpected(), &"a table")
                    .with_span(self.span.clone()),
            );
        }
        self.deserialize_any(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Problem> {
        match self.value {
            DeValue::String(s) => visitor.visit_enum(s.as_ref().into_deserializer()),
            _ => Err(Problem::invalid(format!(
                "expected one of: {}, found {}",
                quoted_list(variants),
                found_text(&self.unexpected())
            ))),
        }
        .map_err(|problem| problem.with_span(self.span.clone()))
    }

    serde::forward_to_deserialize_any! {
        bool u8 u16 u32 u64 i8 i16 i32 i64 i128 u128 f32 f64 char str string seq
        bytes byte_buf unit unit_struct tuple_struct tuple identifier ignored_any
    }
}

/// The elements of an array. A failing element blames the array's key: arrays are skipped whole.
struct SeqDe<'a, 'i> {
    items: std::slice::Iter<'a, Spanned<DeValue<'i>>>,
    path: &'a [String],
    skip: &'a BTreeSet<Vec<String>>,
}

impl<'de> SeqAccess<'de> for SeqDe<'_, '_> {
    type Error = Problem;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Problem> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        seed.deserialize(ValueDe {
            value: item.get_ref(),
            span: item.span(),
            path: self.path.to_vec(),
            skip: self.skip,
        })
        .map(Some)
        .map_err(|mut problem| {
            problem.path = None;
            problem.with_span(item.span())
        })
    }
}

type Entry<'a, 'i> = (
    &'a Spanned<toml::de::DeString<'i>>,
    &'a Spanned<DeValue<'i>>,
);

/// The entries of a table, minus those skipped after an earlier failure.
struct MapDe<'a, 'i> {
    entries: std::vec::IntoIter<Entry<'a, 'i>>,
    current: Option<Entry<'a, 'i>>,
    path: &'a [String],
    skip: &'a BTreeSet<Vec<String>>,
}

impl MapDe<'_, '_> {
    fn child_path(&self, key: &str) -> Vec<String> {
        let mut path = self.path.to_vec();
        path.push(key.to_owned());
        path
    }
}

impl<'de> MapAccess<'de> for MapDe<'_, '_> {
    type Error = Problem;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Problem> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.current = Some((key, value));
        let key_de: de::value::StrDeserializer<'_, Problem> =
            key.get_ref().as_ref().into_deserializer();
        seed.deserialize(key_de)
            .map(Some)
            .map_err(|problem| problem.located(key.span(), &self.child_path(key.get_ref())))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Problem> {
        let Some((key, value)) = self.current.take() else {
            return Err(Problem::invalid(
                "internal error: a value was read before its key".to_owned(),
            ));
        };
        let path = self.child_path(key.get_ref());
        seed.deserialize(ValueDe {
            value: value.get_ref(),
            span: value.span(),
            path: path.clone(),
            skip: self.skip,
        })
        .map_err(|problem| problem.located(value.span(), &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::RawConfig as Config;

    fn problems(text: &str) -> Vec<String> {
        let (root, errors) = DeTable::parse_recoverable(text);
        assert!(errors.is_empty(), "{errors:?}");
        let (_, problems) = deserialize_collecting::<Config>(&root);
        problems.iter().map(Problem::message).collect()
    }

    #[test]
    fn a_quoted_number_gets_a_hint() {
        assert_eq!(
            problems("[web]\nworkers = \"4\"\n"),
            ["web.workers: expected an integer, found the string \"4\"; write 4 without quotes"]
        );
    }

    #[test]
    fn a_command_written_as_a_string_suggests_an_array() {
        assert_eq!(
            problems("[programs.w]\ncommand = \"celery -A app worker\"\n"),
            [
                "programs.w.command: expected an array, found the string \"celery -A app worker\"; write it as an array, e.g. [\"celery\", \"-A\", \"app\", \"worker\"]"
            ]
        );
    }

    #[test]
    fn unknown_keys_list_the_allowed_ones_and_suggest_the_closest() {
        let found = problems("[control]\nsockt = \"/x\"\n");
        assert_eq!(
            found,
            [
                "unknown key \"sockt\" in [control]; did you mean \"socket\"? Expected one of: socket"
            ]
        );
        let found = problems("[control]\nzzz = 1\n");
        assert_eq!(
            found,
            ["unknown key \"zzz\" in [control]; expected one of: socket"]
        );
    }

    #[test]
    fn bad_enum_values_list_the_allowed_values() {
        assert_eq!(
            problems("[programs.w]\ncommand = [\"x\"]\nrestart = \"sometimes\"\n"),
            [
                "programs.w.restart: unknown value \"sometimes\"; expected one of: \"always\", \"on-failure\", \"never\""
            ]
        );
        assert_eq!(
            problems("[programs.w]\nrestart = \"on_failure\"\n"),
            [
                "programs.w.restart: unknown value \"on_failure\" (did you mean \"on-failure\"?); expected one of: \"always\", \"on-failure\", \"never\""
            ]
        );
    }

    #[test]
    fn every_failing_key_is_reported_and_the_rest_still_loads() {
        let text = "[web]\nworkers = -1\nthreads = true\ntimeout = 30\nqueue_size = 7\n";
        let (root, _) = DeTable::parse_recoverable(text);
        let (config, found) = deserialize_collecting::<Config>(&root);
        let messages: Vec<String> = found.iter().map(Problem::message).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(
            messages.contains(
                &"web.workers: expected an integer from 0 to 4294967295, found the integer -1"
                    .to_owned()
            )
        );
        assert!(
            messages
                .contains(&"web.threads: expected an integer, found the boolean true".to_owned())
        );
        assert!(messages.contains(
            &"web.timeout: a bare number is ambiguous here: write a unit, e.g. \"30s\"".to_owned()
        ));
        assert_eq!(config.web.map(|web| web.queue_size), Some(7));
        assert_eq!(
            problems("[web]\nmax_requests = -5\n"),
            ["web.max_requests: expected an integer of at least 0, found the integer -5"]
        );
    }

    #[test]
    fn a_section_that_is_not_a_table_is_refused() {
        assert_eq!(
            problems("web = [\"a\"]\n"),
            ["web: expected a table, found an array"]
        );
    }

    #[test]
    fn an_element_of_the_wrong_type_blames_its_array() {
        let (root, _) = DeTable::parse_recoverable("[web]\nlisten = [\"a:1\", 8000]\n");
        let (_, problems) = deserialize_collecting::<Config>(&root);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].path.as_deref(),
            Some(&["web".to_owned(), "listen".to_owned()][..])
        );
        assert_eq!(problems[0].span, Some(23..27));
    }

    #[test]
    fn dates_are_refused_with_a_fix() {
        let found = problems("[beat.jobs.j]\ntask = \"t\"\nevery = \"1m\"\nargs = [2025-01-01]\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("beat.jobs.j.args: dates and times are not supported here"));
    }
}
