"""Save B-LoRA and Merge B-LoRA in the host: files in output/loras with the host's counter names, splits by role or
block, every format, a saved kohya file in stock LoraLoaderModelOnly equals Apply B-LoRA on the source, merges, and
bad input that writes nothing."""
from __future__ import annotations

import importlib
import shutil

import pytest
import torch
from blora_testkit.dynamic import make_lora, run, sample

from blora.adapters.adapter import Adapter, delta_weight
from blora.errors import BLoRAError, BlockNameError, UnsafePathError
from blora.formats.files import read_adapter

CONTENT, STYLE, LAYOUT, OUT2 = "output_blocks.0.1", "output_blocks.1.1", "input_blocks.8.1", "output_blocks.2.1"


@pytest.fixture
def tools(pack):
    module = importlib.import_module(pack.__name__ + ".nodes.tools")
    return module.BLoRASave, module.BLoRAMerge


@pytest.fixture
def apply_node(pack):
    return importlib.import_module(pack.__name__ + ".nodes.apply").BLoRAApply


@pytest.fixture
def full_lora(tiny_model):
    lora = make_lora(tiny_model, [CONTENT, STYLE, LAYOUT, OUT2], seed=21, source="full.safetensors")
    return Adapter(lora.modules, source=lora.source, dialect="kohya", metadata={"ss_note": "kept"}, trigger="sks")


def save(node, **inputs):
    from blora_testkit.nodes import run_node

    result, ui = run_node(node, **inputs)
    return ui


def blocks_of(adapter):
    return {b.ldm for b in adapter.blocks()}


def loras_dir(host_dirs):
    return host_dirs / "output" / "loras"


def test_save_names_metadata_and_round_trip(host_dirs, tools, full_lora):
    save_node, _ = tools
    ui = save(save_node, blora=full_lora, filename_prefix="mine/full", roles="all", format="kohya", dtype="fp32")
    assert ui["blora_files"] == [{"filename": "full_00001_.safetensors", "subfolder": "loras/mine", "type": "output"}]
    ui2 = save(save_node, blora=full_lora, filename_prefix="mine/full", roles="all", format="kohya", dtype="fp32")
    assert ui2["blora_files"][0]["filename"] == "full_00002_.safetensors"
    back = read_adapter(loras_dir(host_dirs) / "mine" / "full_00001_.safetensors")
    assert back.modules.keys() == full_lora.modules.keys()
    for path, module in full_lora.modules.items():
        torch.testing.assert_close(delta_weight(back.modules[path]), delta_weight(module))
    meta = back.metadata
    assert meta["blora.roles"] == "layout,content,style" and meta["blora.rank"] == "4" and meta["blora.alpha"] == "4"
    assert meta["blora.trigger"] == "sks" and meta["blora.sources"] == "full.safetensors"
    assert meta["ss_note"] == "kept" and meta["blora.selection"] == "all"


@pytest.mark.parametrize("roles, blocks", [
    ("content", {CONTENT}), ("style", {STYLE}), ("layout", {LAYOUT}),
    ("OUT0, up_blocks.0.attentions.1", {CONTENT, STYLE}), ("output_blocks.2.1", {OUT2})])
def test_split_by_roles_and_block_names(host_dirs, tools, full_lora, roles, blocks):
    save_node, _ = tools
    ui = save(save_node, blora=full_lora, filename_prefix="split", roles=roles, format="kohya", dtype="fp16")
    back = read_adapter(loras_dir(host_dirs) / ui["blora_files"][0]["filename"])
    assert blocks_of(back) == blocks
    assert len(back.modules) == sum(1 for p in full_lora.modules if p.split(".transformer_blocks")[0] in blocks)
    for path, module in back.modules.items():
        assert module.tensors["up"].dtype == torch.float16
        torch.testing.assert_close(delta_weight(module), delta_weight(full_lora.modules[path]), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("fmt, key", [("comfy", "diffusion_model.output_blocks.1.1."),
                                      ("diffusers", "unet.up_blocks.0.attentions.1."),
                                      ("kohya", "lora_unet_output_blocks_1_1_")])
def test_formats(host_dirs, tools, full_lora, fmt, key):
    from safetensors import safe_open

    save_node, _ = tools
    ui = save(save_node, blora=full_lora, filename_prefix=fmt, roles="style", format=fmt, dtype="bf16")
    path = loras_dir(host_dirs) / ui["blora_files"][0]["filename"]
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith(key) for k in f.keys())
    back = read_adapter(path)
    for p, module in back.modules.items():
        torch.testing.assert_close(delta_weight(module), delta_weight(full_lora.modules[p]), atol=2e-2, rtol=2e-2)


def test_saved_kohya_file_in_stock_lora_loader_equals_apply_blora(host_dirs, tools, apply_node, full_lora,
                                                                    tiny_model):
    import nodes as host_nodes  # the host's nodes.py (LoraLoaderModelOnly)

    save_node, _ = tools
    ui = save(save_node, blora=full_lora, filename_prefix="cs", roles="content,style", format="kohya", dtype="fp32")
    name = ui["blora_files"][0]["filename"]
    shutil.copy(loras_dir(host_dirs) / name, host_dirs / "models" / "loras" / name)
    stock = host_nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_model, name, 1.0)[0]
    applied = run(apply_node, model=tiny_model, content=full_lora, style=full_lora)
    assert torch.equal(sample(stock), sample(applied))
    assert not torch.equal(sample(stock), sample(tiny_model))


def test_merge_takes_each_role_from_its_own_file(host_dirs, tools, apply_node, tiny_model):
    save_node, merge_node = tools
    a = make_lora(tiny_model, [CONTENT, STYLE], seed=31, source="a.safetensors")
    b = make_lora(tiny_model, [CONTENT, STYLE, LAYOUT], seed=32, source="b.safetensors")
    merged = run(merge_node, content=a, style=b)
    assert blocks_of(merged) == {CONTENT, STYLE}
    for path, module in merged.modules.items():
        assert module is (a if path.startswith(CONTENT) else b).modules[path]
    ui = save(save_node, blora=merged, filename_prefix="ab", roles="all", format="kohya", dtype="fp32")
    back = read_adapter(loras_dir(host_dirs) / ui["blora_files"][0]["filename"])
    assert "content=a.safetensors" in back.metadata["blora.sources"]
    assert "style=b.safetensors" in back.metadata["blora.sources"]
    from_file = run(apply_node, model=tiny_model, content=back, style=back)
    direct = run(apply_node, model=tiny_model, content=a, style=b)
    assert torch.equal(sample(from_file), sample(direct))
    with_layout = run(merge_node, content=a, style=b, layout=b)
    assert blocks_of(with_layout) == {CONTENT, STYLE, LAYOUT}


def test_bad_input_writes_nothing(host_dirs, tools, full_lora, tiny_model):
    save_node, merge_node = tools
    outside = host_dirs / "evil_00001_.safetensors"
    cases = [
        (dict(roles=" , "), BLoRAError, "empty selection"),
        (dict(roles=""), BLoRAError, "empty selection"),
        (dict(roles="content, OUT9"), BlockNameError, "OUT9"),
        (dict(filename_prefix="../evil"), UnsafePathError, "escape"),
        (dict(filename_prefix=str(host_dirs / "evil")), UnsafePathError, "escape"),
        (dict(filename_prefix=" "), BLoRAError, "filename_prefix is empty"),
    ]
    for overrides, error, fragment in cases:
        inputs = dict(blora=full_lora, filename_prefix="ok", roles="all", format="kohya", dtype="fp16")
        inputs.update(overrides)
        with pytest.raises(error, match=fragment):
            save(save_node, **inputs)
    style_only = make_lora(tiny_model, [STYLE], seed=5, source="style_only.safetensors")
    with pytest.raises(BLoRAError, match="style_only.safetensors: none of the blocks 'content'.*OUT1"):
        save(save_node, blora=style_only, filename_prefix="x", roles="content", format="kohya", dtype="fp16")
    huge = Adapter({p: type(m)("lora", {"down": m.tensors["down"], "up": m.tensors["up"] * 1e6}, alpha=m.alpha)
                    for p, m in style_only.modules.items()}, source="huge.safetensors")
    with pytest.raises(BLoRAError, match="NaN or Inf"):
        save(save_node, blora=huge, filename_prefix="huge", roles="all", format="kohya", dtype="fp16")
    with pytest.raises(BLoRAError, match="connect at least one"):
        run(merge_node)
    with pytest.raises(BLoRAError, match="style_only.safetensors: no content block"):
        run(merge_node, content=style_only)
    written = list(loras_dir(host_dirs).rglob("*.safetensors")) if loras_dir(host_dirs).exists() else []
    assert written == [] and not outside.exists()
