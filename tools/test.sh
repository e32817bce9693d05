#!/usr/bin/env bash
# The test command: build ddim (installing what is missing) and run every test with CTest.
# Tests that need a GPU report themselves skipped on a machine without one. The Python
# conformance tests (tests/python, run by CTest as one test) use the .venv that
# tools/setup-python.sh makes. Then the sanitizer stages, each in its own build folder: every fuzz
# harness deterministically under ASan + UBSan (tools/fuzz.sh ci, Clang) and the concurrency test
# under ThreadSanitizer (tools/tsan.sh). DDIM_SKIP_SANITIZERS=1, or CTest arguments
# (tools/test.sh -R NAME), leave those two out.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup-python.sh
tools/setup.sh
BUILD_DIR=${BUILD_DIR:-build}
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc 2>/dev/null || echo 2)" "$@"
if [ $# -eq 0 ] && { [ -z "${DDIM_SKIP_SANITIZERS:-}" ] || [ "${DDIM_SKIP_SANITIZERS}" = 0 ]; }; then
  tools/fuzz.sh ci
  tools/tsan.sh
fi
