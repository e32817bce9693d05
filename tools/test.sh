#!/usr/bin/env bash
# The test command: build ddim (installing what is missing) and run every test with CTest.
# Tests that need a GPU report themselves skipped on a machine without one. The Python
# conformance tests (tests/python, run by CTest as one test) use the .venv that
# tools/setup-python.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup-python.sh
tools/setup.sh
BUILD_DIR=${BUILD_DIR:-build}
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc 2>/dev/null || echo 2)" "$@"
