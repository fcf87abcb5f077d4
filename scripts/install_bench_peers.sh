#!/usr/bin/env bash
# Install the peer libraries the benchmarks compare invnet against (optional extras, never
# runtime dependencies). FrEIA and normflows install cleanly next to the torch already present.
# MemCNN must be installed with --no-deps: its torchvision requirement would pull a second,
# CUDA-built torch and replace the one on this machine; the wrapper we use needs only torch
# and numpy.
set -euo pipefail
PYTHON="${PYTHON:-python}"
"$PYTHON" -m pip install "freia" "normflows"
"$PYTHON" -m pip install --no-deps "memcnn"
"$PYTHON" -c "import FrEIA, normflows, memcnn; print('peers installed: FrEIA, normflows', normflows.__version__, 'memcnn', memcnn.__version__)"
