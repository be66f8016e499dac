#!/usr/bin/env bash
# Graceful reloads under load: failed requests during 10 reloads for sauna-supervisor (`reload`)
# against Gunicorn (`HUP`), uWSGI (chain reload through the master FIFO, `--lazy-apps`,
# `--http11-socket` for keep-alive) and
# Granian (`HUP`), and what each does with a release whose import fails. Same app, 2 workers each,
# wrk on loopback (keep-alive, 16 connections) for the whole series of reloads.
#
#   benches/reload.sh
#   IMPORT_DELAY=0.2 RELOADS=5 benches/reload.sh
#   SAUNA_BIN=target/debug/sauna-supervisor VENV=/path/to/venv benches/reload.sh
#
# IMPORT_DELAY (default 1 s) is how long the app takes to import, like a real Django app; it is
# what separates "start new, then stop old" from "start new, wait until ready, then stop old".
# Peers return at once from their signal, so they get GAP seconds (default 2 × IMPORT_DELAY + 2)
# between reloads; `sauna-supervisor reload` waits until the roll is done by itself.
# A failed request is a non-2xx/3xx answer or a socket error (refused, reset, timed out) as wrk
# counts them. Needs wrk (apt-get install -y wrk); peers are pip-installed into $VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/peers.sh
. benches/peers.sh
RELOADS=${RELOADS:-10}
IMPORT_DELAY=${IMPORT_DELAY:-1}
GAP=${GAP:-$(awk -v d="$IMPORT_DELAY" 'BEGIN {print 2 * d + 2}')}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-benches/.venv}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl is missing: apt-get install -y curl" >&2; exit 2; }

ensure_peers "$VENV"
venv=$(readlink -f "$VENV")
if [ -z "${SAUNA_BIN:-}" ]; then
  cargo build --release --bin sauna-supervisor >/dev/null
  SAUNA_BIN=target/release/sauna-supervisor
fi
sauna=$(readlink -f "$SAUNA_BIN")
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18600
python_bin=$(readlink -f "$venv/bin/python")

write_app() { # ok|broken, release name
  if [ "$1" = broken ]; then
    printf 'raise RuntimeError("this release is broken")\n' >"$work/app.py"
    return
  fi
  cat >"$work/app.py" <<PY
import time
time.sleep($IMPORT_DELAY)
RELEASE = b"$2"

def application(environ, start_response):
    body = b"release " + RELEASE
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
PY
}

start_server() { # name -> sets $pid and $url
  local name=$1
  port=$(free_port $((port + 1)))
  case $name in
    sauna)
      cat >"$work/sauna.toml" <<TOML
[app]
directory = "$work"
python = "$python_bin"
wsgi = "app:application"
[web]
listen = ["127.0.0.1:$port"]
workers = 2
access_log = false
reload_timeout = "30s"
[metrics]
listen = "127.0.0.1:$((port + 1000))"
[control]
socket = "$work/control.sock"
TOML
      "$sauna" run -c "$work/sauna.toml" >"$work/$name.log" 2>&1 &
      ;;
    gunicorn)
      "$venv/bin/gunicorn" --chdir "$work" -w 2 -b "127.0.0.1:$port" app:application >"$work/$name.log" 2>&1 & ;;
    uwsgi)
      rm -f "$work/fifo"
      "$venv/bin/uwsgi" --chdir "$work" --http11-socket "127.0.0.1:$port" --master --die-on-term --processes 2 \
        --lazy-apps --master-fifo "$work/fifo" --wsgi-file "$work/app.py" --disable-logging >"$work/$name.log" 2>&1 & ;;
    granian)
      (cd "$work" && exec "$venv/bin/granian" --interface wsgi --workers 2 --port "$port" --no-ws app:application) \
        >"$work/$name.log" 2>&1 & ;;
  esac
  pid=$!
  url="http://127.0.0.1:$port"
  wait_until_up 200
}

reload_server() { # name -> the reload command's exit status (sauna) or "-" (signals)
  case $1 in
    sauna) local status=0; "$sauna" reload -c "$work/sauna.toml" >>"$work/reloads.log" 2>&1 || status=$?; echo "$status"; return ;;
    gunicorn | granian) kill -HUP "$pid" ;;
    uwsgi) echo c >"$work/fifo" ;;
  esac
  sleep "$GAP"
  echo -
}

# "requests failed" from wrk's summary: non-2xx/3xx answers plus every kind of socket error.
wrk_counts() {
  awk '
    /requests in/ {total=$1}
    /Non-2xx or 3xx responses:/ {failed+=$NF}
    /Socket errors:/ {for (i=1; i<=NF; i++) if ($i ~ /^[0-9]+,?$/) {v=$i; sub(",","",v); failed+=v}}
    END {printf "%d %d\n", total, failed}' "$1"
}

results=$work/results
: >"$results"
for server in sauna gunicorn uwsgi granian; do
  echo "== $server" >&2
  write_app ok 1
  start_server "$server"
  wrk -t2 -c16 -d600s --timeout 10s "$url/" >"$work/wrk.out" 2>&1 &
  load=$!
  sleep 1
  statuses=""
  for round in $(seq 2 $((RELOADS + 1))); do
    write_app ok "$round"
    statuses="$statuses$(reload_server "$server")"
  done
  sleep 1
  kill -INT "$load"; wait "$load" || true
  read -r total failed < <(wrk_counts "$work/wrk.out")
  final=$(curl -s "$url/" || true)

  # A release that fails to import: what does a reload do with it?
  write_app broken
  broken_status=$(reload_server "$server")
  [ "$server" = sauna ] || sleep "$GAP"
  ok=0
  code=
  for _ in $(seq 20); do
    code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$url/" || true)
    if [ "$code" = 200 ]; then ok=$((ok + 1)); fi
  done
  [ "$code" = 000 ] && code="no connection"
  if kill -0 "$pid" 2>/dev/null; then alive=yes; else alive=no; fi
  echo "$server|$total|$failed|$final|$broken_status|$ok|$alive|$statuses|$code" >>"$results"
  echo "  $total requests, $failed failed; broken release: reload exit $broken_status, $ok/20 answered, running: $alive" >&2
  stop_server
done

# Upgrading the server binary itself under the same load: sauna-supervisor `upgrade` hands its
# sockets to a new process (the peers' equivalents — Gunicorn USR2 + TERM of the old master, the
# uWSGI "zerg dance" — are manual procedures, so they are not scripted here).
echo "== sauna upgrade" >&2
write_app ok 1
start_server sauna
old_pid=$pid
wrk -t2 -c16 -d600s --timeout 10s "$url/" >"$work/wrk.out" 2>&1 &
load=$!
sleep 1
upgrade_status=0
"$sauna" upgrade -c "$work/sauna.toml" >"$work/upgrade.log" 2>&1 || upgrade_status=$?
sleep 1
kill -INT "$load"; wait "$load" || true
read -r upgrade_total upgrade_failed < <(wrk_counts "$work/wrk.out")
new_pid=$("$sauna" status -c "$work/sauna.toml" --json | "$python_bin" -c 'import json, sys; print(json.load(sys.stdin)["pid"])' || echo "?")
"$sauna" stop -c "$work/sauna.toml" >/dev/null 2>&1 || true
wait "$old_pid" 2>/dev/null || true

echo
printf '%-9s %9s %8s %-14s   %-30s\n' server requests failed "after reloads" "release that fails to import"
while IFS='|' read -r server total failed final broken_status ok alive statuses code; do
  if [ "$server" = sauna ]; then
    verdict="reload exit $broken_status; $ok/20 answered 200 (old code)"
  elif [ "$alive" = no ]; then
    verdict="server exited; $ok/20 answered 200"
  else
    verdict="still running; $ok/20 answered 200 (last: $code)"
  fi
  printf '%-9s %9s %8s %-14s   %-30s\n' "$server" "$total" "$failed" "${final:-(no answer)}" "$verdict"
done <"$results"
echo
echo
echo "sauna upgrade (new binary, pid $old_pid -> $new_pid) under the same load: exit $upgrade_status, $upgrade_total requests, $upgrade_failed failed"
echo "$RELOADS reloads, app import takes ${IMPORT_DELAY}s, peers get ${GAP}s between reloads; sauna reload exit statuses: $(awk -F'|' '$1=="sauna" {print $8}' "$results")"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
