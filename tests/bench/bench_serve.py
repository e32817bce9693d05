"""Throughput and latency of ddim.serve over HTTP: images/s and p50/p90/p99 request latency at several client
concurrencies, with batching on (max_batch, default 8) and off (max_batch 1: every image its own engine call).
Not a test: the numbers depend on the machine. Starts a local Ray (no dashboard) unless --address is given.

    python tests/bench/bench_serve.py                               # CPU: 2 replicas x 1 thread, 10 steps
    python tests/bench/bench_serve.py --device cuda --replicas 1 --max-batch 32 --steps 50 --requests 256

Clients are closed loops (each sends its next request when the previous one is answered), one seed per request,
.npy output, one keep-alive connection per client, all from this process (the standard library's http.client).
A "direct" line times the engine alone in this process (one Session of batch 1 and one of max_batch), to show
what Serve, HTTP and batching add. Needs the installed package (pip install .) and ray[serve].
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

import ddim

REPO = Path(__file__).resolve().parents[2]


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection; reconnects after an error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = None

    def post(self, body: dict):
        data = json.dumps(body).encode()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            try:
                self.conn.request("POST", "/sample", body=data, headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                return r.status, r.getheader("X-DDIM-Engine-Calls") or "", r.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def run_level(port: int, concurrency: int, requests: int, steps: int, seed0: int):
    """`requests` requests from `concurrency` closed-loop clients: (latencies s, wall s, engine call ids, errors)."""
    lock = threading.Lock()
    next_index = iter(range(requests))
    latencies, calls, errors = [], set(), []

    def client() -> None:
        c = Client(port)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            t = time.perf_counter()
            status, ids, body = c.post({"seed": seed0 + i, "steps": steps, "format": "npy"})
            dt = time.perf_counter() - t
            with lock:
                if status == 200:
                    latencies.append(dt)
                    calls.update(ids.split(","))
                else:
                    errors.append((status, body[:200]))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, time.perf_counter() - start, calls, errors


def direct(model_path: str, device: str, threads: int, steps: int, batch: int) -> float:
    """Seconds per image of the engine alone: one Session of `batch`, best of 3 calls after a warm-up."""
    session = ddim.Session(ddim.Model(model_path), device=device, batch=batch, threads=threads)
    session.sample(steps, seed=0)
    best = float("inf")
    for k in range(3):
        t = time.perf_counter()
        session.sample(steps, seed=k)
        best = min(best, time.perf_counter() - t)
    return best / batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "weights" / "default.ddim"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU engine threads per replica (default: 1)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=8, help="max_batch with batching on (default: 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--partial", default="cover", choices=("cover", "pad"),
                   help="partial batches: cover (several exact calls) or pad (one padded call) (default: cover)")
    p.add_argument("--concurrency", default="1,8,32", help="client concurrencies (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default: max(16, 3 x concurrency))")
    p.add_argument("--modes", default="on,off", help="batching modes to run: on, off or both (default)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()

    import ray
    from ray import serve

    import ddim.serve as dserve

    levels = [int(c) for c in a.concurrency.split(",")]
    modes = [m.strip() for m in a.modes.split(",")]
    if any(m not in ("on", "off") for m in modes):
        p.error("--modes takes on, off or on,off")
    threads = a.threads if a.device == "cpu" else 0

    print(f"machine: {machine()}; {load()} before", flush=True)
    load_before = load()
    d1 = direct(a.model, a.device, threads, a.steps, 1)
    db = direct(a.model, a.device, threads, a.steps, a.max_batch)
    print(f"direct engine ({a.device}, {threads or 'default'} thread(s)): {d1 * 1e3:.1f} ms/image at batch 1, "
          f"{db * 1e3:.1f} ms/image at batch {a.max_batch} ({a.steps} steps)", flush=True)

    if a.address:
        ray.init(address=a.address)
    else:
        ray.init(include_dashboard=False, object_store_memory=256 * 1024 * 1024, log_to_driver=False,
                 configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for mode in modes:
            max_batch = a.max_batch if mode == "on" else 1
            app = dserve.build_app(a.model, device=a.device, replicas=a.replicas, threads=threads,
                                   max_batch=max_batch, batch_wait_ms=a.batch_wait_ms, partial=a.partial,
                                   max_queued_requests=-1,
                                   max_ongoing_requests=max(2 * max_batch, 2), warmup=True)
            serve.run(app, name="ddim_bench", route_prefix="/")
            run_level(port, min(4, max(levels)), 8, a.steps, 10**9)  # warm-up: connections, sessions
            for c in levels:
                n = a.requests or max(16, 3 * c)
                lat, wall, calls, errors = run_level(port, c, n, a.steps, 10**6 * (c + 1))
                if errors:
                    print(f"  {len(errors)} errors at concurrency {c}, e.g. {errors[0]}", file=sys.stderr)
                ms = np.array(lat) * 1e3
                row = dict(batching=mode, max_batch=max_batch, concurrency=c, requests=n, ok=len(lat),
                           images_per_s=len(lat) / wall, p50_ms=float(np.percentile(ms, 50)),
                           p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)),
                           engine_calls=len(calls), images_per_call=len(lat) / max(1, len(calls)))
                rows.append(row)
                print(f"  batching {mode:3} concurrency {c:3}: {row['images_per_s']:7.2f} images/s, p50 "
                      f"{row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms", flush=True)
            serve.delete("ddim_bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nddim.serve on {machine()} ({load_before} before, {load()} after)\nmodel {Path(a.model).name}, {a.steps} steps, device {a.device}, "
          f"{a.replicas} replica(s) x {threads or 'default'} thread(s), batch_wait {a.batch_wait_ms:g} ms, "
          f"partial batches: {a.partial}, "
          f"{a.requests or 'max(16, 3 x concurrency)'} requests per row, one seed each\n")
    header = "| batching | concurrency | images/s | p50 ms | p90 ms | p99 ms | images per engine call |"
    print(header)
    print("|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|")
    for r in rows:
        label = f"on (max {r['max_batch']})" if r["batching"] == "on" else "off"
        print(f"| {label} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['images_per_call']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(machine=machine(), args=vars(a), rows=rows,
                                                direct_ms_per_image={"1": d1 * 1e3, str(a.max_batch): db * 1e3}),
                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
