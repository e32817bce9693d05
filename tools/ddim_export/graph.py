"""The `ddim.graph` of a DDPM U-Net (weights/FORMAT.md sections 3 and 7).

One builder serves both checkpoint layouts. Nodes are always named after diffusers' module paths
(the scheme of engine/graph/unet_builder.cpp, so that `ddim forward --dump` names line up with a
UNet2DModel's modules); the tensors a node references are named by a *naming scheme*:
`DiffusersNaming` keeps diffusers' state-dict names, `OriginalNaming` maps each diffusers name to
the original DDPM code's (`down.0.block.1.temb_proj.weight`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .arch import UNetArch
from .errors import ExportError

# ---------------------------------------------------------------- naming schemes


class DiffusersNaming:
    """Tensors keep diffusers' UNet2DModel state-dict names."""

    kind = "diffusers"
    attention_conv_weights = False  # q/k/v/out stored as linear weights [d, C]

    def tensor(self, canonical: str) -> str:
        return canonical

    def shortcut_kernel(self, resnet_path: str) -> int:
        return 1


_RESNET_LEAF = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2", "conv2": "conv2",
                "conv_shortcut": "nin_shortcut"}
_ATTN_LEAF = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class OriginalNaming:
    """Tensors keep the names of the original DDPM / DDIM code (ermongroup/ddim, pesser/pytorch_diffusion).

    `keys` are the checkpoint's tensor names: a resnet whose shortcut is stored as `conv_shortcut`
    (a 3x3 conv; the code's `conv_shortcut=True`) instead of `nin_shortcut` (1x1) gets a 3x3 node."""

    kind = "original"
    attention_conv_weights = True  # q/k/v/proj_out are 1x1 convs: [d, C, 1, 1]

    def __init__(self, levels: int, keys: Iterable[str] = ()):
        self.levels = levels
        self.keys = set(keys)

    def _module(self, path: str) -> str:
        n = self.levels
        if path == "time_embedding.linear_1":
            return "temb.dense.0"
        if path == "time_embedding.linear_2":
            return "temb.dense.1"
        if path == "conv_norm_out":
            return "norm_out"
        if path in ("conv_in", "conv_out"):
            return path
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            side, level, kind, index, leaf = m.groups()
            level = int(level) if side == "down" else n - 1 - int(level)
            if kind == "resnets":
                base = f"{side}.{level}.block.{index}"
                if leaf == "conv_shortcut" and f"{base}.conv_shortcut.weight" in self.keys:
                    return f"{base}.conv_shortcut"
                return f"{base}.{_RESNET_LEAF[leaf]}"
            return f"{side}.{level}.attn.{index}.{_ATTN_LEAF[leaf]}"
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
        if m:
            return f"down.{m.group(1)}.downsample.conv"
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
        if m:
            return f"up.{n - 1 - int(m.group(1))}.upsample.conv"
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            kind, index, leaf = m.groups()
            if kind == "resnets":
                base = f"mid.block_{int(index) + 1}"
                if leaf == "conv_shortcut" and f"{base}.conv_shortcut.weight" in self.keys:
                    return f"{base}.conv_shortcut"
                return f"{base}.{_RESNET_LEAF[leaf]}"
            return f"mid.attn_{int(index) + 1}.{_ATTN_LEAF[leaf]}"
        raise AssertionError(f"no original name for module {path}")

    def tensor(self, canonical: str) -> str:
        path, leaf = canonical.rsplit(".", 1)
        return f"{self._module(path)}.{leaf}"

    def shortcut_kernel(self, resnet_path: str) -> int:
        return 3 if self._module(resnet_path + ".conv_shortcut").endswith(".conv_shortcut") else 1


# ---------------------------------------------------------------- the builder


@dataclass
class ParamSpec:
    """A tensor the graph references."""

    tensor: str  # its name in the file (the naming scheme's)
    canonical: str  # the diffusers UNet2DModel state-dict name of the same parameter
    shapes: tuple[tuple[int, ...], ...]  # accepted shapes; shapes[0] is the UNet2DModel parameter's


@dataclass
class BuiltGraph:
    graph: dict[str, Any]
    params: list[ParamSpec] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        total = 0
        for p in self.params:
            count = 1
            for d in p.shapes[0]:
                count *= d
            total += count
        return total

    def node(self, name: str) -> dict[str, Any]:
        for n in self.graph["nodes"]:
            if n["name"] == name:
                return n
        raise KeyError(name)


class _Builder:
    def __init__(self, arch: UNetArch, naming):
        self.arch = arch
        self.naming = naming
        self.nodes: list[dict[str, Any]] = []
        self.params: list[ParamSpec] = []
        self.shape: dict[str, tuple[int, int, int]] = {}  # spatial values: (C, H, W)

    def node(self, name: str, op: str, inputs: list[str], attrs: dict | None = None, params: dict | None = None,
             shape: tuple[int, int, int] | None = None) -> str:
        n: dict[str, Any] = {"name": name, "op": op, "inputs": list(inputs)}
        if attrs:
            n["attrs"] = attrs
        if params:
            n["params"] = params
        self.nodes.append(n)
        if shape is not None:
            self.shape[name] = shape
        return name

    def param(self, module: str, leaf: str, role: str, shapes: list[tuple[int, ...]], p: dict) -> None:
        canonical = f"{module}.{leaf}"
        tensor = self.naming.tensor(canonical)
        self.params.append(ParamSpec(tensor, canonical, tuple(tuple(s) for s in shapes)))
        p[role] = tensor

    def conv(self, name: str, x: str, cout: int, k: int, padding: Any, stride: int = 1) -> str:
        cin, h, w = self.shape[x]
        p: dict[str, str] = {}
        self.param(name, "weight", "weight", [(cout, cin, k, k)], p)
        self.param(name, "bias", "bias", [(cout,)], p)
        top, bottom, left, right = padding if isinstance(padding, list) else [padding] * 4
        h2 = (h + top + bottom - k) // stride + 1
        w2 = (w + left + right - k) // stride + 1
        if h2 < 1 or w2 < 1:
            raise ExportError(f"node {name}: a {h}x{w} input is too small for a {k}x{k} conv; increase sample_size")
        attrs = {"out_channels": cout, "kernel": k, "stride": stride, "padding": padding}
        return self.node(name, "conv2d", [x], attrs, p, (cout, h2, w2))

    def linear(self, name: str, x: str, cin: int, cout: int) -> str:
        p: dict[str, str] = {}
        self.param(name, "weight", "weight", [(cout, cin)], p)
        self.param(name, "bias", "bias", [(cout,)], p)
        return self.node(name, "linear", [x], {"out_features": cout}, p)

    def group_norm(self, name: str, x: str, groups: int, eps: float, silu: bool) -> str:
        c = self.shape[x][0]
        if c % groups:
            raise ExportError(f"node {name}: {c} channels are not divisible by {groups} groups "
                              "(norm_num_groups must divide every channel count of the network)")
        p: dict[str, str] = {}
        self.param(name, "weight", "weight", [(c,)], p)
        self.param(name, "bias", "bias", [(c,)], p)
        return self.node(name, "group_norm", [x], {"groups": groups, "eps": eps, "silu": silu}, p, self.shape[x])

    def resnet(self, path: str, x: str, cout: int, temb: str, scale: float) -> str:
        """diffusers ResnetBlock2D (time_embedding_norm "default") = the original ResnetBlock."""
        a = self.arch
        cin, hh, ww = self.shape[x]
        h = self.group_norm(path + ".norm1", x, a.norm_num_groups, a.norm_eps, True)
        h = self.conv(path + ".conv1", h, cout, 3, 1)
        t = self.linear(path + ".time_emb_proj", temb, a.temb_dim, cout)
        h = self.node(path + ".add_temb", "add", [h, t], shape=self.shape[h])
        h = self.group_norm(path + ".norm2", h, a.norm_num_groups, a.norm_eps, True)
        h = self.conv(path + ".conv2", h, cout, 3, 1)
        skip = x
        if cin != cout:
            k = self.naming.shortcut_kernel(path)
            skip = self.conv(path + ".conv_shortcut", x, cout, k, k // 2)
        attrs = {"divisor": scale} if scale != 1.0 else None
        return self.node(path + ".add_residual", "add", [skip, h], attrs, shape=self.shape[h])

    def attention(self, path: str, x: str, groups: int, rescale: float) -> str:
        """diffusers Attention with group_norm and residual_connection = the original AttnBlock."""
        a = self.arch
        ch = self.shape[x][0]
        heads, inner = a.attention_shape(ch)
        h = self.group_norm(path + ".group_norm", x, groups, a.norm_eps, False)
        p: dict[str, str] = {}
        conv = self.naming.attention_conv_weights

        def forms(rows: int, cols: int) -> list[tuple[int, ...]]:
            return [(rows, cols, 1, 1), (rows, cols)] if conv else [(rows, cols), (rows, cols, 1, 1)]

        for r in ("q", "k", "v"):
            self.param(f"{path}.to_{r}", "weight", f"{r}_weight", forms(inner, ch), p)
            self.param(f"{path}.to_{r}", "bias", f"{r}_bias", [(inner,)], p)
        self.param(f"{path}.to_out.0", "weight", "out_weight", forms(ch, inner), p)
        self.param(f"{path}.to_out.0", "bias", "out_bias", [(ch,)], p)
        attrs: dict[str, Any] = {"heads": heads}
        if inner != ch:
            attrs["inner_dim"] = inner
        if rescale != 1.0:
            attrs["rescale_output_factor"] = rescale
        return self.node(path, "attention", [h, x], attrs, p, self.shape[x])


def build_graph(arch: UNetArch, naming=None) -> BuiltGraph:
    """The graph of `arch`, its tensors named by `naming` (default: diffusers' names)."""
    naming = naming or DiffusersNaming()
    a = arch
    b = _Builder(a, naming)
    n = a.levels
    ch0 = a.block_out_channels[0]
    temb_c = a.temb_dim
    t = b.node("time_proj", "timestep_embedding", ["timestep"],
               {"dim": ch0, "flip_sin_to_cos": bool(a.flip_sin_to_cos), "freq_shift": float(a.freq_shift)})
    if ch0 >= 2 and ch0 // 2 - a.freq_shift == 0:
        raise ExportError(f"freq_shift {a.freq_shift} equals half the embedding width ({ch0 // 2}): the sinusoidal "
                          "embedding divides by zero")
    t = b.linear("time_embedding.linear_1", t, ch0, temb_c)
    t = b.node("time_embedding.act", "silu", [t])
    t = b.linear("time_embedding.linear_2", t, temb_c, temb_c)
    class_input = None
    if a.class_kind is not None:
        # diffusers UNet2DModel: emb = time_embedding(time_proj(t)) + class_embedding(labels), where "timestep"
        # labels go through the same time_proj first and "identity" labels are added as given.
        if a.class_kind == "index":
            class_input = {"kind": "index", "num_classes": a.num_class_embeds}
            p: dict[str, str] = {}
            b.param("class_embedding", "weight", "weight", [(a.num_class_embeds, temb_c)], p)
            ce = b.node("class_embedding", "embedding", ["class_labels"],
                        {"num_embeddings": a.num_class_embeds, "dim": temb_c}, p)
        elif a.class_kind == "scalar":
            class_input = {"kind": "scalar"}
            ce = b.node("class_proj", "timestep_embedding", ["class_labels"],
                        {"dim": ch0, "flip_sin_to_cos": bool(a.flip_sin_to_cos), "freq_shift": float(a.freq_shift)})
            ce = b.linear("class_embedding.linear_1", ce, ch0, temb_c)
            ce = b.node("class_embedding.act", "silu", [ce])
            ce = b.linear("class_embedding.linear_2", ce, temb_c, temb_c)
        elif a.class_kind == "vector":
            class_input = {"kind": "vector", "dim": temb_c}
            ce = "class_labels"
        else:
            raise AssertionError(a.class_kind)
        if a.class_null is not None:
            class_input["null"] = a.class_null
        t = b.node("class_embedding.add", "add", [t, ce])
    # Every ResnetBlock2D applies SiLU to the embedding first; one shared node computes it.
    temb = b.node("time_embedding.silu_out", "silu", [t])

    x = "sample"
    b.shape[x] = (a.in_channels, a.height, a.width)
    if a.center_input_sample:
        x = b.node("center_input_sample", "scale", [x], {"scale": 2.0, "shift": -1.0}, shape=b.shape[x])
    x = b.conv("conv_in", x, ch0, 3, 1)
    skips = [x]

    for i in range(n):
        out_c = a.block_out_channels[i]
        blk = f"down_blocks.{i}"
        for j in range(a.layers_per_block):
            x = b.resnet(f"{blk}.resnets.{j}", x, out_c, temb, 1.0)
            if a.down_attention[i]:
                x = b.attention(f"{blk}.attentions.{j}", x, a.norm_num_groups, 1.0)
            skips.append(x)
        if i + 1 < n:
            if a.downsample == "avg_pool":
                c, h, w = b.shape[x]
                if h % 2 or w % 2:
                    raise ExportError(f"down level {i}: a {h}x{w} feature map cannot be average-pooled by 2; "
                                      f"the resolution must be divisible by {2 ** (n - 1)}")
                x = b.node(f"{blk}.downsamplers.0.pool", "avg_pool2x", [x], shape=(c, h // 2, w // 2))
            else:
                pad = [0, 1, 0, 1] if a.downsample_padding == 0 else a.downsample_padding
                x = b.conv(f"{blk}.downsamplers.0.conv", x, out_c, 3, pad, 2)
            skips.append(x)

    if a.mid_block:
        mid_groups = a.mid_attn_groups or a.norm_num_groups
        x = b.resnet("mid_block.resnets.0", x, b.shape[x][0], temb, a.mid_block_scale_factor)
        if a.add_attention:
            x = b.attention("mid_block.attentions.0", x, mid_groups, a.mid_block_scale_factor)
        x = b.resnet("mid_block.resnets.1", x, b.shape[x][0], temb, a.mid_block_scale_factor)

    rev = list(reversed(a.block_out_channels))
    for i in range(n):
        out_c = rev[i]
        blk = f"up_blocks.{i}"
        for j in range(a.layers_per_block + 1):
            skip = skips.pop()
            name = f"{blk}.resnets.{j}"
            (c1, h1, w1), (c2, h2, w2) = b.shape[x], b.shape[skip]
            if (h1, w1) != (h2, w2):
                raise ExportError(f"sample_size {a.height}x{a.width}: the up path's {h1}x{w1} does not match the skip "
                                  f"connection's {h2}x{w2} at {name}; use a size divisible by {2 ** (n - 1)}")
            x = b.node(f"{name}.concat", "concat", [x, skip], shape=(c1 + c2, h1, w1))
            x = b.resnet(name, x, out_c, temb, 1.0)
            if a.up_attention[i]:
                x = b.attention(f"{blk}.attentions.{j}", x, a.norm_num_groups, 1.0)
        if i + 1 < n:
            c, h, w = b.shape[x]
            x = b.node(f"{blk}.upsamplers.0.interpolate", "upsample_nearest2x", [x], shape=(c, 2 * h, 2 * w))
            if a.upsample_conv:
                x = b.conv(f"{blk}.upsamplers.0.conv", x, out_c, 3, 1)
    x = b.group_norm("conv_norm_out", x, a.norm_num_groups, a.norm_eps, True)
    x = b.conv("conv_out", x, a.out_channels, 3, 1)

    graph = {
        "inputs": {"sample": {"channels": a.in_channels, "height": a.height, "width": a.width}, "timestep": {}},
        "output": x,
        "nodes": b.nodes,
    }
    if class_input is not None:
        graph["inputs"]["class_labels"] = class_input
    return BuiltGraph(graph, b.params)
