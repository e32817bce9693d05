#!/usr/bin/env python3
"""Exports a DDPM-family U-Net to a ddim model file. Run with --help; the work is done by tools/ddim_export.

Needs torch, diffusers, safetensors and numpy. When the interpreter running this lacks them and the
repository's .venv (made by tools/setup-python.sh) exists, the script re-runs itself with that
environment's Python, so `python3 tools/export.py ...` works either way.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    from ddim_export.cli import main  # noqa: E402
except ImportError as e:
    venv = os.path.join(os.path.dirname(HERE), ".venv")
    venv_python = os.path.join(venv, "bin", "python")
    if os.path.exists(venv_python) and os.path.realpath(sys.prefix) != os.path.realpath(venv) \
            and not os.environ.get("DDIM_EXPORT_REEXEC"):
        os.environ["DDIM_EXPORT_REEXEC"] = "1"
        os.execv(venv_python, [venv_python, os.path.abspath(__file__)] + sys.argv[1:])
    sys.stderr.write(f"export: error: {e.name or e} is not installed; run tools/setup-python.sh and use "
                     ".venv/bin/python (packages: tools/requirements.txt)\n")
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(main())
