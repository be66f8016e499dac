//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
mod util;
mod pool; // the WSGI pool: front, dispatch, workers, lifecycle
