"""The U-Net architectures the exporter understands, as one description (`UNetArch`).

Two sources fill it: a diffusers `UNet2DModel` config (`arch_from_diffusers_config`) and the
configuration of the original DDPM / DDIM code (ermongroup/ddim, pesser/pytorch_diffusion;
`arch_from_original_config`). Everything the graph builder needs is here; options that would
change the network's math in a way the graph cannot express are refused with a message that
names the option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ExportError, note

# UNet2DModel's constructor defaults (diffusers 0.42); a key missing from a config takes these,
# exactly as `UNet2DModel.from_config` does.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}


@dataclass
class UNetArch:
    """A DDPM-family U-Net, in diffusers' terms (level i = down_blocks.i; up_blocks.i runs i-th)."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    block_out_channels: list[int]
    layers_per_block: int
    down_attention: list[bool]  # per down level
    up_attention: list[bool]  # per up_blocks index (execution order)
    attention_head_dim: int | None = None  # None: one head as wide as the channels
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    mid_attn_groups: int | None = None  # None: norm_num_groups
    downsample_padding: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    center_input_sample: bool = False
    mid_block: bool = True
    add_attention: bool = True
    mid_block_scale_factor: float = 1.0
    time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
    downsample: str = "conv"  # "conv" (3x3 stride 2) or "avg_pool" (the original code without resamp_with_conv)
    upsample_conv: bool = True
    # Class conditioning (added to the time embedding): None, "index" (class_embed_type None with
    # num_class_embeds: nn.Embedding), "scalar" (class_embed_type "timestep") or "vector" ("identity").
    class_kind: str | None = None
    num_class_embeds: int | None = None
    # The unconditional ("null") input recorded in the file for classifier-free guidance: an int label (index), a
    # float (scalar) or a list of temb_dim floats (vector); None: none recorded.
    class_null: Any = None
    # Shape-relevant UNet2DModel keys the config did not set (they took UNet2DModel's defaults): named in the
    # error when the weights do not fit.
    defaulted_keys: tuple[str, ...] = ()

    def missing_keys_hint(self) -> str:
        if not self.defaulted_keys:
            return ""
        shown = ", ".join(f"{k} (default {UNET2D_DEFAULTS[k]!r})" for k in self.defaulted_keys)
        return f"; the config does not set {shown}: UNet2DModel's defaults were used"

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def temb_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def attention_shape(self, channels: int) -> tuple[int, int]:
        """(heads, inner_dim) of an attention block over `channels`, as diffusers computes them."""
        head_dim = self.attention_head_dim if self.attention_head_dim is not None else channels
        heads = channels // head_dim
        return heads, heads * head_dim

    def to_diffusers_config(self) -> dict[str, Any]:
        """The UNet2DModel config of this network (the reference model of `verify`).

        `avg_pool` downsampling and upsampling without a conv have no UNet2DModel option; the
        reference model builder swaps those modules in after construction."""
        n = self.levels
        return {
            "sample_size": [self.height, self.width] if self.height != self.width else self.height,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample,
            "time_embedding_type": "positional",
            "time_embedding_dim": self.time_embedding_dim,
            "freq_shift": self.freq_shift,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in self.down_attention],
            "mid_block_type": "UNetMidBlock2D" if self.mid_block else None,
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in self.up_attention[:n]],
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "downsample_padding": self.downsample_padding,
            "act_fn": "silu",
            "attention_head_dim": self.attention_head_dim,
            "norm_num_groups": self.norm_num_groups,
            "attn_norm_num_groups": self.mid_attn_groups,
            "norm_eps": self.norm_eps,
            "add_attention": self.add_attention,
            "class_embed_type": {None: None, "index": None, "scalar": "timestep", "vector": "identity"}[self.class_kind],
            "num_class_embeds": self.num_class_embeds if self.class_kind == "index" else None,
        }


# ---------------------------------------------------------------- value checks


def _int(cfg: dict, key: str, minimum: int = 1, where: str = "config") -> int:
    v = cfg[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ExportError(f"{where}: '{key}' must be an integer, got {v!r}")
    if v < minimum:
        raise ExportError(f"{where}: '{key}' must be >= {minimum}, got {v}")
    return v


def _num(cfg: dict, key: str, where: str = "config") -> float:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ExportError(f"{where}: '{key}' must be a finite number, got {v!r}")
    return float(v)


def _bool(cfg: dict, key: str, where: str = "config") -> bool:
    v = cfg[key]
    if not isinstance(v, bool):
        raise ExportError(f"{where}: '{key}' must be true or false, got {v!r}")
    return v


def _int_list(cfg: dict, key: str, where: str = "config", minimum: int = 1, allow_empty: bool = False) -> list[int]:
    v = cfg[key]
    if not isinstance(v, (list, tuple)) or (not v and not allow_empty):
        raise ExportError(f"{where}: '{key}' must be a {'' if allow_empty else 'non-empty '}list of integers, got {v!r}")
    out = []
    for i, e in enumerate(v):
        if isinstance(e, float) and e.is_integer():
            e = int(e)
        if isinstance(e, bool) or not isinstance(e, int) or e < minimum:
            raise ExportError(f"{where}: '{key}'[{i}] must be an integer >= {minimum}, got {e!r}")
        out.append(e)
    return out


def _sample_size(v: Any, where: str) -> tuple[int, int]:
    if v is None:
        raise ExportError(f"{where}: 'sample_size' is missing; the model file declares the training image size "
                          "(set sample_size in the config)")
    if isinstance(v, (list, tuple)) and len(v) == 2:
        h, w = v
    else:
        h = w = v
    for d in (h, w):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ExportError(f"{where}: 'sample_size' must be a positive integer or [height, width], got {v!r}")
    return int(h), int(w)


def _strip_unet_res(name: str) -> str:
    # diffusers' get_down_block / get_up_block accept a "UNetRes" prefix on every block type.
    return name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name


# ---------------------------------------------------------------- diffusers


def arch_from_diffusers_config(config: dict[str, Any], where: str = "UNet2DModel config") -> UNetArch:
    """Checks a UNet2DModel config and describes its network; refuses what the graph cannot express."""
    if not isinstance(config, dict):
        raise ExportError(f"{where}: expected a JSON object, got {type(config).__name__}")
    class_name = config.get("_class_name")
    if class_name is not None and class_name != "UNet2DModel":
        raise ExportError(f"{where}: _class_name is '{class_name}'; only diffusers' UNet2DModel is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if unknown:
        note(f"{where}: ignoring keys that UNet2DModel does not have: {', '.join(unknown)}")
    cfg = dict(UNET2D_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if k in UNET2D_DEFAULTS})

    def refuse(key: str, supported: str) -> None:
        raise ExportError(f"{where}: unsupported option {key}={cfg[key]!r} (ddim supports {supported})")

    if cfg["time_embedding_type"] != "positional":
        refuse("time_embedding_type", "'positional' only")
    class_kind, num_class_embeds = None, None
    if cfg["class_embed_type"] is None:
        if cfg["num_class_embeds"] is not None:
            class_kind, num_class_embeds = "index", _int(cfg, "num_class_embeds", 1, where)
    elif cfg["class_embed_type"] == "timestep":
        class_kind = "scalar"
    elif cfg["class_embed_type"] == "identity":
        class_kind = "vector"
    else:
        refuse("class_embed_type", "null (with or without num_class_embeds), 'timestep' or 'identity'")
    if cfg["resnet_time_scale_shift"] != "default":
        refuse("resnet_time_scale_shift", "'default' only; scale_shift / spatial time conditioning is not in the graph")
    if cfg["act_fn"] not in ("silu", "swish"):
        refuse("act_fn", "'silu' only")
    if cfg["mid_block_type"] not in ("UNetMidBlock2D", None):
        refuse("mid_block_type", "'UNetMidBlock2D' or null")
    if cfg["norm_num_groups"] is None:
        refuse("norm_num_groups", "an integer number of groups; null is not supported")

    channels = _int_list(cfg, "block_out_channels", where)
    n = len(channels)
    unset = "" if "block_out_channels" in config else " (block_out_channels is not set; UNet2DModel's default has 4)"
    down_types = cfg["down_block_types"]
    up_types = cfg["up_block_types"]
    for key, types in (("down_block_types", down_types), ("up_block_types", up_types)):
        if not isinstance(types, (list, tuple)):
            raise ExportError(f"{where}: '{key}' must be a list of block type names, got {types!r}")
        if len(types) != n:
            raise ExportError(f"{where}: '{key}' has {len(types)} entries but block_out_channels has {n}{unset}")
    down_attention, up_attention = [], []
    for i, t in enumerate(down_types):
        t2 = _strip_unet_res(t)
        if t2 not in _DOWN_TYPES:
            raise ExportError(f"{where}: unsupported down block type {t!r} at down_block_types[{i}] "
                              f"(ddim supports {', '.join(_DOWN_TYPES)})")
        down_attention.append(_DOWN_TYPES[t2])
    for i, t in enumerate(up_types):
        t2 = _strip_unet_res(t)
        if t2 not in _UP_TYPES:
            raise ExportError(f"{where}: unsupported up block type {t!r} at up_block_types[{i}] "
                              f"(ddim supports {', '.join(_UP_TYPES)})")
        up_attention.append(_UP_TYPES[t2])

    # Down/upsampler types matter only where an Attn block resamples (DownBlock2D / UpBlock2D always
    # use the conv resamplers); None means "conv" there.
    if any(down_attention[i] for i in range(n - 1)) and (cfg["downsample_type"] or "conv") != "conv":
        refuse("downsample_type", "'conv' only")
    if any(up_attention[i] for i in range(n - 1)) and (cfg["upsample_type"] or "conv") != "conv":
        refuse("upsample_type", "'conv' only")

    head_dim = cfg["attention_head_dim"]
    if head_dim is not None:
        if isinstance(head_dim, (list, tuple)):
            raise ExportError(f"{where}: 'attention_head_dim' must be an integer or null for UNet2DModel, got {head_dim!r}")
        head_dim = _int(cfg, "attention_head_dim", 1, where)
    temb_dim = cfg["time_embedding_dim"]
    if temb_dim is not None:
        temb_dim = _int(cfg, "time_embedding_dim", 1, where)
    attn_groups = cfg["attn_norm_num_groups"]
    if attn_groups is not None:
        attn_groups = _int(cfg, "attn_norm_num_groups", 1, where)
    height, width = _sample_size(cfg["sample_size"], where)
    scale = _num(cfg, "mid_block_scale_factor", where)
    if scale == 0:
        raise ExportError(f"{where}: 'mid_block_scale_factor' must not be 0")
    norm_eps = _num(cfg, "norm_eps", where)
    if norm_eps <= 0:
        raise ExportError(f"{where}: 'norm_eps' must be > 0, got {norm_eps}")
    arch = UNetArch(
        in_channels=_int(cfg, "in_channels", 1, where),
        out_channels=_int(cfg, "out_channels", 1, where),
        height=height,
        width=width,
        block_out_channels=channels,
        layers_per_block=_int(cfg, "layers_per_block", 1, where),
        down_attention=down_attention,
        up_attention=up_attention,
        attention_head_dim=head_dim,
        norm_num_groups=_int(cfg, "norm_num_groups", 1, where),
        norm_eps=norm_eps,
        mid_attn_groups=attn_groups,
        downsample_padding=_int(cfg, "downsample_padding", 0, where),
        flip_sin_to_cos=_bool(cfg, "flip_sin_to_cos", where),
        freq_shift=_num(cfg, "freq_shift", where),
        center_input_sample=_bool(cfg, "center_input_sample", where),
        mid_block=cfg["mid_block_type"] is not None,
        add_attention=_bool(cfg, "add_attention", where),
        mid_block_scale_factor=scale,
        time_embedding_dim=temb_dim,
        class_kind=class_kind,
        num_class_embeds=num_class_embeds,
    )
    arch.defaulted_keys = tuple(k for k in _SHAPE_KEYS if k not in config)
    check_attention_widths(arch, where)
    return arch


# UNet2DModel keys that change the network's tensors (a wrong default shows as missing or mis-shaped weights).
_SHAPE_KEYS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "in_channels",
               "out_channels", "attention_head_dim", "time_embedding_dim", "mid_block_type", "add_attention")


def check_attention_widths(arch: UNetArch, where: str) -> None:
    """Every attention block needs at least one head (attention_head_dim <= its channels)."""
    widths = [c for c, a in zip(arch.block_out_channels, arch.down_attention) if a]
    widths += [c for c, a in zip(reversed(arch.block_out_channels), arch.up_attention) if a]
    if arch.mid_block and arch.add_attention:
        widths.append(arch.block_out_channels[-1])
    for c in widths:
        heads, _ = arch.attention_shape(c)
        if heads < 1:
            raise ExportError(f"{where}: attention_head_dim {arch.attention_head_dim} is wider than an attention block's "
                              f"{c} channels (diffusers would make 0 heads)")


# ---------------------------------------------------------------- original DDPM / DDIM code

def split_original_config(config: dict[str, Any], where: str) -> tuple[dict, dict, dict]:
    """(model, diffusion, rest) of a flat config or of ermongroup's nested {"model", "diffusion", "data"}."""
    if not isinstance(config, dict):
        raise ExportError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if isinstance(config.get("model"), dict):
        model = dict(config["model"])
        data = config.get("data") or {}
        if not isinstance(data, dict):
            raise ExportError(f"{where}: 'data' must be an object")
        if "resolution" not in model and "image_size" in data:
            model["resolution"] = data["image_size"]
        if "in_channels" not in model and "channels" in data:
            model["in_channels"] = data["channels"]
        diffusion = config.get("diffusion") or {}
        if not isinstance(diffusion, dict):
            raise ExportError(f"{where}: 'diffusion' must be an object")
        return model, dict(diffusion), config
    return dict(config), dict(config), config


def arch_from_original_config(config: dict[str, Any], where: str = "config") -> UNetArch:
    """The network of the original DDPM code's `Model(ch, out_ch, ch_mult, num_res_blocks, attn_resolutions,
    dropout, resamp_with_conv, in_channels, resolution)`."""
    model, _, _ = split_original_config(config, where)
    if "image_size" in model and "resolution" not in model:
        model["resolution"] = model["image_size"]
    if "in_channels" not in model:
        model["in_channels"] = 3
    if "out_ch" not in model:
        model["out_ch"] = model["in_channels"]
    if "resamp_with_conv" not in model:
        model["resamp_with_conv"] = True
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution") if k not in model]
    if missing:
        raise ExportError(f"{where}: missing {', '.join(missing)} (the original model needs ch, ch_mult, num_res_blocks, "
                          "attn_resolutions, resolution; in_channels, out_ch, resamp_with_conv default to 3, in_channels, true)")
    ch = _int(model, "ch", 1, where)
    mult = _int_list(model, "ch_mult", where)
    attn_res = _int_list(model, "attn_resolutions", where, allow_empty=True)
    resolution = model["resolution"]
    if isinstance(resolution, (list, tuple)):
        if len(resolution) != 2 or resolution[0] != resolution[1]:
            raise ExportError(f"{where}: 'resolution' must be one integer (the original model is square), got {resolution!r}")
        model["resolution"] = resolution[0]
    resolution = _int(model, "resolution", 1, where)
    n = len(mult)
    # The original code decides attention by the current resolution, halving it on the way down and
    # doubling it on the way up (integer arithmetic, as there).
    down_attention, res = [], resolution
    for level in range(n):
        down_attention.append(res in attn_res)
        if level != n - 1:
            res //= 2
    up_by_level = [False] * n
    for level in reversed(range(n)):
        up_by_level[level] = res in attn_res
        if level != 0:
            res *= 2
    model_type = model.get("type", "simple")
    if model_type not in ("simple", "bayesian"):
        raise ExportError(f"{where}: unsupported model type {model_type!r} (ddim supports the 'simple' DDPM U-Net)")
    arch = UNetArch(
        in_channels=_int(model, "in_channels", 1, where),
        out_channels=_int(model, "out_ch", 1, where),
        height=resolution,
        width=resolution,
        block_out_channels=[ch * m for m in mult],
        layers_per_block=_int(model, "num_res_blocks", 1, where),
        down_attention=down_attention,
        up_attention=[up_by_level[n - 1 - i] for i in range(n)],
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1.0,
        downsample="conv" if _bool(model, "resamp_with_conv", where) else "avg_pool",
        upsample_conv=_bool(model, "resamp_with_conv", where),
    )
    if not any(arch.down_attention) and attn_res:
        note(f"{where}: attn_resolutions {attn_res} matches no level's resolution "
             f"({[resolution >> i for i in range(n)]}); the network has attention in the middle block only")
    return arch
