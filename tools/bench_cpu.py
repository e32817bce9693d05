#!/usr/bin/env python3
"""CPU forward benchmark: the engine against PyTorch on the same machine (tools/bench-cpu).

For each preset (cifar10-32, celebahq-256), batch and precision: the engine (build/bin/
bench_cpu_worker, a CPU session of the model file) and PyTorch (diffusers' UNet2DModel of the
same architecture with the same weights, torch.inference_mode, torch.set_num_threads(threads),
one interop thread) time one forward each in turn, `runs` times after warm-up, so that both see
the same machine load. Prints, per configuration, the median and the spread (min - max) of each,
the ratio engine / PyTorch, and GFLOP/s against the machine's measured peak (the engine's worker
measures the fp32 FMA and the bf16 dot-product peak of the same number of threads), with the
load average (/proc/loadavg) before and after; writes the same as JSON with --json.

PyTorch bf16 is the UNet converted to bfloat16 (weights and activations), which oneDNN runs on
AVX512-BF16 or AMX where present; the engine's bf16 rounds only the GEMM operands (fp32
activations, fp32 accumulation).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


class Engine:
    def __init__(self, worker: Path, model: Path, batch: int, precision: str, threads: int):
        self.proc = subprocess.Popen([str(worker), "--model", str(model), "--batch", str(batch), "--precision", precision,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            err = self.proc.stderr.read()
            raise RuntimeError(f"engine worker failed: {err.strip() or line.strip()}")
        self.info = json.loads(line[len("ready "):])

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"engine worker died: {self.proc.stderr.read().strip()}")
        return float(line)

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


class Torch:
    def __init__(self, model: Path, preset: str, batch: int, precision: str):
        import torch
        from diffusers import UNet2DModel
        from diffusers.utils import logging as diffusers_logging
        from safetensors.torch import load_file

        from ddim_export.api import PRESETS

        self.torch = torch
        diffusers_logging.set_verbosity_error()  # no note about casting the whole UNet to bf16
        unet = UNet2DModel(**PRESETS[preset])
        unet.load_state_dict(load_file(str(model)), strict=True)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.unet = unet.to(self.dtype).eval()
        size = PRESETS[preset]["sample_size"]
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn((batch, 3, size, size), generator=g).to(self.dtype)
        self.t = torch.tensor([500] * batch)

    def run(self) -> float:
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.unet(self.x, self.t)
            return (time.perf_counter() - t0) * 1e3


def spread(v: list[float]) -> dict:
    return {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3), "max_ms": round(max(v), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", default="build", help="the engine's build folder (bin/bench_cpu_worker, bin/ddim-make-model)")
    p.add_argument("--presets", nargs="+", default=["cifar10-32"], choices=["cifar10-32", "celebahq-256"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pause", type=float, default=0.05, help="seconds between the contenders' runs")
    p.add_argument("--no-torch", action="store_true", help="the engine only")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")

    build = (ROOT / args.build) if not Path(args.build).is_absolute() else Path(args.build)
    worker, make_model = build / "bin" / "bench_cpu_worker", build / "bin" / "ddim-make-model"
    for f in (worker, make_model):
        if not f.exists():
            print(f"bench-cpu: {f} is missing: build the project first (cmake --build {args.build})", file=sys.stderr)
            return 2
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
        torch_version = torch.__version__
    else:
        torch_version = None

    machine = {"cpu": cpu_name(), "flags": cpu_flags(), "threads": args.threads, "logical_cpus": os.cpu_count(),
               "torch": torch_version}
    print(f"# CPU forward benchmark: {machine['cpu']} ({', '.join(machine['flags'])}), {args.threads} threads, "
          f"median of {args.runs} interleaved runs" + (f", torch {torch_version}" if torch_version else ""))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            model = Path(tmp) / f"{preset}.ddim"
            subprocess.run([str(make_model), "--preset", preset, "--seed", "0", "--out", str(model)], check=True,
                           stdout=subprocess.DEVNULL)
            for precision in args.precisions:
                for batch in args.batches:
                    load_before = load_average()
                    try:
                        engine = Engine(worker, model, batch, precision, args.threads)
                    except RuntimeError as e:
                        print(f"{preset} {precision} batch {batch}: {e}")
                        results.append({"preset": preset, "precision": precision, "batch": batch, "error": str(e)})
                        continue
                    torch_runner = None if args.no_torch else Torch(model, preset, batch, precision)
                    times_e, times_t = [], []
                    for i in range(args.warmup + args.runs):
                        te = engine.run()
                        time.sleep(args.pause)
                        tt = torch_runner.run() if torch_runner else None
                        time.sleep(args.pause)
                        if i >= args.warmup:
                            times_e.append(te)
                            if tt is not None:
                                times_t.append(tt)
                    engine.close()
                    info = engine.info
                    gflop = info["forward_gflop"]
                    peak = info["peak_bf16_n"] if precision == "bf16" else info["peak_fp32_n"]
                    peak_fp32 = info["peak_fp32_n"]
                    row = {"preset": preset, "precision": precision, "batch": batch, "threads": args.threads,
                           "backend": info["backend"], "forward_gflop": gflop, "peak_gflops": peak,
                           "peak_fp32_gflops": peak_fp32, "load_before": load_before, "load_after": load_average(),
                           "engine": spread(times_e)}
                    me = row["engine"]["median_ms"]
                    row["engine"]["gflops"] = round(gflop / (me * 1e-3), 1)
                    if times_t:
                        row["torch"] = spread(times_t)
                        mt = row["torch"]["median_ms"]
                        row["torch"]["gflops"] = round(gflop / (mt * 1e-3), 1)
                        row["ratio"] = round(me / mt, 3)
                    results.append(row)
                    torch_part = ""
                    if times_t:
                        t = row["torch"]
                        torch_part = (f" | torch {t['median_ms']:.1f} ms ({t['min_ms']:.1f}-{t['max_ms']:.1f}), "
                                      f"{t['gflops']:.0f} GFLOP/s | engine/torch {row['ratio']:.2f}")
                    print(f"{preset} {precision} batch {batch}: engine {me:.1f} ms ({row['engine']['min_ms']:.1f}-"
                          f"{row['engine']['max_ms']:.1f}), {row['engine']['gflops']:.0f} GFLOP/s = "
                          f"{100 * row['engine']['gflops'] / peak:.0f}% of the {peak:.0f} GFLOP/s "
                          f"{'bf16' if precision == 'bf16' else 'fp32'} peak{torch_part} | load "
                          f"{row['load_before']:.2f} -> {row['load_after']:.2f}", flush=True)

    print("\n| preset | precision | batch | engine ms (min-max) | PyTorch ms (min-max) | engine / PyTorch | "
          "engine GFLOP/s (% of peak) | PyTorch GFLOP/s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['preset']} | {r['precision']} | {r['batch']} | {r['error']} | | | | | |")
            continue
        e = r["engine"]
        t = r.get("torch")
        print(f"| {r['preset']} | {r['precision']} | {r['batch']} | {e['median_ms']:.1f} ({e['min_ms']:.1f}-{e['max_ms']:.1f}) | "
              + (f"{t['median_ms']:.1f} ({t['min_ms']:.1f}-{t['max_ms']:.1f}) | {r['ratio']:.2f} | " if t else "| | ")
              + f"{e['gflops']:.0f} ({100 * e['gflops'] / r['peak_gflops']:.0f}%) | "
              + (f"{t['gflops']:.0f} | " if t else "| ")
              + f"{r['load_before']:.2f}-{r['load_after']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "runs": args.runs, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
