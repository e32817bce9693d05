#!/usr/bin/env bash
# Rebuilds the bundled default model from scratch: trains tools/train_fashion.py on Debian's
# dataset-fashion-mnist (resuming from build/train/checkpoint.pt when present), exports the EMA
# weights to weights/default.ddim with tools/export.py (checked with --verify), and renders the
# README's sample grid with the main command. Takes about 40 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
tools/setup-python.sh
tools/setup.sh
.venv/bin/python tools/train_fashion.py --out build/train "$@"
.venv/bin/python tools/export.py --diffusers build/train/unet --out weights/default.ddim --verify
cp build/train/unet/training.json weights/default-training.json
tools/sample.sh
cp out/samples.png weights/default-samples.png
