#!/usr/bin/env bash
# Builds the Python wheel that carries the sauna-supervisor binary (maturin, `bindings = "bin"`,
# configured in supervisor/pyproject.toml), so that `pip install sauna_supervisor-*.whl` in an app's
# venv puts `sauna-supervisor` into that venv's bin/ — no Rust toolchain on the server.
#
#   scripts/build-wheel.sh [--debug | --profile NAME] [--out DIR]
#
#   --profile NAME  the Cargo profile to build with (default: release)
#   --debug         shorthand for --profile dev: reuses target/debug, for tests
#   --out DIR       where the wheel is put (default: target/wheels)
#
# maturin is taken from $MATURIN, else PATH, else the repository's .venv (scripts/setup.sh
# installs it there), else it is installed from PyPI into target/build-venv. The last line printed
# on stdout is the path of the built wheel; maturin's progress goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# Keep in step with tests/requirements.txt and [build-system] in supervisor/pyproject.toml.
maturin_requirement='maturin>=1.9,<2'

profile=release
out=$root/target/wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) profile=dev ;;
    --profile) profile=${2:?--profile needs a Cargo profile name}; shift ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-wheel: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# --out is relative to where the script was called from; the build runs from the repository.
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"

find_maturin() {
  if [ -n "${MATURIN:-}" ]; then echo "$MATURIN"; return; fi
  if command -v maturin >/dev/null 2>&1; then command -v maturin; return; fi
  for candidate in "$root/.venv/bin/maturin" "$root/target/build-venv/bin/maturin"; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  local venv="$root/target/build-venv"
  echo "build-wheel: installing $maturin_requirement into $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$maturin_requirement" >&2
  echo "$venv/bin/maturin"
}
maturin=$(find_maturin)

# maturin writes into a fresh directory, so the wheel it built is the only one there even when
# --out already holds wheels of other versions or platforms.
staging=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$staging"' EXIT
# The platform tag is chosen by maturin's auditwheel check (see supervisor/pyproject.toml).
"$maturin" build --manifest-path supervisor/Cargo.toml --profile "$profile" --out "$staging" >&2
wheels=("$staging"/*.whl)
if [ ${#wheels[@]} -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "build-wheel: expected one wheel from maturin in $staging, found: ${wheels[*]}" >&2
  exit 1
fi
wheel="$out/$(basename "${wheels[0]}")"
mv -f "${wheels[0]}" "$wheel"
echo "$wheel"
