"""Errors and diagnostics of the exporter."""

from __future__ import annotations

import sys


class ExportError(ValueError):
    """A user mistake or an unsupported model: the message says what and, where it can, how to fix it."""


class VerificationError(ExportError):
    """`verify` found the ddim engine's output further from PyTorch's than the tolerance allows."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def note(message: str) -> None:
    """A diagnostic for the user (stderr), never part of the result."""
    print(f"export: note: {message}", file=sys.stderr, flush=True)
