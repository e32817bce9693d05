"""Class-conditional U-Nets and classifier-free guidance: the engine (`ddim sample`) against a hand-written diffusers
loop (UNet2DModel with class labels, DDIMScheduler, the CFG combine), for the three kinds of class conditioning
(num_class_embeds: integer labels; class_embed_type "timestep": scalar labels; "identity": caller vectors).

    diffusers:  for each step: w == 1: out = unet(x, t, class_labels=c)
                               else:   u, c = unet(cat([x, x]), t, class_labels=cat([null, c])).chunk(2)
                                       out = u + w (c - u)          [then rescale_noise_cfg when rescale > 0]
                x = sched.step(out, t, x, eta=eta, variance_noise=noise[i]).prev_sample
    engine:     ddim sample --model F --device cpu --timesteps <the remaining steps> --x-T x_i --eta E
                            [--noise noise[i:]] --class-labels ... --guidance-scale w   (null from the file)

Teacher-forced: step i starts from diffusers' own x_i (the engine runs the remaining timesteps from x_i; its first
step is compared with diffusers' x_{i+1}); bound 1e-4 max abs per step. The free-running trajectory (the engine from
x_T for all steps) is reported too, bound 1e-3 as in test_conformance.py. The null input comes from the file, which
the exporter records (--null-class-label / --null-class-embedding)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import SMALL_UNET, load_npy, make_unet, max_abs_diff, run_ddim, save_npy

STEP_TOLERANCE = 1e-4
TRAJECTORY_TOLERANCE = 1e-3
STEPS = 4
BATCH = 2
NUM_CLASSES = 6

KINDS = {
    # kind: (UNet2DModel options, labels of the batch, null input recorded in the file)
    "index": (dict(num_class_embeds=NUM_CLASSES), [1, 3], dict(null_class_label=NUM_CLASSES - 1)),
    "scalar": (dict(class_embed_type="timestep"), [10.0, 437.5], dict(null_class_label=0.0)),
    "vector": (dict(class_embed_type="identity"), None, None),  # embeddings drawn per test
}
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
CASES = [(k, p, w, eta) for k, p, w, eta in itertools.product(KINDS, PREDICTIONS, [1.0, 3.0], [0.0, 0.5])]


def _id(case) -> str:
    k, p, w, eta = case
    return f"{k}-{p}-w{w:g}-eta{eta:g}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, exporter):
    """One exported model per (kind, prediction type), with its diffusers module and labels."""
    cache = {}

    def get(kind: str, prediction: str):
        key = (kind, prediction)
        if key not in cache:
            options, labels, null = KINDS[kind]
            seed = 100 + 10 * list(KINDS).index(kind) + PREDICTIONS.index(prediction)
            unet = make_unet(seed, **SMALL_UNET, **options)
            temb = unet.config.block_out_channels[0] * 4
            gen = torch.Generator().manual_seed(seed)
            if kind == "vector":
                labels = torch.randn(BATCH, temb, generator=gen)
                null = dict(null_class_embedding=torch.randn(temb, generator=gen).numpy())
            sched = dict(num_train_timesteps=1000, prediction_type=prediction, clip_sample=False,
                         set_alpha_to_one=True, timestep_spacing="leading")
            path = tmp_path_factory.mktemp(f"{kind}-{prediction}") / "model.ddim"
            exporter.export(unet, sched, str(path), **null)
            cache[key] = (unet, sched, path, labels, null)
        return cache[key]

    return get


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' rescale_noise_cfg (pipeline_stable_diffusion.py; importing it needs transformers), line for line."""
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def diffusers_cfg(unet, scheduler, x_T, labels, null, w, eta, noise, rescale=0.0):
    """The reference loop; returns the trajectory (S+1 entries) and the timesteps."""
    scheduler.set_timesteps(STEPS)
    x = x_T.clone()
    traj = [x.clone()]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if w == 1.0:
                out = unet(x, t, class_labels=labels).sample
            else:
                both = unet(torch.cat([x, x]), t, class_labels=torch.cat([null, labels])).sample
                uncond, cond = both.chunk(2)
                out = uncond + w * (cond - uncond)
                if rescale > 0:
                    out = rescale_noise_cfg(out, cond, guidance_rescale=rescale)
            x = scheduler.step(out, t, x, eta=eta, variance_noise=noise[i] if eta > 0 else None).prev_sample
            traj.append(x.clone())
    return torch.stack(traj), [int(t) for t in scheduler.timesteps]


def engine_run(work_dir, path, kind, labels, x_start, timesteps, eta, noise, w, rescale=0.0):
    args = ["sample", "--model", path, "--device", "cpu", "--threads", "1", "--eta", repr(eta),
            "--timesteps", ",".join(str(t) for t in timesteps), "--x-T", save_npy(work_dir / "xs.npy", x_start),
            "--out", work_dir / "out.npy", "--trajectory", work_dir / "traj.npy", "--guidance-scale", repr(w)]
    if rescale:
        args += ["--guidance-rescale", repr(rescale)]
    if kind == "vector":
        args += ["--class-embeddings", save_npy(work_dir / "emb.npy", labels)]
    else:
        args += ["--class-labels", ",".join(repr(float(v)) for v in labels)]
    if eta > 0:
        args += ["--noise", save_npy(work_dir / "noise.npy", noise)]
    run_ddim(args)
    return load_npy(work_dir / "traj.npy")


def check_case(exported, work_dir, record_diff, kind, prediction, w, eta, rescale=0.0):
    from diffusers import DDIMScheduler

    unet, sched_cfg, path, labels, null = exported(kind, prediction)
    c, s = unet.config.in_channels, unet.config.sample_size
    gen = torch.Generator().manual_seed(7 + int(10 * w) + int(10 * eta))
    x_T = torch.randn(BATCH, c, s, s, generator=gen)
    noise = torch.randn(STEPS, BATCH, c, s, s, generator=gen) if eta > 0 else None
    if kind == "vector":
        lab = labels
        null_t = torch.from_numpy(null["null_class_embedding"]).float().expand(BATCH, -1)
    else:
        dt = torch.long if kind == "index" else torch.float32
        lab = torch.tensor(labels, dtype=dt)
        null_t = torch.full((BATCH,), null["null_class_label"], dtype=dt)
    ref, timesteps = diffusers_cfg(unet, DDIMScheduler(**sched_cfg), x_T, lab, null_t, w, eta, noise, rescale)
    assert len(timesteps) == STEPS

    per_step = []
    free = None
    for i in range(STEPS):
        traj = engine_run(work_dir, path, kind, lab.numpy() if kind == "vector" else labels, ref[i], timesteps[i:], eta,
                          noise[i:] if noise is not None else None, w, rescale)
        assert traj.shape == (STEPS - i + 1, BATCH, c, s, s)
        per_step.append(max_abs_diff(traj[1], ref[i + 1]))
        if i == 0:
            free = max(max_abs_diff(traj[k], ref[k]) for k in range(STEPS + 1))
    teacher = max(per_step)
    record_diff("teacher-forced step", teacher, STEP_TOLERANCE)
    record_diff("free-running trajectory", free, TRAJECTORY_TOLERANCE)
    assert teacher <= STEP_TOLERANCE, f"per-step max abs differences {per_step} (timesteps {timesteps})"
    assert free <= TRAJECTORY_TOLERANCE
    assert max_abs_diff(ref[-1], x_T) > 0.1  # the sample moved: the comparison means something
    return ref[-1]


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_class_conditional_matches_diffusers(case, exported, work_dir, record_diff):
    check_case(exported, work_dir, record_diff, *case)


@pytest.mark.parametrize("kind", list(KINDS))
def test_guidance_rescale_matches_diffusers(kind, exported, work_dir, record_diff):
    check_case(exported, work_dir, record_diff, kind, "v_prediction", 3.0, 0.0, rescale=0.7)


def test_labels_change_the_output(exported, work_dir):
    """Guards the comparison: with another label the engine's image differs (the labels reach the network)."""
    unet, sched_cfg, path, labels, null = exported("index", "epsilon")
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    outs = []
    for label in (0, 4):
        run_ddim(["sample", "--model", path, "--device", "cpu", "--steps", "3", "--x-T", save_npy(work_dir / "x.npy", x_T),
                  "--out", work_dir / "o.npy", "--class-labels", str(label)])
        outs.append(load_npy(work_dir / "o.npy"))
    assert max_abs_diff(outs[0], outs[1]) > 1e-3
