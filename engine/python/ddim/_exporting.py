"""ddim.export and ddim.from_diffusers: the PyTorch exporter (tools/ddim_export, shipped as ddim._export).

The exporter needs torch, diffusers and safetensors (``pip install 'ddim[export]'``); they are imported only
when an export actually runs, so ``import ddim`` never needs them (and a cached from_diffusers needs none).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional, Union

from ._ddim import Model, __version__
from ._errors import ExportError, InvalidFileError, IoError, VerificationError

PathLike = Union[str, "os.PathLike[str]"]

_EXPORT_PACKAGES = ("torch", "diffusers", "safetensors")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float32": "float32", "torch.float32": "float32",
                  "fp16": "float16", "f16": "float16", "half": "float16", "float16": "float16",
                  "torch.float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16", "torch.bfloat16": "bfloat16"}
# Bumped when the cache's naming or content rules change.
_CACHE_SCHEME = "ddim-from-diffusers 1"


def _exporter() -> ModuleType:
    """ddim._export (tools/ddim_export), or an ImportError that says what to install."""
    missing = [name for name in _EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"exporting a PyTorch model needs {', '.join(_EXPORT_PACKAGES)} ({', '.join(missing)} "
                          "missing): pip install 'ddim[export]'", name=missing[0])
    try:
        from . import _export
    except ImportError as e:
        raise ImportError(f"the exporter could not be imported ({e}); reinstall its dependencies: "
                          "pip install 'ddim[export]'", name=e.name) from e
    return _export


@contextlib.contextmanager
def _translated(ex: ModuleType) -> Iterator[None]:
    """The exporter's ExportError / VerificationError as ddim's (ddim.ExportError is also a ValueError)."""
    try:
        yield
    except ex.VerificationError as e:
        raise VerificationError(str(e), getattr(e, "report", None)) from e
    except ex.ExportError as e:
        raise ExportError(str(e)) from e


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "float32"
    name = _DTYPE_ALIASES.get(str(dtype).lower())
    if name is None:
        raise ExportError(f"unsupported dtype {dtype!r} (use float32, float16 or bfloat16)")
    return name


def export(unet: Any, scheduler_config: Any, path: PathLike, dtype: Any = "float32", *, verify: bool = False,
           tolerance: Optional[float] = None, timesteps: Optional[list[int]] = None,
           ddim_bin: Optional[PathLike] = None, null_class_label: Optional[float] = None,
           null_class_embedding: Any = None) -> Model:
    """Exports a diffusers ``UNet2DModel`` held in memory to the ddim model file ``path`` and loads it.

    scheduler_config: a dict (e.g. ``DDIMScheduler.config``), a diffusers scheduler, a path to a
    scheduler_config.json, or None (DDIMScheduler's defaults). dtype: "float32", "float16" or "bfloat16" (the
    stored weights; the engine computes in its session precision). The file is written atomically and then
    loaded with ddim.Model (which validates it); the loaded Model is returned.

    verify=True also compares the engine with PyTorch on random inputs through the ``ddim`` command-line tool
    (``ddim_bin``, else $DDIM_BIN or ``ddim`` on PATH) and raises VerificationError beyond ``tolerance``.

    A class-conditional model (num_class_embeds, class_embed_type "timestep" or "identity") records the
    unconditional input for classifier-free guidance when given: null_class_label (a label) or
    null_class_embedding (a vector of the time-embedding width).

    Needs torch, diffusers and safetensors (``pip install 'ddim[export]'``), else ImportError.
    Raises ExportError (a ValueError) for an unsupported model or config.
    """
    ex = _exporter()
    kwargs: dict[str, Any] = {"check": False, "verify": verify, "ddim": ddim_bin}
    if tolerance is not None:
        kwargs["tolerance"] = tolerance
    if timesteps is not None:
        kwargs["timesteps"] = timesteps
    if null_class_label is not None:
        kwargs["null_class_label"] = null_class_label
    if null_class_embedding is not None:
        kwargs["null_class_embedding"] = null_class_embedding
    with _translated(ex):
        result = ex.export(unet, scheduler_config, path, _dtype_name(dtype), **kwargs)
    return Model(result.path)


def cache_dir() -> Path:
    """Where from_diffusers keeps its exports: $XDG_CACHE_HOME/ddim, default ~/.cache/ddim."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddim"


def _folder_digest(root: Path, dtype: str) -> str:
    """sha256 of a folder's content: every regular file's relative path, size and bytes (symbolic links followed,
    as in a Hugging Face snapshot; names starting with '.' skipped, e.g. .git), plus the dtype and versions."""
    h = hashlib.sha256()
    h.update(f"{_CACHE_SCHEME}\0{__version__}\0{dtype}\0".encode())
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in filenames:
            if not name.startswith("."):
                full = Path(dirpath) / name
                if full.is_file():
                    files.append((full.relative_to(root).as_posix(), full))
    for rel, full in sorted(files):
        size = full.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(full, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def from_diffusers(path: PathLike, dtype: Any = None, *, cache: Optional[PathLike] = None) -> Model:
    """A ddim.Model from a diffusers UNet2DModel folder (config.json + weights) or a pipeline folder (its unet/
    and scheduler/), exported once and then reused from a cache.

    The export is stored under ``cache`` (default ``$XDG_CACHE_HOME/ddim``, else ``~/.cache/ddim``) in a file
    named by a sha256 of the folder's content (every file's relative name, size and bytes; names starting with
    '.' skipped) and the dtype, so an edited folder is exported again and an unchanged one is loaded without
    torch. dtype: None (float32), "float32", "float16" or "bfloat16".

    The first call needs torch, diffusers and safetensors (``pip install 'ddim[export]'``), else ImportError.
    Raises IoError when ``path`` is not a folder and ExportError for an unsupported model.
    """
    root = Path(path)
    if not root.is_dir():
        raise IoError(f"from_diffusers: '{root}' is not a directory (give a diffusers model or pipeline folder)")
    dtype_name = _dtype_name(dtype)
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / f"diffusers-{_folder_digest(root, dtype_name)[:32]}-{dtype_name}.ddim"
    if target.is_file():
        try:
            return Model(target)
        except InvalidFileError:
            pass  # a damaged cache entry: export again over it
    ex = _exporter()
    folder.mkdir(parents=True, exist_ok=True)
    with _translated(ex):
        result = ex.export_diffusers(root, target, dtype_name, check=False)
    return Model(result.path)
