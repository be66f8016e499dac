//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
// Test code: a failed unwrap is a failed test with its location, which is what we want here.
#![allow(clippy::unwrap_used)]
mod lifecycle;
mod util;
// emit: generated nginx/redis/postgres/systemd files checked and run by the real servers.
mod emit;
