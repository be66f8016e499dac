# Shared by benches/web.sh, reload.sh, compare-builds.sh and wakeups.sh (sourced, not run):
# the peers' venv, a free port, starting sauna on hello world, waiting for a server to answer,
# and stopping it. Callers set $pid, $url, $work and $name as they go.

# The peers and the Django the `django` scenario runs on, pinned so that figures from different
# days compare like with like (Django as in the project's test venv). Change a pin here and the
# next run reinstalls.
PEER_PACKAGES="gunicorn==27.0.1 uwsgi==2.0.31 granian==2.8.9 django==5.2.19"

# Installs $PEER_PACKAGES into the venv $1 unless that exact list is installed there already.
ensure_peers() {
  local venv=$1
  if [ "$(cat "$venv/peers.txt" 2>/dev/null)" != "$PEER_PACKAGES" ]; then
    [ -x "$venv/bin/pip" ] || "${PYTHON:-python3}" -m venv "$venv"
    # shellcheck disable=SC2086 # one word per package
    "$venv/bin/pip" install -q --disable-pip-version-check $PEER_PACKAGES
    echo "$PEER_PACKAGES" >"$venv/peers.txt"
  fi
}

# The first port from $1 up on which nothing listens on loopback. The machine may be shared with
# other benchmark runs: a request answered by one of their servers would count as one of ours.
free_port() {
  local port=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
  echo "$port"
}

# Waits until $url answers (up to $1 tenths of a second) while the server $pid runs; otherwise
# prints $name's log and exits.
wait_until_up() {
  for _ in $(seq "$1"); do
    kill -0 "$pid" 2>/dev/null || break
    curl -sf -o /dev/null "$url/" && return 0
    sleep 0.1
  done
  echo "$name did not start; its log:" >&2; cat "$work/$name.log" >&2; exit 1
}

# Starts the sauna-supervisor binary $1 on hello world (apps.py in $work: 2 workers x 1 thread,
# no metrics endpoint) on a free port from $port + 1, with the access log $2 (true/false, default
# false) in the log format $3 (text/json); sets $port, $pid, $url and $name, and returns once it
# answers. Its log goes to $work/$name.log.
start_sauna_hello() {
  local bin=$1 access_log=${2:-false} log_format=${3:-text} py
  py=$(readlink -f "${PYTHON:-.venv/bin/python}")
  port=$(free_port $((port + 1)))
  name=$port
  mkdir -p "$work/$port"
  cat > "$work/$port/sauna.toml" <<TOML
[app]
directory = "$work"
python = "$py"
wsgi = "apps:hello"
[web]
listen = ["127.0.0.1:$port"]
workers = 2
threads = 1
access_log = $access_log
[metrics]
listen = ""
[control]
socket = "$work/$port/control.sock"
TOML
  "$bin" run -c "$work/$port/sauna.toml" --log-format "$log_format" > "$work/$name.log" 2>&1 &
  pid=$! url="http://127.0.0.1:$port"
  wait_until_up 100
}

# Stops the server $pid gracefully and gives its port a moment to be free again.
stop_server() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 0.5
}

# Clock ticks (see `getconf CLK_TCK`) of CPU time used so far by process $1 and all its
# descendants, counting children they have already reaped (cutime/cstime); the difference over a
# run is the whole server's CPU time, however it spreads work over processes and threads.
tree_cpu_ticks() {
  "${PYTHON:-python3}" - "$1" <<'PY'
import os, sys

root = int(sys.argv[1])
parent, ticks = {}, {}
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    try:
        with open(f"/proc/{entry}/stat") as stat:
            text = stat.read()
    except OSError:  # exited meanwhile
        continue
    # The command name may hold spaces and parentheses: fields start after the last ")".
    fields = text[text.rindex(")") + 2:].split()
    pid = int(entry)
    parent[pid] = int(fields[1])  # ppid (field 4)
    ticks[pid] = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
children = {}
for pid, ppid in parent.items():
    children.setdefault(ppid, []).append(pid)
total, todo = 0, [root]
while todo:
    pid = todo.pop()
    if pid in ticks:
        total += ticks[pid]
        todo += children.get(pid, [])
print(total)
PY
}
