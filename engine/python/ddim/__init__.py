"""ddim: DDIM diffusion sampling in C++ (CPU, and CUDA when built with it), driven from Python.

    import ddim
    model = ddim.Model("weights/default.ddim")
    session = ddim.Session(model, batch=4)
    images = session.sample(steps=50, seed=0)      # float32 NumPy array (4, C, H, W)

Main names:

* ``Model(path)`` / ``Model.from_bytes(b)``: a validated model file (``.info``, ``.schedule``).
* ``Session(model, device="auto", batch=1, ...)``: ``sample``, ``sample_ddpm``, ``invert``, ``forward``,
  ``timesteps``, ``plan_info``, ``backend``.
* ``Scheduler(config)``: timesteps, step coefficients and the DDIM step on NumPy arrays, without a model.
* ``slerp``, ``initial_noise``, ``cuda_device_count``.
* ``export`` / ``from_diffusers``: PyTorch models to ddim files (needs ``pip install 'ddim[export]'``).
* Errors: ``Error`` and its subclasses (see ``ddim._errors``).

Threads: the GIL is released while the engine runs; a Session serves one thread at a time (one Session per
thread, sharing a Model). Ctrl-C cancels a running sample at the next step (KeyboardInterrupt).
See docs/python.md in the repository for a guide.
"""

from __future__ import annotations

from ._errors import (CancelledError, DeviceLostError, Error, ExportError, InternalError, InvalidArgumentError,
                      InvalidFileError, IoError, OutOfMemoryError, UnsupportedError, VerificationError)
from ._ddim import (MAX_BATCH, InvertResult, Model, ModelInfo, SampleResult, Scheduler, Session, __version__,
                    cuda_available, cuda_device_count, initial_noise, slerp)
from ._exporting import cache_dir, export, from_diffusers

__all__ = [
    "MAX_BATCH", "CancelledError", "DeviceLostError", "Error", "ExportError", "InternalError", "InvalidArgumentError",
    "InvalidFileError", "InvertResult", "IoError", "Model", "ModelInfo", "OutOfMemoryError", "SampleResult",
    "Scheduler", "Session", "UnsupportedError", "VerificationError", "__version__", "cache_dir", "cuda_available",
    "cuda_device_count", "export", "from_diffusers", "initial_noise", "slerp",
]
