//! Reading `sauna.toml` into a typed [`Config`] with every problem reported at once, in file
//! order, as `FILE:LINE:COL: message`: syntax errors from the parser, then type and unknown-key
//! problems (`de`), then the checks of the values themselves, which also build the typed
//! configuration (`validate`). Also what the rest of the program needs to know about where the
//! file is: relative paths resolved against its directory, the default control socket next to
//! it, and [`Loaded::diagnostic_at`] for problems found later (a secret that cannot be read, an
//! app that does not import) that must still point at a line and column.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::config::Config;
use crate::de::deserialize_collecting;
use crate::diagnostics::{Diagnostic, Diagnostics, line_column};
use crate::locate::KeyIndex;
use crate::schema::RawConfig;
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
    /// The secrets the file names, once read and installed by [`crate::secrets::install`] (`run`,
    /// `reload`, `check`); empty after a plain load, which commands that only talk to the control
    /// socket use.
    pub secrets: crate::secrets::Secrets,
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
    match runtime_dir(runtime_directory) {
        Some(dir) => dir.join("control.sock"),
        None => config_dir.join(".sauna").join("control.sock"),
    }
}

/// The directory systemd's `RuntimeDirectory=` names in the unit `emit systemd` writes, under
/// `/run`: the control socket of a supervisor started by that unit is
/// `/run/sauna/control.sock`.
pub const SYSTEMD_RUNTIME_DIRECTORY: &str = "sauna";

/// Where `status`, `stop`, `reload` and `upgrade` look for the supervisor when no config file
/// names its socket: `$RUNTIME_DIRECTORY/control.sock` when the variable is set (the command
/// runs inside the supervisor's unit, as `ExecReload=` does), else `/run/sauna/control.sock`,
/// where a supervisor started by the unit `emit systemd` writes has its socket.
pub fn default_control_socket(runtime_directory: Option<&OsStr>) -> PathBuf {
    runtime_dir(runtime_directory)
        .unwrap_or_else(|| Path::new("/run").join(SYSTEMD_RUNTIME_DIRECTORY))
        .join("control.sock")
}

/// The first directory of `$RUNTIME_DIRECTORY` (systemd may list several, separated by `:`).
fn runtime_dir(runtime_directory: Option<&OsStr>) -> Option<PathBuf> {
    runtime_directory
        .and_then(|dirs| std::env::split_paths(dirs).next())
        .filter(|dir| !dir.as_os_str().is_empty())
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
    load_file_with(path, |_| Vec::new())
}

/// Like [`load_file`], and also runs `extra` checks that need more than the file (reading the
/// secrets it names), so that their problems are reported together with the file's own, in file
/// order. `extra` also runs when the file has other problems: it then sees the configuration
/// built from every value that passed (stand-ins in place of the broken ones), so it should only
/// judge values that are present. Build its diagnostics with [`Loaded::diagnostic_at`].
pub fn load_file_with(
    path: &Path,
    extra: impl FnOnce(&Loaded) -> Vec<Diagnostic>,
) -> Result<Loaded, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    let source = String::from_utf8(bytes)
        .map_err(|error| LoadError::Invalid(Diagnostics(vec![not_utf8(path, &error)])))?;
    let (mut config, mut diagnostics) = analyse(&source, &path.display().to_string());
    resolve_paths(&mut config, &config_dir(path));
    let loaded = Loaded {
        config,
        path: path.to_owned(),
        source,
        secrets: crate::secrets::Secrets::default(),
    };
    diagnostics.extend(extra(&loaded));
    if diagnostics.is_empty() {
        return Ok(loaded);
    }
    diagnostics.sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
    Err(LoadError::Invalid(Diagnostics(diagnostics)))
}

/// A file that is not UTF-8 (saved as Latin-1, a stray byte): the first bad byte's place, like
/// any other problem, rather than the OS's "stream did not contain valid UTF-8" with no place.
fn not_utf8(path: &Path, error: &std::string::FromUtf8Error) -> Diagnostic {
    let bytes = error.as_bytes();
    let at = error.utf8_error().valid_up_to();
    // Everything before the bad byte is valid text: the line and column are counted in it.
    let before = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
    let (line, column) = line_column(before, at);
    let byte = bytes.get(at).copied().unwrap_or_default();
    Diagnostic {
        file: path.display().to_string(),
        line,
        column,
        message: format!(
            "byte 0x{byte:02X} is not UTF-8; TOML files are UTF-8 text (convert the file, e.g. \
             with `iconv -f latin1 -t utf-8`)"
        ),
    }
}

/// Joins relative directories and files onto `base`. Never canonicalizes (see [`config_dir`]).
/// [`relative_paths`] lists the same keys.
fn resolve_paths(config: &mut Config, base: &Path) {
    let resolve = |path: &mut PathBuf| {
        if path.is_relative() {
            *path = base.join(&*path);
        }
    };
    if let Some(directory) = &mut config.app.directory {
        resolve(directory);
    }
    // `python3` is looked up on PATH; `venv/bin/python` is a path like the others.
    if config.app.python.contains('/') && Path::new(&config.app.python).is_relative() {
        config.app.python = base.join(&config.app.python).display().to_string();
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
    if let Some(file) = config
        .redis
        .as_mut()
        .and_then(|redis| redis.password_file.as_mut())
    {
        resolve(file);
    }
    if let Some(file) = config
        .postgres
        .as_mut()
        .and_then(|postgres| postgres.password_file.as_mut())
    {
        resolve(file);
    }
}

/// The paths [`resolve_paths`] joins onto the config file's directory, each with its key, in a
/// configuration read with [`load_str`] (which leaves them as written): what changes meaning when
/// the file is installed elsewhere. Keep in step with [`resolve_paths`].
pub fn relative_paths(config: &Config) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let mut check = |key: String, path: &Path| {
        if path.is_relative() {
            found.push((key, path.to_owned()));
        }
    };
    if let Some(directory) = &config.app.directory {
        check("[app].directory".to_owned(), directory);
    }
    if config.app.python.contains('/') {
        check("[app].python".to_owned(), Path::new(&config.app.python));
    }
    for (name, program) in &config.programs {
        if let Some(directory) = &program.directory {
            check(format!("[programs.{name}].directory"), directory);
        }
    }
    if let Some(socket) = &config.control.socket {
        check("[control].socket".to_owned(), socket);
    }
    if let Some(token_file) = &config.metrics.token_file {
        check("[metrics].token_file".to_owned(), token_file);
    }
    found
}

/// Parses and checks configuration text; `file` names it in diagnostics. Relative paths are
/// left as written (there is no file to resolve them against).
pub fn load_str(text: &str, file: &str) -> Result<Config, Diagnostics> {
    let (config, diagnostics) = analyse(text, file);
    if diagnostics.is_empty() {
        Ok(config)
    } else {
        Err(Diagnostics(diagnostics))
    }
}

/// The configuration built from every value that fitted (defaults in place of the others), and
/// every problem in file order.
fn analyse(text: &str, file: &str) -> (Config, Vec<Diagnostic>) {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    let mut found: Vec<(Range<usize>, String)> = syntax_problems(text, &root, &syntax_errors);

    let (raw, problems) = deserialize_collecting::<RawConfig>(&root);
    // After a syntax error the parser's recovery may have cut a value short or swallowed the
    // lines after it: stay quiet about what sits there, the syntax error is the news. A broken
    // `[table` header sends the keys under it to the wrong table, up to the next header.
    let damaged_regions: Vec<Range<usize>> = found
        .iter()
        .map(|(bad, _)| {
            // Byte-wise, so that a span that is not on a character boundary cannot panic.
            let bytes = text.as_bytes();
            let start = bad.start.min(bytes.len());
            let stop = bad.end.clamp(start, bytes.len());
            let line_start = bytes[..start]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let line_end = bytes[stop..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(bytes.len(), |i| stop + i);
            let in_header = starts_header(&bytes[line_start..]);
            let end = if in_header {
                next_header(text, line_end)
            } else {
                line_end.max(bad.end)
            };
            line_start..end
        })
        .collect();
    let damaged = |span: &Range<usize>| {
        damaged_regions
            .iter()
            .any(|region| region.start <= span.start && span.start <= region.end)
    };
    let mut schema: Vec<(Range<usize>, String)> = problems
        .iter()
        .map(|problem| (problem.span.clone().unwrap_or(0..0), problem.message()))
        .filter(|(span, _)| !damaged(span))
        .collect();
    // Checks on a tree the parser had to repair would report keys as missing that are only
    // unreadable, so they wait until the syntax is right; the typed configuration is built
    // either way, for `load_file_with`'s extra checks.
    let broken: BTreeSet<Vec<String>> = problems
        .iter()
        .filter_map(|problem| problem.path.clone())
        .collect();
    let (config, findings) = validate(&raw, &KeyIndex::new(&root), &broken);
    if syntax_errors.is_empty() {
        schema.extend(
            findings
                .into_iter()
                .map(|finding| (finding.span, finding.message)),
        );
    }
    found.extend(schema);
    found.sort_by_key(|(span, _)| span.start);
    let diagnostics = found
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
        .collect();
    (config, diagnostics)
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
        let opener = if raw.starts_with("unclosed array") {
            Some(b'[')
        } else if raw.starts_with("unclosed inline table") {
            Some(b'{')
        } else {
            None
        };
        if let Some(opener) = opener {
            // The outermost array or inline table that runs to where the parser gave up: what
            // it swallowed may look like closed arrays (`[beat.jobs.x]`), but the first opener
            // is the one left open.
            let opened = containers
                .iter()
                .filter(|container| {
                    container.end >= span.start
                        && container.start < span.start
                        && text.as_bytes().get(container.start) == Some(&opener)
                })
                .min_by_key(|container| container.start);
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

/// Offset of the first line after the one at `from` that starts a `[table]` header (the end of
/// the text if none does).
fn next_header(text: &str, from: usize) -> usize {
    let bytes = text.as_bytes();
    let mut offset = from.min(bytes.len());
    for line in bytes[offset..].split_inclusive(|&b| b == b'\n') {
        if offset > from && starts_header(line) {
            return offset;
        }
        offset += line.len();
    }
    bytes.len()
}

/// True when a line, after leading whitespace, opens a `[table]` header.
fn starts_header(line: &[u8]) -> bool {
    line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
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

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(text: &str) -> Vec<String> {
        load_str(text, "sauna.toml")
            .err()
            .map(|diagnostics| diagnostics.0.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_byte_that_is_not_utf8_is_reported_at_its_line_and_column() {
        let error = String::from_utf8(b"[app]\nwsgi = \"caf\xe9:app\"\n".to_vec()).unwrap_err();
        let diagnostic = not_utf8(Path::new("/etc/sauna.toml"), &error);
        let shown = diagnostic.to_string();
        assert!(
            shown.starts_with("/etc/sauna.toml:2:12: byte 0xE9 is not UTF-8"),
            "{shown}"
        );
    }

    #[test]
    fn an_empty_file_is_a_valid_configuration() {
        let config = load_str("", "sauna.toml").unwrap();
        assert_eq!(config, Config::default());
        assert!(config.web.is_none() && config.beat.is_none() && config.programs.is_empty());
    }

    #[test]
    fn relative_paths_are_listed_with_their_keys_and_absolute_ones_are_not() {
        let config = load_str(
            "[app]\ndirectory = \"app\"\npython = \"/srv/venv/bin/python\"\n\
             [programs.worker]\ncommand = [\"sleep\", \"60\"]\ndirectory = \"../jobs\"\n\
             [metrics]\ntoken_file = \"/etc/sauna/token\"\n",
            "sauna.toml",
        )
        .unwrap();
        assert_eq!(
            relative_paths(&config),
            [
                ("[app].directory".to_owned(), PathBuf::from("app")),
                (
                    "[programs.worker].directory".to_owned(),
                    PathBuf::from("../jobs")
                ),
            ]
        );
    }

    #[test]
    fn a_file_with_only_one_program_is_valid() {
        let config = load_str(
            "[programs.x]\ncommand = [\"sleep\", \"60\"]\n",
            "sauna.toml",
        )
        .unwrap();
        assert_eq!(config.programs["x"].command, ["sleep", "60"]);
        assert!(config.web.is_none());
    }

    #[test]
    fn a_file_with_only_beat_is_valid() {
        let config = load_str("[beat]\n", "sauna.toml").unwrap();
        assert_eq!(config.beat.unwrap().timezone, crate::Tz::UTC);
    }

    #[test]
    fn every_problem_is_reported_in_file_order() {
        let text = "\
[web]
workers = 0
timeout = \"30 secs\"

[programs.b]
command = [\"x\"]
restart = \"sometimes\"

[programs.a]
comand = [\"x\"]

[beat.jobs.nightly]
task = \"t\"
every = 5
";
        let found = messages(text);
        assert_eq!(found.len(), 6, "{found:#?}");
        assert!(found[0].starts_with("sauna.toml:1:1: web: the web pool needs an application"));
        assert!(found[1].starts_with("sauna.toml:2:11: web.workers: must be at least 1"));
        assert!(found[2].starts_with("sauna.toml:3:11: web.timeout: invalid duration \"30 secs\""));
        assert!(
            found[3]
                .starts_with("sauna.toml:7:11: programs.b.restart: unknown value \"sometimes\"")
        );
        assert!(found[4].starts_with(
            "sauna.toml:10:1: unknown key \"comand\" in [programs.a]; did you mean \"command\"?"
        ));
        assert_eq!(
            found[5],
            "sauna.toml:14:9: beat.jobs.nightly.every: a bare number is ambiguous here: write a unit, e.g. \"5s\""
        );
    }

    #[test]
    fn columns_count_characters_after_multibyte_text() {
        let text = "[app]\nenv = { CAFE = \"Café ☕\", N = 1 }\n";
        assert_eq!(
            messages(text),
            ["sauna.toml:2:30: app.env.N: expected a string, found the integer 1"]
        );
    }

    #[test]
    fn syntax_errors_are_reported_without_their_fallout() {
        let text = "[web]\nworkers =\nthreads = \"2\nlisten = [\"a:1\",\n[programs.x]\ncommand = [\"x\"]\n";
        assert_eq!(
            messages(text),
            [
                "sauna.toml:2:10: missing value after \"=\"",
                "sauna.toml:3:13: invalid basic string, expected `\"`",
                "sauna.toml:4:10: unclosed array, expected `]`; it was opened here and never closed",
            ]
        );
        assert_eq!(
            messages("[web\nworkers = \"2\"\nthreads = 0\n[programs.x]\ncommand = 5\n"),
            [
                "sauna.toml:1:5: unclosed table, expected `]`",
                "sauna.toml:5:11: programs.x.command: expected an array, found the integer 5",
            ]
        );
        assert_eq!(
            messages("[web]\n[web]\n"),
            [
                "sauna.toml:2:2: duplicate key \"web\": it is already defined above; each key and table can appear once"
            ]
        );
    }

    fn loaded(text: &str, path: &str) -> Loaded {
        Loaded {
            config: load_str(text, path).unwrap(),
            path: PathBuf::from(path),
            source: text.to_owned(),
            secrets: crate::secrets::Secrets::default(),
        }
    }

    #[test]
    fn later_checks_point_at_the_value_or_the_table_header() {
        let loaded = loaded(
            "# ☕\n[beat.jobs.nightly]\ntask = \"t\"\ncron = \"1 * * * *\"\n",
            "deploy/sauna.toml",
        );
        let at_value = loaded.diagnostic_at(&["beat", "jobs", "nightly", "cron"], "too often");
        assert_eq!(at_value.to_string(), "deploy/sauna.toml:4:8: too often");
        let at_header =
            loaded.diagnostic_at(&["beat", "jobs", "nightly", "queue"], "no such queue");
        assert_eq!(
            at_header.to_string(),
            "deploy/sauna.toml:2:1: no such queue"
        );
        let at_start = loaded.diagnostic_at(&["app", "wsgi"], "cannot import");
        assert_eq!(at_start.to_string(), "deploy/sauna.toml:1:1: cannot import");
    }

    #[test]
    fn the_control_socket_defaults_to_the_runtime_directory_then_next_to_the_file() {
        let mut config = Config::default();
        let dir = Path::new("/srv/app");
        assert_eq!(
            control_socket(&config, dir, None),
            Path::new("/srv/app/.sauna/control.sock")
        );
        assert_eq!(
            control_socket(&config, dir, Some(OsStr::new("/run/sauna:/run/other"))),
            Path::new("/run/sauna/control.sock")
        );
        config.control.socket = Some(PathBuf::from("/run/x.sock"));
        assert_eq!(
            control_socket(&config, dir, Some(OsStr::new("/run/sauna"))),
            Path::new("/run/x.sock")
        );
    }

    #[test]
    fn without_a_config_the_control_socket_is_the_runtime_directory_one_else_the_units() {
        assert_eq!(
            default_control_socket(None),
            Path::new("/run/sauna/control.sock")
        );
        assert_eq!(
            default_control_socket(Some(OsStr::new(""))),
            Path::new("/run/sauna/control.sock")
        );
        assert_eq!(
            default_control_socket(Some(OsStr::new("/run/app:/run/other"))),
            Path::new("/run/app/control.sock")
        );
    }

    #[test]
    fn relative_paths_are_joined_onto_the_file_directory_without_resolving_symlinks() {
        let temp = std::env::temp_dir().join(format!("proxy-conf-load-{}", std::process::id()));
        let release = temp.join("releases").join("1");
        std::fs::create_dir_all(&release).unwrap();
        let current = temp.join("current");
        let _ = std::fs::remove_file(&current);
        std::os::unix::fs::symlink(&release, &current).unwrap();
        let file = current.join("sauna.toml");
        std::fs::write(
            &file,
            "[app]\ndirectory = \"src\"\npython = \"venv/bin/python\"\n[programs.a]\ncommand = [\"x\"]\ndirectory = \"/abs\"\n[programs.b]\ncommand = [\"x\"]\ndirectory = \"../shared\"\n[control]\nsocket = \"run/c.sock\"\n",
        )
        .unwrap();
        let loaded = load_file(&file).unwrap();
        let config = &loaded.config;
        assert_eq!(
            config.app.directory.as_deref(),
            Some(current.join("src").as_path())
        );
        assert_eq!(
            config.programs["a"].directory.as_deref(),
            Some(Path::new("/abs"))
        );
        assert_eq!(
            config.programs["b"].directory.as_deref(),
            Some(current.join("../shared").as_path())
        );
        assert_eq!(loaded.control_socket(), current.join("run/c.sock"));
        assert_eq!(loaded.config_dir(), current);
        std::fs::remove_dir_all(&temp).unwrap();
    }

    #[test]
    fn checks_from_outside_are_merged_in_file_order() {
        let temp = std::env::temp_dir().join(format!("proxy-conf-extra-{}", std::process::id()));
        std::fs::create_dir_all(&temp).unwrap();
        let file = temp.join("sauna.toml");
        std::fs::write(
            &file,
            "[web]\nworkers = 0\n[beat.jobs.a]\ntask = \"t\"\ncron = \"0 * * * *\"\n[metrics]\nlisten = 5\n",
        )
        .unwrap();
        let error = load_file_with(&file, |loaded| {
            assert!(
                loaded.config.beat.is_some(),
                "extra checks see the partial config"
            );
            vec![loaded.diagnostic_at(&["beat", "jobs", "a", "task"], "no such Celery task")]
        })
        .unwrap_err();
        let LoadError::Invalid(diagnostics) = error else {
            panic!("expected diagnostics");
        };
        let lines: Vec<(usize, usize)> = diagnostics.0.iter().map(|d| (d.line, d.column)).collect();
        assert_eq!(lines, [(1, 1), (2, 11), (4, 8), (7, 10)], "{diagnostics}");
        assert_eq!(diagnostics.0[2].message, "no such Celery task");
        let ok = load_file_with(&file, |_| Vec::new());
        assert!(ok.is_err(), "the file's own problems remain");
        std::fs::remove_dir_all(&temp).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let error = load_file(Path::new("/nonexistent/sauna.toml")).unwrap_err();
        assert!(matches!(error, LoadError::Io { .. }));
        assert!(
            error
                .to_string()
                .starts_with("cannot read /nonexistent/sauna.toml: ")
        );
    }
}
