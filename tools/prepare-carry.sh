#!/usr/bin/env bash
# Fills .carry/ (git-ignored) with what the GPU machine lacks, before a device session:
#   .carry/include  nlohmann/, doctest/ (header-only), zlib.h + zconf.h (its libz.so.1 is linked)
#   .carry/wheels   diffusers' wheel (pure Python), for the PyTorch baselines of tools/bench: the
#                   GPU image has PyTorch, safetensors, huggingface_hub, regex, Pillow and numpy
#                   but not diffusers (/work/.library/device/KINDS.md); tools/gpu-check installs it
#                   with pip --no-index into /tmp there.
# Run it here (it downloads with pip), then name .carry in the device call's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/include
for d in nlohmann doctest; do
  [ -d "/usr/include/$d" ] || { echo "prepare-carry: /usr/include/$d missing (apt-get install nlohmann-json3-dev doctest-dev)" >&2; exit 1; }
  rm -rf ".carry/include/$d" && cp -r "/usr/include/$d" .carry/include/
done
cp /usr/include/zlib.h /usr/include/zconf.h .carry/include/ 2>/dev/null || cp /usr/include/zlib.h /usr/include/x86_64-linux-gnu/zconf.h .carry/include/

if [ "${1:-}" = "--headers-only" ]; then exit 0; fi
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
rm -rf .carry/wheels .carry/python .carry/python-bin
mkdir -p .carry/wheels
DIFFUSERS=$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo "")
"$PY" -m pip download -q --no-deps -d .carry/wheels "diffusers${DIFFUSERS:+==$DIFFUSERS}"
du -sh .carry
