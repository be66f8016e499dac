#!/usr/bin/env bash
# Where does a request's CPU go, in counts that a noisy machine does not move much: voluntary
# context switches per request of the supervisor and of each worker (read from
# /proc/PID/task/*/status before and after a wrk run), and CPU microseconds per request of the
# whole tree (utime+stime of the supervisor and its workers). Hello world, 2 workers x 1 thread,
# keep-alive, like compare-builds.sh; each binary is measured ROUNDS times, alternating. A
# request is served by one worker, so the workers' switches are summed: switches per request
# served.
#
#   benches/wakeups.sh OLD_BINARY NEW_BINARY      # CONNS=16 ROUNDS=3 DURATION=5s by default
#
# Needs wrk and curl (apt-get install -y wrk curl) and the venv scripts/setup.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/peers.sh
. benches/peers.sh
[ $# -ge 1 ] || { echo "usage: $0 BINARY [BINARY...]" >&2; exit 2; }
for tool in wrk curl; do
  command -v $tool >/dev/null || { echo "$tool is missing: apt-get install -y $tool" >&2; exit 2; }
done
rounds=${ROUNDS:-3} dur=${DURATION:-5s} conns=${CONNS:-16}
work=$(mktemp -d); cp benches/web_apps.py "$work/apps.py"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
ticks=$(getconf CLK_TCK)
port=18800

switches() { # pid -> voluntary context switches of all its threads
  cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s + 0}'
}
cpu() { # pids... -> utime+stime ticks
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' /proc/"$pid"/stat)))
  done
  echo $total
}

run_one() { # binary -> "req sup_switches worker_switches cpu_us" per request
  start_sauna_hello "$1"
  wrk -t2 -c"$conns" -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1
  local workers; workers=$(pgrep -P "$pid" -f sauna-shim | tr '\n' ' ')
  [ -n "$workers" ] || workers=$(pgrep -P "$pid" | tr '\n' ' ')
  local s0 w0=0 c0 w
  s0=$(switches "$pid"); for w in $workers; do w0=$((w0 + $(switches "$w"))); done
  # shellcheck disable=SC2086
  c0=$(cpu "$pid" $workers)
  local requests
  requests=$(wrk -t2 -c"$conns" -d"$dur" "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
  local s1 w1=0 c1
  s1=$(switches "$pid"); for w in $workers; do w1=$((w1 + $(switches "$w"))); done
  # shellcheck disable=SC2086
  c1=$(cpu "$pid" $workers)
  kill -TERM $pid; wait $pid 2>/dev/null || true
  echo "$requests $(echo "scale=3; ($s1 - $s0) / $requests" | bc) \
$(echo "scale=3; ($w1 - $w0) / $requests" | bc) \
$(echo "scale=1; ($c1 - $c0) * 1000000 / $ticks / $requests" | bc)"
}

echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "binary  round  requests  supervisor_switches/req  worker_switches/req  tree_cpu_us/req"
for round in $(seq "$rounds"); do
  for bin in "$@"; do
    echo "$(basename "$bin")  $round  $(run_one "$(readlink -f "$bin")")"
  done
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
