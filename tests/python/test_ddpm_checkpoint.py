"""An original-layout (ermongroup/ddim, DDPM) checkpoint through `export.py --ddpm-checkpoint`.

The checkpoint is made here from a diffusers UNet2DModel, by renaming its state dict to the original names: this
file's renaming goes diffusers -> original, the opposite direction of the exporter's, and is written independently
of it. So that the renaming itself cannot be wrong in a way that the exporter repeats, a small re-implementation of
the original `Model` (models/diffusion.py of the DDIM code, written from its architecture) loads the renamed
checkpoint with strict=True and must compute what the UNet2DModel computes. Then the exporter's file, run by
`ddim forward`, must match the UNet2DModel at several timesteps.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load_npy, make_unet, max_abs_diff, run_ddim, run_export, save_npy, write_json

# An original DDPM config (the `model:` and `diffusion:` sections of the DDIM code's yml, flattened). GroupNorm has
# 32 groups there, so the channel counts are multiples of 32. beta_start/beta_end differ from the usual values so
# that the test sees whether the exporter carries them.
ORIGINAL_CONFIG = {
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "resamp_with_conv": True,
    "beta_schedule": "linear",
    "beta_start": 0.0002,
    "beta_end": 0.015,
    "num_diffusion_timesteps": 1000,
}

# A 1e-4 bound relative to the output's scale (max(1, max |y|)).
TOLERANCE = 1e-4


def unet_for_original_config(cfg: dict, seed: int):
    """The diffusers UNet2DModel that computes what the original Model of `cfg` computes."""
    n = len(cfg["ch_mult"])
    down, up = [], []
    res = cfg["resolution"]
    for level in range(n):
        down.append("AttnDownBlock2D" if res in cfg["attn_resolutions"] else "DownBlock2D")
        if level != n - 1:
            res //= 2
    up = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    return make_unet(
        seed,
        sample_size=cfg["resolution"],
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_ch"],
        block_out_channels=tuple(cfg["ch"] * m for m in cfg["ch_mult"]),
        layers_per_block=cfg["num_res_blocks"],
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    )


# ----------------------------------------------------------------------------------------------------------------
# diffusers -> original names (the opposite direction of the exporter)
# ----------------------------------------------------------------------------------------------------------------

_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_emb_proj": "temb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_name(name: str, n_levels: int) -> str:
    """The original checkpoint's name of a diffusers UNet2DModel state-dict entry."""
    m = re.fullmatch(r"time_embedding\.linear_([12])\.(weight|bias)", name)
    if m:
        return f"temb.dense.{int(m.group(1)) - 1}.{m.group(2)}"
    m = re.fullmatch(r"(conv_in|conv_out|conv_norm_out)\.(weight|bias)", name)
    if m:
        return f"{'norm_out' if m.group(1) == 'conv_norm_out' else m.group(1)}.{m.group(2)}"

    def part(block_kind: str, inner: str) -> str:
        table = _RESNET_PARTS if block_kind == "resnets" else _ATTN_PARTS
        m2 = re.fullmatch(r"(.+)\.(weight|bias)", inner)
        if not m2 or m2.group(1) not in table:
            raise KeyError(f"no original name for {name}")
        return f"{table[m2.group(1)]}.{m2.group(2)}"

    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        side, i, kind, b, inner = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        level = i if side == "down" else n_levels - 1 - i  # up.L is level L: run last for L = 0
        return f"{side}.{level}.{'block' if kind == 'resnets' else 'attn'}.{b}.{part(kind, inner)}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", name)
    if m:
        return f"down.{m.group(1)}.downsample.conv.{m.group(2)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", name)
    if m:
        return f"up.{n_levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", name)
    if m:
        kind, k, inner = m.group(1), int(m.group(2)), m.group(3)
        prefix = {("resnets", 0): "mid.block_1", ("resnets", 1): "mid.block_2", ("attentions", 0): "mid.attn_1"}
        return f"{prefix[(kind, k)]}.{part(kind, inner)}"
    raise KeyError(f"no original name for {name}")


def to_original_state_dict(unet, n_levels: int) -> dict:
    out = {}
    for name, t in unet.state_dict().items():
        new = original_name(name, n_levels)
        t = t.detach().clone()
        if re.search(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", new):
            t = t.reshape(t.shape[0], t.shape[1], 1, 1)  # the original q/k/v/proj_out are 1x1 convolutions
        assert new not in out, f"two tensors map to {new}"
        out[new] = t
    return out


# ----------------------------------------------------------------------------------------------------------------
# The original architecture (DDIM code's models/diffusion.py), as a check of the renaming above
# ----------------------------------------------------------------------------------------------------------------


def _normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _original_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    arg = t.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _ResnetBlock(nn.Module):
    def __init__(self, cin, cout, temb_ch):
        super().__init__()
        self.norm1, self.conv1 = _normalize(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2, self.conv2 = _normalize(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)
        v = self.v(h).reshape(b, c, hh * ww)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class OriginalModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult, nrb = cfg["ch"], tuple(cfg["ch_mult"]), cfg["num_res_blocks"]
        self.ch, self.nrb, self.n = ch, nrb, len(mult)
        self.resamp_with_conv = cfg["resamp_with_conv"]
        temb_ch = ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch, 3, 1, 1)
        in_mult = (1,) + mult
        res = cfg["resolution"]
        self.down = nn.ModuleList()
        for level in range(self.n):
            d = nn.Module()
            d.block, d.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * mult[level]
            for _ in range(nrb):
                d.block.append(_ResnetBlock(block_in, block_out, temb_ch))
                block_in = block_out
                if res in cfg["attn_resolutions"]:
                    d.attn.append(_AttnBlock(block_in))
            if level != self.n - 1:
                d.downsample = nn.Module()
                if self.resamp_with_conv:
                    d.downsample.conv = nn.Conv2d(block_in, block_in, 3, 2, 0)
                res //= 2
            self.down.append(d)
        self.mid = nn.Module()
        self.mid.block_1 = _ResnetBlock(block_in, block_in, temb_ch)
        self.mid.attn_1 = _AttnBlock(block_in)
        self.mid.block_2 = _ResnetBlock(block_in, block_in, temb_ch)
        ups = []
        for level in reversed(range(self.n)):
            u = nn.Module()
            u.block, u.attn = nn.ModuleList(), nn.ModuleList()
            block_out, skip_in = ch * mult[level], ch * mult[level]
            for b in range(nrb + 1):
                if b == nrb:
                    skip_in = ch * in_mult[level]
                u.block.append(_ResnetBlock(block_in + skip_in, block_out, temb_ch))
                block_in = block_out
                if res in cfg["attn_resolutions"]:
                    u.attn.append(_AttnBlock(block_in))
            if level != 0:
                u.upsample = nn.Module()
                if self.resamp_with_conv:
                    u.upsample.conv = nn.Conv2d(block_in, block_in, 3, 1, 1)
                res *= 2
            ups.insert(0, u)
        self.up = nn.ModuleList(ups)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg["out_ch"], 3, 1, 1)

    def forward(self, x, t):
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](_original_timestep_embedding(t, self.ch))))
        hs = [self.conv_in(x)]
        for level in range(self.n):
            for b in range(self.nrb):
                h = self.down[level].block[b](hs[-1], temb)
                if len(self.down[level].attn) > 0:
                    h = self.down[level].attn[b](h)
                hs.append(h)
            if level != self.n - 1:
                if self.resamp_with_conv:
                    hs.append(self.down[level].downsample.conv(F.pad(hs[-1], (0, 1, 0, 1))))
                else:
                    hs.append(F.avg_pool2d(hs[-1], kernel_size=2, stride=2))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for level in reversed(range(self.n)):
            for b in range(self.nrb + 1):
                h = self.up[level].block[b](torch.cat([h, hs.pop()], dim=1), temb)
                if len(self.up[level].attn) > 0:
                    h = self.up[level].attn[b](h)
            if level != 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                if self.resamp_with_conv:
                    h = self.up[level].upsample.conv(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_pair():
    """(UNet2DModel, original-layout state dict) for ORIGINAL_CONFIG, and the inputs of the comparison."""
    unet = unet_for_original_config(ORIGINAL_CONFIG, seed=21)
    state = to_original_state_dict(unet, len(ORIGINAL_CONFIG["ch_mult"]))
    gen = torch.Generator().manual_seed(2021)
    x = torch.randn(3, ORIGINAL_CONFIG["in_channels"], ORIGINAL_CONFIG["resolution"], ORIGINAL_CONFIG["resolution"],
                    generator=gen)
    t = torch.tensor([0, 417, 999], dtype=torch.int64)
    with torch.no_grad():
        ref = unet(x, t).sample
    return unet, state, x, t, ref


def test_renaming_is_the_original_layout(checkpoint_pair, record_diff):
    """The test's own checkpoint: exactly the original Model's names and shapes, and the same function."""
    unet, state, x, t, ref = checkpoint_pair
    original = OriginalModel(ORIGINAL_CONFIG).eval()
    original.load_state_dict(state, strict=True)  # raises on any missing, unexpected or mis-shaped tensor
    assert set(state) == set(original.state_dict())
    assert {"temb.dense.0.weight", "down.1.block.0.nin_shortcut.weight", "down.0.downsample.conv.weight",
            "down.1.attn.0.q.weight", "mid.attn_1.proj_out.weight", "up.1.upsample.conv.weight",
            "up.1.attn.1.k.weight", "up.0.block.1.nin_shortcut.weight", "norm_out.weight"} <= set(state)
    assert state["mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    with torch.no_grad():
        y = original(x, t)
    d = max_abs_diff(y, ref)
    record_diff("original Model vs UNet2DModel", d, 1e-5)
    assert d <= 1e-5


def _resolved_alphas_cumprod(model_path, schedule: dict) -> np.ndarray:
    """ᾱ of a file's schedule (FORMAT.md 4.1), linear schedules and ᾱ tables only."""
    if "alphas_cumprod" in schedule:
        from safetensors import safe_open

        with safe_open(str(model_path), framework="pt") as f:
            return f.get_tensor(schedule["alphas_cumprod"]).double().numpy()
    assert schedule.get("beta_schedule", "linear") == "linear", schedule
    T = schedule.get("num_train_timesteps", 1000)
    betas = np.linspace(schedule.get("beta_start", 0.0001), schedule.get("beta_end", 0.02), T, dtype=np.float64)
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("variant", ["plain", "module-prefix"])
def test_ddpm_checkpoint_export_matches_unet(variant, checkpoint_pair, ddim_bin, work_dir, record_diff):
    unet, state, x, t, ref = checkpoint_pair
    if variant == "module-prefix":  # as saved from torch.nn.DataParallel
        state = {f"module.{k}": v for k, v in state.items()}
    ckpt = work_dir / "ckpt.pth"
    torch.save(state, str(ckpt))
    config = write_json(work_dir / "config.json", ORIGINAL_CONFIG)
    model_path = work_dir / "model.safetensors"
    run_export(["--ddpm-checkpoint", ckpt, "--config", config, "--out", model_path])
    assert model_path.is_file()

    # The network: every timestep of the batch at once (a .npy of N timesteps), then one integer timestep.
    run_ddim(["forward", "--model", model_path, "--device", "cpu", "--x", save_npy(work_dir / "x.npy", x),
              "--t", save_npy(work_dir / "t.npy", t.numpy()), "--out", work_dir / "y.npy"])
    y = load_npy(work_dir / "y.npy")
    scale = max(1.0, float(ref.abs().max()))
    d = max_abs_diff(y, ref)
    record_diff(f"forward t={t.tolist()} (scale {scale:.2f})", d, TOLERANCE * scale)
    assert d <= TOLERANCE * scale, f"max abs difference {d:.3e} > {TOLERANCE:g} x {scale:.3g}"

    run_ddim(["forward", "--model", model_path, "--device", "cpu", "--x", work_dir / "x.npy", "--t", "250",
              "--out", work_dir / "y250.npy"])
    with torch.no_grad():
        ref250 = unet(x, 250).sample
    d250 = max_abs_diff(load_npy(work_dir / "y250.npy"), ref250)
    record_diff("forward t=250", d250, TOLERANCE * scale)
    assert d250 <= TOLERANCE * scale

    # The schedule: the config's linear betas over num_diffusion_timesteps, epsilon prediction.
    from safetensors import safe_open

    with safe_open(str(model_path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    schedule = json.loads(meta["ddim.schedule"])
    assert schedule.get("num_train_timesteps", 1000) == ORIGINAL_CONFIG["num_diffusion_timesteps"]
    assert schedule.get("prediction_type", "epsilon") == "epsilon"
    want = np.cumprod(1.0 - np.linspace(ORIGINAL_CONFIG["beta_start"], ORIGINAL_CONFIG["beta_end"],
                                        ORIGINAL_CONFIG["num_diffusion_timesteps"], dtype=np.float64))
    got = _resolved_alphas_cumprod(model_path, schedule)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    # No stray tensors and no "module." names (the reader would reject unreferenced tensors anyway).
    assert not any(n.startswith("module.") for n in names)
    expected_count = len(state) + (1 if "alphas_cumprod" in schedule else 0)
    assert len(names) == expected_count


def test_ddpm_checkpoint_without_resamp_conv(ddim_bin, work_dir, record_diff):
    """resamp_with_conv false (average-pool down, nearest up without a conv) has no UNet2DModel equivalent: the
    reference is the original Model itself, with random weights (GroupNorm affines and biases perturbed)."""
    from conftest import randomize_unet_

    cfg = dict(ORIGINAL_CONFIG, resamp_with_conv=False, ch_mult=[1, 2, 2], attn_resolutions=[4],
               beta_start=0.0001, beta_end=0.02)
    torch.manual_seed(22)
    original = randomize_unet_(OriginalModel(cfg), 22).eval()
    state = original.state_dict()
    assert not any("downsample" in k or "upsample" in k for k in state)
    ckpt = work_dir / "ckpt.pth"
    torch.save(state, str(ckpt))
    model_path = work_dir / "model.safetensors"
    run_export(["--ddpm-checkpoint", ckpt, "--config", write_json(work_dir / "config.json", cfg),
                "--out", model_path])

    gen = torch.Generator().manual_seed(2022)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([10, 900], dtype=torch.int64)
    with torch.no_grad():
        ref = original(x, t)
    run_ddim(["forward", "--model", model_path, "--device", "cpu", "--x", save_npy(work_dir / "x.npy", x),
              "--t", save_npy(work_dir / "t.npy", t.numpy()), "--out", work_dir / "y.npy"])
    scale = max(1.0, float(ref.abs().max()))
    d = max_abs_diff(load_npy(work_dir / "y.npy"), ref)
    record_diff(f"forward, resamp_with_conv false (scale {scale:.2f})", d, TOLERANCE * scale)
    assert d <= TOLERANCE * scale
