"""Tests of the installed Python package `ddim` (pyproject.toml, engine/python): the nanobind bindings of the
engine, array handling, errors, threads and Ctrl-C, the exporter entry points and the docs/python.md example.

They run against the INSTALLED package (pip install . first): an `import ddim` that resolves into the source tree
(engine/python/ddim, or tools/ddim as a namespace package) fails loudly. When the package is not installed at
all the module is skipped, unless DDIM_PACKAGE_TEST=1 (set by the CTest that installs it first), where that
fails too. Without torch/diffusers the export tests are skipped; without a CUDA device the CUDA tests are.
The `ddim` CLI for the bitwise comparison comes from $DDIM_BIN (skipped when unset).

Run from anywhere:  python -m pytest -q tests/python/test_package.py
(where conftest.py's torch import is unavailable: add --noconftest; this file needs no fixture of it).
"""

from __future__ import annotations

import _thread
import gc
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_PATH = REPO / "weights" / "default.ddim"
DOCS = REPO / "docs" / "python.md"


def _check_not_source(path: Path) -> None:
    path = path.resolve()
    for source in (REPO / "engine" / "python", REPO / "tools"):
        if path.is_relative_to(source):
            pytest.fail(f"`import ddim` resolves to the source tree ({path}); these tests need the installed package "
                        "(pip install .) and must not run with engine/python on sys.path", pytrace=False)


def _import_installed_ddim():
    required = os.environ.get("DDIM_PACKAGE_TEST", "") not in ("", "0")
    spec = importlib.util.find_spec("ddim")
    if spec is not None and spec.origin:
        _check_not_source(Path(spec.origin))
    try:
        import ddim as module
    except ImportError as e:
        message = f"the ddim Python package is not installed ({e}); run `pip install .` at the repository root"
        if required:
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
    where = getattr(module, "__file__", None)
    if where is None:  # tools/ddim (C++ sources) picked up as a namespace package: not the real package
        message = (f"`import ddim` found a namespace package at {list(getattr(module, '__path__', []))}, not the "
                   "installed package; run `pip install .` at the repository root")
        if required:
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
    _check_not_source(Path(where))
    return module


ddim = _import_installed_ddim()
_ddim = ddim._ddim

HAVE_CUDA_DEVICE = ddim.cuda_device_count() > 0
needs_cuda = pytest.mark.skipif(not HAVE_CUDA_DEVICE, reason="no CUDA device (ddim.cuda_device_count() == 0)")


# ------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model():
    return ddim.Model(MODEL_PATH)


@pytest.fixture(scope="module")
def cpu1(model):
    return ddim.Session(model, device="cpu", batch=1)


@pytest.fixture(scope="module")
def cpu2(model):
    return ddim.Session(model, device="cpu", batch=2)


@pytest.fixture(scope="module")
def small(model):
    """8x8 samples: every step is cheap (DDPM's 1000 steps, the Ctrl-C test)."""
    return ddim.Session(model, device="cpu", batch=1, height=8, width=8)


# ------------------------------------------------------------------------------------------------------- package

def test_version_and_layout():
    assert ddim.__version__ == importlib.metadata.version("ddim")
    header = (REPO / "engine" / "include" / "ddim" / "ddim.h").read_text()
    parts = [re.search(rf"#define DDIM_VERSION_{k} (\d+)", header).group(1) for k in ("MAJOR", "MINOR", "PATCH")]
    assert ddim.__version__ == ".".join(parts)
    pkg = Path(ddim.__file__).parent
    stub = pkg / "_ddim.pyi"
    assert stub.is_file(), "the nanobind stub _ddim.pyi is not installed"
    text = stub.read_text()
    for name in ("class Session", "class Model", "class Scheduler", "def sample(", "def slerp("):
        assert name in text
    assert (pkg / "py.typed").is_file()
    assert (pkg / "_export" / "api.py").is_file(), "the exporter (tools/ddim_export) is not shipped as ddim._export"
    for name in ddim.__all__:
        obj = getattr(ddim, name)
        if callable(obj):
            assert obj.__doc__, f"ddim.{name} has no docstring"


def test_public_methods_have_docstrings():
    for cls in (ddim.Model, ddim.Session, ddim.Scheduler, ddim.SampleResult, ddim.InvertResult, ddim.ModelInfo):
        assert cls.__doc__
        for name, member in vars(cls).items():
            if not name.startswith("_"):
                assert getattr(member, "__doc__", None), f"{cls.__name__}.{name} has no docstring"


# ------------------------------------------------------------------------------------------------------- Model

def test_model_info_and_schedule(model):
    info = model.info
    assert (info.in_channels, info.out_channels, info.height, info.width) == (1, 1, 32, 32)
    assert info.parameter_count > 100_000 and info.node_count > 10
    assert sum(info.tensors_by_dtype.values()) > 0
    sched = model.schedule
    assert sched["num_train_timesteps"] == 1000
    assert sched["prediction_type"] == "epsilon"
    assert isinstance(sched["clip_sample"], bool)
    assert "Model" in repr(model) and "in_channels=1" in repr(info)
    assert isinstance(model.summary(), str) and len(model.summary()) > 100


def test_model_from_bytes(model, cpu1):
    m2 = ddim.Model.from_bytes(MODEL_PATH.read_bytes(), name="default")
    assert m2.info.parameter_count == model.info.parameter_count
    s2 = ddim.Session(m2, device="cpu")
    assert np.array_equal(s2.sample(2, seed=3), cpu1.sample(2, seed=3))
    m3 = ddim.Model.from_bytes(memoryview(bytearray(MODEL_PATH.read_bytes())))
    assert m3.schedule == model.schedule


# ------------------------------------------------------------------------------------------------------- sampling

def test_sample_basic(cpu2):
    x = cpu2.sample(steps=4, seed=5)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (2, 1, 32, 32)
    assert x.flags["C_CONTIGUOUS"] and np.all(np.isfinite(x))
    assert np.array_equal(x, cpu2.sample(4, seed=5))
    assert not np.array_equal(x, cpu2.sample(4, seed=6))
    assert cpu2.shape == (2, 1, 32, 32) and cpu2.backend == "cpu"
    info = cpu2.plan_info
    assert info["batch"] == 2 and info["precision"] == "fp32" and info["backend"].startswith("cpu")
    assert "Session" in repr(cpu2)


def test_sample_matches_cli_bitwise(cpu2, tmp_path):
    binary = os.environ.get("DDIM_BIN")
    if not binary:
        pytest.skip("DDIM_BIN is not set (the ddim CLI to compare with)")
    out = tmp_path / "cli.npy"
    proc = subprocess.run([binary, "sample", "--model", str(MODEL_PATH), "--steps", "4", "--batch", "2", "--seed", "5",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli = np.load(out)
    py = cpu2.sample(steps=4, seed=5)
    assert cli.dtype == np.float32 and cli.shape == py.shape
    assert np.array_equal(cli, py), f"max abs diff {np.max(np.abs(cli - py))}"


def test_per_sample_seeds(model, cpu1):
    s3 = ddim.Session(model, device="cpu", batch=3)
    batch = s3.sample(steps=3, seeds=[9, 2, 5])
    for i, seed in enumerate([9, 2, 5]):
        assert np.array_equal(batch[i], cpu1.sample(steps=3, seed=seed)[0]), f"sample {i} (seed {seed})"
    # seed + i without seeds
    assert np.array_equal(s3.sample(steps=3, seed=2)[0], batch[1])
    with pytest.raises(ddim.InvalidArgumentError, match="seeds"):
        s3.sample(steps=3, seeds=[1, 2])


def test_x_T_and_initial_noise(cpu2):
    x_T = np.stack([ddim.initial_noise(5 + i, (1, 32, 32)) for i in range(2)])
    assert x_T.dtype == np.float32 and x_T.shape == (2, 1, 32, 32)
    assert ddim.initial_noise(5, 1024).shape == (1024,)
    assert np.array_equal(ddim.initial_noise(5, np.int64(1024)), ddim.initial_noise(5, 1024))
    assert np.array_equal(cpu2.sample(4, x_T=x_T), cpu2.sample(4, seed=5))
    with pytest.raises(ddim.InvalidArgumentError, match=r"x_T has shape \(1, 1, 32, 32\)"):
        cpu2.sample(4, x_T=x_T[:1])


def test_trajectory_x0_and_timesteps(cpu2, model):
    r = cpu2.sample(steps=3, seed=1, trajectory=True, x0=True)
    assert isinstance(r, ddim.SampleResult)
    assert r.images.shape == (2, 1, 32, 32)
    assert r.trajectory.shape == (4, 2, 1, 32, 32) and r.x0.shape == (3, 2, 1, 32, 32)
    assert np.array_equal(r.trajectory[-1], r.images)
    assert np.array_equal(r.images, cpu2.sample(3, seed=1))
    assert r.timesteps == cpu2.timesteps(3) == ddim.Scheduler(model.schedule).timesteps(3)
    assert r.warning == ""
    only_x0 = cpu2.sample(steps=3, seed=1, x0=True)
    assert only_x0.trajectory is None and only_x0.x0.shape == (3, 2, 1, 32, 32)
    assert cpu2.timesteps(4, spacing="trailing") == [999, 749, 499, 249]
    assert cpu2.timesteps(timesteps=[500, 20]) == [500, 20]
    custom = cpu2.sample(timesteps=[500, 20], seed=1, trajectory=True)
    assert custom.timesteps == [500, 20]


def test_eta_and_noise(cpu1):
    ts = cpu1.timesteps(3)
    noise = np.random.default_rng(0).standard_normal((len(ts), 1, 1, 32, 32)).astype(np.float32)
    a = cpu1.sample(3, eta=1.0, seed=4, noise=noise)
    assert np.array_equal(a, cpu1.sample(3, eta=1.0, seed=4, noise=noise))
    assert not np.array_equal(a, cpu1.sample(3, eta=1.0, seed=4))
    assert not np.array_equal(cpu1.sample(3, eta=1.0, seed=4), cpu1.sample(3, eta=0.0, seed=4))
    with pytest.raises(ddim.InvalidArgumentError, match="noise has shape"):
        cpu1.sample(3, eta=1.0, noise=noise[:2])
    with pytest.raises(ddim.InvalidArgumentError, match="eta"):
        cpu1.sample(3, eta=-1.0)


def test_schedule_overrides(cpu1):
    base = cpu1.sample(3, seed=2)
    assert not np.array_equal(base, cpu1.sample(3, seed=2, clip_sample=False, set_alpha_to_one=False))
    assert np.array_equal(base, cpu1.sample(3, seed=2, steps_offset=0, use_clipped_model_output=False))
    assert cpu1.timesteps(3, steps_offset=1) == [667, 334, 1]


def test_warning_for_spacing(cpu1):
    with pytest.warns(RuntimeWarning):
        plan = cpu1.timesteps(999, spacing="log")
    assert len(plan) < 999


def test_sample_ddpm(small):
    r = small.sample_ddpm(seed=1, x0=True)
    assert r.images.shape == (1, 1, 8, 8) and r.x0.shape == (1000, 1, 1, 8, 8)
    assert r.timesteps[0] == 999 and r.timesteps[-1] == 0
    assert np.all(np.isfinite(r.images))
    with pytest.raises(ddim.CancelledError):
        small.sample_ddpm(seed=1, variance="fixed_large", progress=lambda done, total: done < 3)
    with pytest.raises(ddim.InvalidArgumentError):
        small.sample_ddpm(variance="something")
    with pytest.raises(ddim.InvalidArgumentError, match="noise"):
        small.sample_ddpm(noise=np.zeros((3, 1, 1, 8, 8), np.float32))


def test_invert(cpu1):
    x0 = cpu1.sample(4, seed=7, clip_sample=False)
    x_T = cpu1.invert(x0, steps=4)
    assert x_T.shape == x0.shape and np.all(np.isfinite(x_T))
    r = cpu1.invert(x0, steps=4, trajectory=True, model_time="next")
    assert isinstance(r, ddim.InvertResult)
    assert r.trajectory.shape == (5, 1, 1, 32, 32) and np.array_equal(r.trajectory[0], x0)
    assert r.timesteps == sorted(cpu1.timesteps(4)) and len(r.model_timesteps) == 4
    refined = cpu1.invert(x0, steps=4, refine=1)
    assert refined.shape == x0.shape
    with pytest.raises(ddim.InvalidArgumentError):
        cpu1.invert(x0, steps=4, model_time="later")


def test_forward_and_dump(cpu2):
    x = ddim.initial_noise(1, (2, 1, 32, 32))
    out = cpu2.forward(x, 500)
    assert out.shape == (2, 1, 32, 32) and out.dtype == np.float32
    assert np.array_equal(out, cpu2.forward(x, [500, 500]))
    assert np.array_equal(out, cpu2.forward(x, np.int64(500)))
    assert np.array_equal(out, cpu2.forward(x, np.array([500, 500])))
    assert not np.array_equal(out, cpu2.forward(x, [500, 10]))
    seen = []
    dumped = cpu2.forward(x, 500, dump=lambda name, a: seen.append((name, a.shape)))
    assert np.array_equal(dumped, out)
    assert len(seen) > 10 and all(isinstance(n, str) for n, _ in seen)
    assert all(len(shape) in (2, 4) and shape[0] == 2 for _, shape in seen)

    def boom(name, a):
        raise ZeroDivisionError(name)

    with pytest.raises(ZeroDivisionError):
        cpu2.forward(x, 500, dump=boom)
    with pytest.raises(ddim.InvalidArgumentError):
        cpu2.forward(x, [1, 2, 3])
    with pytest.raises(ddim.InvalidArgumentError):
        cpu2.forward(x, 5000)


# ------------------------------------------------------------------------------------------------------- Scheduler

def test_scheduler(model):
    s = ddim.Scheduler(model.schedule)
    assert s.num_train_timesteps == 1000 and s.alphas_cumprod.dtype == np.float64
    assert s.alphas_cumprod.shape == (1000,)
    assert s.config == model.schedule
    assert ddim.Scheduler(model).config == model.schedule
    assert ddim.Scheduler().config["beta_schedule"] == "linear"
    assert s.timesteps(4) == [750, 500, 250, 0]
    assert s.timesteps(4, spacing="trailing") == [999, 749, 499, 249]
    c = s.step_coefficients(500, 250)
    a_t, a_prev = s.alphas_cumprod[500], s.alphas_cumprod[250]
    assert c["alpha_t"] == pytest.approx(a_t, rel=1e-12) and c["alpha_prev"] == pytest.approx(a_prev, rel=1e-12)
    assert c["sigma"] == 0.0 and c["dir"] == pytest.approx(np.sqrt(1 - a_prev))
    assert len(s.coefficients([750, 500, 250, 0])) == 4

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    prev, pred = s.step(eps, 500, 250, sample, return_pred_x0=True, clip_sample=False)
    x0 = (sample.astype(np.float64) - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    expect = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    assert prev.shape == sample.shape and prev.dtype == np.float32
    np.testing.assert_allclose(pred, x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prev, expect, rtol=1e-5, atol=1e-5)
    # float64 and non-contiguous inputs are converted
    np.testing.assert_array_equal(s.step(eps.astype(np.float64), 500, 250, sample, clip_sample=False), prev)
    noise = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    assert not np.array_equal(s.step(eps, 500, 250, sample, eta=1.0, noise=noise), s.step(eps, 500, 250, sample))
    with pytest.raises(ddim.InvalidArgumentError, match="shape"):
        s.step(eps[:1], 500, 250, sample)
    with pytest.raises(ddim.InvalidArgumentError):
        s.step_coefficients(1000, 0)


def test_scheduler_config_parsing():
    s = ddim.Scheduler({"_class_name": "DDIMScheduler", "num_train_timesteps": 100, "beta_schedule": "scaled_linear",
                        "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
                        "timestep_spacing": "trailing", "clip_sample": False, "trained_betas": None})
    assert s.num_train_timesteps == 100 and s.config["prediction_type"] == "v_prediction"
    assert s.timesteps(2) == [99, 49]
    betas = np.linspace(1e-4, 0.02, 50)
    t = ddim.Scheduler({"trained_betas": betas.tolist()})
    np.testing.assert_allclose(t.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    with pytest.warns(RuntimeWarning, match="skip_prk_steps"):
        ddim.Scheduler({"skip_prk_steps": True})
    with pytest.raises(ddim.InvalidArgumentError, match="beta_schedule"):
        ddim.Scheduler({"beta_schedule": "cosine-ish"})
    with pytest.raises(ddim.InvalidArgumentError, match="clip_sample"):
        ddim.Scheduler({"clip_sample": "yes"})
    with pytest.raises(ValueError):  # InvalidArgumentError is a ValueError
        ddim.Scheduler({"num_train_timesteps": 0})


def test_slerp():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    assert np.array_equal(ddim.slerp(a, b, 0.0), a) and np.array_equal(ddim.slerp(a, b, 1.0), b)
    mid = ddim.slerp(a, b, 0.5)
    assert mid.shape == a.shape and mid.dtype == np.float32
    assert abs(np.linalg.norm(mid) - (np.linalg.norm(a) + np.linalg.norm(b)) / 2) < 0.2 * np.linalg.norm(a)
    with pytest.raises(ddim.InvalidArgumentError):
        ddim.slerp(a, b[:, :4], 0.5)
    with pytest.raises(ddim.InvalidArgumentError):
        ddim.slerp(a, b, 1.5)


# ------------------------------------------------------------------------------------------------------- errors

def test_seed_and_eta_errors_name_the_argument(cpu1, cpu2):
    # Out-of-range or mistyped seeds are InvalidArgumentError naming the argument, not a TypeError
    # with the whole signature.
    for bad in (-1, 2**64, 1.5, "7", True):
        with pytest.raises(ddim.InvalidArgumentError, match=r"seed"):
            cpu1.sample(2, seed=bad)
    with pytest.raises(ddim.InvalidArgumentError, match=r"seeds\[1\]"):
        cpu2.sample(2, seeds=[3, -4])
    with pytest.raises(ddim.InvalidArgumentError, match=r"seeds"):
        cpu2.sample(2, seeds=5)
    with pytest.raises(ddim.InvalidArgumentError, match=r"seed \d+: sample i of the batch uses seed \+ i"):
        cpu2.sample(2, seed=2**64 - 1)  # the second sample's seed would wrap
    assert np.array_equal(cpu1.sample(2, seed=np.uint64(2**64 - 1)), cpu1.sample(2, seed=2**64 - 1))
    for eta in (float("inf"), float("nan"), -0.5):
        with pytest.raises(ddim.InvalidArgumentError, match=r"eta must be finite"):
            cpu1.sample(2, eta=eta)


def test_error_classes(model, tmp_path):
    assert issubclass(ddim.Error, RuntimeError)
    for name in ("InvalidFileError", "InvalidArgumentError", "UnsupportedError", "OutOfMemoryError",
                 "DeviceLostError", "CancelledError", "IoError", "InternalError", "ExportError"):
        assert issubclass(getattr(ddim, name), ddim.Error)
    assert issubclass(ddim.InvalidArgumentError, ValueError)
    assert issubclass(ddim.IoError, OSError)
    assert issubclass(ddim.OutOfMemoryError, MemoryError)

    bad = tmp_path / "bad.ddim"
    bad.write_bytes(b"not a model file" * 64)
    with pytest.raises(ddim.InvalidFileError) as e:
        ddim.Model(bad)
    assert e.value.code == "invalid_file" and str(e.value)
    with pytest.raises(ddim.InvalidFileError):
        ddim.Model.from_bytes(b"\x00" * 16)
    with pytest.raises(ddim.IoError):
        ddim.Model(tmp_path / "missing.ddim")
    with pytest.raises(ddim.InvalidArgumentError):
        ddim.Session(model, batch=0)
    with pytest.raises(ddim.InvalidArgumentError):
        ddim.Session(model, batch=ddim.MAX_BATCH + 1)
    with pytest.raises(ddim.InvalidArgumentError):
        ddim.Session(model, device="tpu")
    with pytest.raises(ddim.InvalidArgumentError):
        ddim.Session(model, height=16)
    with pytest.raises(ddim.UnsupportedError):
        ddim.Session(model, device="cpu", precision="fp16")
    if not HAVE_CUDA_DEVICE:
        with pytest.raises(ddim.InvalidArgumentError, match="CUDA device"):
            ddim.Session(model, device="cuda")


def test_cancel_and_callback_errors(cpu1):
    calls = []

    def stop_after_two(done, total):
        calls.append((done, total))
        return done < 2

    with pytest.raises(ddim.CancelledError) as e:
        cpu1.sample(5, progress=stop_after_two)
    assert e.value.code == "cancelled"
    assert calls == [(1, 5), (2, 5)]
    # None (a callback without a return) continues
    seen = []
    cpu1.sample(3, progress=lambda d, t: seen.append(d))
    assert seen == [1, 2, 3]

    def raises(done, total):
        raise LookupError("from the callback")

    with pytest.raises(LookupError, match="from the callback"):
        cpu1.sample(3, progress=raises)
    with pytest.raises(ddim.CancelledError):
        cpu1.invert(cpu1.sample(2), steps=3, progress=lambda d, t: False)
    with pytest.raises(ddim.InvalidArgumentError):
        cpu1.sample(2, progress="yes")
    # the session is still usable after all that
    assert cpu1.sample(2).shape == (1, 1, 32, 32)


def test_progress_bar(cpu1, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    a = cpu1.sample(3, seed=1, progress=True)
    assert np.array_equal(a, cpu1.sample(3, seed=1))
    # without tqdm: no bar, no error
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert np.array_equal(cpu1.sample(3, seed=1, progress=True), a)


def test_output_device_on_cpu_session(cpu1):
    with pytest.raises(ddim.InvalidArgumentError, match="CUDA session"):
        cpu1.sample(2, output="device")
    with pytest.raises(ddim.InvalidArgumentError):
        cpu1.sample(2, output="gpu")
    with pytest.raises(ddim.InvalidArgumentError):
        cpu1.set_stream(0)


# ------------------------------------------------------------------------------------------------------- threads

def test_gil_released_during_sample(small):
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        time.sleep(0.05)
        before = counter[0]
        started = time.perf_counter()
        small.sample(60, seed=1)
        elapsed = time.perf_counter() - started
        during = counter[0] - before
    finally:
        stop.set()
        t.join()
    # With the GIL held for the whole call the counter would advance only between steps' callbacks.
    assert during > 1000, f"the other thread counted {during} times in {elapsed:.2f} s"


def test_session_is_one_thread_at_a_time(small):
    entered, release = threading.Event(), threading.Event()
    errors = []

    def slow(done, total):
        entered.set()
        release.wait(10)

    def run():
        try:
            small.sample(2, progress=slow)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert entered.wait(10)
        with pytest.raises(ddim.Error, match="in use"):
            small.sample(2)
    finally:
        release.set()
        t.join()
    assert errors == []
    assert small.sample(2).shape == (1, 1, 8, 8)


def test_ctrl_c_cancels_within_a_step(small):
    # Per-step time first, then a long run interrupted after a few steps.
    started = time.perf_counter()
    small.sample(20, seed=1)
    step = (time.perf_counter() - started) / 20
    total = 1000
    done = [0]
    timer = threading.Timer(max(0.2, 5 * step), _thread.interrupt_main)
    timer.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            small.sample(total, seed=1, progress=lambda d, t: done.__setitem__(0, d))
        interrupted_at = time.perf_counter()
    finally:
        timer.cancel()
    assert done[0] < total, f"all {total} steps ran"
    latency = interrupted_at - t0 - timer.interval
    assert latency < max(1.0, 20 * step), f"KeyboardInterrupt came {latency:.3f} s after the signal (a step: {step:.4f} s)"
    # also without a progress callback
    timer2 = threading.Timer(max(0.2, 5 * step), _thread.interrupt_main)
    timer2.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            small.sample(total, seed=1)
        elapsed = time.perf_counter() - t0
    finally:
        timer2.cancel()
    assert elapsed < total * step * 0.5
    assert small.sample(2).shape == (1, 1, 8, 8)


def test_session_outlives_model():
    m = ddim.Model(MODEL_PATH)
    s = ddim.Session(m, device="cpu")
    expect = s.sample(2, seed=3)
    del m
    gc.collect()
    assert np.array_equal(s.sample(2, seed=3), expect)
    assert s.model.info.in_channels == 1


# ------------------------------------------------------------------------------------------------------- arrays

def test_numpy_inputs_without_copy(cpu2, cpu1):
    x_T = np.ascontiguousarray(ddim.initial_noise(11, (2, 1, 32, 32)))
    ref = cpu2.sample(3, x_T=x_T)
    assert _ddim._last_input_pointer() == x_T.ctypes.data, "a C-contiguous float32 x_T was copied"
    x = ddim.initial_noise(3, (2, 1, 32, 32))
    cpu2.forward(x, 10)
    assert _ddim._last_input_pointer() == x.ctypes.data
    a = ddim.initial_noise(1, (1, 1, 32, 32))
    cpu1.invert(a, steps=2)
    assert _ddim._last_input_pointer() == a.ctypes.data
    # converted inputs: float64, Fortran order, a strided view, nested lists
    as64 = x_T.astype(np.float64)
    assert np.array_equal(cpu2.sample(3, x_T=as64), ref)
    assert _ddim._last_input_pointer() != as64.ctypes.data
    fortran = np.asfortranarray(x_T)
    assert np.array_equal(cpu2.sample(3, x_T=fortran), ref)
    wide = np.zeros((2, 1, 32, 64), np.float32)
    wide[..., ::2] = x_T
    assert np.array_equal(cpu2.sample(3, x_T=wide[..., ::2]), ref)
    assert np.array_equal(cpu2.sample(3, x_T=x_T.tolist()), ref)


def test_array_interface_and_cuda_interface_objects(cpu2):
    x_T = ddim.initial_noise(11, (2, 1, 32, 32))

    class OnlyArrayInterface:
        def __init__(self, a):
            self._a = a
            self.__array_interface__ = a.__array_interface__

    ref = cpu2.sample(3, x_T=x_T)
    assert np.array_equal(cpu2.sample(3, x_T=OnlyArrayInterface(x_T)), ref)

    class FakeCudaArray:
        __cuda_array_interface__ = {"shape": (2, 1, 32, 32), "typestr": "<f4", "data": (0x1000, False),
                                    "version": 3, "strides": None}

    with pytest.raises(ddim.InvalidArgumentError, match="CUDA"):
        cpu2.sample(3, x_T=FakeCudaArray())
    with pytest.raises(ddim.InvalidArgumentError):
        cpu2.sample(3, x_T="not an array")


def test_dlpack_torch_cpu_tensor(cpu2):
    torch = pytest.importorskip("torch")
    x_T = torch.from_numpy(ddim.initial_noise(11, (2, 1, 32, 32)))
    ref = cpu2.sample(3, x_T=x_T.numpy())
    assert np.array_equal(cpu2.sample(3, x_T=x_T), ref)
    assert _ddim._last_input_pointer() == x_T.data_ptr(), "a contiguous float32 torch tensor was copied"
    assert np.array_equal(cpu2.sample(3, x_T=x_T.double()), ref)
    assert np.array_equal(cpu2.sample(3, x_T=x_T.transpose(2, 3).contiguous().transpose(2, 3)), ref)


# ------------------------------------------------------------------------------------------------------- CUDA

@needs_cuda
def test_cuda_output_device_and_device_inputs(model):
    torch = pytest.importorskip("torch")
    s = ddim.Session(model, device="cuda", batch=2, precision="fp32")
    assert s.backend == "cuda" and s.plan_info["backend"].startswith("cuda")
    host = s.sample(4, seed=5)
    dev = s.sample(4, seed=5, output="device")
    assert dev.__dlpack_device__()[0] == 2  # kDLCUDA
    t = torch.from_dlpack(dev)
    assert t.is_cuda and t.shape == (2, 1, 32, 32) and t.dtype == torch.float32
    assert np.array_equal(t.cpu().numpy(), host)
    del dev
    gc.collect()
    assert np.array_equal(t.cpu().numpy(), host)  # the tensor keeps the memory alive
    x_T = torch.from_numpy(ddim.initial_noise(5, (2, 1, 32, 32))).cuda()
    np.testing.assert_array_equal(s.sample(4, x_T=x_T), s.sample(4, x_T=x_T.cpu().numpy()))
    noise = torch.randn(4, 2, 1, 32, 32, device="cuda")
    np.testing.assert_array_equal(s.sample(4, eta=1.0, noise=noise), s.sample(4, eta=1.0, noise=noise.cpu().numpy()))
    with pytest.raises(ddim.InvalidArgumentError):
        s.forward(x_T, 10)  # forward reads host arrays
    assert isinstance(s.stream, int)


@needs_cuda
def test_cuda_per_sample_seeds_and_ctrl_c(model):
    s3 = ddim.Session(model, device="cuda", batch=3)
    s1 = ddim.Session(model, device="cuda", batch=1)
    batch = s3.sample(steps=3, seeds=[9, 2, 5])
    assert batch.shape == (3, 1, 32, 32) and np.all(np.isfinite(batch))
    assert s1.sample(3, seed=9).shape == (1, 1, 32, 32)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            s1.sample(1000, seed=1)
    finally:
        timer.cancel()


# ------------------------------------------------------------------------------------------------------- export

def test_export_without_torch_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ImportError, match=r"ddim\[export\]"):
        ddim.export(object(), None, tmp_path / "x.ddim")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ImportError, match=r"ddim\[export\]"):
        ddim.from_diffusers(tmp_path / "model")
    with pytest.raises(ddim.IoError):
        ddim.from_diffusers(tmp_path / "missing")


def _small_unet():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return unet.eval()


def test_export_and_from_diffusers(tmp_path, monkeypatch):
    unet = _small_unet()
    import torch

    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}
    m = ddim.export(unet, config, tmp_path / "small.ddim")
    assert isinstance(m, ddim.Model) and (tmp_path / "small.ddim").is_file()
    assert (m.info.in_channels, m.info.height) == (1, 8) and m.schedule["clip_sample"] is False
    s = ddim.Session(m, device="cpu")
    x = ddim.initial_noise(0, (1, 1, 8, 8))
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), 500).sample.numpy()
    np.testing.assert_allclose(s.forward(x, 500), ref, atol=2e-4, rtol=1e-3)
    with pytest.raises(ddim.ExportError):
        ddim.export(torch.nn.Linear(2, 2), None, tmp_path / "bad.ddim")

    folder = tmp_path / "pipe"
    unet.save_pretrained(folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m1 = ddim.from_diffusers(folder)
    cached = list((tmp_path / "cache" / "ddim").glob("*.ddim"))
    assert len(cached) == 1 and m1.info.parameter_count == m.info.parameter_count
    # a second call loads the cached file without exporting (no torch needed)
    monkeypatch.setattr(ddim._exporting, "_exporter", lambda: pytest.fail("exported again"))
    m2 = ddim.from_diffusers(folder)
    assert m2.name == str(cached[0])
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m3 = ddim.from_diffusers(folder, dtype="float16")
    assert len(list((tmp_path / "cache" / "ddim").glob("*.ddim"))) == 2 and m3.info.tensors_by_dtype


# ------------------------------------------------------------------------------------------------------- latent models
def _latent_files(tmp_path):
    """Small latent models (a VQModel and an AutoencoderKL decoder) from tests/python/test_latent.py's helpers."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import ddim_export  # tools/ddim_export, on sys.path through conftest.py
    from conftest import make_unet
    from test_latent import LATENT_UNET, export_latent_file, make_kl, make_vq

    unet = make_unet(21, in_channels=4, out_channels=4, **LATENT_UNET)
    vq = export_latent_file(ddim_export, tmp_path, unet, make_vq(22), "vq.safetensors")
    kl = export_latent_file(ddim_export, tmp_path, unet, make_kl("kl-shift-attn", 23), "kl.safetensors")
    return vq, kl


def test_latent_model_info_decode_option_and_decode(tmp_path):
    vq_path, kl_path = _latent_files(tmp_path)
    vq, kl = ddim.Model(vq_path), ddim.Model(kl_path)
    i = vq.info
    assert (i.decoder, i.latent_factor, i.image_channels, i.scaling_factor, i.shift_factor) == ("vq", 2, 3, 0.5, 0.0)
    assert (i.in_channels, i.height, i.width) == (4, 8, 8) and i.decoder_parameter_count > 0
    k = kl.info
    assert (k.decoder, k.latent_factor, k.image_channels) == ("kl", 4, 3)
    assert k.scaling_factor == pytest.approx(0.3) and k.shift_factor == pytest.approx(0.1)
    p = ddim.Model(MODEL_PATH).info
    assert (p.decoder, p.latent_factor, p.image_channels, p.scaling_factor, p.shift_factor,
            p.decoder_parameter_count) == ("", 1, p.in_channels, 1.0, 0.0, 0)

    for model in (vq, kl):
        f = model.info.latent_factor
        on = ddim.Session(model, device="cpu", batch=2, threads=1)
        off = ddim.Session(model, device="cpu", batch=2, threads=1, decode=False)
        assert on.shape == off.shape == off.image_shape == (2, 4, 8, 8)
        assert on.image_shape == (2, 3, 8 * f, 8 * f)
        assert f"factor {f}" in on.plan_info["decoder"] and off.plan_info["decoder"] == ""
        assert (on.plan_info["height"], on.plan_info["width"]) == (8, 8)
        images = on.sample(3, seeds=[9, 2])
        latents = off.sample(3, seeds=[9, 2])
        assert images.shape == (2, 3, 8 * f, 8 * f) and images.dtype == np.float32
        assert latents.shape == (2, 4, 8, 8)
        decoded = on.decode(latents)
        assert decoded.shape == (2, 3, 8 * f, 8 * f) and decoded.dtype == np.float32
        np.testing.assert_array_equal(decoded, images)  # bitwise on the CPU: sample decodes the same latents
        r = off.sample(3, seeds=[9, 2], trajectory=True)  # trajectory and images in the latent space
        assert r.trajectory.shape[1:] == (2, 4, 8, 8) and r.images.shape == (2, 4, 8, 8)
        # errors: decode off, wrong shape or dtype
        with pytest.raises(ddim.InvalidArgumentError, match="decode=False"):
            off.decode(latents)
        with pytest.raises(ddim.InvalidArgumentError, match="latents"):
            on.decode(latents[:1])
        with pytest.raises(ddim.InvalidArgumentError, match="latents"):
            on.decode(np.zeros((2, 3, 8 * f, 8 * f), np.float32))
        np.testing.assert_array_equal(on.decode(latents.astype(np.float64)), images)  # converted like forward's x
    with pytest.raises(ddim.InvalidArgumentError, match="multiple of the decoder's factor"):
        ddim.Session(vq, device="cpu", height=15, width=16)
    pixel = ddim.Session(ddim.Model(MODEL_PATH), device="cpu")
    assert pixel.image_shape == pixel.shape and pixel.plan_info["decoder"] == ""
    with pytest.raises(ddim.InvalidArgumentError, match="not a latent model"):
        pixel.decode(np.zeros(pixel.shape, np.float32))


# ------------------------------------------------------------------------------------------------------- docs

def _run_example(example: str) -> str:
    proc = subprocess.run([sys.executable, "-c", example], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"})
    assert proc.returncode == 0, f"the example failed:\n{proc.stderr}\n{proc.stdout}"
    return proc.stdout


def test_docs_example_runs():
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/python.md has no ```python block"
    example = blocks[0]
    assert "weights/default.ddim" in example
    assert "(4, 1, 32, 32)" in _run_example(example)


def test_readme_example_runs():
    text = (REPO / "README.md").read_text()
    section = text.split("\n## From Python\n", 1)
    assert len(section) == 2, "README.md has no '## From Python' section"
    blocks = re.findall(r"```python\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    assert blocks, "README.md's '## From Python' section has no ```python block"
    out = _run_example(blocks[0])
    # the example prints the backend, the shape and whether the lone seed-2 sample equals the batch's: bitwise on
    # the CPU; on CUDA cuDNN may choose other algorithms per batch size (not claimed until a GPU run shows it)
    assert re.search(r"^(cpu \(3, 1, 32, 32\) True|cuda \(3, 1, 32, 32\) (True|False))$", out.strip(), re.M), out


# ------------------------------------------------------------------------------------------------------- class labels

def test_class_conditional_sample_invert_forward(tmp_path):
    """Class labels and guidance as keyword arguments (sample, forward, invert), against the formula and the CLI."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=4).eval()
    m = ddim.export(unet, dict(num_train_timesteps=1000, clip_sample=False), tmp_path / "cc.ddim", null_class_label=3)
    assert m.info.class_kind == "index" and m.info.num_classes == 4 and list(m.info.null_class) == [3.0]
    s = ddim.Session(m, device="cpu", batch=2)
    assert s.plan_info["forward_batch"] == 4 and "class_embedding.add" in s.plan_info["folded_per_label"]
    with pytest.raises(ddim.InvalidArgumentError, match="give class labels"):
        s.sample(steps=2)
    with pytest.raises(ddim.InvalidArgumentError, match=r"not an integer in \[0, 4\)"):
        s.sample(steps=2, class_labels=[1, 4])
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    cond = s.forward(x, 500, class_labels=[1, 2])
    null = s.forward(x, 500, class_labels=3)
    guided = s.forward(x, 500, class_labels=[1, 2], guidance_scale=3.0)
    np.testing.assert_allclose(guided, null + 3.0 * (cond - null), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), 500, class_labels=torch.tensor([1, 2])).sample.numpy()
    assert np.max(np.abs(cond - ref)) < 1e-4
    images = s.sample(steps=3, seed=4, class_labels=np.array([0, 2]), guidance_scale=2.0, guidance_rescale=0.5)
    binary = os.environ.get("DDIM_BIN")
    if binary:
        out = tmp_path / "cli.npy"
        proc = subprocess.run([binary, "sample", "--model", str(tmp_path / "cc.ddim"), "--device", "cpu", "--steps", "3",
                               "--seed", "4", "--class-labels", "0,2", "--guidance-scale", "2", "--guidance-rescale",
                               "0.5", "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert np.array_equal(np.load(out), images)
    x_T = s.invert(images, steps=3, refine=5, class_labels=[0, 2], guidance_scale=2.0)
    back = s.sample(steps=3, x_T=x_T, class_labels=[0, 2], guidance_scale=2.0)
    other = s.sample(steps=3, x_T=x_T, class_labels=[1, 1], guidance_scale=2.0)
    # (3 steps of a random network: the round trip is rough; the labels must still be the ones used)
    assert np.max(np.abs(back - images)) < 0.2 * np.max(np.abs(other - images))
    plain = ddim.Session(ddim.Model(MODEL_PATH), device="cpu", batch=1)
    with pytest.raises(ddim.InvalidArgumentError, match="unconditional"):
        plain.sample(steps=2, class_labels=1)
