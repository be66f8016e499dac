#!/usr/bin/env bash
# `[web] preload` side by side, in one run, on a real Django project (`startproject` + admin):
#
#   memory    PSS of the whole server tree after 200 requests of /admin/login/, 4 workers each:
#             sauna-supervisor without and with preload, gunicorn and gunicorn --preload.
#             (PSS counts each page shared between processes as its share, so the sum over a
#             tree is what the tree really costs; RSS would count shared pages once per process.)
#   replace   a worker killed with SIGKILL: time from the supervisor's "exited unexpectedly"
#             line to the replacement's "web worker ready" line, without and with preload.
#   reload    `sauna-supervisor reload` of 8 workers: wall time, and how many times the app was
#             imported (the project's wsgi.py appends its pid to a file), without and with preload.
#
#   benches/preload.sh
#   SAUNA_BIN=target/debug/sauna-supervisor VENV=/path/to/venv benches/preload.sh
#
# The venv ($VENV, default benches/.venv-preload) needs Django and Gunicorn; the script
# pip-installs them when they are missing (`python3 -m venv benches/.venv-preload &&
# benches/.venv-preload/bin/pip install django gunicorn`). Needs curl.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-benches/.venv-preload}
REQUESTS=${REQUESTS:-200}
command -v curl >/dev/null || { echo "curl is missing: apt-get install -y curl" >&2; exit 2; }

if [ ! -x "$VENV/bin/gunicorn" ] || ! "$VENV/bin/python" -c "import django" 2>/dev/null; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check django gunicorn
fi
venv=$(readlink -f "$VENV")
if [ -z "${SAUNA_BIN:-}" ]; then
  cargo build --release --bin sauna-supervisor >/dev/null
  SAUNA_BIN=target/release/sauna-supervisor
fi
sauna=$(readlink -f "$SAUNA_BIN")
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18700

# The project: startproject + admin (in INSTALLED_APPS by default), migrated, any Host allowed;
# wsgi.py records every import.
mkdir "$work/project"
"$venv/bin/django-admin" startproject mysite "$work/project"
cat >> "$work/project/mysite/settings.py" <<'PY'
ALLOWED_HOSTS = ["*"]
DEBUG = False
PY
cat >> "$work/project/mysite/wsgi.py" <<PY
with open("$work/imports.log", "a") as _log:
    _log.write("%d\n" % os.getpid())
PY
(cd "$work/project" && "$venv/bin/python" manage.py migrate -v 0)

# PSS (MiB) of the tree of processes rooted at $1, from /proc/PID/smaps_rollup.
tree_pss() {
  "$venv/bin/python" - "$1" <<'PY'
import os, sys
root = int(sys.argv[1])
parents = {}
for name in os.listdir("/proc"):
    if name.isdigit():
        try:
            stat = open("/proc/%s/stat" % name).read()
        except OSError:
            continue
        parents[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
tree, grew = {root}, True
while grew:
    grew = False
    for pid, parent in parents.items():
        if parent in tree and pid not in tree:
            tree.add(pid)
            grew = True
total = 0
for pid in tree:
    try:
        for line in open("/proc/%d/smaps_rollup" % pid):
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    except OSError:
        pass
print("%.1f %d" % (total / 1024, len(tree)))
PY
}

# Waits until $url answers; else prints the log and exits.
wait_until_up() {
  for _ in $(seq 300); do
    curl -sf -o /dev/null "$url/admin/login/" && return 0
    sleep 0.1
  done
  echo "$name did not start; its log:" >&2; cat "$work/$name.log" >&2; exit 1
}

stop_server() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 0.5
}

sauna_config() { # workers preload
  cat > "$work/sauna.toml" <<TOML
[app]
directory = "$work/project"
python = "$venv/bin/python"
wsgi = "mysite.wsgi:application"
env = { DJANGO_SETTINGS_MODULE = "mysite.settings" }
[web]
listen = ["127.0.0.1:$port"]
workers = $1
preload = $2
access_log = false
[metrics]
listen = "127.0.0.1:$((port + 1000))"
[control]
socket = "$work/control.sock"
TOML
}

start_server() { # name
  name=$1
  port=$((port + 1))
  case $name in
    sauna) sauna_config 4 false ;;&
    sauna-preload) sauna_config 4 true ;;&
    sauna|sauna-preload)
      "$sauna" run -c "$work/sauna.toml" >"$work/$name.log" 2>&1 & ;;
    gunicorn)
      "$venv/bin/gunicorn" --chdir "$work/project" -w 4 -b "127.0.0.1:$port" mysite.wsgi:application >"$work/$name.log" 2>&1 & ;;
    gunicorn-preload)
      "$venv/bin/gunicorn" --chdir "$work/project" --preload -w 4 -b "127.0.0.1:$port" mysite.wsgi:application >"$work/$name.log" 2>&1 & ;;
  esac
  pid=$!
  url="http://127.0.0.1:$port"
  wait_until_up
}

echo "== memory: Django admin, 4 workers, PSS of the server tree after $REQUESTS requests of /admin/login/"
printf '%-18s %10s %10s\n' server "PSS MiB" processes
declare -A pss
for name in sauna sauna-preload gunicorn gunicorn-preload; do
  start_server "$name"
  for _ in $(seq "$REQUESTS"); do curl -sf -o /dev/null "$url/admin/login/"; done
  sleep 2
  read -r mib count < <(tree_pss "$pid")
  pss[$name]=$mib
  printf '%-18s %10s %10s\n' "$name" "$mib" "$count"
  stop_server
done
awk -v a="${pss[sauna-preload]}" -v b="${pss[gunicorn-preload]}" -v c="${pss[sauna]}" 'BEGIN {
  printf "sauna --preload / gunicorn --preload: %.2f (target <= 0.90)\n", a / b
  printf "sauna --preload / sauna without:     %.2f\n", a / c }'

# Seconds between two log lines' timestamps (2026-01-01T12:00:00.123456Z ...).
log_gap_ms() { # log first-needle second-needle
  "$venv/bin/python" - "$@" <<'PY'
import sys
from datetime import datetime
path, first, second = sys.argv[1:]
def stamp(line):
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
start = None
for line in open(path, errors="replace"):
    if start is None and first in line:
        start = stamp(line)
    elif start is not None and second in line:
        print("%.1f" % ((stamp(line) - start).total_seconds() * 1000))
        break
else:
    print("?")
PY
}

worker_pid() { # slot
  "$sauna" status --json -c "$work/sauna.toml" | "$venv/bin/python" -c '
import json, sys
slot = int(sys.argv[1])
for worker in json.load(sys.stdin)["pool"]["workers"]:
    if worker["slot"] == slot and worker["state"] == "ready":
        print(worker["pid"])' "$1"
}

echo
echo "== replace: SIGKILL of a worker → its replacement ready (from the supervisor's log)"
for name in sauna sauna-preload; do
  start_server "$name"
  victim=$(worker_pid 1)
  kill -9 "$victim"
  for _ in $(seq 300); do
    replacement=$(worker_pid 1)
    [ -n "$replacement" ] && [ "$replacement" != "$victim" ] && break
    sleep 0.05
  done
  printf '%-18s %8s ms\n' "$name" "$(log_gap_ms "$work/$name.log" "exited unexpectedly" "pid=$replacement")"
  stop_server
done

echo
echo "== reload: 8 workers, one \`reload\` (no code change)"
printf '%-18s %10s %10s\n' server seconds imports
for preload in false true; do
  name=sauna-reload-$preload
  port=$((port + 1))
  sauna_config 8 "$preload"
  "$sauna" run -c "$work/sauna.toml" >"$work/$name.log" 2>&1 &
  pid=$!
  url="http://127.0.0.1:$port"
  wait_until_up
  for _ in $(seq 100); do
    [ "$("$sauna" status --json -c "$work/sauna.toml" | grep -o '"state":"ready"' | wc -l)" = 8 ] && break
    sleep 0.1
  done
  : > "$work/imports.log"
  started=$(date +%s.%N)
  "$sauna" reload -c "$work/sauna.toml" >/dev/null 2>&1
  finished=$(date +%s.%N)
  printf '%-18s %10.2f %10s\n' "preload=$preload" "$(echo "$finished - $started" | bc)" "$(wc -l < "$work/imports.log")"
  stop_server
done
