#!/usr/bin/env python3
"""Trains the bundled default model: a small DDPM-family UNet2DModel on Fashion-MNIST.

Data: Debian's `dataset-fashion-mnist` package (the idx files are read directly, no download).
Images are 28x28 grayscale, padded to 32x32 with the background value and scaled to [-1, 1].
Training: epsilon prediction, linear betas 1e-4..0.02 over 1000 steps (DDPM), AdamW, EMA of the
weights. Seeded and reproducible for a fixed thread count; checkpoints every few minutes so an
interrupted run resumes where it stopped (`--resume`, the default when a checkpoint exists).

    python3 tools/train_fashion.py --out build/train          # 4000 steps of batch 64

writes build/train/unet (a diffusers UNet2DModel folder with scheduler_config.json) from the EMA
weights; tools/export.py turns it into weights/default.ddim.
"""
import argparse
import gzip
import json
import os
import struct
import time

import numpy as np
import torch

DATA_DIR = "/usr/share/datasets/fashion-mnist"

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=None,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
)
SCHEDULER_CONFIG = dict(
    _class_name="DDIMScheduler",
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=True,
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="leading",
)


def read_idx_images(path):
    """Reads an idx3-ubyte(.gz) file: magic 0x00000803, count, rows, cols, then uint8 pixels."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 0x803:
        raise ValueError(f"{path}: not an idx3 image file (magic {magic:#x})")
    if len(data) != 16 + n * rows * cols:
        raise ValueError(f"{path}: {len(data)} bytes, expected {16 + n * rows * cols}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def load_dataset():
    images = read_idx_images(os.path.join(DATA_DIR, "train-images-idx3-ubyte.gz"))
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)  # [-1, 1], background -1
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # 32x32
    return x.unsqueeze(1).contiguous()  # (N, 1, 32, 32)


def main():
    from diffusers import DDPMScheduler, UNet2DModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/train", help="working folder (checkpoints, the final model)")
    ap.add_argument("--max-steps", type=int, default=4000, help="training steps (default 4000)")
    ap.add_argument("--minutes", type=float, default=0, help="also stop after this many minutes (0: no limit)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")

    torch.manual_seed(args.seed)
    data = load_dataset()
    model = UNet2DModel(**UNET_CONFIG)
    ema = UNet2DModel(**UNET_CONFIG)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")
                            and k not in ("set_alpha_to_one", "steps_offset", "timestep_spacing")})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0

    if os.path.exists(ckpt_path) and not args.no_resume:
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step, elapsed = int(ck["step"]), float(ck["elapsed"])
        print(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min trained)", flush=True)

    def save_checkpoint():
        tmp = ckpt_path + ".tmp"
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step, "elapsed": elapsed}, tmp)
        os.replace(tmp, ckpt_path)

    nparams = sum(p.numel() for p in model.parameters())
    print(f"{nparams:,} parameters, {len(data):,} images, batch {args.batch}, {torch.get_num_threads()} threads", flush=True)
    model.train()
    t_start = time.time() - elapsed
    last_ckpt = time.time()
    loss_avg = None
    while True:
        elapsed = time.time() - t_start
        if (args.minutes and elapsed > args.minutes * 60) or step >= args.max_steps:
            break
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        x0 = data[idx]
        if torch.rand((), generator=gen) < 0.5:
            x0 = x0.flip(3)  # horizontal flips: the classes are left-right symmetric enough
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.99 * loss_avg + 0.01 * loss.item()
        if step % 100 == 0:
            print(f"step {step}  loss {loss_avg:.4f}  {elapsed / 60:.1f} min  {elapsed / step:.3f} s/step", flush=True)
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint()
            last_ckpt = time.time()
    save_checkpoint()

    final = os.path.join(args.out, "unet")
    ema.save_pretrained(final, safe_serialization=True)
    with open(os.path.join(final, "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    with open(os.path.join(final, "training.json"), "w") as f:
        json.dump({"steps": step, "minutes": round(elapsed / 60, 1), "batch": args.batch, "lr": args.lr,
                   "ema": args.ema, "seed": args.seed, "threads": torch.get_num_threads(),
                   "parameters": nparams, "final_loss_ema": loss_avg}, f, indent=2)
    print(f"done: {step} steps in {elapsed / 60:.1f} min; EMA model in {final}", flush=True)


if __name__ == "__main__":
    main()
