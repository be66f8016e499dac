//! Problems found in a configuration file, each pinned to `FILE:LINE:COL`, and how they print.

use std::fmt;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as the user named it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong and what is expected instead.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem of one file, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, diagnostic) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

/// Turns a byte offset into a 1-based line and character column.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The candidate closest to a misspelt `word`, if one is close enough to be what was meant
/// (an edit distance of at most a third of the longer word, and at least one edit allowed).
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word_lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            (
                edit_distance(&word_lower, &candidate.to_lowercase()),
                candidate,
            )
        })
        .filter(|(distance, candidate)| {
            let longest = word.chars().count().max(candidate.chars().count());
            *distance <= (longest / 3).max(1)
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Edit distance in characters, counting a swap of two neighbours as one edit ("wrokers").
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j]: distance between the first i characters of a and the first j of b.
    let mut rows = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "# é€😀\nkey = \"ü\" x";
        let offset = text.find('x').unwrap();
        assert_eq!(line_column(text, offset), (2, 11));
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, text.find('😀').unwrap() + 4), (1, 6));
    }

    #[test]
    fn suggestions_are_close_or_absent() {
        let keys = ["listen", "workers", "threads", "timeout"];
        assert_eq!(did_you_mean("wrokers", keys), Some("workers"));
        assert_eq!(did_you_mean("Workers", keys), Some("workers"));
        assert_eq!(did_you_mean("thread", keys), Some("threads"));
        assert_eq!(did_you_mean("zzz", keys), None);
        assert_eq!(did_you_mean("port", keys), None);
        assert_eq!(did_you_mean("TREM", ["TERM", "INT"]), Some("TERM"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn diagnostics_print_one_per_line() {
        let diagnostics = Diagnostics(vec![
            Diagnostic {
                file: "sauna.toml".to_owned(),
                line: 3,
                column: 11,
                message: "a".to_owned(),
            },
            Diagnostic {
                file: "sauna.toml".to_owned(),
                line: 4,
                column: 1,
                message: "b".to_owned(),
            },
        ]);
        assert_eq!(
            diagnostics.to_string(),
            "sauna.toml:3:11: a\nsauna.toml:4:1: b"
        );
    }
}
