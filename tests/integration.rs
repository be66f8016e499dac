//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
mod util;
