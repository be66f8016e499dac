#!/usr/bin/env bash
# Did a change make the request path slower? Runs two sauna-supervisor binaries (say, a release
# build of main before the change and one after) on hello world, 2 workers x 1 thread, keep-alive,
# wrk at -c16 and -c64, alternating old/new over ROUNDS rounds, and prints each round, the medians,
# new/old ratios and the load average before and after (measure on a quiet machine).
#
#   git worktree add /tmp/old REV && (cd /tmp/old && cargo build --release)
#   cargo build --release
#   benches/compare-builds.sh /tmp/old/target/release/sauna-supervisor target/release/sauna-supervisor
#   ACCESS_LOG=json benches/compare-builds.sh OLD NEW   # both with the access log on (text or json),
#                                                       # written to a file
#
# Needs wrk, curl and bc (apt-get install -y wrk curl bc) and the venv scripts/setup.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/peers.sh
. benches/peers.sh
[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
for tool in wrk curl bc; do
  command -v $tool >/dev/null || { echo "$tool is missing: apt-get install -y $tool" >&2; exit 2; }
done
old=$(readlink -f "$1") new=$(readlink -f "$2") rounds=${ROUNDS:-5} dur=${DURATION:-5s}
access_log=false log_format=text
case ${ACCESS_LOG:-} in
  "") ;;
  text | json) access_log=true log_format=$ACCESS_LOG ;;
  *) echo "ACCESS_LOG must be text or json" >&2; exit 2 ;;
esac
work=$(mktemp -d); cp benches/web_apps.py "$work/apps.py"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18700
run_one() { # binary conns -> req/s
  local bin=$1 c=$2
  start_sauna_hello "$bin" "$access_log" "$log_format"
  wrk -t2 -c"$c" -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1
  local rps; rps=$(wrk -t2 -c"$c" -d"$dur" "http://127.0.0.1:$port/" | awk '/Requests\/sec/ {print $2}')
  kill -TERM $pid; wait $pid 2>/dev/null || true
  rm -f "$work/$name.log" # with the access log on, tens of MB per run
  echo "$rps"
}
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
for c in 16 64; do
  o=(); n=()
  for r in $(seq "$rounds"); do
    o+=("$(run_one "$old" $c)"); n+=("$(run_one "$new" $c)")
    echo "c$c round $r: old ${o[-1]} new ${n[-1]}"
  done
  mo=$(printf '%s\n' "${o[@]}" | sort -n | sed -n "$(( (rounds+1)/2 ))p")
  mn=$(printf '%s\n' "${n[@]}" | sort -n | sed -n "$(( (rounds+1)/2 ))p")
  echo "c$c median: old $mo new $mn ratio $(echo "scale=3; $mn/$mo" | bc)"
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
