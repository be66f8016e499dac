//! `proxy-conf` owns `sauna.toml`: its schema, loading with diagnostics that point at
//! `FILE:LINE:COL`, the checks that span several keys, and the renderers that turn the same
//! configuration into nginx, Redis, PostgreSQL and systemd files. It has no async runtime, so
//! `check` and `emit` run without starting one.

mod de;
pub mod diagnostics;
pub mod emit;
pub mod listen;
pub mod load;
mod locate;
pub mod schema;
pub mod secrets;
pub mod stack;
pub mod units;
pub mod validate;

pub use diagnostics::{Diagnostic, Diagnostics};
pub use listen::Listen;
pub use load::{
    LoadError, Loaded, SYSTEMD_RUNTIME_DIRECTORY, control_socket, default_control_socket,
    load_file, load_file_with, load_str,
};
pub use schema::*;
pub use units::{ByteSize, Duration};
