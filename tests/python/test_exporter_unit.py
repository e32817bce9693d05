"""Unit tests of the exporter package (tools/ddim_export): the graph against the C++ builder, `verify` on the
UNet2DModel options the DDPM family uses, schedules, checkpoint loading, refusals and the CLI's contract.

The end-to-end conformance of the exporter with diffusers and the engine is in test_conformance.py,
test_export_files.py, test_ddpm_checkpoint.py and test_export_errors.py; this file covers the exporter's own
options and error paths. Every network is tiny (tens of thousands of parameters)."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_unet, run_export

BASE = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=16,
    norm_num_groups=8,
)
TIMESTEPS = [0, 999]


def metadata(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    return json.loads(meta["ddim.graph"]), json.loads(meta["ddim.schedule"]), names


# ----------------------------------------------------------------------------------------------------------------
# The graph = engine/graph/unet_builder.cpp's for the same network
# ----------------------------------------------------------------------------------------------------------------

CPP_PRESETS = {
    "tiny": dict(BASE, sample_size=32, attention_head_dim=None),
    "small": dict(BASE, sample_size=32, attention_head_dim=None, block_out_channels=(64, 128, 128), layers_per_block=2,
                  norm_num_groups=16, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("preset", ["tiny", "small", "cifar10-32"])
def test_graph_equals_cpp_builder(preset, exporter, ddim_bin, work_dir):
    make_model = Path(ddim_bin).parent / "ddim-make-model"
    if not make_model.is_file():
        pytest.skip(f"{make_model} is not built (the cross-check needs it)")
    out = work_dir / "cpp.safetensors"
    subprocess.run([str(make_model), "--preset", preset, "--out", str(out)], check=True, capture_output=True)
    cpp_graph, _, cpp_names = metadata(out)
    config = exporter.PRESETS["cifar10-32"] if preset == "cifar10-32" else CPP_PRESETS[preset]
    built = exporter.build_graph(exporter.arch_from_diffusers_config(dict(config)))
    assert built.graph == cpp_graph
    assert {p.tensor for p in built.params} == cpp_names


def test_preset_parameter_counts(exporter):
    """Both presets from the config alone (no weights): 35,746,307 and 113,673,219 parameters; celebahq's attention
    is one head of 512 channels at 16x16 (level 4 of 6, up_blocks.1)."""
    counts = {}
    for name in ("cifar10-32", "celebahq-256"):
        built = exporter.build_graph(exporter.arch_from_diffusers_config(dict(exporter.PRESETS[name])))
        counts[name] = built.num_parameters
    assert counts == {"cifar10-32": 35_746_307, "celebahq-256": 113_673_219}
    built = exporter.build_graph(exporter.arch_from_diffusers_config(dict(exporter.PRESETS["celebahq-256"])))
    attn = {n["name"]: n for n in built.graph["nodes"] if n["op"] == "attention"}
    assert set(attn) == {"down_blocks.4.attentions.0", "down_blocks.4.attentions.1", "mid_block.attentions.0",
                         "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"}
    assert all(n["attrs"] == {"heads": 1} for n in attn.values())
    widths = {p.shapes[0] for p in built.params if p.canonical.endswith("to_q.weight")}
    assert widths == {(512, 512)}


# ----------------------------------------------------------------------------------------------------------------
# verify: ddim forward against the UNet2DModel, for each option of the DDPM family
# ----------------------------------------------------------------------------------------------------------------

OPTIONS = {
    "multihead": {},
    "inner-dim": dict(attention_head_dim=24),  # 64 channels / 24 = 2 heads, inner width 48
    "single-head": dict(attention_head_dim=None),
    "grayscale": dict(in_channels=1, out_channels=1),
    "pad0-ddpm-embedding": dict(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    "center-midscale": dict(center_input_sample=True, mid_block_scale_factor=1.7),
    "no-mid-attention": dict(add_attention=False),
    "no-mid-block": dict(mid_block_type=None),
    "time-embedding-dim": dict(time_embedding_dim=96),
    "attn-norm-groups": dict(attn_norm_num_groups=4),
    "non-square": dict(sample_size=(16, 24)),
    "all-attention-3-levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                                   down_block_types=("AttnDownBlock2D",) * 3, up_block_types=("AttnUpBlock2D",) * 3),
    "unetres-names": dict(down_block_types=("UNetResDownBlock2D", "AttnDownBlock2D")),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_verify_option(option, exporter, ddim_bin, work_dir, record_diff):
    unet = make_unet(3, **dict(BASE, **OPTIONS[option]))
    result = exporter.export(unet, None, str(work_dir / "m.safetensors"), ddim=str(ddim_bin), verify=True,
                             timesteps=TIMESTEPS)
    report = result.verify_report
    record_diff("ddim forward vs UNet2DModel", report.max_abs, 2e-5)
    assert report.ok and report.max_abs <= 2e-5
    assert [r.t for r in report.results] == TIMESTEPS
    assert result.num_parameters == sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_verify_half_files_against_rounded_weights(dtype, exporter, ddim_bin, work_dir, record_diff):
    unet = make_unet(4, **BASE)
    result = exporter.export(unet, None, str(work_dir / "m.safetensors"), dtype=dtype, ddim=str(ddim_bin),
                             verify=True, timesteps=TIMESTEPS)
    report = result.verify_report
    assert report.dtype == dtype and report.ok
    record_diff(f"{dtype} file vs rounded PyTorch", report.max_abs, 2e-5)
    # ...and the rounding itself is visible against the fp32 model.
    assert all(r.vs_fp32 is not None and r.vs_fp32 > 10 * r.max_abs for r in report.results)


@pytest.mark.parametrize("module", ["up_blocks.0.resnets.1.conv2", "down_blocks.1.attentions.0.to_v",
                                    "time_embedding.linear_1", "down_blocks.0.resnets.0.norm1",
                                    "mid_block.attentions.0.group_norm"])
def test_verify_names_first_diverging_node(module, exporter, ddim_bin, work_dir):
    unet = make_unet(5, **BASE)
    path = work_dir / "m.safetensors"
    exporter.export(unet, None, str(path), ddim=str(ddim_bin))
    with torch.no_grad():
        unet.get_submodule(module).bias.add_(0.1)  # the PyTorch side now differs in one module
    with pytest.raises(exporter.VerificationError) as e:
        exporter.verify(path, unet, ddim=str(ddim_bin), timesteps=[7], log=None)
    node = module.rsplit(".", 1)[0] if module.endswith(".to_v") else module
    assert f"first diverging node: {node} " in str(e.value), str(e.value)
    assert not e.value.report.ok


def test_verify_all_nodes_are_compared(exporter, ddim_bin, work_dir):
    """Every graph node has a PyTorch counterpart (module output, module input, or SiLU of an output)."""
    from ddim_export.verify import _node_reference

    unet = make_unet(6, **dict(BASE, center_input_sample=True))
    built = exporter.build_graph(exporter.arch_from_diffusers_config(dict(unet.config)))
    modules = dict(unet.named_modules())
    for node in built.graph["nodes"]:
        ref = _node_reference(node, modules)
        assert ref is not None and ref[0] in modules, node["name"]


# ----------------------------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------------------------


def test_file_is_exactly_the_state_dict(exporter, ddim_bin, work_dir):
    unet = make_unet(7, **BASE)
    path = work_dir / "m.safetensors"
    exporter.export(unet, None, str(path), ddim=str(ddim_bin))
    tensors = load_file(str(path))
    state = unet.state_dict()
    assert tensors.keys() == state.keys()
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    graph, schedule, _ = metadata(path)
    refs = [t for n in graph["nodes"] for t in n.get("params", {}).values()]
    assert sorted(refs) == sorted(state)
    assert schedule == exporter.DDIM_DEFAULTS
    assert not list(work_dir.glob(".*.tmp")), "the temporary file was left behind"


def test_half_overflow_is_refused(exporter, work_dir):
    unet = make_unet(8, **BASE)
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = 1e6
    out = work_dir / "m.safetensors"
    with pytest.raises(exporter.ExportError, match=r"conv_in\.weight.*overflows"):
        exporter.export(unet, None, str(out), dtype="float16")
    assert not out.exists()
    exporter.export(unet, None, str(out), dtype="bfloat16", check=False)  # bf16 has the range


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


def test_trained_betas_become_an_alphas_cumprod_table(exporter, ddim_bin, work_dir):
    betas = np.linspace(1e-4, 0.03, 500) ** 1.1
    unet = make_unet(9, **BASE)
    path = work_dir / "m.safetensors"
    exporter.export(unet, {"_class_name": "DDPMScheduler", "trained_betas": betas.tolist(), "beta_schedule": "linear",
                           "variance_type": "fixed_large", "clip_sample": False}, str(path), ddim=str(ddim_bin))
    _, schedule, names = metadata(path)
    assert schedule["alphas_cumprod"] == "schedule.alphas_cumprod" and "schedule.alphas_cumprod" in names
    assert schedule["num_train_timesteps"] == 500 and "beta_schedule" not in schedule
    assert schedule["variance_type"] == "fixed_large" and schedule["clip_sample"] is False
    with safe_open(str(path), framework="pt") as f:
        table = f.get_tensor("schedule.alphas_cumprod")
    assert table.dtype == torch.float64
    np.testing.assert_array_equal(table.numpy(), np.cumprod(1.0 - betas))


def test_scheduler_object_and_ignored_keys(exporter, work_dir, capfd):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    doc = exporter.schedule_from_scheduler_config(sched).doc
    assert doc["beta_schedule"] == "squaredcos_cap_v2" and doc["prediction_type"] == "v_prediction"
    doc = exporter.schedule_from_scheduler_config({"skip_prk_steps": True, "steps_offset": 1}).doc
    assert doc["steps_offset"] == 1 and "skip_prk_steps" not in doc
    assert "skip_prk_steps" in capfd.readouterr().err


@pytest.mark.parametrize("config, needle", [
    ({"beta_schedule": "sigmoid"}, "sigmoid"),
    ({"prediction_type": "x0"}, "prediction_type"),
    ({"timestep_spacing": "custom"}, "timestep_spacing"),
    ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"clip_sample": "yes"}, "clip_sample"),
    ({"trained_betas": [0.1, 1.0]}, "alphas_cumprod[1]"),
])
def test_bad_schedules_are_refused(config, needle, exporter):
    with pytest.raises(exporter.ExportError) as e:
        exporter.schedule_from_scheduler_config(config)
    assert needle in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Refused UNet2DModel options (config-level: no model needed)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, needle", [
    (dict(act_fn="gelu"), "act_fn"),
    (dict(up_block_types=["AttnUpBlock2D", "UpBlock2D"], upsample_type="resnet"), "upsample_type"),
    (dict(down_block_types=["AttnDownBlock2D", "DownBlock2D"], downsample_type="resnet"), "downsample_type"),
    (dict(norm_num_groups=None), "norm_num_groups"),
    (dict(attention_head_dim=128), "attention_head_dim"),
    (dict(down_block_types=["DownBlock2D", "AttnSkipDownBlock2D"]), "AttnSkipDownBlock2D"),
    (dict(class_embed_type="simple_projection"), "class_embed_type"),
    (dict(time_embedding_type="learned"), "time_embedding_type"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
    (dict(norm_num_groups=12), "not divisible by 12 groups"),
    (dict(sample_size=None), "sample_size"),
    (dict(sample_size=10, block_out_channels=[32, 32, 64], down_block_types=["DownBlock2D"] * 3,
          up_block_types=["UpBlock2D"] * 3), "divisible by 4"),
    (dict(_class_name="UNet2DConditionModel"), "UNet2DConditionModel"),
])
def test_unsupported_config_is_refused(change, needle, exporter):
    config = dict(BASE, **change)
    with pytest.raises(exporter.ExportError) as e:
        exporter.build_graph(exporter.arch_from_diffusers_config(config))
    assert needle in str(e.value)


def test_irrelevant_resampler_types_are_accepted(exporter):
    """downsample_type / upsample_type only matter for Attn blocks that resample (diffusers' Down/UpBlock2D always
    use conv resamplers)."""
    config = dict(BASE, downsample_type="resnet", upsample_type="resnet",
                  down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"])
    exporter.build_graph(exporter.arch_from_diffusers_config(config))


# ----------------------------------------------------------------------------------------------------------------
# Loading checkpoints
# ----------------------------------------------------------------------------------------------------------------


def test_legacy_attention_names_and_bin_weights(exporter, ddim_bin, work_dir):
    """Old hub checkpoints: diffusion_pytorch_model.bin with query/key/value/proj_attn."""
    unet = make_unet(10, **BASE)
    d = work_dir / "unet"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(unet.config)))
    legacy = {}
    for k, v in unet.state_dict().items():
        k = re.sub(r"\.to_q\.", ".query.", k)
        k = re.sub(r"\.to_k\.", ".key.", k)
        k = re.sub(r"\.to_v\.", ".value.", k)
        k = re.sub(r"\.to_out\.0\.", ".proj_attn.", k)
        legacy[k] = v.clone()
    assert "mid_block.attentions.0.proj_attn.weight" in legacy
    torch.save(legacy, str(d / "diffusion_pytorch_model.bin"))
    result = exporter.export_diffusers(str(d), str(work_dir / "m.safetensors"), ddim=str(ddim_bin), verify=True,
                                       timesteps=[3])
    assert result.verify_report.ok
    assert "mid_block.attentions.0.to_out.0.weight" in metadata(result.path)[2]


def test_pipeline_folder_layout(exporter, ddim_bin, work_dir):
    from diffusers import DDIMScheduler

    unet = make_unet(11, **BASE)
    unet.save_pretrained(str(work_dir / "pipe" / "unet"))
    DDIMScheduler(prediction_type="v_prediction", steps_offset=1).save_config(str(work_dir / "pipe" / "scheduler"))
    for source in ("pipe", "pipe/unet"):
        out = work_dir / "m.safetensors"
        exporter.export_diffusers(str(work_dir / source), str(out), ddim=str(ddim_bin))
        schedule = metadata(out)[1]
        assert schedule["prediction_type"] == "v_prediction" and schedule["steps_offset"] == 1, source


class _NotATensor:
    pass


def test_pickled_objects_are_never_loaded(exporter, work_dir):
    ckpt = work_dir / "evil.pth"
    with open(ckpt, "wb") as f:
        pickle.dump({"conv_in.weight": _NotATensor()}, f, protocol=2)
    with pytest.raises(exporter.ExportError, match="weights_only"):
        exporter.export_ddpm_checkpoint(str(ckpt), dict(ORIGINAL), str(work_dir / "m.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# The original DDPM layout: ermongroup's nested config and checkpoint list, EMA, schedules
# ----------------------------------------------------------------------------------------------------------------

ORIGINAL = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "resolution": 16,
            "in_channels": 3, "out_ch": 3, "resamp_with_conv": True}


def original_state(exporter, config, seed):
    """A random original-layout state dict (diffusers weights under the exporter's original names)."""
    arch = exporter.arch_from_original_config(config)
    unet = make_unet(seed, **arch.to_diffusers_config())
    naming = exporter.OriginalNaming(arch.levels)
    out = {}
    for k, v in unet.state_dict().items():
        name = naming.tensor(k)
        out[name] = v.reshape(*v.shape, 1, 1).clone() if re.search(r"\.(q|k|v|proj_out)\.weight$", name) else v.clone()
    return out


def test_ermongroup_checkpoint_and_config(exporter, ddim_bin, work_dir):
    model_section = {k: v for k, v in ORIGINAL.items() if k not in ("resolution", "in_channels")}
    config = {"model": dict(model_section, type="simple", var_type="fixedlarge", ema=True, dropout=0.1),
              "diffusion": {"beta_schedule": "quad", "beta_start": 0.0001, "beta_end": 0.02,
                            "num_diffusion_timesteps": 1000},
              "data": {"image_size": 16, "channels": 3}}
    model = original_state(exporter, ORIGINAL, 12)
    ema = original_state(exporter, ORIGINAL, 13)
    ckpt = work_dir / "ckpt.pth"
    torch.save([{f"module.{k}": v for k, v in model.items()}, {"state": {}, "param_groups": []}, 5, 1000,
                {f"module.{k}": v for k, v in ema.items()}], str(ckpt))
    for use_ema, want in ((False, model), (True, ema)):
        out = work_dir / f"m{use_ema}.safetensors"
        result = exporter.export_ddpm_checkpoint(str(ckpt), config, str(out), ema=use_ema, ddim=str(ddim_bin),
                                                 verify=True, timesteps=[0, 999])
        assert result.verify_report.ok
        tensors = load_file(str(out))
        assert tensors.keys() == want.keys()
        assert all(torch.equal(tensors[k], want[k]) for k in want)
    _, schedule, _ = metadata(out)
    assert schedule["beta_schedule"] == "scaled_linear" and schedule["variance_type"] == "fixed_large"
    assert schedule["clip_sample"] is False and schedule["timestep_spacing"] == "uniform"


def test_original_conv_shortcut_and_table_schedule(exporter, ddim_bin, work_dir):
    """A 3x3 conv_shortcut (the code's conv_shortcut=True), a 'const' beta schedule (written as a table), a
    'bayesian' model's logvar (dropped) and a safetensors checkpoint."""
    state = original_state(exporter, ORIGINAL, 14)
    gen = torch.Generator().manual_seed(0)
    for base in ("down.1.block.0", "up.0.block.0", "up.0.block.1", "up.1.block.1"):
        if f"{base}.nin_shortcut.weight" in state:
            w = state.pop(f"{base}.nin_shortcut.weight")
            state[f"{base}.conv_shortcut.weight"] = 0.05 * torch.randn(w.shape[0], w.shape[1], 3, 3, generator=gen)
            state[f"{base}.conv_shortcut.bias"] = state.pop(f"{base}.nin_shortcut.bias")
    state["logvar"] = torch.zeros(1000)
    ckpt = work_dir / "ckpt.safetensors"
    save_file(state, str(ckpt))
    config = dict(ORIGINAL, type="bayesian", beta_schedule="const", beta_start=0.0001, beta_end=0.002,
                  num_diffusion_timesteps=200)
    result = exporter.export_ddpm_checkpoint(str(ckpt), config, str(work_dir / "m.safetensors"), ddim=str(ddim_bin),
                                             verify=True, timesteps=[0, 199])
    assert result.verify_report.ok
    node = result.built.node("down_blocks.1.resnets.0.conv_shortcut")
    assert node["attrs"]["kernel"] == 3 and node["attrs"]["padding"] == 1
    _, schedule, names = metadata(result.path)
    assert "logvar" not in names and schedule["num_train_timesteps"] == 200
    with safe_open(str(result.path), framework="pt") as f:
        table = f.get_tensor(schedule["alphas_cumprod"]).numpy()
    np.testing.assert_allclose(table, np.cumprod(np.full(200, 1 - 0.002)), rtol=1e-12)


def test_original_unused_tensor_is_named(exporter, work_dir):
    state = original_state(exporter, ORIGINAL, 15)
    state["temb.extra.weight"] = torch.zeros(2)
    with pytest.raises(exporter.ExportError, match=r"temb\.extra\.weight"):
        exporter.export_ddpm_checkpoint(state, ORIGINAL, str(work_dir / "m.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------------------------


def test_cli_verify_prints_a_table(ddim_bin, work_dir):
    unet = make_unet(16, **BASE)
    unet.save_pretrained(str(work_dir / "unet"))
    out = work_dir / "m.safetensors"
    proc = run_export(["--diffusers", work_dir / "unet", "--out", out, "--verify", "--timesteps", "0,500",
                       "--ddim", ddim_bin])
    assert re.search(r"^\s+0\s+\S+\s+\S+\s+\S+\s+ok", proc.stderr, re.M), proc.stderr
    assert re.search(r"^\s+500\s+\S+\s+\S+\s+\S+\s+ok", proc.stderr, re.M), proc.stderr
    assert "no scheduler config" in proc.stderr
    assert proc.stdout.startswith(f"wrote {out}")


@pytest.mark.parametrize("args, needle", [
    (["--diffusers", "x", "--config", "c.json"], "--config"),
    (["--diffusers", "x", "--tolerance", "0.1"], "--verify"),
    (["--diffusers", "x", "--preset", "cifar10-32"], "exactly one"),
    (["--ddpm-checkpoint", "x"], "--config"),
    (["--diffusers", "x", "--seed", "1"], "--preset"),
    (["--diffusers", "x", "--verify", "--tolerance", "-1"], "--tolerance"),
])
def test_cli_usage_errors(args, needle, work_dir):
    proc = run_export(args + ["--out", work_dir / "o.safetensors"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "export: error:" in proc.stderr and needle in proc.stderr, proc.stderr


def test_cli_help_lists_every_option():
    proc = run_export(["--help"])
    for option in ("--diffusers", "--ddpm-checkpoint", "--preset", "--out", "--dtype", "--scheduler-config",
                   "--config", "--ema", "--random", "--seed", "--verify", "--tolerance", "--timesteps", "--ddim"):
        assert option in proc.stdout, option
    assert "default: float32" in proc.stdout


def test_cli_failed_load_check_leaves_no_file(work_dir):
    """A ddim that rejects the file: exit 1 with its message; nothing is written."""
    fake = work_dir / "fake-ddim"
    fake.write_text("#!/bin/sh\necho 'ddim: error: simulated rejection' >&2\nexit 1\n")
    fake.chmod(0o755)
    make_unet(17, **BASE).save_pretrained(str(work_dir / "unet"))
    out = work_dir / "m.safetensors"
    proc = run_export(["--diffusers", work_dir / "unet", "--out", out, "--ddim", fake], check=False)
    assert proc.returncode == 1 and "simulated rejection" in proc.stderr, proc.stderr
    assert not out.exists() and not list(work_dir.glob(".m.safetensors.*"))
