"""The exporter's output file: safetensors compatibility, exact tensors, metadata, `ddim info`, presets.

- The file opens with the `safetensors` package; its tensors are the UNet2DModel's state dict (bit-exact in
  float32; equal to the state dict cast to float16 / bfloat16 for those dtypes).
- `__metadata__` holds ddim.format_version "1" and ddim.graph / ddim.schedule as JSON; the graph references
  exactly the file's tensors; the schedule carries the scheduler config.
- `ddim info` accepts the file and reports the parameter count and attention widths; `ddim forward` on an
  fp16/bf16 file computes what PyTorch computes with the rounded weights.
- `export.py --diffusers DIR` (a save_pretrained directory, with and without --scheduler-config).
- The presets: cifar10-32 has 35,746,307 parameters, one-head attention of 256 channels; celebahq-256 has
  113,673,219, one-head attention of 512 channels; --preset needs --random; the seed fixes the weights.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from conftest import load_npy, make_unet, max_abs_diff, param_count, run_ddim, run_export, save_npy, write_json

NET = dict(block_out_channels=(32, 48))  # conftest.SMALL_UNET_DEFAULTS otherwise (make_unet)

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def read_file(path):
    """(tensors, metadata) of a safetensors file, through the safetensors package."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def header_dtypes(path) -> dict:
    """The dtype strings of the raw header (what the file really stores)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def graph_param_names(graph: dict) -> list[str]:
    return [t for node in graph["nodes"] for t in node.get("params", {}).values()]


def info_parameters(stdout: str) -> int:
    m = re.search(r"^parameters:\s+([\d,]+)\s*$", stdout, re.M)
    assert m, f"no 'parameters:' line in ddim info:\n{stdout}"
    return int(m.group(1).replace(",", ""))


def info_attention(stdout: str) -> dict:
    """{node: (tokens, channels, heads)} from ddim info."""
    return {
        m.group(1): (m.group(2), int(m.group(3)), int(m.group(4)))
        for m in re.finditer(r"attention '([^']+)': (\d+x\d+) tokens, (\d+) channels, (\d+) heads?", stdout)
    }


@pytest.fixture(scope="module")
def unet():
    return make_unet(31, **NET)


@pytest.fixture(scope="module")
def exported(exporter, unet, tmp_path_factory):
    """The same network exported in each dtype (Python API), with the DDIMScheduler config above."""
    d = tmp_path_factory.mktemp("exported")
    paths = {}
    for dtype in TORCH_DTYPES:
        paths[dtype] = d / f"model-{dtype}.safetensors"
        exporter.export(unet, dict(SCHEDULER), str(paths[dtype]), dtype=dtype)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Tensors and metadata
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_tensors_equal_state_dict(dtype, unet, exported):
    tensors, _ = read_file(exported[dtype])
    state = unet.state_dict()
    extra = sorted(set(tensors) - set(state))
    missing = sorted(set(state) - set(tensors))
    assert not missing, f"state-dict tensors missing from the file: {missing[:10]}"
    assert not extra or extra == ["alphas_cumprod"], f"tensors that are not in the state dict: {extra[:10]}"
    want_dtype = TORCH_DTYPES[dtype]
    stored = header_dtypes(exported[dtype])
    for name, ref in state.items():
        got = tensors[name]
        assert stored[name] == SAFETENSORS_DTYPES[dtype], f"{name} is stored as {stored[name]}"
        assert got.dtype == want_dtype and tuple(got.shape) == tuple(ref.shape), name
        expected = ref.detach().to(want_dtype)
        assert torch.equal(got, expected), f"{name}: max diff {max_abs_diff(got.float(), expected.float()):.3e}"
    # A real rounding happened for the half types (the comparison above is not vacuous).
    if dtype != "float32":
        w = state["conv_in.weight"]
        assert not torch.equal(tensors["conv_in.weight"].float(), w)


def test_metadata(unet, exported):
    _, meta = read_file(exported["float32"])
    ddim_keys = {k for k in meta if k.startswith("ddim.")}
    assert ddim_keys == {"ddim.format_version", "ddim.graph", "ddim.schedule"}
    assert meta["ddim.format_version"] == "1"
    graph = json.loads(meta["ddim.graph"])
    schedule = json.loads(meta["ddim.schedule"])

    assert set(graph) == {"inputs", "output", "nodes"}
    assert graph["inputs"] == {"sample": {"channels": 3, "height": 16, "width": 16}, "timestep": {}}
    names = [n["name"] for n in graph["nodes"]]
    assert graph["output"] in names and len(set(names)) == len(names)
    refs = graph_param_names(graph)
    assert len(refs) == len(set(refs)), "a tensor serves two parameters"
    file_tensors, _ = read_file(exported["float32"])
    table = {schedule["alphas_cumprod"]} if "alphas_cumprod" in schedule else set()
    assert set(refs) | table == set(file_tensors), "the graph must reference exactly the file's tensors"
    assert sum(file_tensors[r].numel() for r in refs) == param_count(unet)

    # Attention nodes carry diffusers' head count: 48 channels / attention_head_dim 8 = 6 heads.
    heads = {n["name"]: n.get("attrs", {}).get("heads", 1) for n in graph["nodes"] if n["op"] == "attention"}
    assert heads and set(heads.values()) == {6}, heads

    for key, value in SCHEDULER.items():
        assert schedule.get(key) == value, f"schedule {key}: {schedule.get(key)!r}, want {value!r}"


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_ddim_info_and_forward(dtype, unet, exported, ddim_bin, work_dir, record_diff):
    path = exported[dtype]
    info = run_ddim(["info", path]).stdout
    assert info_parameters(info) == param_count(unet)
    assert f"{SAFETENSORS_DTYPES[dtype]} x {len(unet.state_dict())}" in info
    attention = info_attention(info)
    assert attention and all(c == 48 and h == 6 for _, c, h in attention.values()), attention
    assert re.search(r"prediction_type:\s+v_prediction", info) and re.search(r"timestep_spacing:\s+trailing", info)

    # The engine on the stored weights = PyTorch in fp32 with the same (rounded) weights.
    ref_net = make_unet(31, **NET)
    with torch.no_grad():
        for name, p in ref_net.state_dict().items():
            p.copy_(p.to(TORCH_DTYPES[dtype]).float())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_net(x, 321).sample
    run_ddim(["forward", "--model", path, "--device", "cpu", "--x", save_npy(work_dir / "x.npy", x), "--t", "321",
              "--out", work_dir / "y.npy"])
    d = max_abs_diff(load_npy(work_dir / "y.npy"), ref)
    record_diff(f"forward {dtype} weights", d, 1e-4)
    assert d <= 1e-4


def test_export_rejects_unknown_dtype(exporter, unet, work_dir):
    with pytest.raises(exporter.ExportError):
        exporter.export(unet, None, str(work_dir / "m.safetensors"), dtype="int8")
    assert not (work_dir / "m.safetensors").exists()


def test_default_schedule_when_none(exporter, unet, work_dir):
    """scheduler_config None: the schedule is diffusers' DDIMScheduler defaults (FORMAT.md 4)."""
    path = work_dir / "m.safetensors"
    exporter.export(unet, None, str(path))
    from diffusers import DDIMScheduler

    _, meta = read_file(path)
    schedule = json.loads(meta["ddim.schedule"])
    defaults = DDIMScheduler().config
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "clip_sample",
                "set_alpha_to_one", "timestep_spacing", "steps_offset"):
        assert schedule.get(key, defaults[key]) == defaults[key], key


# ----------------------------------------------------------------------------------------------------------------
# The CLI on a diffusers directory
# ----------------------------------------------------------------------------------------------------------------


def test_cli_diffusers_directory(unet, ddim_bin, work_dir):
    """A save_pretrained folder with scheduler_config.json beside config.json (and --verify, the exporter's own
    check against PyTorch, which must pass on a correct export)."""
    from diffusers import DDIMScheduler

    model_dir = work_dir / "unet"
    unet.save_pretrained(str(model_dir))
    DDIMScheduler(**SCHEDULER).save_config(str(model_dir))  # scheduler_config.json beside config.json
    out = work_dir / "a.safetensors"
    run_export(["--diffusers", model_dir, "--out", out, "--verify"])
    tensors, meta = read_file(out)
    state = unet.state_dict()
    assert set(state) <= set(tensors)
    for name, ref in state.items():
        assert torch.equal(tensors[name], ref), name
    schedule = json.loads(meta["ddim.schedule"])
    for key, value in SCHEDULER.items():
        assert schedule.get(key) == value, f"schedule {key}: {schedule.get(key)!r}, want {value!r}"


def test_cli_diffusers_pipeline_directory(unet, ddim_bin, work_dir):
    """A pipeline folder (unet/, scheduler/); --scheduler-config overrides its scheduler; --dtype float16."""
    from diffusers import DDIMScheduler

    root = work_dir / "pipeline"
    unet.save_pretrained(str(root / "unet"))
    DDIMScheduler(**SCHEDULER).save_config(str(root / "scheduler"))
    other = dict(SCHEDULER, prediction_type="epsilon", timestep_spacing="leading", clip_sample=True)
    sched_file = write_json(work_dir / "sched.json", dict(other, _class_name="DDIMScheduler"))
    out16 = work_dir / "b.safetensors"
    run_export(["--diffusers", root, "--out", out16, "--dtype", "float16", "--scheduler-config", sched_file])
    tensors16, meta16 = read_file(out16)
    state = unet.state_dict()
    for name, ref in state.items():
        assert torch.equal(tensors16[name], ref.to(torch.float16)), name
    schedule16 = json.loads(meta16["ddim.schedule"])
    for key, value in other.items():
        assert schedule16.get(key) == value, f"schedule {key}: {schedule16.get(key)!r}, want {value!r}"
    info = run_ddim(["info", out16]).stdout
    assert info_parameters(info) == param_count(unet)


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------

CIFAR10_PARAMETERS = 35_746_307
CELEBAHQ_PARAMETERS = 113_673_219


def attention_modules(model) -> dict:
    """{path: (channels, heads)} of every diffusers Attention module."""
    from diffusers.models.attention_processor import Attention

    return {name: (m.to_q.in_features, m.heads) for name, m in model.named_modules() if isinstance(m, Attention)}


def test_preset_cifar10_architecture(exporter):
    model = exporter.preset_unet("cifar10-32", 0)
    assert param_count(model) == CIFAR10_PARAMETERS
    assert model.config.sample_size == 32 and list(model.config.block_out_channels) == [128, 256, 256, 256]
    attn = attention_modules(model)
    assert set(attn) == {"down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "mid_block.attentions.0",
                         "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2"}
    assert set(attn.values()) == {(256, 1)}


def test_preset_celebahq_architecture(exporter):
    model = exporter.preset_unet("celebahq-256", 0)
    assert param_count(model) == CELEBAHQ_PARAMETERS
    assert model.config.sample_size == 256
    attn = attention_modules(model)
    assert set(attn) == {"down_blocks.4.attentions.0", "down_blocks.4.attentions.1", "mid_block.attentions.0",
                         "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"}
    assert set(attn.values()) == {(512, 1)}
    # The graph the exporter would write (built in memory: the 455 MB file is not written here).
    built = exporter.build_graph(exporter.arch_from_diffusers_config(dict(model.config)))
    assert built.num_parameters == CELEBAHQ_PARAMETERS
    shapes = {p.tensor: p.shapes[0] for p in built.params}
    assert sum(math.prod(v.shape) for v in model.state_dict().values()) == sum(math.prod(s) for s in shapes.values())
    nodes = [n for n in built.graph["nodes"] if n["op"] == "attention"]
    assert sorted(n["name"] for n in nodes) == sorted(attn)
    for n in nodes:
        assert n.get("attrs", {}).get("heads", 1) == 1 and n.get("attrs", {}).get("inner_dim", 0) in (0, 512)
        assert shapes[n["params"]["q_weight"]][:2] == (512, 512)


def test_preset_seed_fixes_weights(exporter):
    a = exporter.preset_unet("cifar10-32", 7).state_dict()
    b = exporter.preset_unet("cifar10-32", 7).state_dict()
    c = exporter.preset_unet("cifar10-32", 8).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differing = [k for k in a if not torch.equal(a[k], c[k])]
    # Every randomly initialised tensor differs (GroupNorm affines may be constant: ones and zeros).
    weights = [k for k in a if k.endswith(".weight") and a[k].dim() > 1]
    assert set(weights) <= set(differing)


def test_preset_cli_file(exporter, ddim_bin, work_dir):
    """The cifar10-32 preset through the CLI (a 143 MB file): ddim info, and the same tensors as preset_unet
    with that seed (the seed fixes the weights across processes)."""
    path = work_dir / "cifar10.safetensors"
    run_export(["--preset", "cifar10-32", "--random", "--seed", "3", "--out", path])
    info = run_ddim(["info", path]).stdout
    assert info_parameters(info) == CIFAR10_PARAMETERS
    attention = info_attention(info)
    assert attention["down_blocks.1.attentions.0"] == ("16x16", 256, 1)
    assert attention["mid_block.attentions.0"] == ("4x4", 256, 1)
    assert len(attention) == 6 and all(c == 256 and h == 1 for _, c, h in attention.values())

    tensors, _ = read_file(path)
    same = exporter.preset_unet("cifar10-32", 3).state_dict()
    other = exporter.preset_unet("cifar10-32", 4).state_dict()
    for name, ref in same.items():
        assert torch.equal(tensors[name], ref), name
    assert not torch.equal(tensors["conv_in.weight"], other["conv_in.weight"])


def test_preset_requires_random(work_dir):
    out = work_dir / "p.safetensors"
    proc = run_export(["--preset", "cifar10-32", "--seed", "0", "--out", out], check=False)
    assert proc.returncode in (1, 2), proc
    assert "error" in proc.stderr and "--random" in proc.stderr, proc.stderr
    assert not out.exists()


def test_preset_unknown_name(exporter, work_dir):
    with pytest.raises((exporter.ExportError, ValueError, KeyError)) as e:
        exporter.preset_unet("imagenet-64", 0)
    assert "imagenet-64" in str(e.value)
