#!/usr/bin/env bash
# Set up if needed, then lint (ruff, configured in pyproject.toml) and run the whole test suite
# (serial tests, doctests and MPI tests). A lint finding fails the run before any test starts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"${PYTHON:-python3}" -m ruff check .
exec "${PYTHON:-python3}" -m pytest -q "$@"
