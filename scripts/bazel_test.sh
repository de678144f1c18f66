#!/usr/bin/env bash
# bazel test //... offline with Debian's bazel-bootstrap (Bazel 4), the tests running in the
# project's virtual environment (created if missing). Extra arguments go to `bazel test`:
#   scripts/bazel_test.sh [--test_size_filters=small] [//:test_build ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh
if ! command -v bazel >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[bazel_test] installing Debian's bazel-bootstrap" >&2
    log="$(mktemp)"
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends bazel-bootstrap; } >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      echo "error: could not install bazel-bootstrap (full log: $log)" >&2
      exit 1
    fi
  else
    echo "error: bazel is not installed; on Debian: sudo apt-get install bazel-bootstrap" >&2
    exit 1
  fi
fi
export PATH="$VENV/bin:$PATH"
targets=()
args=()
for a in "$@"; do
  case "$a" in
    //*|:*) targets+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(//...)
exec bazel test "${args[@]}" -- "${targets[@]}"
