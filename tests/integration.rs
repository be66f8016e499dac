//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
mod pool;
mod util; // the WSGI pool: front, dispatch, workers, lifecycle
