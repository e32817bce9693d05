"""Tests of ddim.serve, the Ray Serve application (docs/serving.md), on the CPU and the loopback interface only.

The module starts one local Ray instance (no dashboard, a 200 MB object store, 4 logical CPUs) and one Serve
application of the bundled model (weights/default.ddim, 32x32x1) with 2 replicas of one CPU and one engine
thread each, the model's bytes put once into the object store. Then, with the standard library's HTTP client in
threads:

* 32 concurrent requests with distinct seeds (some with several seeds), malformed requests mixed in: every image
  is bitwise equal to ddim.Session(model, device="cpu", threads=1).sample(STEPS, seed=s), every malformed request
  gets its 4xx, and the engine-call ids in the responses show that batching happened (fewer calls than images);
* PNG output equals the direct sample quantised like the ddim CLI (and the CLI's own PNG when it is built);
* the deployment handle; overload (503 beyond max_queued_requests);
* a replica killed under load (ray.kill): the failures in between are counted and printed, and once Serve
  reports the replacement running, requests succeed again.

Without Ray the module is skipped (it says why); with DDIM_SERVE_TEST=1 a missing Ray or ddim package fails.
It takes about a minute on 2 cores:  python -m pytest -q tests/python/test_serve.py
"""

from __future__ import annotations

import base64
import http.client
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "weights" / "default.ddim"
STEPS = 10
APP = "ddim_test"


def _need(module: str, why: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"{why} ({type(e).__name__}: {e})"
        if os.environ.get("DDIM_SERVE_TEST", "") not in ("", "0"):
            pytest.fail(message + " [DDIM_SERVE_TEST=1 requires it]", pytrace=False)
        pytest.skip(message, allow_module_level=True)


ddim = _need("ddim", "the ddim package is not installed (pip install . at the repository root)")
ray = _need("ray", "Ray is not installed: pip install 'ray[serve]==2.60.0' to run the ddim.serve tests")
serve = _need("ray.serve", "Ray Serve is not installed: pip install 'ray[serve]==2.60.0'")
dserve = _need("ddim.serve", "ddim.serve cannot be imported")
from ddim import _serve_core as core  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return ddim.Model(str(MODEL))


class References:
    """Direct samples, one seed at a time, by the test itself: the oracle for every served image."""

    def __init__(self, model) -> None:
        self.session = ddim.Session(model, device="cpu", threads=1)
        self.cache = {}
        self.lock = threading.Lock()

    def __call__(self, seed: int, **kwargs) -> np.ndarray:
        key = (seed, tuple(sorted(kwargs.items())))
        with self.lock:
            if key not in self.cache:
                self.cache[key] = self.session.sample(STEPS, seed=seed, **kwargs)[0]
            return self.cache[key]


@pytest.fixture(scope="module")
def refs(model):
    return References(model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(port: int, method: str, path: str, body=None, timeout: float = 120.0):
    """One request on a fresh connection: (status, headers (lower-case keys), body bytes)."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def npy(body: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(body), allow_pickle=False)


def error_of(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except Exception:  # noqa: BLE001 - Serve's own errors are plain text
        return body.decode("utf-8", "replace")


def replica_names():
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))


def replica_states():
    app = serve.status().applications.get(APP)
    if app is None:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in app.deployments[dserve.DEPLOYMENT_NAME].replica_states.items()}


@pytest.fixture(scope="module")
def server():
    """Ray + Serve + the application, once for the module; stopped at the end."""
    t0 = time.monotonic()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False,
             configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        model_ref = ray.put(np.frombuffer(MODEL.read_bytes(), dtype=np.uint8))  # the object-store route
        app = dserve.build_app(model_ref, replicas=2, threads=1, max_batch=8, batch_wait_ms=25, max_seeds=8,
                               default_steps=STEPS, max_body_bytes=4096, max_queued_requests=24,
                               health_check_period_s=1)
        handle = serve.run(app, name=APP, route_prefix="/")
        print(f"\n[serve] Ray + Serve + 2 replicas up in {time.monotonic() - t0:.1f} s (port {port})")
        yield dict(port=port, handle=handle)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# Without Ray actors: the pieces
# ----------------------------------------------------------------------------------------------------------------


def test_cover_and_sizes():
    assert core.session_sizes(8) == [1, 2, 4, 8]
    assert core.session_sizes(6) == [1, 2, 4, 6]
    assert core.session_sizes(1) == [1]
    assert core.cover(7, [1, 2, 4, 8]) == [4, 2, 1]
    assert core.cover(13, [1, 2, 4, 6]) == [6, 6, 1]
    assert core.plan_calls(7, [1, 2, 4, 8]) == [(4, 4), (2, 2), (1, 1)]
    assert core.plan_calls(7, [1, 2, 4, 8], "pad") == [(8, 7)]
    assert core.plan_calls(13, [1, 2, 4, 8], "pad") == [(8, 8), (8, 5)]
    assert core.plan_calls(3, [1, 2, 4, 6], "pad") == [(4, 3)]
    with pytest.raises(ValueError, match="partial"):
        core.plan_calls(3, [1, 2], "round")
    big = core.SampleRequest(seeds=tuple(range(19)), steps=STEPS)
    assert [item.seeds for item in core.split_seeds(big, 8)] == [tuple(range(8)), tuple(range(8, 16)), (16, 17, 18)]
    assert core.images_in(core.split_seeds(big, 8)) == 19
    for bad in (0, -1, ddim.MAX_BATCH + 1, 2.0):
        with pytest.raises(ValueError):
            core.session_sizes(bad)


def test_float_to_bytes_is_the_cli_rule():
    x = np.array([np.nan, -np.inf, np.inf, -1.0, 1.0, -0.9999999, 0.9999999, 0.0, 1 / 255 - 1, 3e-38, 2.0, -2.0],
                 dtype=np.float32)
    # v = (x + 1) / 2 clamped to [0, 1], floor(v * 255 + 0.5) in double, NaN -> 0 (tools/ddim/png.cpp)
    expected = []
    for v in x.astype(np.float64):
        if not v > -1.0:
            expected.append(0)
        elif v >= 1.0:
            expected.append(255)
        else:
            expected.append(int(np.floor((v + 1.0) * 0.5 * 255.0 + 0.5)))
    assert core.float_to_bytes(x).tolist() == expected
    rng = np.random.default_rng(0)
    img = rng.uniform(-1.2, 1.2, size=(3, 5, 7)).astype(np.float32)
    png = core.encode_png(img, {"ddim.seed": "3"})
    assert np.array_equal(core.decode_png(png), core.float_to_bytes(img))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        core.encode_png(np.zeros((2, 4, 4), np.float32))


def test_parse_request_messages(model):
    limits = core.Limits(max_seeds=4, max_steps=100, default_steps=10)
    sched = ddim.Scheduler(model.schedule)

    def check(body, match, status=400):
        with pytest.raises(core.RequestError, match=match) as info:
            core.parse_request(body, limits, sched, 1, model.schedule)
        assert info.value.status == status

    check([], "must be a JSON object")
    check({}, "exactly one of 'seed'")
    check({"seed": 1, "seeds": [2]}, "exactly one of 'seed'")
    check({"seed": 1, "colour": "red"}, "unknown field.*'colour'")
    check({"seed": "7"}, "'seed' must be an integer")
    check({"seed": True}, "'seed' must be an integer")
    check({"seed": 2**64}, "'seed' must be an integer")
    check({"seeds": [1, 2.5]}, "'seeds' must be")
    check({"seeds": [1, 2, 3, 4, 5]}, "at most 4")
    check({"seed": 1, "steps": "10"}, "'steps' must be an integer")
    check({"seed": 1, "steps": 101}, "at most 100")
    check({"seed": 1, "steps": 0}, "num_steps must be at least 1")  # the engine's message
    check({"seed": 1, "eta": -1}, "eta must be finite and >= 0")  # the engine's message
    check({"seed": 1, "eta": "0"}, "'eta' must be a number")
    check({"seed": 1, "spacing": "bogus"}, "unknown timestep spacing 'bogus'")
    check({"seed": 1, "steps_offset": 995}, "outside \\[0, 1000\\)")
    check({"seed": 1, "clip_sample": "yes"}, "'clip_sample' must be")
    check({"seed": 1, "format": "jpg"}, "'format' must be")
    r = core.parse_request({"seeds": [5, 6], "eta": 0}, limits, sched, 1, model.schedule)
    assert r.seeds == (5, 6) and r.steps == 10 and r.format == "png"
    # Omitted options and the model's defaults spelled out make the same batching key.
    spelled = core.parse_request({"seed": 9, "spacing": "leading", "clip_sample": True}, limits, sched, 1,
                                 model.schedule)
    assert spelled.settings == r.settings
    assert core.parse_request({"seed": 9, "eta": 0.5}, limits, sched, 1, model.schedule).settings != r.settings
    with pytest.raises(core.RequestError, match="needs 1 or 3 channels"):
        core.parse_request({"seed": 1}, limits, sched, 4, model.schedule)


def test_engine_batches_by_settings_and_isolates_failures(model, refs):
    """Requests of different settings never share an engine call; a failing engine call is retried item by item,
    so only the item that fails by itself gets the error."""
    poison = 666

    class Flaky:
        def __init__(self, model, batch):
            self.inner = ddim.Session(model, device="cpu", batch=batch, threads=1)
            self.backend = "cpu"

        def sample(self, steps, *, seeds, **kwargs):
            if poison in seeds:
                raise ddim.InternalError(f"injected failure for seed {poison}")
            return self.inner.sample(steps, seeds=seeds, **kwargs)

    engine = core.Engine(model, max_batch=4, label="t", session_factory=Flaky)
    try:
        limits, sched = core.Limits(default_steps=STEPS), ddim.Scheduler(model.schedule)

        def req(body):
            return core.parse_request(dict(body, steps=STEPS), limits, sched, 1, model.schedule)

        a, bad, c = req({"seeds": [1, 2]}), req({"seed": poison}), req({"seed": 3})
        other = req({"seed": 4, "eta": 1.0})
        items = [core.WorkItem(a, a.seeds), core.WorkItem(bad, bad.seeds), core.WorkItem(other, other.seeds),
                 core.WorkItem(c, c.seeds)]
        results = engine.executor.submit(engine.run_batch, items).result()
        assert isinstance(results[1].error, ddim.InternalError) and "seed 666" in str(results[1].error)
        for r, seeds in ((results[0], [1, 2]), (results[3], [3])):
            assert r.error is None
            for img, s in zip(r.images, seeds):
                assert np.array_equal(img, refs(s)), f"seed {s}"
        assert results[2].error is None and np.array_equal(results[2].images[0], refs(4, eta=1.0))
        assert not set(results[2].calls) & set(results[0].calls + results[3].calls), "settings were mixed"
        stats = engine.stats()
        assert stats["retried_items"] == 3 and stats["failed_calls"] >= 2, stats
    finally:
        engine.close()


def test_engine_serves_a_latent_model_decoded(tmp_path):
    """A latent model (ddim-make-model --preset ldm-tiny: 4x8x6 latents, a VQ decoder of factor 2 to 16x12 RGB):
    the engine's shape is the decoded images' (PNG takes their 3 channels), and the served images are bitwise the
    direct decoded samples."""
    maker = Path(os.environ.get("DDIM_BIN", REPO / "build" / "bin" / "ddim")).with_name("ddim-make-model")
    if not maker.is_file():
        pytest.skip(f"{maker} is not built")
    path = tmp_path / "ldm-tiny.ddim"
    subprocess.run([str(maker), "--preset", "ldm-tiny", "--seed", "3", "--out", str(path)], check=True,
                   capture_output=True, timeout=120)
    latent = ddim.Model(str(path))
    engine = core.Engine(latent, max_batch=2, label="l")
    try:
        assert engine.shape == (3, 16, 12)
        r = core.parse_request({"seeds": [7, 8], "steps": STEPS, "format": "png"}, core.Limits(),
                               ddim.Scheduler(latent.schedule), engine.shape[0], latent.schedule)
        result = engine.submit([core.WorkItem(r, r.seeds)])[0].result(timeout=120)
        assert result.error is None and result.images.shape == (2, 3, 16, 12)
        direct = ddim.Session(latent, device="cpu", threads=1)
        for img, s in zip(result.images, r.seeds):
            assert np.array_equal(img, direct.sample(STEPS, seed=s)[0]), s
    finally:
        engine.close()


def test_engine_padding_keeps_images(model, refs):
    """partial="pad": 3 images run as one call of 4 (one padding image, dropped); the images are bitwise the
    direct ones (on the CPU an image depends on its own seed only)."""
    engine = core.Engine(model, max_batch=4, partial="pad", label="p")
    try:
        r = core.parse_request({"seeds": [41, 42, 43], "steps": STEPS}, core.Limits(), ddim.Scheduler(model.schedule),
                               1, model.schedule)
        result = engine.submit([core.WorkItem(r, r.seeds)])[0].result(timeout=120)
        assert result.error is None and result.images.shape == (3, 1, 32, 32)
        assert len(set(result.calls)) == 1
        for img, s in zip(result.images, r.seeds):
            assert np.array_equal(img, refs(s)), s
        stats = engine.stats()
        assert stats["engine_calls"] == 1 and stats["padded_images"] == 1 and stats["sessions"] == [4], stats
    finally:
        engine.close()


def test_engine_queue_merges_waiting_batches(model):
    """While the worker is busy, submitted items wait; when it is free it runs the oldest item's settings with every
    waiting item of the same settings, up to max_batch images; cancelled items never run."""
    started, release = threading.Event(), threading.Event()
    log = []

    class Gated:
        def __init__(self, model, batch):
            self.backend = "fake"

        def sample(self, steps, *, seeds, eta, **kwargs):
            log.append((eta, list(seeds)))
            if len(log) == 1:
                started.set()
                assert release.wait(60)
            return np.stack([np.full((1, 32, 32), s, np.float32) for s in seeds])

    engine = core.Engine(model, max_batch=4, label="q", session_factory=Gated)
    try:
        limits, sched = core.Limits(default_steps=STEPS), ddim.Scheduler(model.schedule)

        def item(seeds, eta):
            r = core.parse_request({"seeds": seeds, "eta": eta}, limits, sched, 1, model.schedule)
            return core.WorkItem(r, r.seeds)

        first = engine.submit([item([100], 0.0)])
        assert started.wait(60)
        a1, b1, a2, a3, gone = engine.submit([item([1], 0.0), item([2], 1.0), item([3, 4], 0.0), item([5, 6], 0.0),
                                              item([7], 0.0)])
        assert gone.cancel()
        release.set()
        results = [f.result(timeout=60) for f in (first[0], a1, b1, a2, a3)]
        assert gone.cancelled()
        assert log == [(0.0, [100]), (0.0, [1, 3]), (0.0, [4]), (1.0, [2]), (0.0, [5, 6])], log
        for r, seeds in zip(results, ([100], [1], [2], [3, 4], [5, 6])):
            assert r.error is None and [int(img[0, 0, 0]) for img in r.images] == seeds
        assert results[1].calls[0] == results[3].calls[0], "a1 and a2 should share an engine call"
        assert engine.stats()["batches"] == 4
    finally:
        release.set()
        engine.close()


def test_model_sources(model):
    src, name = dserve._model_source(str(MODEL), "path")
    assert src == str(MODEL.resolve()) and name == "default.ddim"
    src, name = dserve._model_source(str(MODEL), "inline")
    assert isinstance(src, bytes) and len(src) == MODEL.stat().st_size
    loaded = dserve._load_model(src, name)
    assert loaded.info.parameter_count == model.info.parameter_count
    with pytest.raises(ddim.IoError, match="every node"):
        dserve._load_model(str(MODEL) + ".missing", "x")


def test_options_and_builder():
    o = dserve.resolve_options({"model": "m.ddim", "replicas": "3", "warmup": "true", "batch_wait_ms": "5"})
    assert o["replicas"] == 3 and o["warmup"] is True and o["batch_wait_ms"] == 5.0
    d = dserve._deployment_options(o)
    assert d["num_replicas"] == 3 and d["max_ongoing_requests"] == 16 and d["ray_actor_options"]["num_gpus"] == 0
    d = dserve._deployment_options(dserve.resolve_options({"model": "m", "device": "cuda", "max_replicas": 4}))
    assert d["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in d
    assert d["autoscaling_config"] == dict(min_replicas=1, max_replicas=4, initial_replicas=1,
                                           target_ongoing_requests=8.0)
    for bad, match in (({"replicas": "two"}, "must be int"), ({"max_batch": 0}, "max_batch"),
                       ({"device": "tpu"}, "one of cpu, cuda, auto"), ({"port": 80}, "host and port go in"),
                       ({"bogus": 1}, "unknown option"), ({"min_replicas": 2}, "need max_replicas")):
        with pytest.raises(ValueError, match=match):
            dserve.resolve_options(dict(bad, model="m"))
    with pytest.raises(ValueError, match="object-store needs a driver"):
        dserve.app_builder({"model": str(MODEL), "ship_model": "object-store"})


def test_config_file_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "tools/serve/config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "ddim.serve:app_builder" and config.http_options.host == "127.0.0.1"
    args = dict(app.args, model=str(MODEL))
    assert isinstance(dserve.app_builder(args), serve.Application)


def test_command_line_help_and_errors():
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    ok = subprocess.run([sys.executable, "-m", "ddim.serve", "--help"], capture_output=True, text=True, timeout=120,
                        env=env)
    assert ok.returncode == 0 and "--replicas" in ok.stdout and "authentication" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "ddim.serve", "--model", str(MODEL), "--max-batch", "0"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "max_batch" in bad.stderr, bad.stderr


def test_one_command_start_and_ctrl_c(refs):
    """python -m ddim.serve ... serves (the model by path), and Ctrl-C (SIGINT) shuts it and its Ray down.
    Runs before the module's own Ray starts (the server fixture is first used below)."""
    import signal

    port = _free_port()
    cmd = [sys.executable, "-m", "ddim.serve", "--model", str(MODEL), "--replicas", "1", "--device", "cpu",
           "--port", str(port), "--default-steps", str(STEPS), "--object-store-mb", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ddim.serve exited with {proc.returncode}:\n{proc.stdout.read()}"
            try:
                if send(port, "GET", "/healthz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "ddim.serve did not answer /healthz within 120 s"
            time.sleep(0.5)
        status, headers, body = send(port, "POST", "/sample", {"seed": 4242})
        assert status == 200 and headers["content-type"] == "image/png", (status, body[:200])
        assert np.array_equal(core.decode_png(body), core.float_to_bytes(refs(4242)))
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, output[-3000:]
        assert "no authentication" in output and "shutting down" in output, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ----------------------------------------------------------------------------------------------------------------
# Through Ray Serve
# ----------------------------------------------------------------------------------------------------------------

MALFORMED = [
    # (description, method, path, body, expected status, text the error must contain)
    ("missing seed", "POST", "/sample", {"steps": STEPS}, 400, "exactly one of 'seed'"),
    ("empty object", "POST", "/sample", {}, 400, "exactly one of 'seed'"),
    ("steps 0", "POST", "/sample", {"seed": 1, "steps": 0}, 400, "num_steps must be at least 1"),
    ("eta -1", "POST", "/sample", {"seed": 1, "eta": -1}, 400, "eta must be finite and >= 0"),
    ("seed as string", "POST", "/sample", {"seed": "12"}, 400, "'seed' must be an integer"),
    ("steps as float", "POST", "/sample", {"seed": 1, "steps": 10.5}, 400, "'steps' must be an integer"),
    ("too many seeds", "POST", "/sample", {"seeds": list(range(9))}, 400, "at most 8"),
    ("not JSON", "POST", "/sample", b"{seed: 1", 400, "not valid JSON"),
    ("NaN literal", "POST", "/sample", b'{"seed": 1, "eta": NaN}', 400, "not valid JSON"),
    ("empty body", "POST", "/sample", b"", 400, "body is empty"),
    ("oversized body", "POST", "/sample", json.dumps({"seed": 1, "pad": "x" * 6000}).encode(), 413, "at most 4096"),
    ("GET /sample", "GET", "/sample", None, 405, "takes POST"),
    ("unknown route", "GET", "/nowhere", None, 404, "no route"),
]


def test_concurrent_http_bitwise_batched_and_malformed(server, refs):
    port = server["port"]
    # 32 valid requests with distinct seeds: 28 of one seed, 4 of three seeds; all as .npy.
    valid = [[1000 + i] for i in range(28)] + [[2000 + 10 * i + k for k in range(3)] for i in range(4)]
    jobs = [("valid", seeds) for seeds in valid] + [("bad", m) for m in MALFORMED]
    rng = np.random.default_rng(1)
    rng.shuffle(jobs)
    barrier = threading.Barrier(len(jobs))

    retries = Counter()

    def run(job):
        # Serve counts a request as queued until its router has heard from a replica, so a burst of 45 can meet
        # backpressure (503, max_queued_requests 24) although 2 replicas x 16 could hold it. A client retries a
        # 503; at most 50 times here, and only for Serve's backpressure answer, so any other failure still fails.
        kind, what = job
        barrier.wait(timeout=60)
        if kind == "valid":
            body = {"seed": what[0]} if len(what) == 1 else {"seeds": what}
            method, path, body = "POST", "/sample", dict(body, steps=STEPS, format="npy")
        else:
            _, method, path, body, _, _ = what
        for attempt in range(50):
            got = send(port, method, path, body)
            if got[0] != 503 or b"backpressure" not in got[2]:
                break
            retries[kind] += 1
            time.sleep(0.05 * (attempt + 1))
        return job, got

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.monotonic() - t0

    calls, replicas, images = set(), Counter(), 0
    for (kind, what), (status, headers, body) in results:
        if kind == "bad":
            desc, _, _, _, want, text = what
            assert status == want, f"{desc}: got {status} {body[:300]!r}"
            assert text in error_of(body), f"{desc}: {error_of(body)!r}"
            continue
        assert status == 200, f"seeds {what}: {status} {body[:300]!r}"
        got = npy(body)
        assert got.dtype == np.float32 and got.shape == (len(what), 1, 32, 32)
        assert headers["x-ddim-seeds"] == ",".join(map(str, what))
        for img, seed in zip(got, what):
            assert np.array_equal(img, refs(seed)), f"seed {seed}: not bitwise equal to the direct sample"
        ids = headers["x-ddim-engine-calls"].split(",")
        assert len(ids) == len(what)
        calls.update(ids)
        replicas[headers["x-ddim-replica"]] += 1
        images += len(what)
    print(f"\n[serve] {len(valid)} requests, {images} images in {elapsed:.2f} s through {len(calls)} engine calls "
          f"on replicas {dict(replicas)}; {len(MALFORMED)} malformed requests answered 4xx; retries after 503: "
          f"{dict(retries) or 0}")
    assert images == 40
    assert len(calls) < images, "no batching: one engine call per image"


def test_png_output(server, refs):
    port = server["port"]
    status, headers, body = send(port, "POST", "/sample", {"seed": 77, "steps": STEPS})
    assert status == 200 and headers["content-type"] == "image/png", (status, body[:200])
    pixels = core.decode_png(body)
    assert np.array_equal(pixels, core.float_to_bytes(refs(77)))
    # Several seeds as PNG: JSON with one base64 PNG per seed, in request order.
    status, headers, body = send(port, "POST", "/sample", {"seeds": [78, 79], "steps": STEPS, "format": "png"})
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["seeds"] == [78, 79] and doc["shape"] == [1, 32, 32] and len(doc["images"]) == 2
    for b64, seed in zip(doc["images"], doc["seeds"]):
        assert np.array_equal(core.decode_png(base64.b64decode(b64)), core.float_to_bytes(refs(seed)))
    # The ddim CLI's own PNG of the same seed, when the CLI is built.
    cli = Path(os.environ.get("DDIM_BIN", REPO / "build" / "bin" / "ddim"))
    if cli.is_file():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([str(cli), "sample", "--model", str(MODEL), "--seeds", "77", "--steps", str(STEPS),
                            "--device", "cpu", "--threads", "1", "--out-dir", tmp], check=True, capture_output=True,
                           timeout=120)
            assert np.array_equal(core.decode_png((Path(tmp) / "77_0.png").read_bytes()), pixels)


def test_info_healthz_and_handle(server, refs):
    port = server["port"]
    status, _, body = send(port, "GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = send(port, "GET", "/info")
    info = json.loads(body)
    assert status == 200 and info["model"]["height"] == 32 and info["batching"]["session_sizes"] == [1, 2, 4, 8]
    assert info["engine"]["engine_calls"] >= 1 and info["limits"]["max_seeds"] == 8
    handle = server["handle"]
    out = handle.sample.remote(seeds=[31, 32, 33], steps=STEPS, format="npy").result(timeout_s=120)
    assert out["seeds"] == [31, 32, 33]
    for img, seed in zip(out["images"], out["seeds"]):
        assert np.array_equal(img, refs(seed))
    out = handle.sample.remote({"seed": 34, "steps": STEPS}).result(timeout_s=120)
    assert np.array_equal(core.decode_png(out["png"][0]), core.float_to_bytes(refs(34)))
    with pytest.raises(ddim.InvalidArgumentError, match="num_steps must be at least 1"):
        handle.sample.remote(seed=1, steps=0).result(timeout_s=120)
    assert handle.info.remote().result(timeout_s=60)["model"]["width"] == 32


def test_overload_gets_503(server):
    """2 replicas x max_ongoing_requests 16 + max_queued_requests 24: of 100 simultaneous requests, the excess gets
    503 from Serve; every accepted one succeeds."""
    port = server["port"]
    n = 100
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait(timeout=60)
        return send(port, "POST", "/sample", {"seed": 5000 + i, "steps": STEPS, "format": "npy"})

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(run, range(n)))
    codes = Counter(status for status, _, _ in results)
    print(f"\n[serve] overload: {n} simultaneous requests -> {dict(codes)}")
    assert set(codes) <= {200, 503}, {s: error_of(b) for s, _, b in results if s not in (200, 503)}
    assert codes[503] >= 1 and codes[200] >= 32
    # The server is fine afterwards.
    assert send(port, "POST", "/sample", {"seed": 1, "steps": STEPS, "format": "npy"})[0] == 200


def test_killed_replica_is_replaced(server, refs):
    port = server["port"]
    before = replica_names()
    assert len(before) == 2, before
    victim = before[0]
    stop = threading.Event()
    log = []  # (start time, status, message)
    lock = threading.Lock()
    counter = iter(range(10_000, 20_000))

    def load():
        while not stop.is_set():
            with lock:
                seed = next(counter)
            t = time.monotonic()
            try:
                status, _, body = send(port, "POST", "/sample", {"seed": seed, "steps": STEPS, "format": "npy"},
                                       timeout=60)
                message = "" if status == 200 else error_of(body)[:200]
            except OSError as e:
                status, message = -1, f"{type(e).__name__}: {e}"
            with lock:
                log.append((t, status, message))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = t_kill + 120
    while time.monotonic() < deadline:
        names = replica_names()
        if victim not in names and len(names) == 2 and replica_states() == {"RUNNING": 2}:
            break
        time.sleep(0.25)
    else:
        stop.set()
        pytest.fail(f"no healthy replacement within 120 s: replicas {replica_names()}, states {replica_states()}")
    t_healthy = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for th in threads:
        th.join(timeout=90)

    failures = [(round(t - t_kill, 2), s, m) for t, s, m in log if s != 200]
    print(f"\n[serve] killed {victim}; replacement RUNNING after {t_healthy - t_kill:.1f} s; "
          f"{len(log)} requests under load, {len(failures)} failed:")
    for f in failures[:10]:
        print(f"    t={f[0]:+.2f}s status {f[1]}: {f[2]}")
    late = [f for t, s, m in log if s != 200 and t > t_healthy for f in [(round(t - t_kill, 2), s, m)]]
    assert not late, f"requests started after the replacement was reported healthy failed: {late}"

    # Afterwards: every request succeeds, bitwise, on the two replicas Serve now has.
    after = replica_names()
    seeds = list(range(30_000, 30_008))
    with ThreadPoolExecutor(len(seeds)) as pool:
        results = list(pool.map(lambda s: send(port, "POST", "/sample", {"seed": s, "steps": STEPS, "format": "npy"}),
                                seeds))
    for s, (status, headers, body) in zip(seeds, results):
        assert status == 200, (s, status, error_of(body))
        assert np.array_equal(npy(body)[0], refs(s))
    print(f"[serve] after recovery: replicas {after}, 8/8 requests succeeded, served by "
          f"{sorted(Counter(h['x-ddim-replica'] for _, h, _ in results).items())}")
