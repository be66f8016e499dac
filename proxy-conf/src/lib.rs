//! `proxy-conf` owns `sauna.toml`: its schema, loading with diagnostics that point at
//! `FILE:LINE:COL`, the checks that span several keys, and the renderers that turn the same
//! configuration into nginx, Redis, PostgreSQL and systemd files. It has no async runtime, so
//! `check` and `emit` run without starting one.

pub mod diagnostics;
pub mod emit;
pub mod load;
pub mod schema;
pub mod stack;
pub mod units;

pub use diagnostics::{Diagnostic, Diagnostics};
pub use load::{LoadError, Loaded, load_file, load_str};
pub use schema::*;
pub use units::{ByteSize, Duration};
