"""Load B-LoRA in the real host: its outputs, UI block map, file listing and re-run fingerprint."""
from __future__ import annotations

import json
import os

import pytest

from blora_testkit.dialects import TINY_ATTN_SHAPES, blora_shapes, make_state_dict
from blora_testkit.nodes import fingerprint, run_node, write_lora

UI_KEYS = {"dialect", "roles", "blocks", "ranks", "alpha", "num_params", "file"}


@pytest.fixture
def loader(pack):
    return pack.nodes.load.BLoRALoader


def test_outputs_adapter_trigger_summary_and_block_map(loader, host_dirs):
    sd = make_state_dict("diffusers", blora_shapes(TINY_ATTN_SHAPES), rank=4, seed=0)
    write_lora(host_dirs / "models" / "blora", "subject.safetensors", sd, {"ss_instance_prompt": "A [v]"})
    (adapter, trigger, summary, _losses), ui = run_node(loader, lora_name="subject.safetensors")
    assert adapter.roles() == ["content", "style"]
    assert len(adapter.modules) == len(blora_shapes(TINY_ATTN_SHAPES))
    assert adapter.source.endswith("subject.safetensors")
    assert trigger == "A [v]"
    assert "\n" not in summary and "content, style" in summary and "diffusers" in summary
    assert list(ui) == ["blora"] and len(ui["blora"]) == 1
    info = ui["blora"][0]
    assert UI_KEYS <= set(info)
    assert info["blocks"] == ["OUT0", "OUT1"] and info["roles"] == ["content", "style"]
    assert info["ranks"] == [4] and info["alpha"] is None and info["dialect"] == "diffusers"
    assert info["file"] == "subject.safetensors"
    assert info["num_params"] == sum(t.numel() for t in sd.values())
    assert json.loads(json.dumps(ui)) == ui  # what the server sends over the websocket


def test_trigger_is_empty_without_metadata_and_alpha_is_reported(loader, host_dirs):
    sd = make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES, blocks=("input_blocks.8.1",)), 4, 1, alpha=2.0)
    write_lora(host_dirs / "models" / "loras", "layout.safetensors", sd)
    (adapter, trigger, summary, _losses), ui = run_node(loader, lora_name="layout.safetensors")
    assert trigger == ""
    assert ui["blora"][0]["alpha"] == [2.0] and ui["blora"][0]["blocks"] == ["IN08"]
    assert "layout" in summary and adapter.roles() == ["layout"]


def test_outputs_match_the_schema(loader):
    schema = loader.GET_SCHEMA()
    assert [o.io_type for o in schema.outputs] == ["BLORA", "STRING", "STRING", "LOSS_MAP"]
    assert [i.id for i in schema.inputs] == ["lora_name"]
    assert loader.GET_NODE_INFO_V1()["category"] == "B-LoRA"
    assert loader.GET_NODE_INFO_V1()["display_name"] == "Load B-LoRA"
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs) and schema.description


def test_lists_files_from_both_blora_and_loras_folders(loader, host_dirs):
    sd = make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES), 4, 0)
    write_lora(host_dirs / "models" / "blora", "in_blora.safetensors", sd)
    write_lora(host_dirs / "models" / "loras", "in_loras.safetensors", sd)
    (host_dirs / "models" / "loras" / "notes.txt").write_text("not an adapter")
    options = loader.GET_NODE_INFO_V1()["input"]["required"]["lora_name"][1]["options"]
    assert options == ["in_blora.safetensors", "in_loras.safetensors"]
    for name in options:
        (adapter, _, _, _), _ = run_node(loader, lora_name=name)
        assert adapter.roles() == ["content", "style"]


def test_fingerprint_follows_file_changes(loader, host_dirs):
    path = write_lora(host_dirs / "models" / "loras", "x.safetensors",
                      make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES), 4, 0))
    first = fingerprint(loader, lora_name="x.safetensors")
    assert fingerprint(loader, lora_name="x.safetensors") == first
    write_lora(path.parent, path.name, make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES), 8, 0))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert fingerprint(loader, lora_name="x.safetensors") != first
    (adapter, _, _, _), _ = run_node(loader, lora_name="x.safetensors")
    assert {m.rank for m in adapter.modules.values()} == {8}


def test_missing_file_names_it(loader, host_dirs):
    assert fingerprint(loader, lora_name="gone.safetensors") == ("gone.safetensors",)
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        run_node(loader, lora_name="gone.safetensors")
