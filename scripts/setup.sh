#!/usr/bin/env bash
# Install invnet (editable) with everything its tests and applications need, into the current
# Python environment. An installed torch is kept as it is (GPU users keep their CUDA build).
# Without torch: on a machine with an NVIDIA driver pip's default (CUDA) build is taken; without
# one the CPU build 2.13.0, which pip finds on disk on our CPU machines in seconds. Set
# INVNET_TORCH_SPEC to choose another, e.g. INVNET_TORCH_SPEC="torch==2.5.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${INVNET_TORCH_SPEC:-}" ]; then
        spec=$INVNET_TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1; then
        spec=torch
    else
        spec=torch==2.13.0
    fi
    echo "[setup] installing $spec"
    "$PY" -m pip install -q "$spec"
fi
# Checked from / so that the source tree on the current directory does not count as installed.
installed=$(cd / && "$PY" -c 'import invnet, pathlib; print(pathlib.Path(invnet.__file__).resolve().parent.parent)' 2>/dev/null || true)
if [ "$installed" != "$(pwd -P)" ] || ! command -v invnet >/dev/null 2>&1 \
    || ! (cd / && "$PY" -c "import h5py, zarr, safetensors, tqdm, matplotlib, mpi4py, pytest_timeout, skimage, pylops") >/dev/null 2>&1 \
    || ! "$PY" -m ruff --version >/dev/null 2>&1; then
    echo "[setup] installing invnet and its dependencies"
    "$PY" -m pip install -q -e ".[all]"
fi
