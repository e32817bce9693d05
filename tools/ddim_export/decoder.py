"""The decoder of a latent model (weights/FORMAT.md section 9): diffusers' VQModel or AutoencoderKL decoder as a
`ddim.decoder` graph, its `ddim.latent` configuration, and the tensors with the component's prefix.

The decoder graph mirrors `vqvae.decode(latents)` (quantize, post_quant_conv, decoder) and `vae.decode(latents)`
(post_quant_conv unless use_post_quant_conv is False, decoder), where diffusers' pipelines first divide the latents
by scaling_factor (and add shift_factor where set); the engine does that division on the host, so the graph starts
from the divided latents. Nodes and tensors are named `<component>.<module path>` (`vqvae.decoder.conv_in`), the
state-dict names of the component inside its pipeline; the U-Net keeps its own unprefixed names (FORMAT.md 9.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ExportError, note
from .graph import BuiltGraph, ParamSpec, _Builder


@dataclass
class DecoderArch:
    kind: str  # "vq" or "kl"
    component: str  # "vqvae" or "vae": the tensor / node prefix
    latent_channels: int  # what the U-Net samples (VQModel: vq_embed_dim)
    decoder_in_channels: int  # the Decoder's in_channels (post_quant_conv's output)
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool
    use_post_quant_conv: bool
    num_vq_embeddings: int
    scaling_factor: float
    shift_factor: float

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_doc(self) -> dict[str, Any]:
        return {"decoder": self.kind, "component": self.component, "scaling_factor": float(self.scaling_factor),
                "shift_factor": float(self.shift_factor), "factor": self.factor}


def decoder_arch_from_config(config: dict[str, Any], component: str, where: str) -> DecoderArch:
    """A VQModel / AutoencoderKL config (complete: from `model.config`, defaults filled in) as a DecoderArch.
    Options the engine does not implement are refused by name."""
    cls = config.get("_class_name")
    if cls not in ("VQModel", "AutoencoderKL"):
        raise ExportError(f"{where}: the decoder must be a diffusers VQModel or AutoencoderKL, got {cls!r}")
    kind = "vq" if cls == "VQModel" else "kl"
    if config.get("act_fn", "silu") != "silu":
        raise ExportError(f"{where}: act_fn {config.get('act_fn')!r} is not supported (the decoder's activation must be silu)")
    ups = list(config.get("up_block_types", ()))
    if any(u != "UpDecoderBlock2D" for u in ups):
        raise ExportError(f"{where}: up_block_types {ups} are not supported (only UpDecoderBlock2D)")
    boc = tuple(int(c) for c in config["block_out_channels"])
    if len(ups) != len(boc):
        raise ExportError(f"{where}: {len(ups)} up blocks for {len(boc)} block_out_channels")
    if kind == "vq":
        if config.get("norm_type", "group") != "group":
            raise ExportError(f"{where}: norm_type {config.get('norm_type')!r} is not supported (the decoder's SpatialNorm, "
                              "conditioned on the quantised latents, is not implemented; only norm_type \"group\")")
        if config.get("lookup_from_codebook"):
            note(f"{where}: lookup_from_codebook is ignored: VQModel.decode quantises the latents (force_not_quantize False)")
        vq_dim = config.get("vq_embed_dim") or config["latent_channels"]
        latent_channels, decoder_in = int(vq_dim), int(config["latent_channels"])
        use_post_quant_conv = True
        shift = 0.0
    else:
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ExportError(f"{where}: {key} is set; per-channel latent statistics are not supported (only "
                                  "scaling_factor and shift_factor)")
        latent_channels = decoder_in = int(config["latent_channels"])
        use_post_quant_conv = bool(config.get("use_post_quant_conv", True))
        shift = float(config.get("shift_factor") or 0.0)
    if config.get("force_upcast") is not None and config.get("force_upcast"):
        note(f"{where}: force_upcast is ignored (the engine decodes in the session's precision; fp32 on the CPU)")
    groups = int(config.get("norm_num_groups", 32))
    for c in boc:
        if c % groups:
            raise ExportError(f"{where}: block_out_channels {list(boc)} are not divisible by norm_num_groups {groups}")
    scaling = float(config.get("scaling_factor", 0.18215))
    if not scaling > 0:
        raise ExportError(f"{where}: scaling_factor must be positive, got {scaling}")
    return DecoderArch(kind=kind, component=component, latent_channels=latent_channels, decoder_in_channels=decoder_in,
                       out_channels=int(config.get("out_channels", 3)), block_out_channels=boc,
                       layers_per_block=int(config.get("layers_per_block", 1)), norm_num_groups=groups,
                       mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
                       use_post_quant_conv=use_post_quant_conv,
                       num_vq_embeddings=int(config.get("num_vq_embeddings", 0) or 0), scaling_factor=scaling,
                       shift_factor=shift)


class PrefixNaming:
    """Tensors named `<component>.<state-dict name>`."""

    kind = "diffusers"
    attention_conv_weights = False

    def __init__(self, component: str):
        self.prefix = component + "."

    def tensor(self, canonical: str) -> str:
        return self.prefix + canonical

    def shortcut_kernel(self, resnet_path: str) -> int:
        return 1


class _DecoderBuilder(_Builder):
    EPS = 1e-6  # the Decoder's resnet_eps, its attention's and conv_norm_out's

    def __init__(self, arch: DecoderArch):
        super().__init__(arch, PrefixNaming(arch.component))
        self.p = arch.component + "."

    def resnet(self, path: str, x: str, cout: int) -> str:  # ResnetBlock2D, temb None
        groups = self.arch.norm_num_groups
        cin = self.shape[x][0]
        h = self.group_norm(self.p + path + ".norm1", x, groups, self.EPS, True)
        h = self.conv(self.p + path + ".conv1", h, cout, 3, 1)
        h = self.group_norm(self.p + path + ".norm2", h, groups, self.EPS, True)
        h = self.conv(self.p + path + ".conv2", h, cout, 3, 1)
        skip = x
        if cin != cout:
            skip = self.conv(self.p + path + ".conv_shortcut", x, cout, 1, 0)
        return self.node(self.p + path + ".add_residual", "add", [skip, h], shape=self.shape[h])

    def attention(self, path: str, x: str) -> str:  # Attention: 1 head as wide as the channels, residual
        ch = self.shape[x][0]
        h = self.group_norm(self.p + path + ".group_norm", x, self.arch.norm_num_groups, self.EPS, False)
        p: dict[str, str] = {}
        for r in ("q", "k", "v"):
            self.param(f"{path}.to_{r}", "weight", f"{r}_weight", [(ch, ch), (ch, ch, 1, 1)], p)
            self.param(f"{path}.to_{r}", "bias", f"{r}_bias", [(ch,)], p)
        self.param(f"{path}.to_out.0", "weight", "out_weight", [(ch, ch), (ch, ch, 1, 1)], p)
        self.param(f"{path}.to_out.0", "bias", "out_bias", [(ch,)], p)
        return self.node(self.p + path, "attention", [h, x], {"heads": 1}, p, self.shape[x])

    # conv / group_norm of _Builder name their tensors after the node: strip the node prefix first.
    def param(self, module: str, leaf: str, role: str, shapes, p: dict) -> None:
        if module.startswith(self.p):
            module = module[len(self.p):]
        super().param(module, leaf, role, shapes, p)


def build_decoder_graph(arch: DecoderArch, latent_height: int, latent_width: int) -> BuiltGraph:
    b = _DecoderBuilder(arch)
    pre = b.p
    x = "sample"
    b.shape[x] = (arch.latent_channels, latent_height, latent_width)
    if arch.kind == "vq":
        if arch.num_vq_embeddings < 1:
            raise ExportError("the VQModel has no codebook entries (num_vq_embeddings)")
        p: dict[str, str] = {}
        b.param("quantize.embedding", "weight", "codebook", [(arch.num_vq_embeddings, arch.latent_channels)], p)
        x = b.node(pre + "quantize", "vector_quantize", [x], {"entries": arch.num_vq_embeddings}, p, b.shape[x])
    if arch.use_post_quant_conv:
        x = b.conv(pre + "post_quant_conv", x, arch.decoder_in_channels, 1, 0)
    top = arch.block_out_channels[-1]
    x = b.conv(pre + "decoder.conv_in", x, top, 3, 1)
    x = b.resnet("decoder.mid_block.resnets.0", x, top)
    if arch.mid_block_add_attention:
        x = b.attention("decoder.mid_block.attentions.0", x)
    x = b.resnet("decoder.mid_block.resnets.1", x, top)
    rev = list(reversed(arch.block_out_channels))
    for i, out in enumerate(rev):
        blk = f"decoder.up_blocks.{i}"
        for j in range(arch.layers_per_block + 1):
            x = b.resnet(f"{blk}.resnets.{j}", x, out)
        if i + 1 < len(rev):
            c, h, w = b.shape[x]
            x = b.node(f"{pre}{blk}.upsamplers.0.interpolate", "upsample_nearest2x", [x], shape=(c, 2 * h, 2 * w))
            x = b.conv(f"{pre}{blk}.upsamplers.0.conv", x, out, 3, 1)
    x = b.group_norm(pre + "decoder.conv_norm_out", x, arch.norm_num_groups, _DecoderBuilder.EPS, True)
    x = b.conv(pre + "decoder.conv_out", x, arch.out_channels, 3, 1)
    graph = {"inputs": {"sample": {"channels": arch.latent_channels, "height": latent_height, "width": latent_width}},
             "output": x, "nodes": b.nodes}
    return BuiltGraph(graph, b.params)


# State-dict entries of a VQModel / AutoencoderKL that decoding does not use.
_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def decoder_tensors(built: BuiltGraph, arch: DecoderArch, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The decoder's tensors from the component's state dict, under their prefixed names; every decoder tensor
    must be used (the encoder's are dropped)."""
    prefix = arch.component + "."
    needed = {p.canonical: p for p in built.params}
    out: dict[str, torch.Tensor] = {}
    missing, wrong, unused = [], [], []
    for p in built.params:
        t = state.get(p.canonical)
        if t is None:
            missing.append(p.canonical)
        elif tuple(t.shape) not in p.shapes:
            wrong.append(f"{p.canonical} has shape {list(t.shape)}, expected {list(p.shapes[0])}")
        else:
            out[prefix + p.canonical] = t
    for k in state:
        if k not in needed and not k.startswith(_ENCODER_PREFIXES):
            unused.append(k)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the decoder needs are missing: {', '.join(missing[:8])}")
    if wrong:
        problems.append("; ".join(wrong[:8]))
    if unused:
        problems.append(f"{len(unused)} tensor(s) the decoder does not use: {', '.join(unused[:8])}")
    if problems:
        raise ExportError(f"{where}: the weights do not match the decoder's architecture: " + "; ".join(problems))
    return out


def load_decoder_module(folder, component: str):
    """VQModel / AutoencoderKL.from_pretrained(folder) (diffusers renames legacy attention names itself)."""
    from pathlib import Path

    from .checkpoint import read_json
    from .verify import _quiet_diffusers

    folder = Path(folder)
    config = read_json(folder / "config.json", f"{component} config")
    cls = config.get("_class_name")
    import diffusers

    if cls not in ("VQModel", "AutoencoderKL"):
        raise ExportError(f"{folder / 'config.json'}: _class_name {cls!r}; the {component}/ folder must hold a VQModel or "
                          "AutoencoderKL")
    with _quiet_diffusers():
        model = getattr(diffusers, cls).from_pretrained(str(folder), torch_dtype=torch.float32)
    return model.eval()
