#!/usr/bin/env bash
# Installs what building ddim needs on a fresh Debian/Ubuntu machine (when run as root and something
# is missing), then configures and builds into ${BUILD_DIR:-build}. CUDA is used when nvcc exists.
# Arguments: the CMake targets to build (default: everything), e.g. `tools/setup.sh ddim_cli`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v ninja >/dev/null || need+=(ninja-build)
[ -f /usr/include/nlohmann/json.hpp ] || need+=(nlohmann-json3-dev)
[ -f /usr/include/doctest/doctest.h ] || need+=(doctest-dev)
[ -f /usr/include/zlib.h ] || need+=(zlib1g-dev)
command -v python3 >/dev/null || need+=(python3)
# ccache: the Python package (pip install ., tools/test.sh) compiles the engine again in its own
# build folder; with both builds going through ccache, that second build is mostly cache hits.
# Optional for a user who is not root; installed when we can.
if ! command -v ccache >/dev/null && [ "$(id -u)" = 0 ]; then need+=(ccache); fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: missing ${need[*]}; install them (sudo apt-get install ${need[*]}) and run again" >&2
    exit 1
  fi
fi

# nvcc is often installed outside PATH.
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

BUILD_DIR=${BUILD_DIR:-build}
jobs=$(nproc 2>/dev/null || echo 2)
launcher=()
if command -v ccache >/dev/null && { [ -z "${DDIM_NO_CCACHE:-}" ] || [ "${DDIM_NO_CCACHE}" = 0 ]; }; then
  # (No CCACHE_BASEDIR: it makes paths relative to each build folder, and the package's build
  # folder, build/python/<tag>, is deeper than build/; absolute paths match in both.)
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} "${launcher[@]}" ${DDIM_CMAKE_ARGS:-} >/dev/null
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$BUILD_DIR" -j "$jobs" "${targets[@]}"
