"""The exporter's entry points: a UNet2DModel in memory, a diffusers folder, an original DDPM checkpoint,
and the random-weight presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .arch import UNetArch, arch_from_diffusers_config, arch_from_original_config, split_original_config
from .checkpoint import (find_scheduler_config, find_unet_folder, load_diffusers_weights, load_tensor_file, read_json,
                         rename_legacy_attention, unwrap_state_dict)
from .errors import ExportError, note
from .graph import BuiltGraph, DiffusersNaming, OriginalNaming, build_graph
from .schedule import Schedule, schedule_from_original_config, schedule_from_scheduler_config
from .verify import DEFAULT_TOLERANCE, VerifyReport, _quiet_diffusers, reference_unet
from .verify import verify as run_verify
from .writer import normalize_dtype, select_tensors, write_model


@dataclass
class ExportResult:
    path: Path
    arch: UNetArch
    built: BuiltGraph
    schedule: Schedule
    dtype: str
    reference: Callable[[], torch.nn.Module]  # builds the float32 PyTorch model that `verify` compares against
    verify_report: VerifyReport | None = None
    decoder: BuiltGraph | None = None  # latent models: the decoder graph (export_latent)
    decoder_arch: Any = None           # and its decoder.DecoderArch

    @property
    def num_parameters(self) -> int:
        return self.built.num_parameters

    def verify(self, **kwargs) -> VerifyReport:
        self.verify_report = run_verify(self.path, self.reference(), **kwargs)
        return self.verify_report


def _finish(out, arch: UNetArch, built: BuiltGraph, schedule: Schedule, tensors: dict[str, torch.Tensor], dtype: str,
            reference: Callable[[], torch.nn.Module], provenance: dict[str, str], ddim, check: bool, do_verify: bool,
            tolerance: float, timesteps: Iterable[int] | None) -> ExportResult:
    dtype = normalize_dtype(dtype)
    if arch.out_channels != arch.in_channels:
        note(f"the network outputs {arch.out_channels} channels for {arch.in_channels} input channels: `ddim forward` "
             "runs it, but `ddim sample` needs the output to have the input's channels (a learned-variance model "
             "would have to be cut to its epsilon half)")
    path = write_model(out, built, schedule, tensors, dtype, provenance, ddim=ddim, check=check)
    result = ExportResult(path, arch, built, schedule, dtype, reference)
    if do_verify:
        result.verify(ddim=ddim, tolerance=tolerance, timesteps=timesteps)
    return result


def _diffusers_reference(config: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """UNet2DModel.from_config(config) with `state` (built on the meta device, then given the tensors)."""
    from diffusers import UNet2DModel

    with _quiet_diffusers(), torch.device("meta"):
        model = UNet2DModel.from_config(config)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def set_class_null(arch: UNetArch, null_class_label=None, null_class_embedding=None) -> None:
    """Records the unconditional ("null") input of a class-conditional model for classifier-free guidance:
    `null_class_label` (an integer label in [0, num_class_embeds) or, for class_embed_type "timestep", a number) or
    `null_class_embedding` (class_embed_type "identity": temb_dim numbers, array-like or a .npy path)."""
    if null_class_label is None and null_class_embedding is None:
        return
    if null_class_label is not None and null_class_embedding is not None:
        raise ExportError("give null_class_label or null_class_embedding, not both")
    if arch.class_kind is None:
        raise ExportError("a null class input was given, but the model is unconditional (no class_embed_type or "
                          "num_class_embeds)")
    if arch.class_kind == "vector":
        if null_class_embedding is None:
            raise ExportError("the model's class_embed_type is 'identity': give a null class embedding "
                              f"({arch.temb_dim} values), not a label")
        v = null_class_embedding
        if isinstance(v, (str, os.PathLike)):
            v = np.load(str(v), allow_pickle=False)
        v = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).reshape(-1)
        if v.size != arch.temb_dim or not np.all(np.isfinite(v)) or np.any(np.abs(v) > 3e38):
            raise ExportError(f"the null class embedding must hold {arch.temb_dim} finite float32 values "
                              f"(the time-embedding width), got {v.size} values")
        arch.class_null = [float(np.float32(x)) for x in v]
        return
    if null_class_label is None:
        raise ExportError(f"the model takes class labels ({arch.class_kind}): give a null class label, not an embedding")
    try:
        value = float(null_class_label)
    except (TypeError, ValueError):
        raise ExportError(f"the null class label must be a number, got {null_class_label!r}") from None
    if not np.isfinite(value) or abs(value) > 3e38:
        raise ExportError(f"the null class label must be finite, got {null_class_label!r}")
    if arch.class_kind == "index":
        if value != int(value) or not 0 <= value < arch.num_class_embeds:
            raise ExportError(f"the null class label must be an integer in [0, num_class_embeds = "
                              f"{arch.num_class_embeds}), got {null_class_label!r}")
        arch.class_null = int(value)
    else:
        arch.class_null = float(np.float32(value))


def export(unet_module, scheduler_config, path, dtype: str = "float32", *, ddim=None, verify: bool = False,
           tolerance: float = DEFAULT_TOLERANCE, timesteps: Iterable[int] | None = None,
           check: bool = True, null_class_label=None, null_class_embedding=None) -> ExportResult:
    """Exports a diffusers UNet2DModel held in memory. `scheduler_config`: a dict, a diffusers scheduler, a path
    to a scheduler_config.json, or None (DDIMScheduler's defaults). A class-conditional model's null input for
    guidance is recorded when given (set_class_null)."""
    name = type(unet_module).__name__
    config = getattr(unet_module, "config", None)
    if config is None or not hasattr(unet_module, "state_dict"):
        raise ExportError(f"export() needs a diffusers UNet2DModel, got {name}")
    if name != "UNet2DModel" and dict(config).get("_class_name", name) != "UNet2DModel":
        raise ExportError(f"export() needs a diffusers UNet2DModel, got {name}")
    config = {k: v for k, v in dict(config).items()}
    arch = arch_from_diffusers_config(config)
    set_class_null(arch, null_class_label, null_class_embedding)
    built = build_graph(arch, DiffusersNaming())
    tensors = select_tensors(built, dict(unet_module.state_dict()), "UNet2DModel state dict",
                             hint=arch.missing_keys_hint())
    schedule = schedule_from_scheduler_config(scheduler_config)
    return _finish(path, arch, built, schedule, tensors, dtype, lambda: unet_module,
                   {"source": "diffusers UNet2DModel"}, ddim, check, verify, tolerance, timesteps)


def export_latent(unet_module, decoder_module, scheduler_config, path, dtype: str = "float32", *, component=None,
                  ddim=None, verify: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                  timesteps: Iterable[int] | None = None, check: bool = True,
                  provenance: dict[str, str] | None = None) -> ExportResult:
    """Exports a latent model held in memory: a UNet2DModel and a VQModel (LDMPipeline's `vqvae`) or AutoencoderKL
    (`vae`) into one file of format version 2 (weights/FORMAT.md section 9). `component` (default: "vqvae" for a
    VQModel, "vae" for an AutoencoderKL) prefixes the decoder's tensor and node names. --verify checks the U-Net."""
    from .decoder import build_decoder_graph, decoder_arch_from_config, decoder_tensors

    config = {k: v for k, v in dict(unet_module.config).items()}
    if type(unet_module).__name__ != "UNet2DModel" and config.get("_class_name") != "UNet2DModel":
        raise ExportError(f"export_latent() needs a diffusers UNet2DModel, got {type(unet_module).__name__}")
    arch = arch_from_diffusers_config(config)
    built = build_graph(arch, DiffusersNaming())
    tensors = select_tensors(built, dict(unet_module.state_dict()), "UNet2DModel state dict",
                             hint=arch.missing_keys_hint())
    dconfig = {k: v for k, v in dict(decoder_module.config).items()}
    dconfig.setdefault("_class_name", type(decoder_module).__name__)
    component = component or ("vqvae" if dconfig["_class_name"] == "VQModel" else "vae")
    darch = decoder_arch_from_config(dconfig, component, f"{component} config")
    if darch.latent_channels != arch.in_channels or arch.out_channels != arch.in_channels:
        raise ExportError(f"the U-Net samples {arch.in_channels} channels (and outputs {arch.out_channels}) but the "
                          f"{component} decodes {darch.latent_channels}-channel latents")
    dbuilt = build_decoder_graph(darch, arch.height, arch.width)
    dtensors = decoder_tensors(dbuilt, darch, dict(decoder_module.state_dict()), f"{component} state dict")
    clash = set(tensors) & set(dtensors)
    if clash:
        raise ExportError(f"tensor names of the U-Net and the {component} collide: {sorted(clash)[:4]}")
    tensors.update(dtensors)
    schedule = schedule_from_scheduler_config(scheduler_config)
    dtype = normalize_dtype(dtype)
    prov = {"source": f"diffusers UNet2DModel + {dconfig['_class_name']}"}
    prov.update(provenance or {})
    out = write_model(path, built, schedule, tensors, dtype, prov, ddim=ddim, check=check, decoder=dbuilt,
                      latent=darch.latent_doc())
    result = ExportResult(out, arch, built, schedule, dtype, lambda: unet_module, decoder=dbuilt, decoder_arch=darch)
    if verify:
        result.verify(ddim=ddim, tolerance=tolerance, timesteps=timesteps)
    return result


def _latent_component(root: Path) -> str | None:
    for name in ("vqvae", "vae"):
        if (root / name / "config.json").is_file() and (root / "unet" / "config.json").is_file():
            return name
    return None


def export_diffusers(dir, out, dtype: str = "float32", scheduler_config=None, *, ddim=None, verify: bool = False,
                     tolerance: float = DEFAULT_TOLERANCE, timesteps: Iterable[int] | None = None,
                     check: bool = True, null_class_label=None, null_class_embedding=None) -> ExportResult:
    """Exports a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors or .bin), or the
    unet/ of a pipeline folder. The schedule comes from `scheduler_config` (path, dict or scheduler), else from
    scheduler_config.json beside the model or in the pipeline's scheduler/ folder, else DDIMScheduler's defaults.
    A latent pipeline folder (unet/ with vqvae/, as LDMPipeline saves it, or with vae/ holding an AutoencoderKL)
    becomes a latent model file (format version 2) with the decoder."""
    root = Path(dir)
    component = _latent_component(root) if root.is_dir() else None
    if component is not None:
        from diffusers import UNet2DModel

        from .decoder import load_decoder_module

        with _quiet_diffusers():
            unet = UNet2DModel.from_pretrained(str(root / "unet"), torch_dtype=torch.float32).eval()
        decoder = load_decoder_module(root / component, component)
        if scheduler_config is None:
            found = find_scheduler_config(root / "unet", root)
            if found is not None:
                note(f"schedule from {found}")
                scheduler_config = found
        return export_latent(unet, decoder, scheduler_config, out, dtype, component=component, ddim=ddim, verify=verify,
                             tolerance=tolerance, timesteps=timesteps, check=check,
                             provenance={"source": f"diffusers latent pipeline {root.resolve().name}"})
    unet_dir = find_unet_folder(root)
    config = read_json(unet_dir / "config.json", "model config")
    arch = arch_from_diffusers_config(config, f"{unet_dir / 'config.json'}")
    set_class_null(arch, null_class_label, null_class_embedding)
    state = rename_legacy_attention(load_diffusers_weights(unet_dir))
    built = build_graph(arch, DiffusersNaming())
    tensors = select_tensors(built, state, str(unet_dir), hint=arch.missing_keys_hint())
    if scheduler_config is None:
        found = find_scheduler_config(unet_dir, root)
        if found is not None:
            note(f"schedule from {found}")
            scheduler_config = found
    where = str(scheduler_config) if isinstance(scheduler_config, (str, os.PathLike)) else "scheduler config"
    schedule = schedule_from_scheduler_config(scheduler_config, where)
    return _finish(out, arch, built, schedule, tensors, dtype, lambda: _diffusers_reference(config, state),
                   {"source": f"diffusers {unet_dir.resolve().name}"}, ddim, check, verify, tolerance, timesteps)


def _load_config(config, what: str) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        return read_json(Path(config), what)
    raise ExportError(f"{what} must be a dict or a path to a JSON file, not {type(config).__name__}")


def export_ddpm_checkpoint(checkpoint, config, out, dtype: str = "float32", *, ema: bool = False, ddim=None,
                           verify: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                           timesteps: Iterable[int] | None = None, check: bool = True) -> ExportResult:
    """Exports a checkpoint of the original DDPM / DDIM code (ermongroup/ddim, pesser/pytorch_diffusion), keeping
    its tensor names. `checkpoint`: a path (.ckpt/.pth/.pt via torch.load(weights_only=True), or .safetensors) or a
    state dict; `config`: a path or dict, flat or ermongroup's {"model", "diffusion", "data"}. With `ema`, the EMA
    copy of an ermongroup checkpoint is exported."""
    cfg = _load_config(config, "--config")
    where = str(config) if isinstance(config, (str, os.PathLike)) else "config"
    arch = arch_from_original_config(cfg, where)
    model_cfg, diffusion_cfg, rest = split_original_config(cfg, where)
    schedule = schedule_from_original_config(diffusion_cfg, model_cfg, rest.get("scheduler"), where)
    if isinstance(checkpoint, (str, os.PathLike)):
        obj, cwhere = load_tensor_file(checkpoint), str(checkpoint)
    else:
        obj, cwhere = checkpoint, "checkpoint"
    state = unwrap_state_dict(obj, cwhere, ema=ema)
    ignore = []
    if "logvar" in state and model_cfg.get("type") == "bayesian":
        note("dropping 'logvar' (the 'bayesian' model's variance table; DDIM sampling does not use it)")
        ignore.append("logvar")
    naming = OriginalNaming(arch.levels, state.keys())
    built = build_graph(arch, naming)
    tensors = select_tensors(built, state, cwhere, ignore)

    def reference() -> torch.nn.Module:
        return reference_unet(arch, {p.canonical: state[p.tensor] for p in built.params})

    return _finish(out, arch, built, schedule, tensors, dtype, reference,
                   {"source": f"original DDPM checkpoint {Path(cwhere).name}"}, ddim, check, verify, tolerance,
                   timesteps)


# ---------------------------------------------------------------- presets

_COMMON = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "act_fn": "silu",
    "mid_block_scale_factor": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32: levels at 32, 16, 8, 4; attention at 16x16 = level 1 (up_blocks.2), 256 wide.
    "cifar10-32": dict(_COMMON, sample_size=32, block_out_channels=[128, 256, 256, 256],
                       down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
    # google/ddpm-celebahq-256: levels at 256 ... 8; attention at 16x16 = level 4 (up_blocks.1), 512 wide.
    "celebahq-256": dict(_COMMON, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
                         down_block_types=["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                                           "AttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
                                         "UpBlock2D"]),
}

# Their DDPMScheduler: linear betas 1e-4..0.02 over 1000 steps, epsilon.
PRESET_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": True,
    "variance_type": "fixed_small",
}


# Latent presets: (UNet2DModel kwargs, decoder class, decoder kwargs, scheduler config).
LATENT_PRESETS: dict[str, tuple[dict[str, Any], str, dict[str, Any], dict[str, Any]]] = {
    # CompVis/ldm-celebahq-256 (LDMPipeline): the original LDM config celebahq-ldm-vq-4 (model_channels 224,
    # channel_mult 1,2,3,4, attention at downsampling 2, 4, 8 with 32-wide heads, 64x64x3 latents) and its
    # VQ-f4 first stage (ch 128, ch_mult 1,2,4, 2 res blocks, 8192 x 3 codebook), scaled_linear betas
    # 0.0015 .. 0.0195 (the LDM "linear" schedule, linear in sqrt(beta)).
    "ldm-celebahq-256": (
        dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[224, 448, 672, 896],
             down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
             up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=32,
             norm_num_groups=32, norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
             center_input_sample=False, time_embedding_type="positional", act_fn="silu", mid_block_scale_factor=1),
        "VQModel",
        dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
             up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[128, 256, 512], layers_per_block=2,
             act_fn="silu", latent_channels=3, sample_size=256, num_vq_embeddings=8192, norm_num_groups=32),
        {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.0015, "beta_end": 0.0195, "clip_sample": False},
    ),
}


def preset_latent(name: str, seed: int = 0):
    """(UNet2DModel, decoder, scheduler config) of a latent preset with PyTorch's default initialisation from `seed`."""
    if name not in LATENT_PRESETS:
        raise ExportError(f"unknown latent preset {name!r} (known: {', '.join(LATENT_PRESETS)})")
    import diffusers

    unet_kwargs, cls, dec_kwargs, sched = LATENT_PRESETS[name]
    with _quiet_diffusers(), torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        unet = diffusers.UNet2DModel(**unet_kwargs).eval()
        decoder = getattr(diffusers, cls)(**dec_kwargs).eval()
    return unet, decoder, dict(sched)


def preset_unet(name: str, seed: int = 0):
    """A UNet2DModel of a preset architecture with PyTorch's default initialisation, drawn from `seed`
    (the same seed gives the same weights; the caller's RNG state is left untouched)."""
    if name not in PRESETS:
        raise ExportError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ExportError(f"the seed must be a non-negative integer, got {seed!r}")
    from diffusers import UNet2DModel

    with _quiet_diffusers(), torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = UNet2DModel(**PRESETS[name])
    return model.eval()


def export_preset(name: str, seed: int, out, dtype: str = "float32", **kwargs) -> ExportResult:
    """export(preset_unet(name, seed), PRESET_SCHEDULER, out, dtype, ...)."""
    return export(preset_unet(name, seed), PRESET_SCHEDULER, out, dtype, **kwargs)

