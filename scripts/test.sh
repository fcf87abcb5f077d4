#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (serial tests, doctests and MPI tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "${PYTHON:-python3}" -m pytest -q "$@"
