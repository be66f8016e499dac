//! sauna-supervisor runs a Python web application's whole process tree from one `sauna.toml`.
//!
//! Vocabulary, used the same way in every module, log line and status field:
//! - **program**: a supervised command from `[programs.NAME]` (a Celery worker, say); it may run
//!   as several *instances*.
//! - **worker**: one Python process of the web pool, running the WSGI app through the shim.
//! - **pool**: the set of workers behind the HTTP front, with its dispatch queue.
//! - **generation**: the configuration epoch a worker or program instance was started under;
//!   every reload starts a new one.
//! - **job**: one beat schedule entry from `[beat.jobs.NAME]`.
//! - **Celery task**: the message a job publishes to the broker.
//!
//! Data flows one way: config → supervisor state (the main loop) → pool, programs, beat → metrics.

pub mod beat;
pub mod broker;
pub mod cli;
pub mod config;
pub mod control;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod programs;
pub mod supervisor;
#[cfg(test)]
mod test_support;
pub mod web;
