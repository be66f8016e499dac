//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
mod lifecycle;
mod util;
// emit: generated nginx/redis/postgres/systemd files checked and run by the real servers.
mod emit;
