"""`verify`: the exported file run by `ddim forward` against the PyTorch model, and, on a mismatch, the first
graph node whose output diverges (from `ddim forward --dump`)."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

import numpy as np
import torch

from .arch import UNetArch
from .errors import ExportError, VerificationError
from .writer import find_ddim

DEFAULT_TOLERANCE = 1e-3


@contextlib.contextmanager
def _quiet_diffusers():
    try:
        from diffusers.utils import logging as dlog
    except ImportError:  # pragma: no cover - diffusers is a requirement of verification
        yield
        return
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def reference_unet(arch: UNetArch, canonical_state: dict[str, torch.Tensor]):
    """A float32 diffusers UNet2DModel computing `arch` with the given weights (diffusers state-dict names).

    The original code's avg-pool downsampling, conv-less upsampling and 3x3 conv shortcuts have no
    UNet2DModel option; those modules are swapped in after construction."""
    from diffusers import UNet2DModel
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    with _quiet_diffusers(), torch.device("meta"):
        model = UNet2DModel.from_config(arch.to_diffusers_config())
        n = arch.levels
        for i in range(n - 1):
            c = arch.block_out_channels[i]
            if arch.downsample == "avg_pool":
                model.down_blocks[i].downsamplers[0] = Downsample2D(c, use_conv=False, name="op")
            c = arch.block_out_channels[n - 1 - i]
            if not arch.upsample_conv:
                model.up_blocks[i].upsamplers[0] = Upsample2D(c, use_conv=False)
        for name, t in canonical_state.items():
            if name.endswith(".conv_shortcut.weight") and t.dim() == 4 and t.shape[-1] == 3:
                parent = model.get_submodule(name[: -len(".conv_shortcut.weight")])
                parent.conv_shortcut = torch.nn.Conv2d(t.shape[1], t.shape[0], 3, padding=1)
    params = dict(model.state_dict())
    state = {}
    for name, t in canonical_state.items():
        if name in params:
            t = t.detach().to("cpu", torch.float32).reshape(params[name].shape)
        state[name] = t
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"cannot build the PyTorch reference model: {e}") from None
    return model.eval()


@dataclass
class TimestepResult:
    t: int
    max_abs: float
    max_rel: float
    ref_max: float
    ok: bool
    vs_fp32: float | None = None  # max abs difference to the unrounded fp32 model (f16/bf16 files)


@dataclass
class VerifyReport:
    path: str
    tolerance: float
    dtype: str
    results: list[TimestepResult] = field(default_factory=list)
    first_divergence: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def max_abs(self) -> float:
        return max((r.max_abs for r in self.results), default=0.0)


def _file_info(path: Path) -> tuple[dict, dict, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "ddim.graph" not in meta:
            raise ExportError(f"'{path}' is not a ddim model file (no ddim.graph)")
        graph = json.loads(meta["ddim.graph"])
        schedule = json.loads(meta.get("ddim.schedule", "{}"))
        table = schedule.get("alphas_cumprod")
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys() if key != table}
    if len(dtypes) > 1:
        raise ExportError(f"'{path}' mixes weight dtypes {sorted(dtypes)}; verify expects one")
    dtype = {"F16": "float16", "BF16": "bfloat16"}.get(next(iter(dtypes), "F32"), "float32")
    return graph, schedule, dtype


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except OSError as e:
        raise ExportError(f"cannot run {cmd[0]}: {e}") from None
    if r.returncode != 0:
        raise ExportError(f"{what} failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def _node_reference(node: dict[str, Any], modules: dict[str, torch.nn.Module]) -> tuple[str, str] | None:
    """Which PyTorch value a graph node equals: (module path, 'out' | 'out_silu' | 'in')."""
    name, op = node["name"], node["op"]

    def base(suffix: str) -> str:
        return name[: -len(suffix)]

    if name.endswith(".concat"):
        return base(".concat"), "in"
    if name.endswith(".add_temb"):
        return base(".add_temb") + ".norm2", "in"
    if name.endswith(".add_residual"):
        return base(".add_residual"), "out"
    if name == "center_input_sample":
        return "conv_in", "in"
    if name == "time_embedding.silu_out":
        return "time_embedding", "out_silu"
    if op == "upsample_nearest2x":
        parent = name.rsplit(".", 1)[0]
        return (parent + ".conv", "in") if parent + ".conv" in modules else (parent, "out")
    if op == "avg_pool2x":
        return name.rsplit(".", 1)[0], "out"
    if name in modules:
        silu = op == "group_norm" and bool(node.get("attrs", {}).get("silu", False))
        return name, "out_silu" if silu else "out"
    return None


def _first_divergence(model, x: torch.Tensor, t: int, graph: dict, ddim: str, path: Path, tmp: Path,
                      tolerance: float) -> str:
    dump = tmp / f"dump_{t}"
    _run([ddim, "forward", "--model", str(path), "--x", str(tmp / "x.npy"), "--t", str(t), "--out",
          str(tmp / f"dump_{t}.npy"), "--device", "cpu", "--precision", "fp32", "--dump", str(dump)],
         "ddim forward --dump")
    modules = dict(model.named_modules())
    nodes = {n["name"]: n for n in graph["nodes"]}
    wanted: dict[tuple[str, str], str] = {}
    for n in graph["nodes"]:
        ref = _node_reference(n, modules)
        if ref is not None and ref[0] in modules:
            wanted[(ref[0], "in" if ref[1] == "in" else "out")] = n["name"]
    captured: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    for (mod, kind) in wanted:
        m = modules[mod]
        if kind == "in":
            handles.append(m.register_forward_pre_hook(
                lambda _m, args, key=(mod, kind): captured.__setitem__(key, args[0].detach().clone())))
        else:
            handles.append(m.register_forward_hook(
                lambda _m, _a, out, key=(mod, kind): captured.__setitem__(
                    key, (out[0] if isinstance(out, tuple) else getattr(out, "sample", out)).detach().clone())))
    try:
        with torch.no_grad():
            model(x, torch.full((x.shape[0],), t, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    lines = (dump / "nodes.txt").read_text().splitlines()
    compared = 0
    for line in lines:
        _, name, _, file = line.split("\t")
        node = nodes.get(name)
        if node is None:
            continue
        ref = _node_reference(node, modules)
        if ref is None or (ref[0], "in" if ref[1] == "in" else "out") not in captured:
            continue
        value = captured[(ref[0], "in" if ref[1] == "in" else "out")].float()
        if ref[1] == "out_silu":
            value = torch.nn.functional.silu(value)
        got = np.load(dump / file)
        want = value.numpy()
        if want.size != got.size:
            if want.shape[0] == x.shape[0] and want[0].size == got.size:
                want = want[0]  # a time-only value evaluated once
            else:
                continue
        want = want.reshape(got.shape)
        diff = float(np.max(np.abs(got.astype(np.float64) - want)))
        scale = max(1.0, float(np.max(np.abs(want))))
        compared += 1
        if not diff <= tolerance * scale:
            return (f"first diverging node: {name} ({node['op']}), max abs diff {diff:.3e} "
                    f"(values up to {scale:.3g}; PyTorch module {ref[0]})")
    return f"no single node diverges beyond the tolerance ({compared} nodes compared); the error accumulates"


def verify(path, unet, *, ddim=None, timesteps: Iterable[int] | None = None, tolerance: float = DEFAULT_TOLERANCE,
           batch: int = 2, seed: int = 0, log: TextIO | None = sys.stderr, raise_on_failure: bool = True,
           find_divergence: bool = True) -> VerifyReport:
    """Runs `ddim forward --device cpu` on the file at `path` and `unet` (a UNet2DModel, or any module with the
    same module paths) in float32 on the CPU, on the same seeded N(0, 1) inputs (a batch of `batch`) at several
    timesteps (default 0, 1, T/4, T/2, T-1). For an fp16/bf16 file the PyTorch weights are rounded the same
    way first, so `tolerance` (max abs) keeps its fp32 meaning. Prints a table to `log`; over tolerance it
    finds the first graph node that diverges and raises VerificationError (or returns, with
    raise_on_failure=False)."""
    path = Path(path)
    binary = find_ddim(ddim)
    if binary is None:
        raise ExportError("verify needs the ddim binary (--ddim PATH, $DDIM_BIN, build/bin/ddim or ddim on PATH)")
    graph, schedule, dtype = _file_info(path)
    T = int(schedule.get("num_train_timesteps", 1000))
    ts = sorted({int(t) for t in (timesteps if timesteps is not None else (0, 1, T // 4, T // 2, T - 1))})
    bad = [t for t in ts if not 0 <= t < T]
    if bad or not ts:
        raise ExportError(f"verify: timesteps must be in [0, {T}), got {bad or 'none'}")
    inputs = graph["inputs"]["sample"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, inputs["channels"], inputs["height"], inputs["width"], generator=gen)
    # Class-conditional models: labels for the batch (index: 0, 1, ...; scalar: spread over the timestep range;
    # vector: N(0, 1) embeddings), given to both sides.
    labels, label_args = None, []
    cls = graph["inputs"].get("class_labels")
    if cls is not None:
        if cls["kind"] == "vector":
            labels = torch.randn(batch, cls["dim"], generator=gen)
        elif cls["kind"] == "index":
            labels = torch.arange(batch, dtype=torch.long) % int(cls["num_classes"])
        else:
            labels = torch.linspace(0, T - 1, batch)

    with _quiet_diffusers():
        reference = copy.deepcopy(unet).to("cpu", torch.float32).eval()
    fp32_model = None
    if dtype != "float32":
        fp32_model = reference
        reference = copy.deepcopy(reference)
        rounding = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        with torch.no_grad():
            for p in reference.parameters():
                p.copy_(p.to(rounding).to(torch.float32))

    report = VerifyReport(str(path), tolerance, dtype)
    with tempfile.TemporaryDirectory(prefix="ddim_verify_") as tmpdir:
        tmp = Path(tmpdir)
        np.save(tmp / "x.npy", x.numpy())
        if labels is not None and cls["kind"] == "vector":
            np.save(tmp / "class_embeddings.npy", labels.numpy().astype(np.float32))
            label_args = ["--class-embeddings", str(tmp / "class_embeddings.npy")]
        elif labels is not None:
            label_args = ["--class-labels", ",".join(repr(float(v)) for v in labels.tolist())]
        for t in ts:
            tt = torch.full((batch,), t, dtype=torch.long)
            with torch.no_grad():
                kw = {} if labels is None else {"class_labels": labels}
                want = reference(x, tt, **kw).sample.numpy().astype(np.float64)
                vs32 = None
                if fp32_model is not None:
                    vs32 = fp32_model(x, tt, **kw).sample.numpy().astype(np.float64)
            out = tmp / f"y_{t}.npy"
            _run([binary, "forward", "--model", str(path), "--x", str(tmp / "x.npy"), "--t", str(t), "--out", str(out),
                  "--device", "cpu", "--precision", "fp32", *label_args], "ddim forward")
            got = np.load(out).astype(np.float64)
            if got.shape != want.shape:
                raise ExportError(f"ddim forward returned shape {got.shape}, PyTorch {want.shape}")
            diff = np.abs(got - want)
            max_abs = float(diff.max())
            ref_max = float(np.abs(want).max())
            res = TimestepResult(t, max_abs, max_abs / max(ref_max, 1e-30), ref_max,
                                 bool(np.isfinite(max_abs) and max_abs <= tolerance),
                                 float(np.abs(got - vs32).max()) if vs32 is not None else None)
            report.results.append(res)
        if log is not None:
            print(f"verify {path.name} ({dtype} weights; PyTorch float32 on the CPU"
                  f"{' with the same rounded weights' if dtype != 'float32' else ''}; batch {batch}, seed {seed}; "
                  f"tolerance {tolerance:g} max abs)", file=log)
            extra = "  vs fp32 model" if dtype != "float32" else ""
            print(f"  {'t':>6}  {'max abs':>10}  {'max rel':>10}  {'|ref| max':>10}  result{extra}", file=log)
            for r in report.results:
                tail = f"{'':4}{r.vs_fp32:13.3e}" if r.vs_fp32 is not None else ""
                print(f"  {r.t:>6}  {r.max_abs:10.3e}  {r.max_rel:10.3e}  {r.ref_max:10.3g}  "
                      f"{'ok    ' if r.ok else 'FAIL  '}{tail}".rstrip(), file=log)
        if not report.ok and find_divergence and labels is None:  # (the node search runs unconditional models)
            failing = next(r for r in report.results if not r.ok)
            report.first_divergence = f"t={failing.t}: " + _first_divergence(
                reference, x, failing.t, graph, binary, path, tmp, tolerance)
            if log is not None:
                print(f"  {report.first_divergence}", file=log)
    if log is not None:
        log.flush()
    if not report.ok and raise_on_failure:
        raise VerificationError(f"verification failed: ddim differs from PyTorch by {report.max_abs:.3e} "
                                f"(tolerance {tolerance:g})" + (f"; {report.first_divergence}"
                                                                if report.first_divergence else ""), report)
    return report
