#!/usr/bin/env bash
# Runs the test suite; creates .venv with the pinned stack first if it is missing.
#   ./run_tests.sh [pytest args]
# Test files run in TEST_WORKERS processes at once (default: the machine's cores, at most 4),
# each file whole in one of them (its module fixtures built once); TEST_WORKERS=0: one process.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES=""
workers="${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
parallel=()
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers" --dist loadfile); fi
exec python -m pytest -q -p no:cacheprovider "${parallel[@]}" "${@:-tests}"
