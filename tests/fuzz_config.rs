//! Property tests of `sauna.toml` loading (`proxy_conf::load_str`, and the file loader the
//! commands use): the real example files mutated — random bytes inserted, lines dropped or
//! repeated, known keys given random values, whole values of the wrong type — never panic, and
//! every problem is reported at a `FILE:LINE:COL` that exists in the text. Case counts:
//! `util::fuzz::config`; long runs: `benches/fuzz.sh`.

use proptest::prelude::*;
use proxy_conf::Diagnostics;

use crate::util::{Sandbox, fuzz};

/// The files mutated: small ones whose every line matters (first, so that a failure shrinks
/// towards them), the golden file `check` is tested with, the quickstart and the reference with
/// every key the supervisor knows.
const SEEDS: &[&str] = &[
    "[app]\nwsgi = \"app:application\"\n\n[web]\nlisten = [\"127.0.0.1:8000\", \"unix:/tmp/s.sock\"]\nworkers = 2\ntimeout = \"30s\"\nmax_body = \"1MiB\"\n",
    "[beat]\nbroker = \"redis://127.0.0.1:6379/0\"\ntimezone = \"Europe/Helsinki\"\n\n[beat.jobs.nightly]\ntask = \"app.tasks.nightly\"\ncron = \"30 2 * * *\"\ncatch_up = \"once\"\nargs = [1, \"two\"]\n",
    "[programs.worker]\ncommand = [\"python\", \"-m\", \"celery\", \"worker\"]\ninstances = 2\nstop_signal = \"QUIT\"\nrestart = \"always\"\n[programs.worker.rlimits]\nnofile = 4096\n",
    include_str!("golden/all.toml"),
    include_str!("../examples/quickstart/sauna.toml"),
    include_str!("../examples/sauna.toml"),
];

/// Values that each break some key in its own way: wrong types, out-of-range numbers, units
/// that do not exist, addresses and cron specs that do not parse, odd characters.
const VALUES: &[&str] = &[
    "\"\"",
    "0",
    "-1",
    "18446744073709551616",
    "1e400",
    "nan",
    "true",
    "[]",
    "{}",
    "[1, \"a\"]",
    "{ a = 1 }",
    "\"0\"",
    "\"1h30x\"",
    "\"-5s\"",
    "\"99999999999999999999d\"",
    "\"512XiB\"",
    "\"18446744073709551616B\"",
    "\"*/0 * * * *\"",
    "\"61 25 32 13 8\"",
    "\"@every 0s\"",
    "\"unix:\"",
    "\"[::1]:99999\"",
    "\"example.com:80\"",
    "\"Mars/Olympus\"",
    "\"SIGNOPE\"",
    "\"caf\u{e9} \u{1f600}\"",
    "\"\\u0000\"",
    "\"a\\nb\"",
    "'''\nmulti\nline'''",
    "1979-05-27T07:32:00Z",
    "\"\u{202e}evil\"",
];

/// One change to a configuration text.
#[derive(Debug, Clone)]
enum Edit {
    /// Inserts arbitrary characters at a position (a character boundary at or after it).
    Insert(usize, String),
    /// Drops line `index`.
    DropLine(usize),
    /// Repeats line `index` after itself (a duplicated key or table).
    RepeatLine(usize),
    /// Gives the `key = value` line `index` (among such lines) a value from [`VALUES`].
    Value(usize, usize),
    /// Gives it arbitrary text as its value.
    RawValue(usize, String),
    /// Cuts the text at a position.
    Truncate(usize),
}

fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

fn apply(text: &str, edit: &Edit) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let join = |lines: Vec<&str>| lines.concat();
    match edit {
        Edit::Insert(at, inserted) => {
            let at = boundary(text, *at);
            format!("{}{inserted}{}", &text[..at], &text[at..])
        }
        Edit::Truncate(at) => text[..boundary(text, *at)].to_owned(),
        Edit::DropLine(index) if !lines.is_empty() => {
            let mut lines = lines;
            let index = index % lines.len();
            lines.remove(index);
            join(lines)
        }
        Edit::RepeatLine(index) if !lines.is_empty() => {
            let mut lines = lines;
            let index = index % lines.len();
            let line = lines[index];
            lines.insert(index, line);
            join(lines)
        }
        Edit::Value(index, value) => set_value(&lines, *index, VALUES[value % VALUES.len()]),
        Edit::RawValue(index, value) => set_value(&lines, *index, value),
        _ => text.to_owned(),
    }
}

/// Replaces the value of the `index`-th `key = value` line (commented-out keys included, which
/// uncomments them: the reference file lists every default that way).
fn set_value(lines: &[&str], index: usize, value: &str) -> String {
    let assignments: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.trim_start().trim_start_matches('#').trim_start();
            line.split_once('=').is_some_and(|(key, _)| {
                let key = key.trim();
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.\"".contains(c))
            })
        })
        .map(|(index, _)| index)
        .collect();
    let mut out: Vec<String> = lines.iter().map(|line| (*line).to_owned()).collect();
    if let Some(&line) = assignments.get(index % assignments.len().max(1)) {
        let uncommented = out[line].trim_start().trim_start_matches('#').trim_start();
        if let Some((key, _)) = uncommented.split_once('=') {
            out[line] = format!("{} = {value}\n", key.trim());
        }
    }
    out.concat()
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<usize>(), any::<String>()).prop_map(|(at, text)| Edit::Insert(at, text)),
        2 => (any::<usize>(), prop::sample::select(&["[", "]", "\"", "'", "=", "\n", "#", "[[", "{", ",", "\\", "\r", "\t", "\u{0}", "\u{feff}"][..]))
            .prop_map(|(at, text)| Edit::Insert(at, text.to_owned())),
        1 => any::<usize>().prop_map(Edit::DropLine),
        1 => any::<usize>().prop_map(Edit::RepeatLine),
        4 => (any::<usize>(), any::<usize>()).prop_map(|(line, value)| Edit::Value(line, value)),
        1 => (any::<usize>(), any::<String>()).prop_map(|(line, value)| Edit::RawValue(line, value)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn mutated_config() -> impl Strategy<Value = String> {
    (
        prop::sample::select(SEEDS),
        prop::collection::vec(edit(), 1..5),
    )
        .prop_map(|(seed, edits)| {
            edits
                .iter()
                .fold(seed.to_owned(), |text, edit| apply(&text, edit))
        })
}

/// Every diagnostic names `file` and a line and column inside `text`, and says something.
fn check_diagnostics(
    text: &str,
    file: &str,
    diagnostics: &Diagnostics,
) -> Result<(), TestCaseError> {
    prop_assert!(
        !diagnostics.0.is_empty(),
        "an error without a problem in it"
    );
    let lines: Vec<&str> = text.split('\n').collect();
    for diagnostic in &diagnostics.0 {
        prop_assert_eq!(&diagnostic.file, file);
        prop_assert!(
            diagnostic.line >= 1 && diagnostic.line <= lines.len(),
            "{diagnostic} is past the last line"
        );
        let columns = lines[diagnostic.line - 1].chars().count() + 1;
        prop_assert!(
            diagnostic.column >= 1 && diagnostic.column <= columns,
            "{diagnostic} is past the end of its line"
        );
        prop_assert!(
            !diagnostic.message.trim().is_empty(),
            "{diagnostic} says nothing"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    /// Mutated configuration text: loads, or fails with problems at real places. Never panics.
    #[test]
    fn mutated_configs_load_or_name_every_problem_at_file_line_col(text in mutated_config()) {
        if let Err(diagnostics) = proxy_conf::load_str(&text, "sauna.toml") {
            check_diagnostics(&text, "sauna.toml", &diagnostics)?;
        }
    }

    /// The same through a file, as `run` and `check` read it, with arbitrary bytes spliced in
    /// (not always UTF-8): still a place for every problem, an invalid byte included.
    #[test]
    fn config_files_with_arbitrary_bytes_name_every_problem_at_file_line_col(
        text in mutated_config(),
        at in any::<usize>(),
        inserted in prop::collection::vec(any::<u8>(), 0..6),
    ) {
        let mut bytes = text.into_bytes();
        let at = at % (bytes.len() + 1);
        bytes.splice(at..at, inserted);
        let sandbox = Sandbox::new();
        let path = sandbox.path("sauna.toml");
        std::fs::write(&path, &bytes).unwrap();
        match sauna_supervisor::config::load_path(&path) {
            Ok(_) => {}
            Err(sauna_supervisor::config::ConfigError::Invalid(diagnostics, _)) => {
                let shown = String::from_utf8_lossy(&bytes);
                check_diagnostics(&shown, &path.display().to_string(), &diagnostics)?;
            }
            Err(other) => prop_assert!(false, "not a located problem: {other}"),
        }
    }
}
