#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need (scripts/setup.sh), then
# checks formatting and lints and runs every unit and integration test against real CPython,
# Redis, Celery, nginx and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export SAUNA_TEST_PYTHON="$PWD/.venv/bin/python"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"
