#!/usr/bin/env bash
# Runs the test suite; creates .venv with the pinned stack first if it is missing.
#   ./run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES=""
exec python -m pytest -q -p no:cacheprovider "${@:-tests}"
