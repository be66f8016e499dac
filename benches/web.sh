#!/usr/bin/env bash
# Side-by-side load benchmark of sauna-supervisor against Gunicorn (sync and gthread), uWSGI
# (--http-socket) and Granian (WSGI), same apps (benches/web_apps.py), same number of workers, load
# from wrk on loopback, one server after another. Prints req/s, p50, p99 and sauna's ratio.
#
#   benches/web.sh                 # everything (about 6 minutes)
#   DURATION=5s benches/web.sh     # shorter runs
#   SCENARIOS=stream SERVERS="sauna uwsgi" benches/web.sh   # a focused run
#
# Needs wrk (apt-get install -y wrk). Peers are pip-installed into benches/.venv.
# Scenarios (2 workers each):
#   hello    2 workers x 1 thread, keep-alive, wrk -c16 and -c64
#   stream   1 MiB streamed response, 2 x 1, wrk -c16 (reports MB/s)
#   mixed    2 workers x 8 threads, 90 % fast / 10 % 50 ms requests from 12 connections (within the
#            16 slots) and from 60 (saturated); the fast requests' latency is measured by a separate
#            4-connection wrk on / running alongside the mix
#            (wrk reports one latency distribution per run, not one per path).
# The supervisor's idle RSS is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/peers.sh
. benches/peers.sh
DURATION=${DURATION:-10s}
PYTHON=${PYTHON:-python3}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }

venv=benches/.venv
ensure_peers "$venv"
cargo build --release --bin sauna-supervisor >/dev/null
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cp benches/web_apps.py "$work/apps.py"
port=18400
python_bin=$(readlink -f "$venv/bin/python")

start_server() { # name app threads -> sets $pid and $url
  local name=$1 app=$2 threads=$3
  port=$((port + 1))
  case $name in
    sauna)
      cat > "$work/sauna.toml" <<TOML
[app]
directory = "$work"
python = "$python_bin"
wsgi = "apps:$app"
[web]
listen = ["127.0.0.1:$port"]
workers = 2
threads = $threads
access_log = false
[metrics]
listen = "127.0.0.1:$((port + 1000))"
[control]
socket = "$work/control.sock"
TOML
      target/release/sauna-supervisor run -c "$work/sauna.toml" >"$work/$name.log" 2>&1 &
      ;;
    gunicorn-sync)
      "$venv/bin/gunicorn" --chdir "$work" -w 2 -b "127.0.0.1:$port" "apps:$app" >"$work/$name.log" 2>&1 & ;;
    gunicorn-gthread)
      "$venv/bin/gunicorn" --chdir "$work" -w 2 -k gthread --threads "$threads" -b "127.0.0.1:$port" "apps:$app" >"$work/$name.log" 2>&1 & ;;
    uwsgi)
      "$venv/bin/uwsgi" --chdir "$work" --http-socket "127.0.0.1:$port" --master --die-on-term --processes 2 --threads "$threads" \
        --wsgi-file "$work/apps.py" --callable "$app" --disable-logging >"$work/$name.log" 2>&1 & ;;
    granian)
      (cd "$work" && exec "$(readlink -f "$OLDPWD/$venv/bin/granian")" --interface wsgi --workers 2 --blocking-threads "$threads" \
        --port "$port" --no-ws "apps:$app") >"$work/$name.log" 2>&1 & ;;
  esac
  pid=$!
  url="http://127.0.0.1:$port"
  wait_until_up 100
}

# wrk's summary as "req/s p50 p99 MB/s".
run_wrk() {
  local out
  out=$(wrk --latency "$@")
  awk '
    /Requests\/sec/ {rps=$2}
    /Transfer\/sec/ {t=$2; if (t ~ /GB/) {sub("GB","",t); t*=1024} else if (t ~ /MB/) {sub("MB","",t)} else if (t ~ /KB/) {sub("KB","",t); t/=1024}; mbs=t}
    $1=="50%" {p50=$2} $1=="99%" {p99=$2}
    END {printf "%s %s %s %s\n", rps, p50, p99, mbs}' <<<"$out"
}

results=$work/results
: >"$results"
record() { echo "$1|$2|$3" >>"$results"; echo "  $1 $2: $3" >&2; }

read -r -a servers <<<"${SERVERS:-sauna uwsgi granian gunicorn-sync gunicorn-gthread}"
scenarios=" ${SCENARIOS:-hello stream mixed} "
for server in "${servers[@]}"; do
  echo "== $server" >&2
  if [[ $scenarios == *" hello "* ]]; then
    start_server "$server" hello 1
    wrk -t2 -c16 -d2s "$url/" >/dev/null # warm-up
    record hello-c16 "$server" "$(run_wrk -t2 -c16 -d"$DURATION" "$url/")"
    record hello-c64 "$server" "$(run_wrk -t2 -c64 -d"$DURATION" "$url/")"
    stop_server
  fi
  if [[ $scenarios == *" stream "* ]]; then
    start_server "$server" stream 1
    wrk -t2 -c16 -d2s "$url/" >/dev/null # warm-up
    record stream-1MiB "$server" "$(run_wrk -t2 -c16 -d"$DURATION" "$url/")"
    stop_server
  fi
  if [[ $scenarios == *" mixed "* ]] && [ "$server" != gunicorn-sync ]; then
    start_server "$server" mixed 8
    # 12 + 4 connections fit the 16 slots; 60 + 4 saturate them, so fast requests queue behind slow.
    for mix in 12 60; do
      wrk -t1 -c"$mix" -d"$DURATION" -s benches/web_mix.lua "$url/" >/dev/null &
      load=$!
      sleep 1
      record "mixed-fast-c$((mix + 4))" "$server" "$(run_wrk -t1 -c4 -d"$(( ${DURATION%s} - 2 ))s" "$url/")"
      wait "$load" || true
    done
    stop_server
  fi
done

sauna_idle_rss() {
  start_server sauna hello 1
  sleep 1
  awk '/VmRSS/ {print $2/1024 " MiB"}' "/proc/$pid/status"
  stop_server
}
idle=$(sauna_idle_rss)

echo
printf '%-12s %-17s %10s %9s %9s %9s %8s\n' scenario server req/s p50 p99 MB/s "sauna÷"
while IFS='|' read -r scenario server values; do
  read -r rps p50 p99 mbs <<<"$values"
  base=$(awk -F'|' -v s="$scenario" '$1==s && $2=="sauna" {split($3,a," "); print a[1]}' "$results")
  ratio=$(awk -v a="$base" -v b="$rps" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}')
  printf '%-12s %-17s %10s %9s %9s %9s %8s\n' "$scenario" "$server" "$rps" "$p50" "$p99" "$mbs" "$ratio"
done < <(sort -t'|' -k1,1 -s "$results")
echo
echo "sauna-supervisor idle RSS (supervisor process only): $idle"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
