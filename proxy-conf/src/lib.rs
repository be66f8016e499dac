//! `proxy-conf` owns `sauna.toml`: its schema, loading with diagnostics that point at
//! `FILE:LINE:COL`, every check of its values, and the renderers that turn the same
//! configuration into nginx, Redis, PostgreSQL and systemd files. It has no async runtime, so
//! `check` and `emit` run without starting one.
//!
//! The file is read in two steps, as ripgrep reads its flags: serde fills the raw `schema`
//! structs with what is written, then `validate` judges them and builds the typed [`Config`]
//! (addresses, time zones, cron specs, signals, non-zero counts). Only the typed configuration
//! leaves the crate, so the runtime never parses a string from the file again.

pub mod config;
pub mod cron;
mod de;
pub mod diagnostics;
pub mod emit;
pub mod forwarded;
pub mod listen;
pub mod load;
mod locate;
mod schema;
pub mod secrets;
pub mod signal;
pub mod stack;
pub mod units;
mod validate;
pub mod warm_up;

pub use config::{
    AppConfig, AppTarget, BeatConfig, Config, JobConfig, JobSchedule, MAX_HEADER_SIZE,
    MIN_HEADER_SIZE, MetricsConfig, ProgramConfig, Tz, WebConfig, parse_time_zone,
};
pub use cron::{Cron, CronSpec, DayRule};
pub use diagnostics::{Diagnostic, Diagnostics};
pub use forwarded::{Forwarders, TrustedPeer};
pub use listen::Listen;
pub use load::{
    LoadError, Loaded, SYSTEMD_RUNTIME_DIRECTORY, control_socket, default_control_socket,
    load_file, load_file_with, load_str,
};
pub use schema::{CatchUp, ControlConfig, ProgramReload, RestartPolicy, Rlimits};
pub use signal::StopSignal;
pub use units::{ByteSize, Duration};
pub use warm_up::WarmUp;
