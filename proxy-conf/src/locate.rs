//! Where each key of a `sauna.toml` sits in its text, so that a problem found after parsing (a
//! check in `validate`, a secret that cannot be read, an emit refusal) can still be reported at
//! `FILE:LINE:COL`. Key paths are written the TOML way: `beat.jobs."nightly.report"`.
//! Array elements are addressed by their index (`["web", "listen", "1"]`).

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Where one key and its value are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    /// The key itself (for a `[table]` header: the name inside the brackets).
    pub key: Range<usize>,
    /// The value; for a `[table]` header, the whole header.
    pub value: Range<usize>,
}

/// Every key path of a document and where it is.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyIndex {
    entries: BTreeMap<Vec<String>, Located>,
}

impl KeyIndex {
    /// Indexes a parsed document.
    pub(crate) fn new(root: &Spanned<DeTable<'_>>) -> Self {
        let mut index = KeyIndex::default();
        index.add_table(&mut Vec::new(), root.get_ref());
        index
    }

    fn add_table(&mut self, path: &mut Vec<String>, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            self.entries.insert(
                path.clone(),
                Located {
                    key: key.span(),
                    value: value.span(),
                },
            );
            self.add_value(path, value.get_ref());
            path.pop();
        }
    }

    fn add_value(&mut self, path: &mut Vec<String>, value: &DeValue<'_>) {
        match value {
            DeValue::Table(table) => self.add_table(path, table),
            DeValue::Array(items) => {
                for (position, item) in items.iter().enumerate() {
                    path.push(position.to_string());
                    self.entries.insert(
                        path.clone(),
                        Located {
                            key: item.span(),
                            value: item.span(),
                        },
                    );
                    self.add_value(path, item.get_ref());
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// The key and value at `path`, if it is in the file.
    pub(crate) fn get<S: AsRef<str>>(&self, path: &[S]) -> Option<&Located> {
        let path: Vec<String> = path.iter().map(|part| part.as_ref().to_owned()).collect();
        self.entries.get(&path)
    }

    /// The value at `path`; when the key is absent (a default applies), the nearest table that is
    /// in the file, which is its header; the start of the file when nothing is.
    pub(crate) fn value_or_table<S: AsRef<str>>(&self, path: &[S]) -> Range<usize> {
        (0..=path.len())
            .rev()
            .find_map(|len| self.get(&path[..len]).map(|located| located.value.clone()))
            .unwrap_or(0..0)
    }
}

/// One key as TOML writes it: bare when it can be, quoted otherwise.
pub(crate) fn display_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// A key path as TOML writes it: `programs.celery.command`, `beat.jobs."a.b"`.
pub(crate) fn display_path<S: AsRef<str>>(path: &[S]) -> String {
    path.iter()
        .map(|part| display_key(part.as_ref()))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(text: &str) -> KeyIndex {
        let (root, errors) = DeTable::parse_recoverable(text);
        assert!(errors.is_empty());
        KeyIndex::new(&root)
    }

    #[test]
    fn values_headers_and_array_elements_are_found() {
        let text = "[web]\nlisten = [\"a:1\", \"b:2\"]\n";
        let index = index(text);
        let value = index.value_or_table(&["web", "listen", "1"]);
        assert_eq!(&text[value], "\"b:2\"");
        let header = index.value_or_table(&["web", "workers"]);
        assert_eq!(&text[header], "[web]");
        assert_eq!(index.value_or_table(&["beat", "timezone"]), 0..0);
        let key = &index.get(&["web", "listen"]).unwrap().key;
        assert_eq!(&text[key.clone()], "listen");
    }

    #[test]
    fn paths_are_written_the_toml_way() {
        assert_eq!(display_path(&["beat", "jobs", "a.b"]), "beat.jobs.\"a.b\"");
        assert_eq!(
            display_path(&["programs", "my-worker_2"]),
            "programs.my-worker_2"
        );
        assert_eq!(display_key(""), "\"\"");
    }
}
