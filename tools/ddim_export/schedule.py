"""The `ddim.schedule` document (weights/FORMAT.md section 4) from a diffusers scheduler config or from
the original DDPM code's `diffusion` settings."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ExportError, note

# diffusers' DDIMScheduler defaults = the file's defaults (FORMAT.md section 4).
DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "rescale_betas_zero_snr": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "variance_type": "fixed_small",
}

ALPHAS_TENSOR = "schedule.alphas_cumprod"

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace", "uniform", "quadratic", "log")
_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
_KNOWN_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")
# Scheduler-config keys that exist in DDPMScheduler / DDIMScheduler but do not describe the model's noise
# schedule (or are diffusers' bookkeeping); dropped without a note.
_SILENT_KEYS = {"trained_betas"}


@dataclass
class Schedule:
    """The schedule JSON object and the tensors it references (an explicit alphas_cumprod table)."""

    doc: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def _check_type(key: str, v: Any, where: str) -> Any:
    if key in ("num_train_timesteps", "steps_offset"):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ExportError(f"{where}: '{key}' must be an integer, got {v!r}")
        lo = 1 if key == "num_train_timesteps" else 0
        hi = 1_000_000 if key == "num_train_timesteps" else 2**31 - 1
        if not lo <= v <= hi:
            raise ExportError(f"{where}: '{key}' must be in [{lo}, {hi}], got {v}")
        return v
    if key in ("beta_start", "beta_end", "clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value"):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ExportError(f"{where}: '{key}' must be a finite number, got {v!r}")
        return float(v)
    if key in ("rescale_betas_zero_snr", "clip_sample", "set_alpha_to_one", "thresholding"):
        if not isinstance(v, bool):
            raise ExportError(f"{where}: '{key}' must be true or false, got {v!r}")
        return v
    allowed = {"beta_schedule": _BETA_SCHEDULES, "prediction_type": _PREDICTION_TYPES, "timestep_spacing": _SPACINGS,
               "variance_type": _VARIANCE_TYPES}[key]
    if v not in allowed:
        raise ExportError(f"{where}: unsupported {key} {v!r} (ddim supports {', '.join(allowed)})")
    return v


def _check_ranges(doc: dict[str, Any], where: str) -> None:
    if "alphas_cumprod" not in doc and doc["beta_schedule"] in ("linear", "scaled_linear"):
        if not 0.0 < doc["beta_start"] <= doc["beta_end"] < 1.0:
            raise ExportError(f"{where}: beta_start {doc['beta_start']} and beta_end {doc['beta_end']} must satisfy "
                              "0 < beta_start <= beta_end < 1")
    if doc["clip_sample_range"] <= 0:
        raise ExportError(f"{where}: clip_sample_range must be > 0, got {doc['clip_sample_range']}")
    if not 0.0 < doc["dynamic_thresholding_ratio"] <= 1.0:
        raise ExportError(f"{where}: dynamic_thresholding_ratio must be in (0, 1], got {doc['dynamic_thresholding_ratio']}")
    if doc["sample_max_value"] <= 0:
        raise ExportError(f"{where}: sample_max_value must be > 0, got {doc['sample_max_value']}")
    if doc["rescale_betas_zero_snr"] and doc["num_train_timesteps"] < 2:
        raise ExportError(f"{where}: rescale_betas_zero_snr needs num_train_timesteps >= 2")


def alphas_cumprod_from_betas(betas: np.ndarray, where: str) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0 or not np.all(np.isfinite(betas)):
        raise ExportError(f"{where}: the betas must be a non-empty list of finite numbers")
    alphas = np.cumprod(1.0 - betas)
    bad = np.nonzero(~((alphas > 0.0) & (alphas <= 1.0)))[0]
    if bad.size:
        i = int(bad[0])
        raise ExportError(f"{where}: alphas_cumprod[{i}] = {alphas[i]!r} is outside (0, 1] (beta[{i}] = {betas[i]!r}); "
                          "every beta must be in [0, 1)")
    return alphas


def _with_table(doc: dict[str, Any], alphas: np.ndarray, where: str) -> Schedule:
    t = doc["num_train_timesteps"]
    if alphas.size != t:
        raise ExportError(f"{where}: the beta table has {alphas.size} entries but num_train_timesteps is {t}")
    doc = {k: v for k, v in doc.items() if k not in ("beta_schedule", "beta_start", "beta_end")}
    doc["alphas_cumprod"] = ALPHAS_TENSOR
    _check_ranges(doc, where)
    return Schedule(doc, {ALPHAS_TENSOR: alphas})


def load_scheduler_config(source: Any) -> dict[str, Any] | None:
    """A dict from a dict, a diffusers scheduler (its `.config`), a path to a JSON file, or None."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ExportError(f"cannot read the scheduler config '{source}': {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise ExportError(f"scheduler config '{source}' is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ExportError(f"scheduler config '{source}' must be a JSON object")
        return data
    if isinstance(source, dict):
        return dict(source)
    config = getattr(source, "config", None)
    if config is not None:
        data = dict(config)
        data.setdefault("_class_name", type(source).__name__)
        return data
    raise ExportError(f"scheduler_config must be a dict, a diffusers scheduler or None, not {type(source).__name__}")


def schedule_from_scheduler_config(source: Any, where: str = "scheduler config") -> Schedule:
    """The schedule of a DDPMScheduler / DDIMScheduler config; missing keys take DDIMScheduler's defaults."""
    cfg = load_scheduler_config(source)
    if cfg is None:
        note("no scheduler config: using DDIMScheduler's defaults (linear betas 0.0001..0.02 over 1000 steps, epsilon)")
        cfg = {}
    class_name = cfg.get("_class_name")
    if class_name is not None and class_name not in _KNOWN_SCHEDULERS:
        note(f"{where}: _class_name is {class_name}; reading its DDPMScheduler/DDIMScheduler keys only")
    doc = dict(DDIM_DEFAULTS)
    ignored = []
    for key, v in cfg.items():
        if key in DDIM_DEFAULTS:
            if v is None and key == "variance_type":
                continue
            doc[key] = _check_type(key, v, where)
        elif not key.startswith("_") and key not in _SILENT_KEYS:
            ignored.append(key)
    if ignored:
        note(f"{where}: ignoring keys the model file does not use: {', '.join(sorted(ignored))}")

    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        if "num_train_timesteps" not in cfg:
            doc["num_train_timesteps"] = int(betas.size)
        return _with_table(doc, alphas_cumprod_from_betas(betas, f"{where}: trained_betas"), where)
    _check_ranges(doc, where)
    return Schedule(doc)


# The original code's beta schedules (ermongroup/ddim `get_beta_schedule`), betas in float64.
def _original_betas(name: str, start: float, end: float, t: int, where: str) -> np.ndarray:
    if name == "const":
        return end * np.ones(t, dtype=np.float64)
    if name == "jsd":
        return 1.0 / np.linspace(t, 1, t, dtype=np.float64)
    if name == "sigmoid":
        x = np.linspace(-6, 6, t)
        return 1.0 / (1.0 + np.exp(-x)) * (end - start) + start
    raise ExportError(f"{where}: unsupported beta_schedule {name!r} (supported: linear, quad, const, jsd, sigmoid)")


def schedule_from_original_config(diffusion: dict[str, Any], model: dict[str, Any], overrides: Any = None,
                                  where: str = "config") -> Schedule:
    """The schedule of the original code: its betas, epsilon prediction, and the DDIM paper's sampler settings
    (no x0 clipping, `uniform` spacing, final alpha-bar 1). `overrides`: scheduler-config keys that replace them."""
    doc = dict(DDIM_DEFAULTS)
    doc.update({"clip_sample": False, "timestep_spacing": "uniform", "set_alpha_to_one": True})
    t = diffusion.get("num_diffusion_timesteps", diffusion.get("num_train_timesteps", 1000))
    doc["num_train_timesteps"] = _check_type("num_train_timesteps", t, where)
    for key in ("beta_start", "beta_end"):
        if key in diffusion:
            doc[key] = _check_type(key, diffusion[key], where)
    var_type = model.get("var_type")
    if var_type is not None:
        mapped = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}.get(var_type, var_type)
        doc["variance_type"] = _check_type("variance_type", mapped, where)
    name = diffusion.get("beta_schedule", "linear")
    table = False
    if name in ("linear", "quad"):
        doc["beta_schedule"] = "linear" if name == "linear" else "scaled_linear"  # quad = linspace(sqrt)**2
    elif name in _BETA_SCHEDULES:
        doc["beta_schedule"] = name
    else:
        table = True
    if overrides:
        if not isinstance(overrides, dict):
            raise ExportError(f"{where}: 'scheduler' must be an object of scheduler-config keys")
        for key, v in overrides.items():
            if key not in DDIM_DEFAULTS:
                raise ExportError(f"{where}: scheduler key {key!r} is not a schedule key "
                                  f"(known: {', '.join(DDIM_DEFAULTS)})")
            doc[key] = _check_type(key, v, where)
    if table:
        betas = _original_betas(name, doc["beta_start"], doc["beta_end"], doc["num_train_timesteps"], where)
        return _with_table(doc, alphas_cumprod_from_betas(betas, f"{where}: {name} betas"), where)
    _check_ranges(doc, where)
    return Schedule(doc)
