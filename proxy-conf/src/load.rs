//! Reading `sauna.toml` into a [`Config`] with every problem reported at once, in file order, as
//! `FILE:LINE:COL: message`: syntax errors from the parser, then type and unknown-key problems
//! (`de`), then cross-field checks (`validate`). Also what the rest of the program needs to know
//! about where the file is: relative paths resolved against its directory, the default control
//! socket next to it, and [`Loaded::diagnostic_at`] for problems found later (cron syntax, app
//! import) that must still point at a line and column.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::de::deserialize_collecting;
use crate::diagnostics::{Diagnostic, Diagnostics, line_column};
use crate::locate::KeyIndex;
use crate::schema::Config;
use crate::validate::validate;

/// A configuration together with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The parsed and checked configuration; relative paths already resolved against the file's
    /// directory.
    pub config: Config,
    /// The file it was read from, as the user named it.
    pub path: PathBuf,
    /// The file's text, to locate keys for later diagnostics.
    pub source: String,
}

impl Loaded {
    /// The file name as diagnostics print it.
    pub fn file_name(&self) -> String {
        self.path.display().to_string()
    }

    /// A diagnostic about the key at `key_path` (e.g. `["beat", "jobs", "nightly", "cron"]`),
    /// pointing at its value; when the key is absent (a default applies), at the header of the
    /// nearest enclosing table in the file. Array elements are addressed by index
    /// (`["web", "listen", "1"]`).
    pub fn diagnostic_at<S: AsRef<str>>(
        &self,
        key_path: &[S],
        message: impl Into<String>,
    ) -> Diagnostic {
        let (root, _) = DeTable::parse_recoverable(&self.source);
        let span = KeyIndex::new(&root).value_or_table(key_path);
        let (line, column) = line_column(&self.source, span.start);
        Diagnostic {
            file: self.file_name(),
            line,
            column,
            message: message.into(),
        }
    }

    /// The directory relative paths in the file are resolved against (absolute, symlinks kept).
    pub fn config_dir(&self) -> PathBuf {
        config_dir(&self.path)
    }

    /// Where the control socket is: `[control].socket`, else `$RUNTIME_DIRECTORY/control.sock`
    /// (set by systemd's `RuntimeDirectory=`), else `.sauna/control.sock` next to the config file.
    pub fn control_socket(&self) -> PathBuf {
        control_socket(
            &self.config,
            &self.config_dir(),
            std::env::var_os("RUNTIME_DIRECTORY").as_deref(),
        )
    }
}

/// The control socket for `config` read from `config_dir`, given the value of
/// `$RUNTIME_DIRECTORY` (systemd may list several directories separated by `:`; the first wins).
pub fn control_socket(
    config: &Config,
    config_dir: &Path,
    runtime_directory: Option<&OsStr>,
) -> PathBuf {
    if let Some(socket) = &config.control.socket {
        return config_dir.join(socket);
    }
    let runtime = runtime_directory
        .and_then(|dirs| std::env::split_paths(dirs).next())
        .filter(|dir| !dir.as_os_str().is_empty());
    match runtime {
        Some(dir) => dir.join("control.sock"),
        None => config_dir.join(".sauna").join("control.sock"),
    }
}

/// The absolute directory of the config file, without resolving symlinks: a deploy that switches
/// a `current` symlink must be seen at the next reload.
fn config_dir(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    absolute
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file was read but has problems; all of them are listed.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// Reads and checks the file at `path`; relative paths in it are resolved against its directory.
pub fn load_file(path: &Path) -> Result<Loaded, LoadError> {
    let source = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut config = load_str(&source, &path.display().to_string()).map_err(LoadError::Invalid)?;
    resolve_paths(&mut config, &config_dir(path));
    Ok(Loaded {
        config,
        path: path.to_owned(),
        source,
    })
}

/// Joins relative directories and files onto `base`. Never canonicalizes (see [`config_dir`]).
fn resolve_paths(config: &mut Config, base: &Path) {
    let resolve = |path: &mut PathBuf| {
        if path.is_relative() {
            *path = base.join(&*path);
        }
    };
    if let Some(directory) = &mut config.app.directory {
        resolve(directory);
    }
    for program in config.programs.values_mut() {
        if let Some(directory) = &mut program.directory {
            resolve(directory);
        }
    }
    if let Some(socket) = &mut config.control.socket {
        resolve(socket);
    }
    if let Some(token_file) = &mut config.metrics.token_file {
        resolve(token_file);
    }
}

/// Parses and checks configuration text; `file` names it in diagnostics. Relative paths are
/// left as written (there is no file to resolve them against).
pub fn load_str(text: &str, file: &str) -> Result<Config, Diagnostics> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    let mut found: Vec<(Range<usize>, String)> = syntax_problems(text, &root, &syntax_errors);

    let (config, problems) = deserialize_collecting::<Config>(&root);
    // After a syntax error the parser's recovery may have cut a value short or swallowed the
    // lines after it: stay quiet about what sits on those lines, the syntax error is the news.
    let damaged = |span: &Range<usize>| {
        found.iter().any(|(bad, _)| {
            let same_line = line_column(text, bad.start).0 == line_column(text, span.start).0;
            same_line || (bad.start < span.start && span.start < bad.end)
        })
    };
    let mut schema: Vec<(Range<usize>, String)> = problems
        .iter()
        .map(|problem| (problem.span.clone().unwrap_or(0..0), problem.message()))
        .filter(|(span, _)| !damaged(span))
        .collect();
    // Cross-field checks on a tree the parser had to repair would report keys as missing that
    // are only unreadable, so they wait until the syntax is right.
    if syntax_errors.is_empty() {
        let broken: BTreeSet<Vec<String>> = problems
            .iter()
            .filter_map(|problem| problem.path.clone())
            .collect();
        let index = KeyIndex::new(&root);
        schema.extend(
            validate(&config, &index, &broken)
                .into_iter()
                .map(|finding| (finding.span, finding.message)),
        );
    }
    found.extend(schema);
    if found.is_empty() {
        return Ok(config);
    }
    found.sort_by_key(|(span, _)| span.start);
    Err(Diagnostics(
        found
            .into_iter()
            .map(|(span, message)| {
                let (line, column) = line_column(text, span.start);
                Diagnostic {
                    file: file.to_owned(),
                    line,
                    column,
                    message,
                }
            })
            .collect(),
    ))
}

/// The parser's errors, made readable: one per line (recovery tends to cascade), an unclosed
/// array or inline table reported where it was opened rather than at the end of the file, and
/// the region it swallowed kept quiet. The span of an unclosed value covers that region, which
/// `load_str` uses to silence later problems inside it.
fn syntax_problems(
    text: &str,
    root: &Spanned<DeTable<'_>>,
    errors: &[toml::de::Error],
) -> Vec<(Range<usize>, String)> {
    let mut containers = Vec::new();
    collect_containers(root.get_ref(), &mut containers);
    let mut problems: Vec<(Range<usize>, String)> = Vec::new();
    for error in errors {
        let span = error.span().unwrap_or(0..0);
        let raw = error.message().trim().replace('\n', "; ");
        if raw.starts_with("unclosed") {
            // The innermost array or inline table that runs to where the parser gave up.
            let opened = containers
                .iter()
                .filter(|container| container.end >= span.start && container.start < span.start)
                .max_by_key(|container| container.start);
            if let Some(opened) = opened {
                problems.push((
                    opened.start..span.end.max(opened.end),
                    format!("{raw}; it was opened here and never closed"),
                ));
                continue;
            }
        }
        let message = if raw == "duplicate key" {
            let key = text.get(span.clone()).unwrap_or_default();
            format!(
                "duplicate key \"{key}\": it is already defined above; each key and table can appear once"
            )
        } else if span.is_empty() && raw.starts_with("string values must be quoted") {
            "missing value after \"=\"".to_owned()
        } else {
            raw
        };
        problems.push((span, message));
    }
    problems.sort_by_key(|(span, _)| span.start);
    let mut kept: Vec<(Range<usize>, String)> = Vec::new();
    for (span, message) in problems {
        let line = line_column(text, span.start).0;
        let repeats_line = kept
            .iter()
            .any(|(k, _)| line_column(text, k.start).0 == line);
        let swallowed = kept
            .iter()
            .any(|(k, _)| k.len() > 1 && k.start < span.start && span.start < k.end);
        if !repeats_line && !swallowed {
            kept.push((span, message));
        }
    }
    kept
}

/// Spans of every array and inline table in the tree.
fn collect_containers(table: &DeTable<'_>, out: &mut Vec<Range<usize>>) {
    fn visit(value: &Spanned<DeValue<'_>>, out: &mut Vec<Range<usize>>) {
        match value.get_ref() {
            DeValue::Array(items) => {
                out.push(value.span());
                for item in items {
                    visit(item, out);
                }
            }
            DeValue::Table(table) => {
                out.push(value.span());
                collect_containers(table, out);
            }
            _ => {}
        }
    }
    for (_, value) in table.iter() {
        visit(value, out);
    }
}
