#!/usr/bin/env bash
# Set up the super-resolution application: invnet with its application extras (scikit-image),
# and Debian's Fashion-MNIST package (70,000 28x28 images under /usr/share/datasets/fashion-mnist)
# when apt-get is available. The scikit-image sample images need nothing more.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq dataset-fashion-mnist
    else
        echo "[setup] no apt-get: Fashion-MNIST not installed (the skimage data source still works)" >&2
    fi
fi
echo "[setup] super_resolution ready"
