#!/usr/bin/env bash
# Creates .venv with the pinned stack when it is missing, or when requirements.lock changed
# since it was built; otherwise reuses it. Sourced by run_local.sh and run_tests.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "error: Python 3.11 is required (tensorflow 2.15 / tensorflow-transform 1.15); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
stamp="$VENV/.lock-$(sha256sum "$ROOT/requirements.lock" "$ROOT/setup.py" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[ensure_venv] building $VENV from requirements.lock (about 2 minutes)" >&2
  rm -rf "$VENV"
  log="$(mktemp)"
  if ! { "$PYTHON" -m venv "$VENV" &&
         "$VENV/bin/pip" install --disable-pip-version-check --upgrade "pip==24.2" &&
         "$VENV/bin/pip" install --disable-pip-version-check -r "$ROOT/requirements.lock" &&
         "$VENV/bin/pip" install --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"; } >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "error: building $VENV failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
