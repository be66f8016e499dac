#!/usr/bin/env bash
# Sets up and runs the example stack in the foreground: a WSGI app on http://127.0.0.1:8000,
# Redis and a Celery worker as supervised programs, beat publishing two jobs, and metrics on
# http://127.0.0.1:9808/metrics. Ctrl-C stops everything gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bin sauna-supervisor
exec target/release/sauna-supervisor run -c examples/quickstart/sauna.toml "$@"
