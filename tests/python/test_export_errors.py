"""Malformed or unsupported inputs to the exporter give clear errors.

CLI contract: the message goes to stderr and starts with "export: error:", the exit status is 1 (2 for usage
errors), and no output file is left behind. Each case checks that the message names the option, key or tensor at
fault. The module-level cases also go through the Python API (`ExportError`).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_unet, run_export, write_json

TINY = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def assert_cli_error(proc, *needles, out=None, status=1):
    """Exit status, the "export: error:" prefix, every needle (a string, or a compiled regex) in stderr, and no
    output file."""
    print(proc.stderr)  # shown with -s, and with the assertion below when it fails
    assert proc.returncode == status, f"exit status {proc.returncode}, want {status}\nstderr:\n{proc.stderr}"
    if status == 1:
        assert re.search(r"^export: error:", proc.stderr, re.M), f"no 'export: error:' line:\n{proc.stderr}"
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(proc.stderr), f"{needle.pattern!r} not in stderr:\n{proc.stderr}"
        else:
            assert needle in proc.stderr, f"{needle!r} not in stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, f"a traceback instead of a message:\n{proc.stderr}"
    if out is not None:
        assert not out.exists(), f"{out} was written although the export failed"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A valid diffusers directory (save_pretrained) that each test copies and breaks."""
    d = tmp_path_factory.mktemp("base") / "unet"
    make_unet(41, **TINY).save_pretrained(str(d))
    assert (d / "config.json").is_file() and (d / WEIGHTS).is_file()
    return d


@pytest.fixture
def model_dir(base_dir, work_dir):
    d = work_dir / "unet"
    shutil.copytree(base_dir, d)
    return d


_DELETE = object()


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def export_dir(d, work_dir):
    out = work_dir / "out.safetensors"
    return run_export(["--diffusers", d, "--out", out], check=False), out


def test_valid_directory_exports(model_dir, work_dir):
    """The base of every case below is itself valid (so each failure is caused by its one change)."""
    proc, out = export_dir(model_dir, work_dir)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_directory_without_config(model_dir, work_dir):
    (model_dir / "config.json").unlink()
    proc, out = export_dir(model_dir, work_dir)
    assert_cli_error(proc, "config.json", out=out)


def test_directory_missing(work_dir):
    missing = work_dir / "does-not-exist"
    proc, out = export_dir(missing, work_dir)
    assert_cli_error(proc, "does-not-exist", out=out)


FOUR_LEVELS = dict(
    TINY,
    sample_size=16,
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)


@pytest.mark.parametrize("levels", [2, 4])
def test_config_missing_block_out_channels(levels, base_dir, work_dir):
    """With 2 levels the default block_out_channels (4 entries) contradicts down_block_types; with 4 levels only
    the tensors' shapes do: either way the message must name the missing key, not (only) the tensors."""
    d = work_dir / "unet"
    if levels == 2:
        shutil.copytree(base_dir, d)
    else:
        make_unet(45, **FOUR_LEVELS).save_pretrained(str(d))
    edit_config(d, block_out_channels=_DELETE)
    proc, out = export_dir(d, work_dir)
    assert_cli_error(proc, "block_out_channels", out=out)


def test_config_cross_attention_block(model_dir, work_dir):
    edit_config(model_dir, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"])
    proc, out = export_dir(model_dir, work_dir)
    assert_cli_error(proc, "CrossAttnDownBlock2D", out=out)


def test_tensor_of_wrong_shape(model_dir, work_dir):
    name = "down_blocks.1.resnets.0.conv1.weight"
    state = load_file(str(model_dir / WEIGHTS))
    state[name] = torch.zeros(32, 16, 3, 1)
    save_file(state, str(model_dir / WEIGHTS), metadata={"format": "pt"})
    proc, out = export_dir(model_dir, work_dir)
    assert_cli_error(proc, name, out=out)


def test_missing_tensor(model_dir, work_dir):
    name = "mid_block.attentions.0.to_k.bias"
    state = load_file(str(model_dir / WEIGHTS))
    del state[name]
    save_file(state, str(model_dir / WEIGHTS), metadata={"format": "pt"})
    proc, out = export_dir(model_dir, work_dir)
    assert_cli_error(proc, name, out=out)


def test_extra_unused_tensor(model_dir, work_dir):
    state = load_file(str(model_dir / WEIGHTS))
    state["extra_head.weight"] = torch.ones(4, 4)
    save_file(state, str(model_dir / WEIGHTS), metadata={"format": "pt"})
    proc, out = export_dir(model_dir, work_dir)
    assert_cli_error(proc, "extra_head.weight", out=out)


# Options that change the network in ways the graph cannot express: real UNet2DModels with the option, saved
# with save_pretrained (so config and weights agree), and the same module through the Python API.
UNSUPPORTED = {
    "time_embedding_type": dict(time_embedding_type="fourier", flip_sin_to_cos=False),
    # ("timestep" and "identity" and num_class_embeds are supported: tests/python/test_class_conditional.py)
    "class_embed_type": dict(class_embed_type="projection"),
    "resnet_time_scale_shift": dict(resnet_time_scale_shift="scale_shift"),
}


@pytest.mark.parametrize("option", list(UNSUPPORTED))
def test_unsupported_option_directory(option, work_dir):
    d = work_dir / "unet"
    make_unet(42, **dict(TINY, **UNSUPPORTED[option])).save_pretrained(str(d))
    proc, out = export_dir(d, work_dir)
    assert_cli_error(proc, option, str(UNSUPPORTED[option][option]), out=out)


@pytest.mark.parametrize("option", list(UNSUPPORTED))
def test_unsupported_option_module(option, exporter, work_dir):
    unet = make_unet(42, **dict(TINY, **UNSUPPORTED[option]))
    out = work_dir / "out.safetensors"
    with pytest.raises(exporter.ExportError) as e:
        exporter.export(unet, None, str(out))
    assert option in str(e.value)
    assert not out.exists()


def test_unsupported_scheduler_option(exporter, work_dir):
    """A beta schedule the format does not have is refused by name (not silently replaced by the default)."""
    unet = make_unet(43, **TINY)
    out = work_dir / "out.safetensors"
    with pytest.raises(exporter.ExportError) as e:
        exporter.export(unet, {"beta_schedule": "sigmoid"}, str(out))
    assert "beta_schedule" in str(e.value) and "sigmoid" in str(e.value)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Original (DDPM) checkpoints and configs
# ----------------------------------------------------------------------------------------------------------------

ORIGINAL = {
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "resolution": 8,
    "in_channels": 3,
    "out_ch": 3,
    "resamp_with_conv": True,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_diffusion_timesteps": 1000,
}


def test_original_config_missing_ch(work_dir):
    ckpt = work_dir / "ckpt.pth"
    torch.save({"conv_in.weight": torch.zeros(32, 3, 3, 3)}, str(ckpt))
    cfg = dict(ORIGINAL)
    del cfg["ch"]
    out = work_dir / "out.safetensors"
    proc = run_export(["--ddpm-checkpoint", ckpt, "--config", write_json(work_dir / "c.json", cfg), "--out", out],
                      check=False)
    assert_cli_error(proc, re.compile(r"\bch\b"), out=out)


def test_original_checkpoint_wrong_names(work_dir):
    """A checkpoint that is not in the original layout (here: a diffusers state dict) names a tensor at fault."""
    ckpt = work_dir / "ckpt.pth"
    torch.save(make_unet(44, **dict(TINY, norm_num_groups=32, block_out_channels=(32, 64))).state_dict(), str(ckpt))
    out = work_dir / "out.safetensors"
    proc = run_export(["--ddpm-checkpoint", ckpt, "--config", write_json(work_dir / "c.json", ORIGINAL),
                       "--out", out], check=False)
    assert_cli_error(proc, re.compile(r"temb\.dense\.0|time_embedding\.linear_1|conv_norm_out|down_blocks"), out=out)


# ----------------------------------------------------------------------------------------------------------------
# Usage errors (exit status 2)
# ----------------------------------------------------------------------------------------------------------------


def test_usage_no_source(work_dir):
    proc = run_export(["--out", work_dir / "o.safetensors"], check=False)
    assert_cli_error(proc, status=2, out=work_dir / "o.safetensors")
    assert "usage" in proc.stderr.lower()


def test_usage_bad_dtype(model_dir, work_dir):
    out = work_dir / "o.safetensors"
    proc = run_export(["--diffusers", model_dir, "--out", out, "--dtype", "int8"], check=False)
    assert_cli_error(proc, "int8", status=2, out=out)
