#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv with the Python packages of
# tools/requirements.txt: torch, diffusers, safetensors, numpy, pytest. Only the exporter, the
# conformance tests and the training script need it; the engine itself does not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
      rm -rf .venv
      "$PY" -m venv .venv
    else
      echo "setup-python: cannot create a virtual environment (install python3-venv)" >&2
      exit 1
    fi
  fi
fi
stamp=.venv/.requirements.sha
want=$(sha256sum tools/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup-python: installing tools/requirements.txt into .venv (torch is large: a few minutes)"
  .venv/bin/pip install -q --disable-pip-version-check -r tools/requirements.txt
  echo "$want" > "$stamp"
fi
