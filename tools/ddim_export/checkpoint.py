"""Reading checkpoints without executing anything: safetensors, or `torch.load(..., weights_only=True)`."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .errors import ExportError, note

StateDict = dict[str, torch.Tensor]


def load_tensor_file(path: str | os.PathLike) -> Any:
    """The object stored in a .safetensors file (a dict of tensors) or a PyTorch pickle (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint '{path}' does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"cannot read '{path}' as safetensors: {e}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"'{path}' cannot be loaded with torch.load(weights_only=True): {first}. The exporter never unpickles "
            "arbitrary Python objects from a checkpoint; re-save it as a plain state dict (torch.save(model.state_dict()))"
            " or as .safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ExportError(f"cannot read checkpoint '{path}': {e}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, where: str, ema: bool = False) -> StateDict:
    """The model's state dict inside a checkpoint.

    Accepted: a state dict; a dict holding it under 'state_dict' or 'model' (or, with `ema`, 'ema' /
    'ema_model' / 'model_ema'); ermongroup's ckpt.pth list [model, optimizer, epoch, step(, ema)], whose
    first element is the model (the last one the EMA copy, taken with `ema`). A `module.` prefix
    (DataParallel) is stripped."""
    sd = obj
    if isinstance(sd, (list, tuple)):
        if not sd:
            raise ExportError(f"{where}: the checkpoint is an empty list")
        if ema:
            if len(sd) < 5 or not _is_state_dict(sd[-1]):
                raise ExportError(f"{where}: --ema: this checkpoint list has no EMA state dict as its last element "
                                  "(ermongroup saves [model, optimizer, epoch, step, ema] when training with EMA)")
            sd = sd[-1]
        else:
            sd = sd[0]
    elif isinstance(sd, dict) and not _is_state_dict(sd):
        keys = ("ema", "ema_model", "model_ema") if ema else ("state_dict", "model")
        for key in keys:
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
        else:
            if ema:
                raise ExportError(f"{where}: --ema: the checkpoint has none of the keys {', '.join(keys)}")
    elif ema:
        raise ExportError(f"{where}: --ema: the checkpoint is a plain state dict without an EMA copy")
    if not isinstance(sd, dict) or not sd:
        raise ExportError(f"{where}: no state dict found (expected a dict of tensors, a dict with 'state_dict' or "
                          "'model', or a list whose first element is the state dict)")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:5])
        raise ExportError(f"{where}: entries that are not tensors: {shown}{' ...' if len(bad) > 5 else ''} "
                          "(expected a state dict of tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


_LEGACY_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_LEAF = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention(sd: StateDict) -> StateDict:
    """Hub checkpoints saved by old diffusers name attention weights query/key/value/proj_attn; diffusers
    renames them to to_q/to_k/to_v/to_out.0 when loading, and so does the exporter."""
    out = {}
    for k, v in sd.items():
        m = _LEGACY_ATTN.match(k)
        out[f"{m.group(1)}.{_LEGACY_LEAF[m.group(2)]}.{m.group(3)}" if m else k] = v
    return out


# ---------------------------------------------------------------- diffusers folders

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def find_unet_folder(path: str | os.PathLike) -> Path:
    """The folder holding the UNet2DModel's config.json: `path` itself, or `path/unet` of a pipeline folder."""
    root = Path(path)
    if not root.is_dir():
        raise ExportError(f"--diffusers: '{root}' is not a directory")
    if (root / "config.json").is_file():
        return root
    if (root / "unet" / "config.json").is_file():
        return root / "unet"
    raise ExportError(f"--diffusers: no config.json in '{root}' (nor in '{root / 'unet'}'); "
                      "expected a diffusers UNet2DModel folder")


def find_scheduler_config(unet_dir: Path, given_root: Path) -> Path | None:
    """scheduler_config.json beside the model, in a pipeline's scheduler/ folder, or in ../scheduler/."""
    candidates = [unet_dir / "scheduler_config.json", unet_dir / "scheduler" / "scheduler_config.json",
                  given_root / "scheduler" / "scheduler_config.json", unet_dir.parent / "scheduler" / "scheduler_config.json"]
    for c in candidates:
        if c.is_file():
            return c
    return None


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ExportError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{what} '{path}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{what} '{path}' must be a JSON object")
    return data


def load_diffusers_weights(unet_dir: Path) -> StateDict:
    """The state dict of a diffusers model folder (single file, a variant, or shards with an index)."""
    for name in _WEIGHT_FILES:
        if (unet_dir / name).is_file():
            return unwrap_state_dict(load_tensor_file(unet_dir / name), str(unet_dir / name))
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"):
        index = unet_dir / index_name
        if index.is_file():
            weight_map = read_json(index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ExportError(f"'{index}' has no weight_map")
            sd: StateDict = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(unwrap_state_dict(load_tensor_file(unet_dir / shard), str(unet_dir / shard)))
            return sd
    variants = sorted(p for p in unet_dir.glob("diffusion_pytorch_model.*.safetensors"))
    variants += sorted(p for p in unet_dir.glob("diffusion_pytorch_model.*.bin"))
    if variants:
        note(f"using the weight variant {variants[0].name}")
        return unwrap_state_dict(load_tensor_file(variants[0]), str(variants[0]))
    raise ExportError(f"no weights in '{unet_dir}' (expected {' or '.join(_WEIGHT_FILES)})")
