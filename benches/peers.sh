# Shared by benches/web.sh and benches/reload.sh (sourced, not run): the peers' venv, waiting for
# a server to answer, and stopping it. Callers set $pid, $url, $work and $name as they go.

# Installs Gunicorn, uWSGI and Granian into the venv $1 unless they are there already.
ensure_peers() {
  local venv=$1
  if [ ! -x "$venv/bin/granian" ] || [ ! -x "$venv/bin/uwsgi" ] || [ ! -x "$venv/bin/gunicorn" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check gunicorn uwsgi granian
  fi
}

# Waits until $url answers (up to $1 tenths of a second); otherwise prints $name's log and exits.
wait_until_up() {
  for _ in $(seq "$1"); do
    curl -sf -o /dev/null "$url/" && return 0
    sleep 0.1
  done
  echo "$name did not start; its log:" >&2; cat "$work/$name.log" >&2; exit 1
}

# Stops the server $pid gracefully and gives its port a moment to be free again.
stop_server() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 0.5
}
