"""Latent diffusion (issue 14 section 2): a U-Net sampling latents plus a VQModel or AutoencoderKL decoder in one
model file (weights/FORMAT.md section 9), against diffusers on the CPU with small random-weight networks.

* The decoder from identical latents: `ddim decode --latents L` against `vqvae.decode(L / scaling_factor)` (with the
  codebook quantisation) and `vae.decode(L / scaling_factor + shift_factor)`: max abs difference <= 1e-3. The
  codebook indices the engine chose (read back from the dumped quantize node) equal diffusers' except where the two
  nearest entries are within a relative distance of NEAR_TIE (both sides then may pick either; such pixels are
  counted and must be rare).
* The sampling loop, teacher-forced: from every latent x_k of the engine's trajectory, diffusers' U-Net and
  DDIMScheduler.step (eta 0) give x_{k+1}, compared with the engine's (<= 1e-4); the engine's decoded image is
  compared with the decoder run on the engine's final latents (<= 1e-3).
* The real LDMPipeline (diffusers/pipelines/deprecated) saved with save_pretrained and exported with
  `tools/export.py --diffusers DIR`, sampled from the pipeline's own initial latents (--x-T): the final images agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_npy, make_unet, max_abs_diff, randomize_unet_, run_ddim, run_export, save_npy

DECODER_TOL = 1e-3
STEP_TOL = 1e-4
NEAR_TIE = 1e-4  # relative gap (d2 - d1) / d1 of squared distances under which either index is accepted

LATENT_UNET = dict(sample_size=8, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8)

VQ_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                 latent_channels=3, vq_embed_dim=4, num_vq_embeddings=64, norm_num_groups=8, scaling_factor=0.5)

KL_CONFIGS = {
    # shift_factor, a mid-block attention of 32 channels, post_quant_conv.
    "kl-shift-attn": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 32), layers_per_block=1,
                          latent_channels=4, norm_num_groups=8, scaling_factor=0.3, shift_factor=0.1),
    # use_post_quant_conv off, mid_block_add_attention off, two layers per block.
    "kl-nopqc-noattn": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), layers_per_block=2,
                            latent_channels=4, norm_num_groups=8, scaling_factor=0.7, use_post_quant_conv=False,
                            use_quant_conv=False, mid_block_add_attention=False),
}


def _randomize_decoder(model, seed: int):
    randomize_unet_(model, seed)
    if hasattr(model, "quantize"):  # diffusers initialises the codebook to +-1/n: spread it out
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            model.quantize.embedding.weight.copy_(torch.randn(model.quantize.embedding.weight.shape, generator=gen))
    return model.eval().requires_grad_(False)


def make_vq(seed=0, **overrides):
    from diffusers import VQModel

    torch.manual_seed(seed)
    return _randomize_decoder(VQModel(**dict(VQ_CONFIG, **overrides)), seed)


def make_kl(name, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _randomize_decoder(AutoencoderKL(**KL_CONFIGS[name]), seed)


def reference_decode(decoder, latents: torch.Tensor) -> torch.Tensor:
    """What diffusers' pipelines do after the loop, before post-processing."""
    cfg = decoder.config
    z = latents / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None) is not None:
        z = z + cfg.shift_factor
    with torch.no_grad():
        return decoder.decode(z).sample


SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.0015, "beta_end": 0.0195, "clip_sample": False}


def export_latent_file(exporter, work_dir, unet, decoder, name="latent.safetensors"):
    from ddim_export.api import export_latent

    path = work_dir / name
    export_latent(unet, decoder, SCHEDULER, path, check=False)
    return path


@pytest.fixture
def vq_file(exporter, work_dir):
    unet = make_unet(1, in_channels=4, out_channels=4, **LATENT_UNET)
    vq = make_vq(2)
    return unet, vq, export_latent_file(exporter, work_dir, unet, vq)


def test_file_is_version_2_with_prefixed_decoder_tensors(ddim_bin, vq_file):
    from safetensors import safe_open

    _, vq, path = vq_file
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ddim.format_version"] == "2"
    assert {"ddim.decoder", "ddim.latent"} <= set(meta)
    dec = {k for k in keys if k.startswith("vqvae.")}
    expected = {"vqvae." + k for k in vq.state_dict() if not k.startswith(("encoder.", "quant_conv."))}
    assert dec == expected
    assert all(not k.startswith(("vae.", "unet.")) for k in keys)
    info = run_ddim(["info", path]).stdout
    assert "decoder" in info


def _engine_indices(dump_dir, codebook: np.ndarray) -> np.ndarray:
    """The codebook index of every pixel of the dumped quantize node (its rows are codebook entries, exactly)."""
    q = load_npy(dump_dir / "vqvae.quantize.npy")  # (N, C, h, w)
    flat = q.transpose(0, 2, 3, 1).reshape(-1, q.shape[1])
    eq = np.all(flat[:, None, :] == codebook[None, :, :], axis=2)
    assert np.all(eq.any(axis=1)), "a quantised pixel is not a codebook entry"
    return eq.argmax(axis=1)


def test_vq_decoder_matches_diffusers_from_identical_latents(ddim_bin, vq_file, work_dir, record_diff):
    _, vq, path = vq_file
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn((2, 4, 8, 8), generator=gen) * vq.config.scaling_factor
    ref = reference_decode(vq, latents)
    save_npy(work_dir / "lat.npy", latents)
    run_ddim(["decode", "--model", path, "--latents", work_dir / "lat.npy", "--out", work_dir / "img.npy", "--device",
              "cpu", "--dump", work_dir / "dump"])
    out = load_npy(work_dir / "img.npy")
    assert out.shape == (2, 3, 16, 16)
    diff = max_abs_diff(out, ref)
    record_diff("vq decode", diff, DECODER_TOL)
    assert diff <= DECODER_TOL

    # Codebook indices: diffusers' argmin over cdist against the engine's choice.
    codebook = vq.quantize.embedding.weight.detach().numpy()
    z = (latents / vq.config.scaling_factor).permute(0, 2, 3, 1).reshape(-1, 4)
    ref_idx = torch.argmin(torch.cdist(z, vq.quantize.embedding.weight), dim=1).numpy()
    d = ((z.double()[:, None, :] - torch.from_numpy(codebook).double()[None]) ** 2).sum(-1).numpy()
    two = np.sort(d, axis=1)[:, :2]
    near = (two[:, 1] - two[:, 0]) <= NEAR_TIE * np.maximum(two[:, 0], 1e-30)
    idx = _engine_indices(work_dir / "dump", codebook)
    mismatched = (idx != ref_idx) & ~near
    assert not mismatched.any(), f"{int(mismatched.sum())} pixels quantised to other entries than diffusers'"
    assert near.sum() <= 2, f"{int(near.sum())} near ties: the test latents should avoid them"


def test_vq_exact_tie_takes_the_lowest_index(ddim_bin, exporter, work_dir):
    """Two identical codebook entries: torch.argmin's rule (the first) on both sides."""
    unet = make_unet(1, in_channels=4, out_channels=4, **LATENT_UNET)
    vq = make_vq(3)
    with torch.no_grad():
        w = vq.quantize.embedding.weight
        w[40] = w[7]  # entry 40 duplicates entry 7; latents placed at entry 7 must get index 7
    path = export_latent_file(exporter, work_dir, unet, vq)
    z = w[7].detach().clone().reshape(1, 4, 1, 1).expand(1, 4, 8, 8) + 0.0
    z = z + 1e-3 * torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    save_npy(work_dir / "lat.npy", z * vq.config.scaling_factor)
    run_ddim(["decode", "--model", path, "--latents", work_dir / "lat.npy", "--out", work_dir / "img.npy", "--device",
              "cpu", "--dump", work_dir / "dump"])
    q = load_npy(work_dir / "dump" / "vqvae.quantize.npy").transpose(0, 2, 3, 1).reshape(-1, 4)
    assert np.all(q == w[7].detach().numpy())
    ref_idx = torch.argmin(torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 4), w), dim=1)
    assert torch.all(ref_idx == 7)


@pytest.mark.parametrize("name", sorted(KL_CONFIGS))
def test_kl_decoder_matches_diffusers_from_identical_latents(ddim_bin, exporter, work_dir, record_diff, name):
    kl = make_kl(name, 4)
    unet = make_unet(1, in_channels=4, out_channels=4, **LATENT_UNET)
    path = export_latent_file(exporter, work_dir, unet, kl)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    ref = reference_decode(kl, latents)
    save_npy(work_dir / "lat.npy", latents)
    run_ddim(["decode", "--model", path, "--latents", work_dir / "lat.npy", "--out", work_dir / "img.npy", "--device",
              "cpu"])
    out = load_npy(work_dir / "img.npy")
    assert out.shape == tuple(ref.shape)
    diff = max_abs_diff(out, ref)
    record_diff(f"{name} decode", diff, DECODER_TOL)
    assert diff <= DECODER_TOL


def _teacher_forced(unet, traj: np.ndarray, steps: int) -> float:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(SCHEDULER)
    sched.set_timesteps(steps)
    worst = 0.0
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            x = torch.from_numpy(traj[k])
            ref = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
            worst = max(worst, max_abs_diff(traj[k + 1], ref))
    return worst


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_latent_loop_teacher_forced_and_decoded(ddim_bin, exporter, work_dir, record_diff, kind):
    unet = make_unet(7, in_channels=4, out_channels=4, **LATENT_UNET)
    decoder = make_vq(8) if kind == "vq" else make_kl("kl-shift-attn", 8)
    path = export_latent_file(exporter, work_dir, unet, decoder)
    steps = 6
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    save_npy(work_dir / "xT.npy", x_T)
    f = decoder.config.block_out_channels and 2 ** (len(decoder.config.block_out_channels) - 1)
    run_ddim(["sample", "--model", path, "--device", "cpu", "--steps", steps, "--x-T", work_dir / "xT.npy",
              "--trajectory", work_dir / "traj.npy", "--out", work_dir / "img.npy"])
    traj = load_npy(work_dir / "traj.npy")
    assert traj.shape == (steps + 1, 2, 4, 8, 8)
    assert np.array_equal(traj[0], x_T.numpy())
    step_diff = _teacher_forced(unet, traj, steps)
    record_diff(f"{kind} latent step (teacher-forced)", step_diff, STEP_TOL)
    assert step_diff <= STEP_TOL
    img = load_npy(work_dir / "img.npy")
    assert img.shape == (2, 3, 8 * f, 8 * f)
    ref = reference_decode(decoder, torch.from_numpy(traj[-1]))
    dec_diff = max_abs_diff(img, ref)
    record_diff(f"{kind} decoded image", dec_diff, DECODER_TOL)
    assert dec_diff <= DECODER_TOL

    # --decode off returns the final latents; --height/--width are pixels of the decoded image.
    run_ddim(["sample", "--model", path, "--device", "cpu", "--steps", steps, "--x-T", work_dir / "xT.npy",
              "--decode", "off", "--out", work_dir / "lat.npy"])
    assert np.array_equal(load_npy(work_dir / "lat.npy"), traj[-1])
    proc = run_ddim(["sample", "--model", path, "--device", "cpu", "--steps", 2, "--batch", 1, "--height", 8 * f + 1,
                     "--width", 8 * f, "--out", work_dir / "x.npy"], check=False)
    assert proc.returncode != 0 and "multiple" in proc.stderr
    run_ddim(["sample", "--model", path, "--device", "cpu", "--steps", 2, "--batch", 1, "--height", 16 * f, "--width",
              8 * f, "--out", work_dir / "wide.npy"])
    assert load_npy(work_dir / "wide.npy").shape == (1, 3, 16 * f, 8 * f)


def test_ldm_pipeline_folder_export_and_sampling(ddim_bin, work_dir, record_diff):
    """LDMPipeline (unet/, vqvae/, scheduler/) saved by diffusers, exported from the folder, sampled like the pipeline."""
    from diffusers import DDIMScheduler, LDMPipeline
    from diffusers.utils.torch_utils import randn_tensor

    unet = make_unet(11, in_channels=4, out_channels=4, **LATENT_UNET)
    vq = make_vq(12)
    pipe = LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler.from_config(SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    folder = work_dir / "ldm"
    pipe.save_pretrained(str(folder))
    run_export(["--diffusers", folder, "--out", work_dir / "ldm.safetensors"])
    steps = 5
    x_T = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=steps, eta=0.0,
                   output_type="np").images  # (N, H, W, 3) in [0, 1]
    save_npy(work_dir / "xT.npy", x_T)
    run_ddim(["sample", "--model", work_dir / "ldm.safetensors", "--device", "cpu", "--steps", steps, "--x-T",
              work_dir / "xT.npy", "--out", work_dir / "img.npy"])
    img = np.clip(load_npy(work_dir / "img.npy") / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    diff = max_abs_diff(img, ref)
    record_diff("LDMPipeline images", diff, DECODER_TOL)
    assert diff <= DECODER_TOL


def test_unet_and_autoencoderkl_folder_export(ddim_bin, work_dir, record_diff):
    """A pipeline folder with unet/, vae/ (AutoencoderKL) and scheduler/."""
    from diffusers import DDIMScheduler

    unet = make_unet(13, in_channels=4, out_channels=4, **LATENT_UNET)
    kl = make_kl("kl-shift-attn", 14)
    folder = work_dir / "pipe"
    unet.save_pretrained(str(folder / "unet"))
    kl.save_pretrained(str(folder / "vae"))
    DDIMScheduler.from_config(SCHEDULER).save_pretrained(str(folder / "scheduler"))
    run_export(["--diffusers", folder, "--out", work_dir / "kl.safetensors"])
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(15))
    save_npy(work_dir / "lat.npy", latents)
    run_ddim(["decode", "--model", work_dir / "kl.safetensors", "--latents", work_dir / "lat.npy", "--out",
              work_dir / "img.npy", "--device", "cpu"])
    diff = max_abs_diff(load_npy(work_dir / "img.npy"), reference_decode(kl, latents))
    record_diff("unet+vae folder decode", diff, DECODER_TOL)
    assert diff <= DECODER_TOL


def test_refused_decoder_options_are_named(exporter, work_dir):
    from ddim_export.errors import ExportError

    unet = make_unet(1, in_channels=4, out_channels=4, **LATENT_UNET)
    vq = make_vq(2, norm_type="spatial", block_out_channels=(32, 32))  # SpatialNorm has 32 groups
    with pytest.raises(ExportError, match="norm_type"):
        export_latent_file(exporter, work_dir, unet, vq)
    from diffusers import AutoencoderKL

    kl = AutoencoderKL(**dict(KL_CONFIGS["kl-shift-attn"], latents_mean=[0.0] * 4, latents_std=[1.0] * 4))
    with pytest.raises(ExportError, match="latents_mean"):
        export_latent_file(exporter, work_dir, unet, kl)


LDM_UNET_PARAMS = 274_056_163  # CompVis/ldm-celebahq-256's UNet2DModel
LDM_VQ_DECODER_PARAMS = 32_985_359  # its VQModel without the encoder and quant_conv (quantize, post_quant_conv, decoder)


def test_ldm_celebahq_preset_parameter_counts(exporter):
    """diffusers' own modules (built on the meta device, no weights) against the exporter's graphs; the C++ builder
    (ddim-make-model) is held to the same numbers in tests/cpp/test_latent.cpp."""
    import diffusers
    from ddim_export.api import LATENT_PRESETS
    from ddim_export.arch import arch_from_diffusers_config
    from ddim_export.decoder import build_decoder_graph, decoder_arch_from_config
    from ddim_export.graph import DiffusersNaming, build_graph

    unet_kwargs, cls, dec_kwargs, _ = LATENT_PRESETS["ldm-celebahq-256"]
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**unet_kwargs)
        vq = getattr(diffusers, cls)(**dec_kwargs)
    assert sum(p.numel() for p in unet.parameters()) == LDM_UNET_PARAMS
    dec = sum(v.numel() for k, v in vq.state_dict().items() if not k.startswith(("encoder.", "quant_conv.")))
    assert dec == LDM_VQ_DECODER_PARAMS
    assert build_graph(arch_from_diffusers_config(dict(unet.config)), DiffusersNaming()).num_parameters == LDM_UNET_PARAMS
    darch = decoder_arch_from_config(dict(vq.config, _class_name=cls), "vqvae", "vqvae")
    built = build_decoder_graph(darch, 64, 64)
    assert built.num_parameters == LDM_VQ_DECODER_PARAMS
    assert darch.factor == 4 and darch.latent_doc()["scaling_factor"] == pytest.approx(0.18215)
    attn = [n for n in built.graph["nodes"] if n["op"] == "attention"]
    assert len(attn) == 1 and attn[0]["attrs"] == {"heads": 1}
