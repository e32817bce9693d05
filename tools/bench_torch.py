#!/usr/bin/env python3
"""The PyTorch baseline of tools/bench: what a user would otherwise run.

diffusers' UNet2DModel of a preset architecture with the weights of a ddim model file (the file's
tensors are the UNet's state dict), fp16, SDPA attention, the whole 50-step loop with diffusers'
DDIMScheduler (eta 0), in eager mode or with the U-Net under torch.compile. Prints one JSON object
with the same fields as build/bin/bench_gpu: cold start (file -> first image, in this fresh
process), 50-step latency per batch, images/s, and the process's peak device memory from NVML's
per-process accounting (the figure nvidia-smi shows), sampled every 2 ms on a thread, exactly as
bench_gpu measures the engine.

    python3 tools/bench_torch.py --model cifar.ddim --preset cifar10-32 --batches 1 64 256 --mode eager
    ... --mode compile [--compile-mode max-autotune|reduce-overhead]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class ProcessMemory:
    """This process's device memory via NVML (libnvidia-ml.so.1, shipped with the driver)."""

    class _Info(ctypes.Structure):
        _fields_ = [("pid", ctypes.c_uint), ("used", ctypes.c_ulonglong), ("gi", ctypes.c_uint), ("ci", ctypes.c_uint)]

    def __init__(self, device_index: int = 0):
        import torch

        self.ok = False
        try:
            self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if self.nvml.nvmlInit_v2() != 0:
                return
            # torch's pci_bus_id / pci_device_id / pci_domain_id are the integers of cudaDeviceProp
            # (pciBusID, ...), not NVML's bus-id string: build "domain:bus:device.0" from them.
            props = torch.cuda.get_device_properties(device_index)
            bus = None
            if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
                bus = f"{int(props.pci_domain_id):08x}:{int(props.pci_bus_id):02x}:{int(props.pci_device_id):02x}.0"
            self.handle = ctypes.c_void_p()
            if bus:
                rc = self.nvml.nvmlDeviceGetHandleByPciBusId_v2(bus.encode(), ctypes.byref(self.handle))
            else:
                rc = self.nvml.nvmlDeviceGetHandleByIndex_v2(device_index, ctypes.byref(self.handle))
            self.ok = rc == 0
        except (OSError, AttributeError, TypeError, ValueError):  # no NVML: peak_mib 0, "nvml": false
            self.ok = False

    def now(self) -> int:
        if not self.ok:
            return 0
        infos = (self._Info * 64)()
        count = ctypes.c_uint(64)
        if self.nvml.nvmlDeviceGetComputeRunningProcesses_v3(self.handle, ctypes.byref(count), infos) != 0:
            return 0
        for i in range(count.value):
            if infos[i].pid == os.getpid():
                return infos[i].used
        return 0


class PeakWatcher:
    def __init__(self, mem: ProcessMemory):
        self.mem, self.peak, self.stop = mem, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.mem.now())
            time.sleep(0.002)

    def reset(self):
        self.peak = self.mem.now()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--preset", required=True, choices=["cifar10-32", "celebahq-256"])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()

    t0 = time.perf_counter()
    import torch
    from diffusers import DDIMScheduler, UNet2DModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from safetensors.torch import load_file

    from ddim_export.api import PRESET_SCHEDULER, PRESETS

    dev = torch.device("cuda")
    unet = UNet2DModel(**PRESETS[args.preset])
    state = {k: v for k, v in load_file(args.model).items()}
    unet.load_state_dict(state, strict=True)
    unet = unet.to(dev, torch.float16).eval()
    unet.set_attn_processor(AttnProcessor2_0())  # scaled_dot_product_attention
    if args.mode == "compile":
        unet = torch.compile(unet, mode=args.compile_mode)
    sched = DDIMScheduler.from_config({k: v for k, v in PRESET_SCHEDULER.items() if k != "_class_name"})
    size = PRESETS[args.preset]["sample_size"]

    @torch.no_grad()
    def sample(batch: int) -> torch.Tensor:
        sched.set_timesteps(50)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn((batch, 3, size, size), generator=g, device=dev, dtype=torch.float16)
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        torch.cuda.synchronize()
        return x

    sample(1)
    cold = (time.perf_counter() - t0) * 1e3

    mem = ProcessMemory(0)
    watch = PeakWatcher(mem)
    runs = []
    for b in [1] + [b for b in args.batches if b != 1]:
        torch.cuda.empty_cache()
        watch.reset()
        sample(b)  # warm-up (compilation for a new shape)
        times = []
        for _ in range(max(3, args.runs // 3 if b > 16 else args.runs)):
            s0 = time.perf_counter()
            sample(b)
            times.append((time.perf_counter() - s0) * 1e3)
        times.sort()
        ms = times[len(times) // 2]
        time.sleep(0.01)
        runs.append({"batch": b, "sample50_ms": round(ms, 3), "images_per_s": round(b / (ms / 1e3), 1),
                     "peak_mib": round(watch.peak / 2**20)})
    watch.stop = True
    print(json.dumps({"contender": f"pytorch-{args.mode}" + (f"-{args.compile_mode}" if args.mode == "compile" else ""),
                      "preset": args.preset, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                      "cold_start_ms": round(cold, 1), "nvml": mem.ok, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
