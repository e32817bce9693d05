"""The exceptions of ddim: ``ddim.Error`` and one subclass per engine error code.

Besides ``ddim.Error`` (a ``RuntimeError``), some classes also derive from the built-in exception that
Python code usually catches for the same problem:

=====================  ======================  ====================================================
class                  also a                  raised for
=====================  ======================  ====================================================
InvalidFileError                               a corrupt, hostile or unknown-version model file
InvalidArgumentError   ValueError              an argument out of range or inconsistent
UnsupportedError                               valid, but not supported here (op, precision, backend)
OutOfMemoryError       MemoryError             host or device allocation failed (std::bad_alloc too)
DeviceLostError                                a sticky device error: the session is unusable
CancelledError                                 the progress callback returned False
IoError                OSError                 a file could not be opened, read or written
InternalError                                  a bug in ddim: please report it
ExportError            ValueError              ddim.export / ddim.from_diffusers could not convert
=====================  ======================  ====================================================

Ctrl-C during a call raises ``KeyboardInterrupt`` (not CancelledError); an exception raised by a
progress or dump callback is re-raised as it is.
"""

from __future__ import annotations

__all__ = [
    "Error", "InvalidFileError", "InvalidArgumentError", "UnsupportedError", "OutOfMemoryError",
    "DeviceLostError", "CancelledError", "IoError", "InternalError", "ExportError", "VerificationError",
]


class Error(RuntimeError):
    """Base class of every error the ddim engine reports; ``code`` names the engine's error code."""

    __module__ = "ddim"
    code: str = "error"


class InvalidFileError(Error):
    """A model file (or .npy) that is corrupt, hostile or of an unknown version."""

    __module__ = "ddim"
    code = "invalid_file"


class InvalidArgumentError(Error, ValueError):
    """A caller's argument that is out of range or inconsistent (also a ValueError)."""

    __module__ = "ddim"
    code = "invalid_argument"


class UnsupportedError(Error):
    """Valid but not supported here (an op, a precision, a backend)."""

    __module__ = "ddim"
    code = "unsupported"


class OutOfMemoryError(Error, MemoryError):
    """A host or device allocation failed (also a MemoryError; C++ std::bad_alloc maps here too)."""

    __module__ = "ddim"
    code = "out_of_memory"


class DeviceLostError(Error):
    """A sticky device error: the session is unusable, make a new one."""

    __module__ = "ddim"
    code = "device_lost"


class CancelledError(Error):
    """The progress callback returned False. (Ctrl-C raises KeyboardInterrupt instead.)"""

    __module__ = "ddim"
    code = "cancelled"


class IoError(Error, OSError):
    """A file could not be opened, read or written (also an OSError)."""

    __module__ = "ddim"
    code = "io"


class InternalError(Error):
    """A bug in ddim: please report it with the message."""

    __module__ = "ddim"
    code = "internal"


class ExportError(Error, ValueError):
    """ddim.export / ddim.from_diffusers could not convert a model (the message says what and how to fix it)."""

    __module__ = "ddim"
    code = "export"


class VerificationError(ExportError):
    """ddim.export(verify=True) found the engine's output further from PyTorch's than the tolerance allows."""

    __module__ = "ddim"
    code = "verification"

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report
