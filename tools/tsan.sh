#!/usr/bin/env bash
# The concurrency test (tests/tsan/test_concurrency.cpp) under ThreadSanitizer: a CPU-only build
# with -DDDIM_SANITIZE=thread in ${TSAN_BUILD_DIR:-build-tsan}; only that test is built and run. Any
# reported data race fails it. tools/test.sh runs this after the main tests.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${TSAN_BUILD_DIR:-build-tsan}
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDDIM_CUDA=OFF -DDDIM_SANITIZE=thread \
  -DDDIM_CUDA_EMU=OFF "${launcher[@]}" >/dev/null
cmake --build "$BUILD" -j "$(nproc 2>/dev/null || echo 2)" --target ddim_concurrency_test
ctest --test-dir "$BUILD" -R '^concurrency$' --output-on-failure
