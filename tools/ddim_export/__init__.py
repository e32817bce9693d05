"""ddim_export: converts DDPM-family U-Nets (diffusers UNet2DModel, the original DDPM/DDIM checkpoints) into the
ddim model file (weights/FORMAT.md), and checks the result against PyTorch with the ddim binary.

    import sys; sys.path.insert(0, "tools")
    from ddim_export import export, export_diffusers, export_ddpm_checkpoint, preset_unet, verify, ExportError
"""

from .api import (PRESET_SCHEDULER, PRESETS, ExportResult, export, export_ddpm_checkpoint, export_diffusers,
                  export_preset, preset_unet)
from .arch import UNetArch, arch_from_diffusers_config, arch_from_original_config
from .errors import ExportError, VerificationError
from .graph import BuiltGraph, DiffusersNaming, OriginalNaming, build_graph
from .schedule import DDIM_DEFAULTS, schedule_from_scheduler_config
from .verify import VerifyReport, reference_unet, verify

__all__ = [
    "BuiltGraph", "DDIM_DEFAULTS", "DiffusersNaming", "ExportError", "ExportResult", "OriginalNaming", "PRESETS",
    "PRESET_SCHEDULER", "UNetArch", "VerificationError", "VerifyReport", "arch_from_diffusers_config",
    "arch_from_original_config", "build_graph", "export", "export_ddpm_checkpoint", "export_diffusers",
    "export_preset", "preset_unet", "reference_unet", "schedule_from_scheduler_config", "verify",
]
