#!/usr/bin/env bash
# Side-by-side load benchmark of sauna-supervisor against Gunicorn (sync and gthread), uWSGI
# (--http-socket) and Granian (WSGI), same apps (benches/web_apps.py and the Django project in
# benches/django_app), same number of workers, load from wrk on loopback, one server after
# another. Prints req/s, p50, p99, the CPU time each server's whole process tree spent per request
# (µs, from /proc: every process and thread, children it reaped included) and sauna's ratio; with
# ROUNDS > 1 the servers take turns round after round and the table shows medians. The load
# average is printed before and after: on a busy machine, trust CPU µs/req over req/s.
#
#   benches/web.sh                 # everything (about 9 minutes)
#   DURATION=5s benches/web.sh     # shorter runs
#   SCENARIOS=stream SERVERS="sauna uwsgi" benches/web.sh   # a focused run
#   ROUNDS=3 DURATION=5s SCENARIOS=hello SERVERS="sauna sauna-log-text sauna-log-json granian" \
#     benches/web.sh               # interleaved rounds, medians: what the access log costs
#
# Needs wrk (apt-get install -y wrk). Peers are pip-installed into benches/.venv.
# Servers: sauna (access_log = false), sauna-log-text and sauna-log-json (access_log = true, the
# log in text or --log-format json, written to a file; hello only), uwsgi, granian, gunicorn-sync,
# gunicorn-gthread.
# Scenarios:
#   hello    2 workers x 1 thread, keep-alive, wrk -c16 and -c64
#   stream   1 MiB streamed response, 2 x 1, wrk -c16 (reports MB/s)
#   mixed    2 workers x 8 threads, 90 % fast / 10 % 50 ms requests from 12 connections (within the
#            16 slots) and from 60 (saturated); the fast requests' latency is measured by a separate
#            4-connection wrk on / running alongside the mix
#            (wrk reports one latency distribution per run, not one per path).
#   django   a Django view that runs one ORM query on a SQLite file (20 rows) and renders them
#            through a template (about 2 KiB of HTML); DEBUG off, persistent database
#            connections, no session/auth middleware. 4 workers x 1 thread (sauna workers = 4,
#            uWSGI --processes 4, Granian --workers 4 --blocking-threads 1, Gunicorn sync -w 4),
#            keep-alive, wrk -c16 and -c64. The database is created (migrate + rows) in the run's
#            temp dir before any server starts. Gunicorn gthread sits it out: with one thread it
#            is the sync worker plus a thread hand-off.
# The supervisor's idle RSS is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/peers.sh
. benches/peers.sh
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-1}
PYTHON=${PYTHON:-python3}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }

venv=benches/.venv
ensure_peers "$venv"
cargo build --release --bin sauna-supervisor >/dev/null
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cp benches/web_apps.py "$work/apps.py"
cp -r benches/django_app "$work/django_app"
port=18400
# Not resolved: the symlink is what makes Python use the venv's site-packages (Django).
python_bin=$(cd "$venv/bin" && pwd)/python
granian=$(readlink -f "$venv/bin/granian")

start_server() { # name app threads workers -> sets $pid and $url
  local name=$1 app=$2 threads=$3 workers=$4 dir=$work module=apps callable=$2
  if [ "$app" = django ]; then
    dir=$work/django_app module=benchsite.wsgi callable=application
  fi
  port=$(free_port $((port + 1)))
  local metrics_port
  metrics_port=$(free_port $((port + 1000)))
  case $name in
    sauna | sauna-log-text | sauna-log-json)
      local access_log=false format=text
      case $name in
        sauna-log-text) access_log=true ;;
        sauna-log-json) access_log=true format=json ;;
      esac
      cat > "$work/sauna.toml" <<TOML
[app]
directory = "$dir"
python = "$python_bin"
wsgi = "$module:$callable"
[web]
listen = ["127.0.0.1:$port"]
workers = $workers
threads = $threads
access_log = $access_log
[metrics]
listen = "127.0.0.1:$metrics_port"
[control]
socket = "$work/control.sock"
TOML
      target/release/sauna-supervisor run -c "$work/sauna.toml" --log-format "$format" >"$work/$name.log" 2>&1 &
      ;;
    gunicorn-sync)
      "$venv/bin/gunicorn" --chdir "$dir" -w "$workers" -b "127.0.0.1:$port" "$module:$callable" >"$work/$name.log" 2>&1 & ;;
    gunicorn-gthread)
      "$venv/bin/gunicorn" --chdir "$dir" -w "$workers" -k gthread --threads "$threads" -b "127.0.0.1:$port" "$module:$callable" \
        >"$work/$name.log" 2>&1 & ;;
    uwsgi)
      "$venv/bin/uwsgi" --chdir "$dir" --pythonpath "$dir" --http-socket "127.0.0.1:$port" --master --die-on-term \
        --processes "$workers" --threads "$threads" --wsgi-file "$dir/${module//.//}.py" --callable "$callable" \
        --disable-logging >"$work/$name.log" 2>&1 & ;;
    granian)
      (cd "$dir" && exec "$granian" --interface wsgi --workers "$workers" --blocking-threads "$threads" \
        --port "$port" --no-ws "$module:$callable") >"$work/$name.log" 2>&1 & ;;
  esac
  pid=$!
  url="http://127.0.0.1:$port"
  wait_until_up 100
}

clock_ticks=$(getconf CLK_TCK)

# wrk's summary as "req/s p50 p99 MB/s CPU-µs-per-request", the last one for the server $pid.
run_wrk() {
  local out before after
  before=$(tree_cpu_ticks "$pid")
  out=$(wrk --latency "$@")
  after=$(tree_cpu_ticks "$pid")
  # Error answers would be counted as requests served: say so next to the figures.
  grep -E "Non-2xx|Socket errors" <<<"$out" | sed 's/^ */  warning: /' >&2 || true
  awk -v ticks=$((after - before)) -v hz="$clock_ticks" '
    / requests in / {requests=$1}
    /Requests\/sec/ {rps=$2}
    /Transfer\/sec/ {t=$2; if (t ~ /GB/) {sub("GB","",t); t*=1024} else if (t ~ /MB/) {sub("MB","",t)} else if (t ~ /KB/) {sub("KB","",t); t/=1024}; mbs=t}
    $1=="50%" {p50=$2} $1=="99%" {p99=$2}
    END {cpu = requests > 0 ? sprintf("%.1f", ticks * 1e6 / hz / requests) : "-"
         printf "%s %s %s %s %s\n", rps, p50, p99, mbs, cpu}' <<<"$out"
}

results=$work/results
: >"$results"
record() { echo "$1|$2|$3" >>"$results"; echo "  $1 $2: $3" >&2; }

read -r -a servers <<<"${SERVERS:-sauna sauna-log-text sauna-log-json uwsgi granian gunicorn-sync gunicorn-gthread}"
scenarios=" ${SCENARIOS:-hello stream mixed django} "
if [[ $scenarios == *" django "* ]]; then
  "$python_bin" "$work/django_app/seed.py"
fi
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for round in $(seq "$ROUNDS"); do
for server in "${servers[@]}"; do
  echo "== round $round: $server" >&2
  if [[ $scenarios == *" hello "* ]]; then
    start_server "$server" hello 1 2
    wrk -t2 -c16 -d2s "$url/" >/dev/null # warm-up
    record hello-c16 "$server" "$(run_wrk -t2 -c16 -d"$DURATION" "$url/")"
    record hello-c64 "$server" "$(run_wrk -t2 -c64 -d"$DURATION" "$url/")"
    stop_server
  fi
  # The access-log variants differ from sauna per request only: hello world shows it best.
  [[ $server == sauna-log-* ]] && continue
  if [[ $scenarios == *" stream "* ]]; then
    start_server "$server" stream 1 2
    wrk -t2 -c16 -d2s "$url/" >/dev/null # warm-up
    record stream-1MiB "$server" "$(run_wrk -t2 -c16 -d"$DURATION" "$url/")"
    stop_server
  fi
  if [[ $scenarios == *" mixed "* ]] && [ "$server" != gunicorn-sync ]; then
    start_server "$server" mixed 8 2
    # 12 + 4 connections fit the 16 slots; 60 + 4 saturate them, so fast requests queue behind slow.
    for mix in 12 60; do
      wrk -t1 -c"$mix" -d"$DURATION" -s benches/web_mix.lua "$url/" >/dev/null &
      load=$!
      sleep 1
      # The server's CPU also goes to the mix, whose requests wrk does not count here: no µs/req.
      read -r rps p50 p99 mbs _ <<<"$(run_wrk -t1 -c4 -d"$(( ${DURATION%s} - 2 ))s" "$url/")"
      record "mixed-fast-c$((mix + 4))" "$server" "$rps $p50 $p99 $mbs -"
      wait "$load" || true
    done
    stop_server
  fi
  if [[ $scenarios == *" django "* ]] && [ "$server" != gunicorn-gthread ]; then
    start_server "$server" django 1 4
    wrk -t2 -c16 -d2s "$url/" >/dev/null # warm-up: every worker loads its templates
    record django-c16 "$server" "$(run_wrk -t2 -c16 -d"$DURATION" "$url/")"
    record django-c64 "$server" "$(run_wrk -t2 -c64 -d"$DURATION" "$url/")"
    stop_server
  fi
done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

sauna_idle_rss() {
  start_server sauna hello 1 2
  sleep 1
  awk '/VmRSS/ {print $2/1024 " MiB"}' "/proc/$pid/status"
  stop_server
}
idle=$(sauna_idle_rss)

echo
[ "$ROUNDS" -gt 1 ] && echo "medians of $ROUNDS interleaved rounds"
# Medians per scenario and server (wrk's latencies keep their units: "612.00us", "1.20ms"), then
# sauna's ratio and, for the access-log variants, what the log costs against sauna without it.
"$PYTHON" - "$results" <<'PY'
import statistics, sys

def seconds(text):
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(text)

def median(values):
    known = [float(value) for value in values if value not in ("", "-")]
    return f"{statistics.median(known):.1f}" if known else "-"

def median_latency(values):
    ordered = sorted(values, key=seconds)
    return ordered[(len(ordered) - 1) // 2]

rows = {}
for line in open(sys.argv[1]):
    scenario, server, values = line.rstrip("\n").split("|")
    rows.setdefault((scenario, server), []).append(values.split())
table = {}
for key, runs in rows.items():
    columns = list(zip(*runs))
    table[key] = {
        "rps": float(median(columns[0])),
        "p50": median_latency(columns[1]),
        "p99": median_latency(columns[2]),
        "mbs": median(columns[3]),
        "cpu": median(columns[4]),
    }
print(f"{'scenario':<12} {'server':<17} {'req/s':>10} {'p50':>9} {'p99':>9} {'MB/s':>9} {'CPU µs/req':>11} {'sauna÷':>7}")
for scenario, server in sorted(table, key=lambda key: key[0]):
    row = table[(scenario, server)]
    base = table.get((scenario, "sauna"))
    ratio = f"{base['rps'] / row['rps']:.2f}" if base and row["rps"] > 0 else "-"
    print(f"{scenario:<12} {server:<17} {row['rps']:>10.0f} {row['p50']:>9} {row['p99']:>9} "
          f"{row['mbs']:>9} {row['cpu']:>11} {ratio:>7}")
def cpu_cost(row, base):
    # CPU per request moves less with the machine's other load than req/s does.
    if "-" in (row["cpu"], base["cpu"]):
        return ""
    return f", {float(row['cpu']) - float(base['cpu']):+.1f} µs CPU/req"

costs = [
    f"{server[len('sauna-log-'):]} {scenario} {100 * (1 - row['rps'] / base['rps']):+.1f} %"
    + cpu_cost(row, base)
    for (scenario, server), row in sorted(table.items())
    if server.startswith("sauna-log-") and (base := table.get((scenario, "sauna")))
]
if costs:
    print("\naccess log cost in req/s against sauna without it (target <= 5 %): " + "; ".join(costs))
PY
echo
echo "sauna-supervisor idle RSS (supervisor process only): $idle"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
