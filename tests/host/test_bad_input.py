"""Bad input to Load B-LoRA, Apply B-LoRA and B-LoRA Block Weights: each gives a clear error naming the file or
the entry, and neither the base model nor the files on disk change."""
from __future__ import annotations

import hashlib

import pytest
import torch

from blora_testkit.dialects import (FULL_ATTN_SHAPES, TINY_ATTN_SHAPES, blora_shapes, make_state_dict)
from blora_testkit.nodes import load_blora, model_state, run_node, write_lora

SD15_TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 8,
    "num_head_channels": -1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@pytest.fixture
def nodes(pack):
    return pack.nodes


@pytest.fixture
def loras(host_dirs):
    return host_dirs / "models" / "loras"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unchanged(model, before):
    after = model_state(model)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def apply(nodes, model, **inputs):
    strengths = dict(content_strength=1.0, style_strength=1.0, layout_strength=1.0, strength_mode="linear")
    return run_node(nodes.apply.BLoRAApply, model=model, **strengths, **inputs)[0][0]


def good_file(loras, name="good.safetensors", shapes=None, **kw):
    shapes = blora_shapes(TINY_ATTN_SHAPES) if shapes is None else shapes
    return write_lora(loras, name, make_state_dict("kohya", shapes, rank=4, seed=0, alpha=2.0, **kw))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header
    path.write_bytes(bytes(data))


def pickle_file(path):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))


def nan_file(path):
    sd = make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES), rank=4, seed=0)
    key = sorted(k for k in sd if k.endswith("lora_up.weight"))[0]
    sd[key][0, 0] = float("nan")
    write_lora(path.parent, path.name, sd)


def inf_file(path):
    sd = make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES), rank=4, seed=0)
    sd[sorted(sd)[0]][0, 0] = float("inf")
    write_lora(path.parent, path.name, sd)


@pytest.mark.parametrize("spoil,pattern", [
    (truncate, r"bad\.safetensors"), (corrupt, r"bad\.safetensors"),
    (pickle_file, r"bad\.safetensors.*pickle"), (nan_file, r"bad\.safetensors.*NaN or Inf"),
    (inf_file, r"bad\.safetensors.*NaN or Inf"),
], ids=["truncated", "corrupt-header", "pickle-not-safetensors", "nan", "inf"])
def test_broken_files_are_refused_by_load_naming_the_file(nodes, loras, spoil, pattern):
    path = good_file(loras, "bad.safetensors")
    spoil(path)
    before = digest(path)
    with pytest.raises(ValueError, match=pattern):
        load_blora(nodes, "bad.safetensors")
    assert digest(path) == before


def test_sd15_keyed_lora_is_refused_naming_the_file(nodes, loras, tiny_model):
    sd15 = {}  # SD1.5 attention blocks SDXL lacks: input_blocks.1.1, output_blocks.9.1 (width 320, context 768)
    for block in ("input_blocks_1_1", "output_blocks_9_1"):
        for proj, (o, i) in {"attn1_to_q": (320, 320), "attn2_to_k": (320, 768)}.items():
            name = f"lora_unet_{block}_transformer_blocks_0_{proj}"
            sd15[name + ".lora_down.weight"] = torch.randn(4, i)
            sd15[name + ".lora_up.weight"] = torch.randn(o, 4)
            sd15[name + ".alpha"] = torch.tensor(4.0)
    path = write_lora(loras, "sd15.safetensors", sd15)
    before, file_before = model_state(tiny_model), digest(path)
    with pytest.raises(ValueError, match=r"sd15\.safetensors"):
        adapter = load_blora(nodes, "sd15.safetensors")
        run_node(nodes.apply.BLoRABlockWeights, model=tiny_model, blora=adapter, weights="")
    assert unchanged(tiny_model, before) and digest(path) == file_before


def test_full_width_lora_on_the_tiny_model_is_refused_naming_module_and_shapes(nodes, loras, tiny_model):
    full = {p: s for p, s in blora_shapes(FULL_ATTN_SHAPES).items() if ".transformer_blocks.0." in p}
    path = good_file(loras, "full_width.safetensors", shapes=full)
    adapter = load_blora(nodes, "full_width.safetensors")
    before, file_before = model_state(tiny_model), digest(path)
    with pytest.raises(ValueError, match=r"full_width\.safetensors: module 'output_blocks\.0\.1\.transformer_blocks"
                                         r"\.0\.attn\d\.to_\w+(\.0)?' expects a weight of shape \(1280, \d+\), "
                                         r"the model has \(128, \d+\)"):
        apply(nodes, tiny_model, content=adapter)
    with pytest.raises(ValueError, match=r"full_width\.safetensors.*expects a weight of shape"):
        run_node(nodes.apply.BLoRABlockWeights, model=tiny_model, blora=adapter, weights="style=1")
    assert unchanged(tiny_model, before) and digest(path) == file_before


def test_modules_missing_from_the_model_are_refused(nodes, loras, tiny_model):
    deep = {p: s for p, s in blora_shapes(FULL_ATTN_SHAPES).items() if ".transformer_blocks.7." in p}
    good_file(loras, "deep.safetensors", shapes=deep)
    adapter = load_blora(nodes, "deep.safetensors")
    before = model_state(tiny_model)
    with pytest.raises(ValueError, match=r"deep\.safetensors: module 'output_blocks\.1\.1\.transformer_blocks\.7\."
                                         r".*' does not exist in this model"):
        apply(nodes, tiny_model, style=adapter)
    assert unchanged(tiny_model, before)


def tiny_sd15_model():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from blora_testkit.tiny_sdxl import init_weights_

    config = comfy.supported_models.SD15(dict(SD15_TINY_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights_(model.diffusion_model, 0)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def test_non_sdxl_model_is_refused_naming_the_model_class(nodes, loras, comfy_host):
    good_file(loras, "good.safetensors")
    adapter = load_blora(nodes, "good.safetensors")
    model = tiny_sd15_model()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"SDXL-architecture model, got BaseModel \(SD15\): it has no attention "
                                         r"block output_blocks\.0\.1 \(content block\)"):
        apply(nodes, model, content=adapter)
    with pytest.raises(ValueError, match=r"got BaseModel \(SD15\)"):
        run_node(nodes.apply.BLoRABlockWeights, model=model, blora=adapter, weights="")
    assert unchanged(model, before)


def test_file_lacking_the_requested_role_names_file_and_role(nodes, loras, tiny_model):
    style_only = {p: s for p, s in TINY_ATTN_SHAPES.items() if p.startswith("output_blocks.1.1.")}
    path = good_file(loras, "style_only.safetensors", shapes=style_only)
    adapter = load_blora(nodes, "style_only.safetensors")
    before, file_before = model_state(tiny_model), digest(path)
    with pytest.raises(ValueError, match=r"style_only\.safetensors: no content block \(output_blocks\.0\.1, OUT0\) "
                                         r"in this file, given as content; it holds OUT1 \(style\)"):
        apply(nodes, tiny_model, content=adapter, style=adapter)
    with pytest.raises(ValueError, match=r"style_only\.safetensors: no layout block"):
        apply(nodes, tiny_model, layout=adapter)
    assert unchanged(tiny_model, before) and digest(path) == file_before


@pytest.mark.parametrize("text,pattern", [
    ("content=1, OUT9=0.5", r"line 1, item 2: 'OUT9=0\.5'.*unknown block 'OUT9'"),
    ("style=1\nstyle.transformer_blocks.0.attn3=0", r"line 2, item 1: 'style\.transformer_blocks\.0\.attn3=0'"),
    ("content=strong", r"'content=strong': 'strong' is not a number"),
])
def test_bad_block_weights_name_the_entry(nodes, loras, tiny_model, text, pattern):
    good_file(loras, "good.safetensors")
    adapter = load_blora(nodes, "good.safetensors")
    before = model_state(tiny_model)
    with pytest.raises(ValueError, match=pattern):
        run_node(nodes.apply.BLoRABlockWeights, model=tiny_model, blora=adapter, weights=text)
    assert unchanged(tiny_model, before)


def test_errors_are_the_packs_own_classes(nodes, loras, tiny_model):
    from blora.errors import ArchitectureError, BLoRAError, BlockNameError

    good_file(loras, "good.safetensors")
    adapter = load_blora(nodes, "good.safetensors")
    with pytest.raises(BlockNameError):
        run_node(nodes.apply.BLoRABlockWeights, model=tiny_model, blora=adapter, weights="OUT9=1")
    with pytest.raises(ArchitectureError):
        apply(nodes, tiny_sd15_model(), content=adapter)
    with pytest.raises(BLoRAError):
        apply(nodes, tiny_model, layout=adapter)


def test_modules_the_host_loader_skips_raise_instead_of_vanishing(nodes, loras, tiny_model, monkeypatch):
    import comfy.lora

    good_file(loras, "good.safetensors")
    adapter = load_blora(nodes, "good.safetensors")
    real = comfy.lora.load_lora

    def drops_one(state_dict, to_load, log_missing=True):
        patches = real(state_dict, to_load, log_missing)
        patches.pop(sorted(patches)[0])
        return patches

    monkeypatch.setattr(comfy.lora, "load_lora", drops_one)
    with pytest.raises(ValueError, match=r"good\.safetensors: the host's LoRA loader did not load 1 module\(s\): "
                                         r"output_blocks\.0\.1\.transformer_blocks\.0\.attn1\.to_k"):
        apply(nodes, tiny_model, content=adapter)


def test_patches_the_model_refuses_raise(nodes, loras, tiny_model, monkeypatch):
    import comfy.model_patcher

    good_file(loras, "good.safetensors")
    adapter = load_blora(nodes, "good.safetensors")
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "add_patches", lambda self, patches, *a, **k: [])
    with pytest.raises(ValueError, match=r"good\.safetensors: the model refused 8 patch\(es\)"):
        apply(nodes, tiny_model, style=adapter)
    assert not tiny_model.patches
