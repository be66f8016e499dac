//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
// Test code: a failed unwrap is a failed test with its location, which is what we want here.
#![allow(clippy::unwrap_used)]
// util: the harness (sandbox, the real binary behind a kill-on-drop guard, waiting on status).
mod util;
// lifecycle: one instance per socket, stale sockets, socket permissions, signals, sd_notify.
mod lifecycle;
// django: the README's "Deploy a Django app" walkthrough with a real project, PostgreSQL and nginx.
mod django;
// emit: generated nginx/redis/postgres/systemd files checked and run by the real servers.
mod emit;
// programs: restarts, backoff into fatal, group stops, orphans, rlimits, identity, max_rss.
mod programs;
// beat: `beat next` golden files; beat with real Redis and Celery, leader takeover, outages, partitions.
mod beat;
// beat_runtime: runtime jobs in Redis — CLI, Python helper, django-celery-beat import, minute-boundary changes.
mod beat_runtime;
// check: every config problem at once as FILE:LINE:COL (golden output), exit status.
mod check;
// access_log: every access line, text and JSON, written before a clean stop ends the process.
mod access_log;
// pool: the WSGI pool through real CPython workers (front, dispatch, lifecycle, frameworks).
mod pool;
// http: RFC 9112 edges through the real binary — Host, head size (431), chunk lines, short bodies.
mod http;
// metrics: the /metrics, /healthz and /readyz endpoint, promtool, Celery queue lengths, emit grafana.
mod metrics;
// reload: rolling web-pool reloads under load — release switches, broken releases rolled back.
mod reload;
// reload_programs: `reload` rolls programs new-first (an in-place deploy too), rolls back a dying one, loses no Celery task.
mod reload_programs;
// preload: [web] preload — workers forked from one template per generation (Flask, Django, Pyramid).
mod preload;
// hooks: [hooks] before_start/before_reload run in the release with the app's python and env; failures refuse.
mod hooks;
// secrets: passwords named once reach beat, Celery, the sampler and the app; never a log line.
mod secrets;
// status: status/stop/reload without a config find the default socket; units, last errors.
mod status;
// upgrade: `upgrade`/SIGUSR2 hand every socket to a new process under load; failing successors.
mod upgrade;
// fuzz_config: mutated sauna.toml files load or name every problem at FILE:LINE:COL, never panic.
mod fuzz_config;
// fuzz_frame: property tests of the worker frame decoder and the shared ring's offsets.
mod fuzz_frame;
// fuzz_framing: the front's chunked-framing check finds the same violation however reads split the bytes.
mod fuzz_framing;
// fuzz_http: generated raw HTTP/1.1 against the real front: a status line or a close, no hang, no worker replaced.
mod fuzz_http;
// fuzz_shim: the real shim.py reads generated frames under random read sizes and echoes them intact.
mod fuzz_shim;
// wheel: scripts/build-wheel.sh's wheel pip-installed into a fresh venv runs `--version` and `check`.
mod wheel;
