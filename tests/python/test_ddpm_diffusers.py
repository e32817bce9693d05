"""DDPM ancestral sampling: the engine (`ddim sample --sampler ddpm`) against diffusers' DDPMScheduler.

A small random-weight UNet2DModel is exported with the exporter's Python API together with a scheduler config of
T = 50 training timesteps; both sides then sample all 50 steps from the same x_T (batch 2) with the same per-step
unit-normal noise:

    diffusers:  sched = DDPMScheduler(**cfg); sched.set_timesteps(50)
                for t in sched.timesteps: x = sched.step(unet(x, t).sample, t, x).prev_sample
                with scheduling_ddpm.randn_tensor patched to return Z[step] (it is called for t > 0 only)
    engine:     ddim sample --sampler ddpm --variance V --model F --x-T xT.npy --noise Z.npy --out out.npy

Z has shape (T, N, C, H, W); slice s is the noise of the step at timestep T - 1 - s (the last slice, t = 0, is
unused on both sides). The final samples must agree to 1e-3 (max abs difference, fp32) for fixed_small and
fixed_large, epsilon and v prediction, clip on and off.

The ddim binary is $DDIM_BIN, else <repo>/build/bin/ddim; the exporter is tools/ddim_export.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import SMALL_UNET, load_npy, make_unet, max_abs_diff, run_ddim, save_npy

TOLERANCE = 1e-3
BATCH = 2
T = 50

UNET = SMALL_UNET


@dataclasses.dataclass(frozen=True)
class Case:
    variance: str
    clip: bool
    prediction_type: str = "epsilon"
    seed: int = 0

    @property
    def id(self) -> str:
        return "-".join([self.variance, self.prediction_type, "clip" if self.clip else "noclip"])

    def scheduler_config(self) -> dict:
        return dict(
            num_train_timesteps=T,
            beta_start=0.001,
            beta_end=0.2,
            beta_schedule="linear",
            prediction_type=self.prediction_type,
            variance_type=self.variance,
            clip_sample=self.clip,
        )


CASES = [
    Case("fixed_small", True, seed=1),
    Case("fixed_large", True, seed=2),
    Case("fixed_small", False, "v_prediction", seed=3),
    Case("fixed_large", False, seed=4),
]


def diffusers_ddpm(unet, cfg: dict, x_T: torch.Tensor, noise: torch.Tensor, monkeypatch):
    """The reference loop with diffusers' noise source replaced by the given slices. Returns x_0 and the number of
    noise draws."""
    import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
    from diffusers import DDPMScheduler

    assert hasattr(scheduling_ddpm, "randn_tensor"), "diffusers moved randn_tensor: update the patch"
    sched = DDPMScheduler(**cfg)
    sched.set_timesteps(T)
    assert [int(t) for t in sched.timesteps] == list(range(T - 1, -1, -1))
    step = {"index": 0}
    draws = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(x_T.shape)
        draws.append(step["index"])
        return noise[step["index"]].clone().to(dtype=dtype or torch.float32)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
    x = x_T.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            step["index"] = i
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x, draws


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ddpm_matches_diffusers_scheduler(case: Case, work_dir, record_diff, monkeypatch):
    try:
        from ddim_export import export
    except Exception as e:  # pragma: no cover - the message is the point
        pytest.fail(f"cannot import ddim_export from {TOOLS}: {type(e).__name__}: {e}", pytrace=False)
    unet = make_unet(case.seed, **UNET)
    model_path = work_dir / "model.safetensors"
    export(unet, case.scheduler_config(), str(model_path))
    c, s = unet.config.in_channels, unet.config.sample_size
    gen = torch.Generator().manual_seed(3000 + case.seed)
    x_T = torch.randn(BATCH, c, s, s, generator=gen)
    noise = torch.randn(T, BATCH, c, s, s, generator=gen)

    ref, draws = diffusers_ddpm(unet, case.scheduler_config(), x_T, noise, monkeypatch)
    assert draws == list(range(T - 1)), "diffusers must draw noise at every step but the last (t = 0)"

    run_ddim([
        "sample", "--sampler", "ddpm", "--variance", case.variance, "--model", model_path, "--device", "cpu",
        "--x-T", save_npy(work_dir / "xT.npy", x_T), "--noise", save_npy(work_dir / "z.npy", noise),
        "--out", work_dir / "out.npy",
    ])
    out = load_npy(work_dir / "out.npy")
    assert out.dtype == np.float32 and out.shape == (BATCH, c, s, s)
    diff = max_abs_diff(out, ref)
    record_diff("ddpm x_0", diff, TOLERANCE)
    assert diff <= TOLERANCE, f"max abs difference {diff:.3e} > {TOLERANCE:g}"
    # The noise matters: a different last-but-one noise slice changes the engine's result.
    noise2 = noise.clone()
    noise2[T - 2] += 1.0
    run_ddim([
        "sample", "--sampler", "ddpm", "--variance", case.variance, "--model", model_path, "--device", "cpu",
        "--x-T", work_dir / "xT.npy", "--noise", save_npy(work_dir / "z2.npy", noise2), "--out", work_dir / "out2.npy",
    ])
    assert max_abs_diff(load_npy(work_dir / "out2.npy"), out) > 10 * TOLERANCE
