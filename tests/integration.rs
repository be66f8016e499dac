//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
mod util;
// [programs.NAME]: restarts, backoff and fatal, group stops, orphans, rlimits, max_rss.
mod programs;
