"""The UI outputs the front end draws (Load B-LoRA's block map) reach the page and /history also when the node was
cached: 0.3.64 keeps cached nodes' UI outputs in /history by itself; 0.33 does so (and sends ``executed`` again)
only for nodes that declare ``has_intermediate_output``, which Load B-LoRA does where the host has it."""
from __future__ import annotations

from blora_testkit.loras import ROLE_BLOCKS, attention_shapes, make_pairs, write_original
from blora_testkit.workflows import load_api_example

LORA = "ui_outputs_blora.safetensors"


def _loader_outputs(server, pid, messages) -> tuple[dict, dict]:
    """({node: blora UI output} from /history, {node: blora UI output} from `executed` messages)."""
    outputs = server.history(pid)["outputs"]
    history = {k: v["blora"] for k, v in outputs.items() if "blora" in v}
    sent = {m["data"]["node"]: m["data"]["output"]["blora"] for m in messages
            if m["type"] == "executed" and "blora" in (m["data"].get("output") or {})}
    return history, sent


def test_block_map_output_survives_a_cached_run(server):
    shapes = attention_shapes(server.models_dir / "checkpoints" / server.ckpt_name)
    write_original(server.models_dir / "blora" / LORA,
                   make_pairs(shapes, [ROLE_BLOCKS["content"], ROLE_BLOCKS["style"]], rank=4, seed=3))
    graph = load_api_example("style_transfer", server.ckpt_name, lora_name=LORA)
    loaders = sorted(k for k, v in graph.items() if v["class_type"] == "BLoRALoader")
    assert loaders

    pid, messages = server.run(graph, timeout=120)
    first, sent = _loader_outputs(server, pid, messages)
    assert sorted(first) == loaders and sorted(sent) == loaders
    assert all(out[0]["blocks"] == ["OUT0", "OUT1"] and out[0]["file"] == LORA for out in first.values()), first

    pid, messages = server.run(graph, timeout=120)  # same graph: every node is cached
    assert not any(m["type"] == "executing" and m["data"].get("node") in loaders for m in messages)
    again, resent = _loader_outputs(server, pid, messages)
    assert again == first  # what the front end replays after a cached run (restore_outputs.js)
    assert all(resent[k] == first[k] for k in resent)  # 0.33 sends them again; 0.3.64 sends none
