#!/usr/bin/env bash
# Installs what sauna-supervisor's tests and example need, idempotently:
#   - the Debian packages listed in scripts/apt-packages.txt (redis-server, nginx, ...);
#   - a Python venv at .venv with tests/requirements.txt and the example's requirements.
# Safe to run again: it installs only what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
while read -r package; do
  package="${package%%#*}"; package="${package//[[:space:]]/}"
  [ -n "$package" ] || continue
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done < scripts/apt-packages.txt
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_if_needed apt-get update -qq
  # Packaged services must not start on their default ports: the tests start their own copies.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | sudo_if_needed tee /usr/sbin/policy-rc.d >/dev/null
    sudo_if_needed chmod 755 /usr/sbin/policy-rc.d
    remove_policy=1
  fi
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ "${remove_policy:-0}" = 1 ]; then sudo_if_needed rm -f /usr/sbin/policy-rc.d; fi
fi

python=${PYTHON:-python3}
requirements=(tests/requirements.txt examples/quickstart/requirements.txt)
stamp=$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$stamp" ]; then
  echo "setup: preparing the Python venv .venv"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  for file in "${requirements[@]}"; do
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$file"
  done
  echo "$stamp" > .venv/.requirements.sha256
fi
