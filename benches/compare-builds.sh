#!/usr/bin/env bash
# Did a change make the request path slower? Runs two sauna-supervisor binaries (say, a release
# build of main before the change and one after) on hello world, 2 workers x 1 thread, keep-alive,
# wrk at -c16 and -c64, alternating old/new over ROUNDS rounds, and prints each round, the medians,
# new/old ratios and the load average before and after (measure on a quiet machine). Beside req/s
# it gives the CPU time of each server's process tree per request, which varies less between
# rounds on a shared host than req/s does.
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
hz=$(getconf CLK_TCK)
run_one() { # binary conns -> "req/s CPU-µs-per-request"
  local bin=$1 c=$2 before after out
  start_sauna_hello "$bin" "$access_log" "$log_format"
  wrk -t2 -c"$c" -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1
  before=$(tree_cpu_ticks "$pid")
  out=$(wrk -t2 -c"$c" -d"$dur" "http://127.0.0.1:$port/")
  after=$(tree_cpu_ticks "$pid")
  kill -TERM $pid; wait $pid 2>/dev/null || true
  rm -f "$work/$name.log" # with the access log on, tens of MB per run
  awk -v ticks=$((after - before)) -v hz="$hz" '
    / requests in / {requests=$1} /Requests\/sec/ {rps=$2}
    END {printf "%s %.1f\n", rps, ticks * 1e6 / hz / requests}' <<<"$out"
}
median() { sort -n | sed -n "$(( (rounds+1)/2 ))p"; }
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
for c in 16 64; do
  o=(); n=()
  for r in $(seq "$rounds"); do
    o+=("$(run_one "$old" $c)"); n+=("$(run_one "$new" $c)")
    echo "c$c round $r: old ${o[-1]% *} req/s ${o[-1]#* } µs/req, new ${n[-1]% *} req/s ${n[-1]#* } µs/req"
  done
  mo=$(printf '%s\n' "${o[@]% *}" | median) mn=$(printf '%s\n' "${n[@]% *}" | median)
  co=$(printf '%s\n' "${o[@]#* }" | median) cn=$(printf '%s\n' "${n[@]#* }" | median)
  echo "c$c median: old $mo new $mn req/s, ratio $(echo "scale=3; $mn/$mo" | bc);" \
    "CPU old $co new $cn µs/req, ratio $(echo "scale=3; $cn/$co" | bc)"
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
