"""Per-call overhead of the Python package over the C++ call it wraps, on near-empty calls: one DDIM step of the
model-free scheduler on 16 floats, a session's timestep plan (50 steps, no sampling) and a session's shape. The C++
(and C API) times come from bench_api_overhead, run on the same machine in the same invocation, so the difference
is measured under the same load. Not a test: timings depend on the machine.

    python tests/bench/bench_python_overhead.py [--cpp build/bin/bench_api_overhead] [--model weights/default.ddim]

Needs the installed package (pip install .).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import ddim

REPO = Path(__file__).resolve().parents[2]


def ns_per_call(fn, calls: int, rounds: int = 15) -> float:
    """Median over rounds of the mean time per call, in ns (after a warm-up of calls/10)."""
    for _ in range(max(1, calls // 10)):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(times)


def cpp_times(binary: Path, model: Path) -> dict[str, float]:
    """{row label: C++ ns} parsed from bench_api_overhead's table."""
    out = subprocess.run([str(binary), str(model)], check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(.+?)\s+C\+\+\s+([\d.]+) ns\s+C\s+([\d.]+) ns", line)
        if m:
            rows[m.group(1).strip()] = (float(m.group(2)), float(m.group(3)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpp", type=Path, default=REPO / "build" / "bin" / "bench_api_overhead",
                    help="bench_api_overhead, for the C++ and C times (skipped when missing)")
    ap.add_argument("--model", type=Path, default=REPO / "weights" / "default.ddim")
    args = ap.parse_args()

    scheduler = ddim.Scheduler()  # DDIMScheduler's defaults, as bench_api_overhead
    out = np.full(16, 0.1, np.float32)
    x = np.full(16, 0.2, np.float32)
    py_step = ns_per_call(lambda: scheduler.step(out, 500, 250, x), 20000)

    session = ddim.Session(ddim.Model(args.model), device="cpu")
    py_plan = ns_per_call(lambda: session.timesteps(50), 5000)
    py_shape = ns_per_call(lambda: session.shape, 200000)

    cpp = cpp_times(args.cpp, args.model) if args.cpp.is_file() else {}
    print(f"Python overhead per call (median of 15 rounds; ddim {ddim.__version__}):")
    for label, py in (("scheduler step, 16 floats", py_step), ("session timestep plan, 50 steps", py_plan),
                      ("session shape (get_shape / plan_info)", py_shape)):
        if label in cpp:
            c_plus, c_api = cpp[label]
            print(f"{label:<40}  C++ {c_plus:9.1f} ns   C {c_api:9.1f} ns   Python {py:9.1f} ns   "
                  f"Python - C++ {py - c_plus:+9.1f} ns")
        else:
            print(f"{label:<40}  Python {py:9.1f} ns   (no C++ time: build bench_api_overhead)")


if __name__ == "__main__":
    main()
