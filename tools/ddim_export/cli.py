"""The command line of tools/export.py."""

from __future__ import annotations

import argparse
import sys

from .errors import ExportError

USAGE = """python3 tools/export.py --diffusers DIR --out FILE [--scheduler-config FILE] [options]
       (DIR: a UNet2DModel folder, or a pipeline folder with unet/, or a latent pipeline with unet/ and vqvae/ or vae/)
       python3 tools/export.py --ddpm-checkpoint FILE --config FILE.json --out FILE [--ema] [options]
       python3 tools/export.py --preset {cifar10-32,celebahq-256,ldm-celebahq-256} --random [--seed S] --out FILE [options]"""

DESCRIPTION = """Converts a DDPM-family U-Net into a ddim model file (weights/FORMAT.md): the graph, the noise schedule and
the weights in one safetensors file. The written file is loaded with `ddim info` before it replaces FILE
(skipped with a note when no ddim binary is found)."""

EPILOG = """exit status: 0 on success, 1 on an error or a failed --verify, 2 on a usage error.

examples:
  python3 tools/export.py --diffusers ddpm-cifar10-32/ --out cifar10.safetensors --verify
  python3 tools/export.py --ddpm-checkpoint model-790000.ckpt --config cifar10.json --out cifar10.safetensors
  python3 tools/export.py --preset cifar10-32 --random --seed 1 --out random.safetensors"""


def _timesteps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one timestep")
    return values


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def make_parser() -> argparse.ArgumentParser:
    from .api import PRESETS
    from .verify import DEFAULT_TOLERANCE

    p = argparse.ArgumentParser(prog="export", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--diffusers", metavar="DIR",
                     help="a diffusers UNet2DModel folder (config.json and diffusion_pytorch_model.safetensors or .bin), "
                          "or a pipeline folder with unet/")
    src.add_argument("--ddpm-checkpoint", metavar="FILE",
                     help="a checkpoint of the original DDPM/DDIM code (ermongroup/ddim, pesser/pytorch_diffusion): "
                          ".ckpt/.pth/.pt (loaded with torch.load(weights_only=True)) or .safetensors; needs --config")
    from .api import LATENT_PRESETS

    src.add_argument("--preset", metavar="NAME", choices=sorted(PRESETS) + sorted(LATENT_PRESETS),
                     help=f"a built-in architecture with random weights ({', '.join(list(PRESETS) + list(LATENT_PRESETS))}; "
                          "ldm-celebahq-256 is a latent model: U-Net and VQ decoder); needs --random")
    opt = p.add_argument_group("output and checks")
    opt.add_argument("--out", metavar="FILE", help="the model file to write (required)")
    opt.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="dtype of the weights in the file (default: float32)")
    opt.add_argument("--scheduler-config", metavar="FILE",
                     help="with --diffusers or --preset: a DDPMScheduler/DDIMScheduler scheduler_config.json "
                          "(default: scheduler_config.json beside the model, DIR/scheduler/, DIR/../scheduler/, else "
                          "DDIMScheduler's defaults)")
    opt.add_argument("--config", metavar="FILE.json",
                     help="with --ddpm-checkpoint: the model and schedule config, flat (ch, ch_mult, num_res_blocks, "
                          "attn_resolutions, resolution, in_channels, out_ch, resamp_with_conv, beta_schedule, "
                          "beta_start, beta_end, num_diffusion_timesteps) or ermongroup's {model, diffusion, data}; "
                          "an optional \"scheduler\" object of DDIMScheduler keys overrides the sampling defaults "
                          "(clip_sample false, timestep_spacing uniform, set_alpha_to_one true)")
    opt.add_argument("--ema", action="store_true",
                     help="with --ddpm-checkpoint: export the EMA weights of an ermongroup training checkpoint "
                          "(default: the model weights)")
    opt.add_argument("--random", action="store_true", help="with --preset: random weights (required)")
    opt.add_argument("--seed", type=_nonneg_int, default=None, metavar="S", help="with --preset: the weights' seed (default: 0)")
    opt.add_argument("--null-class-label", metavar="X", default=None,
                     help="class-conditional models: record this unconditional label (num_class_embeds: an integer "
                          "class; class_embed_type 'timestep': a number) for classifier-free guidance")
    opt.add_argument("--null-class-embedding", metavar="FILE.npy", default=None,
                     help="class_embed_type 'identity': record this unconditional embedding (time-embedding width "
                          "values) for classifier-free guidance")
    opt.add_argument("--verify", action="store_true",
                     help="compare `ddim forward` with PyTorch on random inputs at several timesteps; on a mismatch, "
                          "report the first diverging graph node; exit 1 over the tolerance (default: off)")
    opt.add_argument("--tolerance", type=_positive_float, default=DEFAULT_TOLERANCE, metavar="X",
                     help=f"--verify: the largest max abs difference accepted (default: {DEFAULT_TOLERANCE:g}; for "
                          "float16/bfloat16 files PyTorch runs with the same rounded weights)")
    opt.add_argument("--timesteps", type=_timesteps, default=None, metavar="LIST",
                     help="--verify: comma-separated timesteps (default: 0,1,T/4,T/2,T-1, i.e. 0,1,250,500,999)")
    opt.add_argument("--ddim", metavar="PATH",
                     help="the ddim binary for the load check and --verify (default: $DDIM_BIN, else "
                          "<repo>/build/bin/ddim, else ddim on PATH; without one the load check is skipped)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    sources = [s for s in ("diffusers", "ddpm_checkpoint", "preset") if getattr(args, s) is not None]
    if len(sources) != 1:
        parser.error("give exactly one of --diffusers, --ddpm-checkpoint, --preset"
                     + (f" (got {', '.join('--' + s.replace('_', '-') for s in sources)})" if sources else ""))
    if args.out is None:
        parser.error("--out FILE is required")
    source = sources[0]
    if args.config is not None and source != "ddpm_checkpoint":
        parser.error("--config goes with --ddpm-checkpoint (a diffusers folder has its own config.json)")
    if source == "ddpm_checkpoint" and args.config is None:
        parser.error("--ddpm-checkpoint needs --config FILE.json")
    if args.ema and source != "ddpm_checkpoint":
        parser.error("--ema goes with --ddpm-checkpoint")
    if args.scheduler_config is not None and source == "ddpm_checkpoint":
        parser.error("--scheduler-config goes with --diffusers or --preset (the schedule of an original checkpoint "
                     "comes from --config)")
    if source == "preset" and not args.random:
        parser.error("--preset needs --random (a preset has no trained weights; it makes random ones)")
    if source != "preset" and (args.random or args.seed is not None):
        parser.error("--random and --seed go with --preset")
    if (args.timesteps is not None or args.tolerance != parser.get_default("tolerance")) and not args.verify:
        parser.error("--tolerance and --timesteps go with --verify")

    from . import api

    common = dict(ddim=args.ddim, verify=args.verify, tolerance=args.tolerance, timesteps=args.timesteps)
    if (args.null_class_label is not None or args.null_class_embedding is not None) and source == "ddpm_checkpoint":
        parser.error("--null-class-label and --null-class-embedding go with --diffusers or --preset (original DDPM "
                     "checkpoints are unconditional)")
    null = dict(null_class_label=args.null_class_label, null_class_embedding=args.null_class_embedding)
    try:
        if source == "diffusers":
            result = api.export_diffusers(args.diffusers, args.out, args.dtype, args.scheduler_config, **common, **null)
        elif source == "ddpm_checkpoint":
            result = api.export_ddpm_checkpoint(args.ddpm_checkpoint, args.config, args.out, args.dtype, ema=args.ema,
                                                **common)
        else:
            seed = args.seed if args.seed is not None else 0
            if args.preset in api.LATENT_PRESETS:
                unet, decoder, sched = api.preset_latent(args.preset, seed)
                scheduler = args.scheduler_config if args.scheduler_config is not None else sched
                result = api.export_latent(unet, decoder, scheduler, args.out, args.dtype, **common)
            else:
                scheduler = args.scheduler_config if args.scheduler_config is not None else api.PRESET_SCHEDULER
                result = api.export(api.preset_unet(args.preset, seed), scheduler, args.out, args.dtype, **common, **null)
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export: interrupted", file=sys.stderr)
        return 130
    a = result.arch
    print(f"wrote {result.path}: {len(result.built.graph['nodes'])} nodes, {len(result.built.params)} tensors, "
          f"{result.num_parameters:,} parameters ({result.dtype}), {a.in_channels}x{a.height}x{a.width} input"
          + ("; verified" if result.verify_report is not None else ""))
    dec = getattr(result, "decoder", None)
    if dec is not None:
        d = result.decoder_arch
        print(f"  latent model: decoder '{d.component}' ({'VQModel' if d.kind == 'vq' else 'AutoencoderKL'}), "
              f"{len(dec.graph['nodes'])} nodes, {dec.num_parameters:,} parameters; images "
              f"{d.out_channels}x{a.height * d.factor}x{a.width * d.factor} (factor {d.factor}, scaling_factor "
              f"{d.scaling_factor:g})")
    return 0
