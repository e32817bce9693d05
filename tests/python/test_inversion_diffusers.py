"""DDIM inversion: the engine's `next` mode (`ddim invert --model-time next`) against diffusers' DDIMInverseScheduler.

A small random-weight UNet2DModel is exported with the exporter's Python API together with the scheduler config;
then both sides invert the same x0 (batch 2):

    diffusers:  sched = DDIMInverseScheduler(**cfg); sched.set_timesteps(N)
                for t in sched.timesteps: x = sched.step(unet(x, t).sample, t, x).prev_sample
    engine:     ddim invert --model F --model-time next --input x0.npy --out xt.npy --steps N --device cpu
                            --trajectory T.npy

`next` mirrors DDIMInverseScheduler.step: the model at the destination timestep t, alpha-bar of the source from
t - T // N (alpha-bar 1 or alpha-bar_0 below 0, by set_alpha_to_one), x0 clipped when clip_sample is on. The whole
trajectory is compared (max abs difference, bound 1e-3 in fp32, as for sampling). The trailing case with
T % N != 0 is the one where diffusers' source timestep t - T // N is not the previous visited timestep.

The ddim binary is $DDIM_BIN, else <repo>/build/bin/ddim; the exporter is tools/ddim_export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_UNET, load_npy, make_unet, max_abs_diff, run_ddim, save_npy

TOLERANCE = 1e-3
BATCH = 2

UNET = SMALL_UNET


@dataclasses.dataclass(frozen=True)
class Case:
    spacing: str
    steps: int
    clip: bool
    set_alpha_to_one: bool
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [self.spacing, f"{self.steps}steps", self.prediction_type, "clip" if self.clip else "noclip",
                 "alpha1" if self.set_alpha_to_one else "alpha0"]
        if self.steps_offset:
            parts.append(f"offset{self.steps_offset}")
        return "-".join(parts)

    def scheduler_config(self) -> dict:
        return dict(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type=self.prediction_type,
            timestep_spacing=self.spacing,
            steps_offset=self.steps_offset,
            clip_sample=self.clip,
            set_alpha_to_one=self.set_alpha_to_one,
        )


CASES = [
    Case("leading", 10, True, True, seed=1),
    Case("leading", 50, False, False, steps_offset=1, seed=2),
    Case("trailing", 10, False, True, "v_prediction", seed=3),
    Case("trailing", 30, True, False, seed=4),  # T % N != 0: source t - 33 is not the previous timestep
]


def diffusers_inversion(unet, cfg: dict, x0: torch.Tensor, steps: int):
    """The reference loop. Returns the trajectory x0, x_1, ..., x_N and the timesteps."""
    from diffusers import DDIMInverseScheduler

    sched = DDIMInverseScheduler(**cfg)
    sched.set_timesteps(steps)
    x = x0.clone()
    trajectory = [x.clone()]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
            trajectory.append(x.clone())
    return torch.stack(trajectory), [int(t) for t in sched.timesteps]


def export_model(case: Case, work_dir: Path):
    try:
        from ddim_export import export
    except Exception as e:  # pragma: no cover - the message is the point
        pytest.fail(f"cannot import ddim_export from {TOOLS}: {type(e).__name__}: {e}", pytrace=False)
    unet = make_unet(case.seed, **UNET)
    model_path = work_dir / "model.safetensors"
    export(unet, case.scheduler_config(), str(model_path))
    assert model_path.is_file()
    return unet, model_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_next_mode_matches_diffusers_inverse_scheduler(case: Case, work_dir, record_diff):
    unet, model_path = export_model(case, work_dir)
    c, s = unet.config.in_channels, unet.config.sample_size
    gen = torch.Generator().manual_seed(2000 + case.seed)
    x0 = torch.rand(BATCH, c, s, s, generator=gen) * 2 - 1  # an "image" in [-1, 1]

    ref_traj, ref_timesteps = diffusers_inversion(unet, case.scheduler_config(), x0, case.steps)
    assert len(ref_timesteps) == case.steps and ref_timesteps == sorted(ref_timesteps)

    run_ddim([
        "invert", "--model", model_path, "--device", "cpu", "--steps", case.steps, "--model-time", "next",
        "--input", save_npy(work_dir / "x0.npy", x0),
        "--out", work_dir / "xt.npy", "--trajectory", work_dir / "traj.npy",
    ])
    out = load_npy(work_dir / "xt.npy")
    traj = load_npy(work_dir / "traj.npy")
    assert out.dtype == np.float32 and out.shape == (BATCH, c, s, s)
    assert traj.shape == tuple(ref_traj.shape), (
        f"the engine took {traj.shape[0] - 1} steps, diffusers {len(ref_timesteps)} ({ref_timesteps})"
    )
    np.testing.assert_array_equal(traj[0], x0.numpy(), err_msg="trajectory[0] must be x0 as given")
    np.testing.assert_array_equal(traj[-1], out, err_msg="the last trajectory entry must be x_T")

    per_step = [max_abs_diff(traj[i], ref_traj[i]) for i in range(traj.shape[0])]
    traj_diff = max(per_step)
    record_diff("inverted x_T", max_abs_diff(out, ref_traj[-1]), TOLERANCE)
    record_diff("trajectory", traj_diff, TOLERANCE)
    first_bad = next((i for i, d in enumerate(per_step) if d > TOLERANCE), None)
    assert traj_diff <= TOLERANCE, (
        f"max abs difference {traj_diff:.3e} > {TOLERANCE:g}; first exceeded after step {first_bad} "
        f"(timestep {ref_timesteps[first_bad - 1] if first_bad else None}); diffusers timesteps {ref_timesteps}"
    )
    # The comparison is meaningful: x moved far from x0.
    assert max_abs_diff(out, x0) > 0.1


def test_current_mode_is_not_diffusers(work_dir):
    """`current` (the default) evaluates the model at the point's own timestep: a different map, so the comparison
    above really distinguishes the two modes."""
    case = CASES[0]
    unet, model_path = export_model(case, work_dir)
    c, s = unet.config.in_channels, unet.config.sample_size
    x0 = torch.rand(BATCH, c, s, s, generator=torch.Generator().manual_seed(7)) * 2 - 1
    ref_traj, _ = diffusers_inversion(unet, case.scheduler_config(), x0, case.steps)
    run_ddim([
        "invert", "--model", model_path, "--device", "cpu", "--steps", case.steps,
        "--input", save_npy(work_dir / "x0.npy", x0), "--out", work_dir / "xt.npy",
    ])
    assert max_abs_diff(load_npy(work_dir / "xt.npy"), ref_traj[-1]) > 10 * TOLERANCE
