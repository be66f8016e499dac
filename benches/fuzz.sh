#!/usr/bin/env bash
# The suite's property tests (tests/fuzz_*.rs: sauna.toml loading, the worker frame decoder and the
# shared ring, the shim's frame reader, raw HTTP/1.1 against the real front) run for a long time:
# round after round, each with CASES cases per test and fresh random inputs, until DURATION has
# passed. Stops at the first failure and prints proptest's minimal failing input; a round that
# runs past the deadline by GRACE is reported as a hang.
#
#   benches/fuzz.sh                      # an hour, every fuzz_ test
#   DURATION=10m benches/fuzz.sh fuzz_http
#   CASES=20000 DURATION=8h benches/fuzz.sh fuzz_frame fuzz_config
#
# The arguments filter test names as `cargo test` does (default: fuzz_). Needs the venv
# scripts/setup.sh makes (or SAUNA_TEST_PYTHON). A failure's full output stays in the printed log.
set -euo pipefail
cd "$(dirname "$0")/.."
filters=("${@:-fuzz_}")
duration=${DURATION:-1h} cases=${CASES:-3000} grace=${GRACE:-600}
seconds() { # 90, 90s, 30m, 8h -> seconds
  case $1 in
    *h) echo $(( ${1%h} * 3600 )) ;; *m) echo $(( ${1%m} * 60 )) ;;
    *s) echo "${1%s}" ;; *) echo "$1" ;;
  esac
}
total=$(seconds "$duration")
export SAUNA_TEST_PYTHON=${SAUNA_TEST_PYTHON:-$PWD/.venv/bin/python} RUST_BACKTRACE=0
[ -x "$SAUNA_TEST_PYTHON" ] || { echo "no Python at $SAUNA_TEST_PYTHON: run scripts/setup.sh or set SAUNA_TEST_PYTHON" >&2; exit 2; }
cargo test --test integration --no-run
logs=$(mktemp -d)
deadline=$((SECONDS + total)) round=0
echo "fuzzing ${filters[*]} for ${total}s, $cases cases per test and round; logs in $logs"
while (( SECONDS < deadline )); do
  round=$((round + 1)) log="$logs/round-$round.log" started=$SECONDS
  if PROPTEST_CASES=$cases timeout --signal=KILL $((deadline - SECONDS + grace)) \
      cargo test -q --test integration -- "${filters[@]}" >"$log" 2>&1; then
    echo "round $round: $(grep -h '^test result' "$log" | tail -1) ($((SECONDS - started))s)"
    rm -f "$log"
    continue
  else
    status=$?
  fi
  echo "round $round FAILED (exit $status after $((SECONDS - started))s); full output: $log"
  if [ "$status" -eq 137 ]; then
    echo "the round did not finish ${grace}s after the deadline: a hang (see the log for the test still running)"
  fi
  # proptest's verdict: the failure and the minimal input it shrank to.
  awk '/Test failed:/ {show = 1} show {print} /^\tsuccesses:|^supervisor log/ {show = 0}' "$log" | head -300
  grep -h -E '^    fuzz_' "$log" | sort -u || true
  exit 1
done
echo "no failure in $round rounds"
