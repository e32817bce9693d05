#!/usr/bin/env bash
# The fuzz harnesses (tests/fuzz/README.md), built with Clang + libFuzzer + ASan/UBSan in
# ${FUZZ_BUILD_DIR:-build-fuzz} (CPU engine only).
#   tools/fuzz.sh ci                    build, then every harness deterministically (CTest -L fuzz)
#   tools/fuzz.sh campaign H MINUTES    fuzz harness H for MINUTES (or until 1M executions when
#                                       RUNS is set), growing out/fuzz/H/corpus; prints the stats
# Installs clang-19 and libclang-rt-19-dev (Debian) when run as root and they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${FUZZ_BUILD_DIR:-build-fuzz}
CC_FUZZ=${CC_FUZZ:-clang-19}
CXX_FUZZ=${CXX_FUZZ:-clang++-19}

if ! command -v "$CXX_FUZZ" >/dev/null || ! ls /usr/lib/llvm-19/lib/clang/19/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "fuzz: installing clang-19 libclang-rt-19-dev"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq clang-19 libclang-rt-19-dev >/dev/null
  else
    echo "fuzz: clang-19 with libFuzzer is missing: sudo apt-get install clang-19 libclang-rt-19-dev" >&2
    exit 1
  fi
fi
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER="$CC_FUZZ" \
  -DCMAKE_CXX_COMPILER="$CXX_FUZZ" -DDDIM_FUZZ=ON -DDDIM_BUILD_TESTS=OFF "${launcher[@]}" >/dev/null
cmake --build "$BUILD" -j "$(nproc 2>/dev/null || echo 2)"

case "${1:-ci}" in
  ci)
    # -V: each harness prints its executions and coverage (run_fuzz.cmake); on failure, libFuzzer's
    # whole report and the crashing input's path.
    ctest --test-dir "$BUILD" -L fuzz -V -j "$(nproc 2>/dev/null || echo 2)"
    ;;
  campaign)
    h=${2:?harness name}
    minutes=${3:?minutes}
    out=out/fuzz/$h
    mkdir -p "$out/corpus" "$out/artifacts"
    case $h in model | header | metadata) dict=format.dict ;; *) dict=$h.dict ;; esac
    max_len=65536
    [ "$h" = model ] && max_len=131072
    args=(-max_total_time=$((minutes * 60)) -max_len=$max_len -timeout=25 -rss_limit_mb=2048 -malloc_limit_mb=1024
          -print_final_stats=1 -dict=tests/fuzz/dict/$dict "-artifact_prefix=$out/artifacts/")
    [ -n "${RUNS:-}" ] && args+=(-runs="$RUNS")
    regressions=()
    [ -d tests/fuzz/regressions/$h ] && regressions=(tests/fuzz/regressions/$h)
    "$BUILD/bin/fuzz_$h" "${args[@]}" "$out/corpus" "tests/fuzz/corpus/$h" "${regressions[@]}" 2>&1 | tee "$out/log.txt" |
      grep -E "^#[0-9]+ *(INITED|DONE|pulse)|Done|stat::|ERROR|SUMMARY" || true
    echo "fuzz: $h: corpus $(ls "$out/corpus" | wc -l) files (started from $(ls tests/fuzz/corpus/$h | wc -l)); findings: $(ls "$out/artifacts" | wc -l)"
    ;;
  *)
    echo "usage: tools/fuzz.sh [ci | campaign HARNESS MINUTES]" >&2
    exit 2
    ;;
esac
