//! Reading `sauna.toml` from disk into a [`Config`], with every problem reported as a diagnostic.

use std::path::{Path, PathBuf};

use crate::diagnostics::{Diagnostic, Diagnostics, line_column};
use crate::schema::Config;

/// A configuration together with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The parsed and checked configuration.
    pub config: Config,
    /// The file it was read from.
    pub path: PathBuf,
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

/// Reads and checks the file at `path`.
pub fn load_file(path: &Path) -> Result<Loaded, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    let config = load_str(&text, &path.display().to_string()).map_err(LoadError::Invalid)?;
    Ok(Loaded {
        config,
        path: path.to_owned(),
    })
}

/// Parses and checks configuration text; `file` names it in diagnostics.
pub fn load_str(text: &str, file: &str) -> Result<Config, Diagnostics> {
    toml::from_str::<Config>(text).map_err(|error| {
        let (line, column) = error
            .span()
            .map_or((1, 1), |span| line_column(text, span.start));
        Diagnostics(vec![Diagnostic {
            file: file.to_owned(),
            line,
            column,
            message: error.message().trim().to_owned(),
        }])
    })
}
