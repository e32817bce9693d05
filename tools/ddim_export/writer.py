"""Checking the tensors against the graph, writing the model file, and loading it back with `ddim info`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .errors import ExportError, note
from .graph import BuiltGraph
from .schedule import Schedule

FORMAT_VERSION = "1"  # pixel-space models; latent models (a decoder) are written as LATENT_FORMAT_VERSION
LATENT_FORMAT_VERSION = "2"
EXPORTER_VERSION = "ddim_export 1"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
                  "bf16": "bfloat16"}

REPO_ROOT = Path(__file__).resolve().parents[2]


def normalize_dtype(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        for name, d in DTYPES.items():
            if d == dtype:
                return name
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r} (use float32, float16 or bfloat16)")
    return name


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def select_tensors(built: BuiltGraph, state: dict[str, torch.Tensor], where: str,
                   ignore: Iterable[str] = (), hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors the graph references, checked against FORMAT.md's shapes; unused tensors are an error."""
    missing, wrong = [], []
    referenced = set()
    out: dict[str, torch.Tensor] = {}
    for p in built.params:
        referenced.add(p.tensor)
        t = state.get(p.tensor)
        if t is None:
            missing.append(p.tensor)
        elif tuple(t.shape) not in p.shapes:
            wrong.append(f"{p.tensor} has shape {_shape_str(t.shape)}, expected "
                         + " or ".join(_shape_str(s) for s in p.shapes))
        else:
            out[p.tensor] = t
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the graph needs are missing: {', '.join(missing[:8])}"
                        f"{' ...' if len(missing) > 8 else ''}")
    if wrong:
        problems.append("; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    ignore = set(ignore)
    unused = [k for k in state if k not in referenced and k not in ignore]
    if unused:
        problems.append(f"{len(unused)} tensor(s) the graph does not use: {', '.join(unused[:8])}"
                        f"{' ...' if len(unused) > 8 else ''}")
    if problems:
        raise ExportError(f"{where}: the weights do not match the architecture: " + "; ".join(problems)
                          + (hint or " (is the config the one this checkpoint was trained with?)"))
    return out


def _convert(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    if not t.is_floating_point():
        raise ExportError(f"tensor {name} has dtype {t.dtype}; weights must be floating point")
    bad = ~torch.isfinite(t)
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        raise ExportError(f"tensor {name} has a non-finite value at element {i} ({t.flatten()[i].item()})")
    out = t.to(dtype=dtype, copy=True).contiguous()
    bad = ~torch.isfinite(out)
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        raise ExportError(f"tensor {name}: element {i} ({t.flatten()[i].item()}) overflows {dtype}; "
                          "export as float32 or bfloat16")
    return out


def find_ddim(ddim: str | os.PathLike | None = None) -> str | None:
    """The ddim binary: `ddim` if given, else $DDIM_BIN, <repo>/build/bin/ddim, `ddim` on PATH; None if none."""
    if ddim is not None:
        path = Path(ddim)
        if not (path.is_file() and os.access(path, os.X_OK)):
            found = shutil.which(str(ddim))
            if found is None:
                raise ExportError(f"--ddim: '{ddim}' is not an executable file")
            return found
        return str(path)
    env = os.environ.get("DDIM_BIN")
    if env and Path(env).is_file() and os.access(env, os.X_OK):
        return env
    local = REPO_ROOT / "build" / "bin" / "ddim"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("ddim")


def ddim_info(ddim: str, path: str | os.PathLike) -> str:
    """Runs `ddim info FILE`; a non-zero exit is an ExportError carrying ddim's message."""
    try:
        r = subprocess.run([ddim, "info", str(path)], capture_output=True, text=True, timeout=600)
    except OSError as e:
        raise ExportError(f"cannot run '{ddim}': {e}") from None
    if r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip() or f"exit status {r.returncode}")
        raise ExportError(f"the written file does not load in ddim ('{ddim} info' failed): {msg}")
    return r.stdout


def write_model(out: str | os.PathLike, built: BuiltGraph, schedule: Schedule, tensors: dict[str, torch.Tensor],
                dtype: str = "float32", provenance: dict[str, str] | None = None,
                ddim: str | os.PathLike | None = None, check: bool = True, decoder: BuiltGraph | None = None,
                latent: dict[str, Any] | None = None) -> Path:
    """Writes the model file atomically (a temporary file beside `out`, loaded with `ddim info` when a ddim
    binary is available, then renamed over `out`). A latent model passes its `decoder` graph and `latent`
    configuration (weights/FORMAT.md section 9; the decoder's tensors are among `tensors`)."""
    from safetensors.torch import save_file

    dtype = normalize_dtype(dtype)
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out: '{out}' is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"--out: the directory '{parent}' does not exist")
    converted = {name: _convert(name, t, DTYPES[dtype]) for name, t in tensors.items()}
    for name, table in schedule.tensors.items():
        if name in converted:
            raise ExportError(f"the schedule table name {name} collides with a weight")
        converted[name] = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float64))
    metadata = {
        # Version 2 only where needed (class_labels), so that older readers keep loading every other file.
        "ddim.format_version": "2" if "class_labels" in built.graph["inputs"] else FORMAT_VERSION,
        "ddim.graph": json.dumps(built.graph, allow_nan=False, separators=(",", ":")),
        "ddim.schedule": json.dumps(schedule.doc, allow_nan=False, separators=(",", ":")),
        "exporter": EXPORTER_VERSION,
    }
    if (decoder is None) != (latent is None):
        raise AssertionError("a latent model needs both the decoder graph and the latent configuration")
    if decoder is not None:
        metadata["ddim.format_version"] = LATENT_FORMAT_VERSION
        metadata["ddim.decoder"] = json.dumps(decoder.graph, allow_nan=False, separators=(",", ":"))
        metadata["ddim.latent"] = json.dumps(latent, allow_nan=False, separators=(",", ":"))
    for k, v in (provenance or {}).items():
        if k.startswith("ddim."):
            raise AssertionError("the ddim. prefix is reserved")
        metadata[k] = str(v)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        save_file(converted, tmp, metadata=metadata)
        if check:
            binary = find_ddim(ddim)
            if binary is None:
                note("no ddim binary found (--ddim, $DDIM_BIN, build/bin/ddim, PATH): skipped loading the file with ddim")
            else:
                ddim_info(binary, tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out
