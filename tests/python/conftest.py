"""Shared fixtures and helpers of the Python conformance suite.

The suite compares three things that were written independently: diffusers (the reference), the exporter
(tools/export.py, package tools/ddim_export) and the C++ engine (the `ddim` CLI). Everything runs on the CPU in
float32 with small random-weight networks and fixed seeds, so every run computes the same numbers.

The `ddim` binary is taken from $DDIM_BIN, else <repo>/build/bin/ddim. A missing binary or a missing exporter
package makes the tests that need them FAIL with a message saying what to build; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
EXPORT_PY = TOOLS / "export.py"

if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

# One intra-op thread: the networks are tiny, and on a small shared machine PyTorch's spinning worker threads make a
# forward pass up to 100x slower than a single thread when another process holds the cores.
torch.set_num_threads(1)

# Subprocesses must not be slowed down (or made non-deterministic) by an inherited thread setting.
_CHILD_ENV = dict(os.environ)
_CHILD_ENV.setdefault("OMP_NUM_THREADS", "1")


# ----------------------------------------------------------------------------------------------------------------
# The ddim binary
# ----------------------------------------------------------------------------------------------------------------


def ddim_bin_path() -> Path:
    """The ddim CLI: $DDIM_BIN, else <repo>/build/bin/ddim. Fails the calling test when it is missing."""
    env = os.environ.get("DDIM_BIN")
    path = Path(env) if env else REPO / "build" / "bin" / "ddim"
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"the ddim binary was not found at {path} "
            f"({'from $DDIM_BIN' if env else 'default location; set $DDIM_BIN to override'}): "
            "build it first (tools/setup.sh, or cmake -S . -B build && cmake --build build)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def ddim_bin() -> Path:
    return ddim_bin_path()


def run_ddim(args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `ddim ARGS...`; with check, a non-zero exit fails the test and shows stderr."""
    cmd = [str(ddim_bin_path())] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_CHILD_ENV)
    if check and proc.returncode != 0:
        pytest.fail(
            f"ddim exited with {proc.returncode}: {' '.join(cmd)}\n--- stderr ---\n{proc.stderr}\n"
            f"--- stdout ---\n{proc.stdout}",
            pytrace=False,
        )
    return proc


@pytest.fixture
def ddim(ddim_bin):
    """The run_ddim helper as a fixture (and a check, first, that the binary exists)."""
    return run_ddim


# ----------------------------------------------------------------------------------------------------------------
# The exporter
# ----------------------------------------------------------------------------------------------------------------


def run_export(args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python3 tools/export.py ARGS...` with this interpreter; with check, a non-zero exit fails the test."""
    if not EXPORT_PY.is_file():
        pytest.fail(f"the exporter {EXPORT_PY} does not exist", pytrace=False)
    cmd = [sys.executable, str(EXPORT_PY)] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=_CHILD_ENV)
    if check and proc.returncode != 0:
        pytest.fail(
            f"the exporter exited with {proc.returncode}: {' '.join(cmd)}\n--- stderr ---\n{proc.stderr}\n"
            f"--- stdout ---\n{proc.stdout}",
            pytrace=False,
        )
    return proc


@pytest.fixture(scope="session")
def exporter():
    """The ddim_export package (tools/ddim_export); fails clearly when it cannot be imported."""
    try:
        import ddim_export  # noqa: WPS433 (imported here so that a missing exporter fails the test, not collection)
    except Exception as e:  # pragma: no cover - the message is the point
        pytest.fail(f"cannot import ddim_export from {TOOLS}: {type(e).__name__}: {e}", pytrace=False)
    return ddim_export


# ----------------------------------------------------------------------------------------------------------------
# .npy files, directories
# ----------------------------------------------------------------------------------------------------------------


def save_npy(path, array) -> Path:
    """Writes a C-contiguous float32 (or the given integer dtype) .npy and returns the path."""
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
    np.save(str(path), np.ascontiguousarray(a), allow_pickle=False)
    return Path(path)


def load_npy(path) -> np.ndarray:
    return np.load(str(path), allow_pickle=False)


@pytest.fixture
def work_dir(tmp_path) -> Path:
    """A fresh, empty temporary directory for one test (pytest removes old ones)."""
    return tmp_path


def write_json(path, obj) -> Path:
    Path(path).write_text(json.dumps(obj, indent=2))
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Small random-weight UNet2DModel
# ----------------------------------------------------------------------------------------------------------------

SMALL_UNET_DEFAULTS = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
    norm_eps=1e-5,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
)


def randomize_unet_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturbs a freshly initialised model deterministically (`seed`): the GroupNorm affines (identity by default) and the biases (many are zero-initialised) are perturbed, so a
    swapped scale/shift or a dropped bias shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm) and module.affine:
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.add_(0.02 * torch.randn(module.bias.shape, generator=gen))
    return model


# The small RGB network most tests use: 16x16, two levels, multi-head attention (48 / 8 = 6 heads at
# level 1 and in the mid block), downsample_padding 1; a few hundred thousand parameters.
SMALL_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 48),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
    downsample_padding=1,
)


def make_unet(seed: int = 0, **overrides):
    """A small UNet2DModel (a few hundred thousand parameters) with random weights fixed by `seed`, in eval mode."""
    from diffusers import UNet2DModel

    config = dict(SMALL_UNET_DEFAULTS)
    config.update(overrides)
    torch.manual_seed(seed)
    model = UNet2DModel(**config)
    randomize_unet_(model, seed)
    model.eval().requires_grad_(False)
    return model.float()


@pytest.fixture
def small_unet_factory():
    return make_unet


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_abs_diff(a, b) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, f"shape mismatch: {a.shape} vs {b.shape}"
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), "non-finite values"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Measured differences: printed in the terminal summary (with or without -s) and attached to the JUnit report
# ----------------------------------------------------------------------------------------------------------------

_MEASUREMENTS: list[tuple[str, str, float, float]] = []


@pytest.fixture
def record_diff(request, record_property):
    """record_diff(label, value, tolerance): keeps the measurement for the session summary."""

    def record(label: str, value: float, tolerance: float) -> None:
        _MEASUREMENTS.append((request.node.nodeid.split("::", 1)[-1], label, float(value), float(tolerance)))
        record_property(label, f"{value:.3e}")

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _MEASUREMENTS:
        return
    terminalreporter.section("ddim conformance: measured max abs differences")
    width = max(len(f"{t} [{l}]") for t, l, _, _ in _MEASUREMENTS)
    for test, label, value, tol in _MEASUREMENTS:
        status = "ok" if value <= tol else "OVER"
        terminalreporter.write_line(f"{f'{test} [{label}]':<{width}}  {value:10.3e}  (tol {tol:.0e}) {status}")
