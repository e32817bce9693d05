"""Whole DDIM sampling: the engine (`ddim sample`) against diffusers' DDIMScheduler loop.

Several small random-weight UNet2DModel configurations are exported with the exporter's Python API together with
a DDIMScheduler config; then both sides sample from the same x_T (batch 2) with the schedule's defaults:

    diffusers:  sched.set_timesteps(S); for i, t in enumerate(sched.timesteps):
                    x = sched.step(unet(x, t).sample, t, x, eta=eta, variance_noise=noise[i]).prev_sample
    engine:     ddim sample --model F --device cpu --steps S --eta E --x-T xT.npy [--noise Z.npy] --trajectory T.npy

The engine is given no --spacing/--clip-sample/--set-alpha-to-one override, so the exported file's schedule must
carry the scheduler config (prediction type, clipping, final alpha, spacing, offset, betas). The whole trajectory is
compared, which also checks that both sides take the same number of steps. Every case records its max abs
difference (printed in the session summary); the bound is 1e-3 in fp32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import SMALL_UNET, load_npy, make_unet, max_abs_diff, param_count, run_ddim, save_npy

TOLERANCE = 1e-3
BATCH = 2

# Network configurations. Each has a few hundred thousand parameters and runs in a few milliseconds.
UNET_CONFIGS = {
    # RGB, 16x16, multi-head attention (48 / 8 = 6 heads at level 1 and in the mid block), downsample_padding 1,
    # diffusers' default time embedding (flip_sin_to_cos, freq_shift 0).
    "rgb-multihead-pad1": SMALL_UNET,
    # Grayscale, three levels, single-head attention (attention_head_dim None) at full resolution,
    # downsample_padding 0, the original DDPM time embedding and GroupNorm eps.
    "gray-singlehead-pad0": dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=8,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    # Three levels, two layers per block, multi-head attention of head width 16 on two levels (2 and 3 heads),
    # downsample_padding 0, an 8x8 sample (2x2 at the bottom).
    "rgb-3level-heads16-pad0": dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 48),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        norm_num_groups=8,
        downsample_padding=0,
    ),
    # The remaining UNet2DModel options of FORMAT.md 7.1: center_input_sample, mid_block_scale_factor (the mid
    # block's residual divisor and attention rescale), 4 groups.
    "rgb-center-midscale": dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=4,
        center_input_sample=True,
        mid_block_scale_factor=1.5,
    ),
}


@dataclasses.dataclass(frozen=True)
class Case:
    net: str
    prediction_type: str
    spacing: str
    steps: int
    clip: bool
    set_alpha_to_one: bool
    eta: float = 0.0
    beta_schedule: str = "linear"
    steps_offset: int = 0
    pass_scheduler_object: bool = False  # export(..., scheduler_config=<DDIMScheduler>) instead of a dict
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [
            self.net,
            "eps" if self.prediction_type == "epsilon" else "v",
            self.spacing,
            f"{self.steps}steps",
            f"clip-{'on' if self.clip else 'off'}",
            f"a1-{'on' if self.set_alpha_to_one else 'off'}",
            f"eta{self.eta:g}",
        ]
        if self.beta_schedule != "linear":
            parts.append(self.beta_schedule)
        if self.steps_offset:
            parts.append(f"offset{self.steps_offset}")
        return "-".join(parts)

    def scheduler_config(self) -> dict:
        return dict(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            timestep_spacing=self.spacing,
            steps_offset=self.steps_offset,
            clip_sample=self.clip,
            set_alpha_to_one=self.set_alpha_to_one,
        )


# Every factor appears at least once on each side: every network; epsilon and v_prediction; 10 and 50 steps;
# clip on/off; set_alpha_to_one on/off; leading and trailing; eta 0 and eta > 0 (with given noise); the
# scheduler config as a dict and as a DDIMScheduler; beta schedules and steps_offset on a few.
CASES = [
    Case("rgb-multihead-pad1", "epsilon", "leading", 10, True, True, seed=1),
    Case("rgb-multihead-pad1", "v_prediction", "trailing", 50, False, False, seed=2, pass_scheduler_object=True),
    Case("gray-singlehead-pad0", "epsilon", "trailing", 10, False, True, seed=3),
    Case("gray-singlehead-pad0", "v_prediction", "leading", 50, True, False, seed=4, pass_scheduler_object=True),
    Case("rgb-3level-heads16-pad0", "epsilon", "leading", 10, False, False, steps_offset=1, seed=5),
    Case("rgb-3level-heads16-pad0", "v_prediction", "trailing", 10, True, True, beta_schedule="scaled_linear",
         seed=6, pass_scheduler_object=True),
    Case("rgb-multihead-pad1", "epsilon", "trailing", 10, True, False, eta=0.5, seed=7),
    Case("gray-singlehead-pad0", "v_prediction", "leading", 10, False, True, eta=1.0,
         beta_schedule="squaredcos_cap_v2", seed=8, pass_scheduler_object=True),
    Case("rgb-3level-heads16-pad0", "epsilon", "leading", 50, False, True, eta=1.0, seed=9),
    Case("rgb-center-midscale", "epsilon", "leading", 10, True, True, seed=10),
    Case("rgb-center-midscale", "v_prediction", "trailing", 10, False, False, eta=0.3, seed=11),
]


def test_matrix_covers_every_factor():
    """The matrix itself: each listed factor is exercised (guards against an edit that drops one)."""
    assert {c.net for c in CASES} == set(UNET_CONFIGS)
    assert {c.prediction_type for c in CASES} == {"epsilon", "v_prediction"}
    assert {c.spacing for c in CASES} == {"leading", "trailing"}
    assert {c.steps for c in CASES} == {10, 50} and sum(c.steps == 50 for c in CASES) >= 2
    assert {c.clip for c in CASES} == {True, False}
    assert {c.set_alpha_to_one for c in CASES} == {True, False}
    assert any(c.eta == 0 for c in CASES) and any(c.eta > 0 for c in CASES)
    assert {c.pass_scheduler_object for c in CASES} == {True, False}
    for name, cfg in UNET_CONFIGS.items():
        n = param_count(make_unet(0, **cfg))
        assert 100_000 <= n <= 1_000_000, f"{name}: {n} parameters"


def diffusers_ddim(unet, scheduler, x_T: torch.Tensor, steps: int, eta: float, noise: torch.Tensor | None):
    """The reference: diffusers' DDIMScheduler loop. Returns the trajectory x_T, x_1, ..., x_S (S+1 entries)."""
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    trajectory = [x.clone()]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = unet(x, t).sample
            x = scheduler.step(
                eps, t, x, eta=eta, variance_noise=noise[i] if eta > 0 else None
            ).prev_sample
            trajectory.append(x.clone())
    return torch.stack(trajectory), [int(t) for t in scheduler.timesteps]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sampling_matches_diffusers(case: Case, exporter, ddim_bin, work_dir, record_diff):
    from diffusers import DDIMScheduler

    unet = make_unet(case.seed, **UNET_CONFIGS[case.net])
    cfg = case.scheduler_config()
    scheduler = DDIMScheduler(**cfg)

    model_path = work_dir / "model.safetensors"
    exporter.export(unet, scheduler if case.pass_scheduler_object else dict(cfg), str(model_path))
    assert model_path.is_file()

    c, s = unet.config.in_channels, unet.config.sample_size
    gen = torch.Generator().manual_seed(1000 + case.seed)
    x_T = torch.randn(BATCH, c, s, s, generator=gen)
    noise = torch.randn(case.steps, BATCH, c, s, s, generator=gen) if case.eta > 0 else None

    ref_traj, ref_timesteps = diffusers_ddim(unet, scheduler, x_T, case.steps, case.eta, noise)
    assert len(ref_timesteps) == case.steps

    args = [
        "sample", "--model", model_path, "--device", "cpu", "--steps", case.steps, "--eta", repr(case.eta),
        "--x-T", save_npy(work_dir / "xT.npy", x_T),
        "--out", work_dir / "out.npy", "--trajectory", work_dir / "traj.npy",
    ]
    if noise is not None:
        args += ["--noise", save_npy(work_dir / "noise.npy", noise)]
    run_ddim(args)

    out = load_npy(work_dir / "out.npy")
    traj = load_npy(work_dir / "traj.npy")
    assert out.dtype == np.float32 and out.shape == (BATCH, c, s, s)
    assert traj.shape[0] == len(ref_timesteps) + 1, (
        f"the engine took {traj.shape[0] - 1} steps, diffusers {len(ref_timesteps)} ({ref_timesteps})"
    )
    assert traj.shape == tuple(ref_traj.shape)
    np.testing.assert_array_equal(traj[0], x_T.numpy(), err_msg="trajectory[0] must be x_T as given")
    np.testing.assert_array_equal(traj[-1], out, err_msg="the last trajectory entry must be the output")

    final_diff = max_abs_diff(out, ref_traj[-1])
    # The first step at which the two trajectories part, for a useful failure message.
    per_step = [max_abs_diff(traj[i], ref_traj[i]) for i in range(traj.shape[0])]
    traj_diff = max(per_step)
    record_diff("final x_0", final_diff, TOLERANCE)
    record_diff("trajectory", traj_diff, TOLERANCE)
    first_bad = next((i for i, d in enumerate(per_step) if d > TOLERANCE), None)
    assert traj_diff <= TOLERANCE, (
        f"max abs difference {traj_diff:.3e} > {TOLERANCE:g} (final {final_diff:.3e}); first exceeded after step "
        f"{first_bad} (timestep {ref_timesteps[first_bad - 1] if first_bad else None}); diffusers timesteps "
        f"{ref_timesteps}; sample scale {float(ref_traj[-1].abs().max()):.3g}"
    )
    # The comparison is meaningful: the sample moved far from x_T.
    assert max_abs_diff(out, x_T) > 0.1
