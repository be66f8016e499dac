//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
mod beat;
mod util; // beat next golden files; beat against real Redis and a real Celery worker
