//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
mod beat; // beat next golden files; beat against real Redis and a real Celery worker
mod lifecycle;
mod util;
