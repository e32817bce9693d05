#!/usr/bin/env python3
"""Exports a DDPM-family U-Net to a ddim model file. Run with --help; the work is done by tools/ddim_export."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ddim_export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
