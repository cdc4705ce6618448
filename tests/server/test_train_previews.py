"""Train B-LoRA's validation previews and settings nodes through a real server (tiny checkpoint): the preview rows
arrive live (``blora.train.preview``, images the server serves) and in /history with the saved files beside the
trained file; the final grid is the node's IMAGE output; one row per seed; a workflow saved before the settings
moved to their own nodes still runs with the same settings, or fails saying what moved."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from blora_testkit.workflows import execution_error, load_api_example, read_image

np = pytest.importorskip("numpy")
OLD_WORKFLOWS = Path(__file__).resolve().parents[1] / "blora_testkit" / "old_workflows" / "api"
CHEAP = {"steps": 3, "resolution": 64, "rank": 4, "training_dtype": "fp32"}
VALIDATION_CHEAP = {"width": 64, "height": 64, "steps": 2, "every": 2}
SETTINGS_NODES = {"BLoRAAlgorithmOptions", "BLoRAAugmentation", "BLoRACheckpoints", "BLoRAMemoryOptions",
                  "BLoRAValidation"}


def write_png(path, seed=0):
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).uniform(0, 255, (64, 64, 3)).astype(np.uint8)).save(path)


def training_graph(server, prefix: str, **train) -> tuple[dict, str, str]:
    """train_then_apply, made cheap, its previews grid saved by a SaveImage: (graph, train id, validation id)."""
    write_png(server.input_dir / "subject.png")
    graph = load_api_example("train_then_apply", server.ckpt_name)
    train_id = next(k for k, n in graph.items() if n["class_type"] == "BLoRATrain")
    val_id = next(k for k, n in graph.items() if n["class_type"] == "BLoRAValidation")
    apply_id = next(k for k, n in graph.items() if n["class_type"] == "BLoRAApply")
    graph[apply_id]["inputs"].pop("style")  # no second B-LoRA file: the content of the trained one alone
    graph[train_id]["inputs"].update(CHEAP, filename_prefix=prefix, **train)
    graph[val_id]["inputs"].update(VALIDATION_CHEAP)
    graph["grid"] = {"class_type": "SaveImage", "inputs": {"images": [train_id, 3], "filename_prefix": "grids/g"}}
    return graph, train_id, val_id


def test_settings_nodes_are_served_with_the_recipe_defaults(server):
    info = server.object_info()
    assert SETTINGS_NODES <= set(info)
    train = info["BLoRATrain"]["input"]
    assert set(train["optional"]) >= {"algorithm_options", "augmentation", "checkpoints", "memory", "validation"}
    memory = info["BLoRAMemoryOptions"]["input"]["required"]
    options = memory["gradient_checkpointing"]
    assert (options[1]["options"] if options[0] == "COMBO" else options[0]) == ["off", "trained blocks", "all above"]
    assert options[1]["default"] == "trained blocks" and memory["offload"][1]["default"] is False
    assert info["BLoRATrain"]["output"][3] == "IMAGE"


def test_preview_rows_arrive_live_and_in_history_with_their_files(server):
    graph, train_id, _ = training_graph(server, "previews/run")
    pid, msgs = server.run(graph, timeout=300)
    live = [m["data"] for m in msgs if m["type"] == "blora.train.preview"]
    assert [(e["step"], e["seed"], e["node"]) for e in live] == [(0, 0, train_id), (2, 0, train_id),
                                                                 (3, 0, train_id)]
    for e in live:  # the server serves each live row
        status, body = server.request("GET", "/view?" + "&".join(f"{k}={v}" for k, v in e["image"].items()))
        assert status == 200 and str(body)[1:4] == "PNG"
    out = server.history(pid)["outputs"][train_id]
    rows = out["previews"]
    assert [(r["step"], r["seed"]) for r in rows] == [(0, 0), (2, 0), (3, 0)]
    folder = server.output_dir / "loras" / "previews"
    assert sorted(p.name for p in folder.iterdir()) == [
        "run_00001_.safetensors", "run_00001_preview_step000000.png", "run_00001_preview_step000002.png",
        "run_00001_preview_step000003.png"]
    assert all(r["subfolder"] == "loras/previews" and r["type"] == "output" for r in rows)
    assert out["preview_seconds"][0] > 0 and len(out["loss"]) == 3
    last = read_image(folder / rows[-1]["filename"])
    assert last.shape == (64, 192, 3)
    content, style, both = np.split(last.astype(int), 3, axis=1)
    assert np.abs(content - both).max() > 0 and np.abs(style - both).max() > 0
    grid = read_image(next(f for f in server.outputs_by_node(pid)["grid"]))
    assert np.abs(grid.astype(int) - last.astype(int)).max() <= 1  # the IMAGE output is the last row


def test_seeds_get_a_row_each(server):
    graph, train_id, _ = training_graph(server, "previews/seeds", seeds=2, seed=4)
    pid, msgs = server.run(graph, timeout=300)
    rows = server.history(pid)["outputs"][train_id]["previews"]
    assert [(r["step"], r["seed"]) for r in rows] == [(0, 4), (0, 5), (2, 4), (2, 5), (3, 4), (3, 5)]
    grid = read_image(next(f for f in server.outputs_by_node(pid)["grid"]))
    assert grid.shape == (128, 192, 3) and np.abs(grid[:64].astype(int) - grid[64:].astype(int)).max() > 0


def old_workflow(server, name: str) -> tuple[dict, str]:
    graph = json.loads((OLD_WORKFLOWS / f"{name}.json").read_text())
    for node in graph.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = server.ckpt_name
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
        if node["class_type"] == "BLoRAApply":
            node["inputs"].pop("style", None)
    train_id = next(k for k, n in graph.items() if n["class_type"] == "BLoRATrain")
    return graph, train_id


def test_a_workflow_saved_before_the_split_trains_with_the_same_settings(server):
    from blora.formats.files import read_adapter

    write_png(server.input_dir / "subject.png")
    graph, train_id = old_workflow(server, "train_then_apply")
    inputs = graph[train_id]["inputs"]
    assert {"optimizer", "weight_decay", "save_precision", "gradient_checkpointing", "adalora_orth_reg"} <= set(inputs)
    inputs.update(CHEAP, weight_decay=0.25, flip=True, grad_accumulation=2, save_precision="fp32",
                  filename_prefix="old/run")
    server.run(graph, timeout=300)
    meta = read_adapter(next((server.output_dir / "loras" / "old").glob("*.safetensors"))).metadata
    assert {k: meta[f"blora.train.{k}"] for k in ("weight_decay", "flip", "grad_accumulation", "save_precision",
                                                   "gradient_checkpointing", "steps")} == {
        "weight_decay": "0.25", "flip": "True", "grad_accumulation": "2", "save_precision": "fp32",
        "gradient_checkpointing": "trained blocks", "steps": "3"}


def test_an_old_input_beside_its_settings_node_fails_saying_what_moved(server):
    write_png(server.input_dir / "subject.png")
    graph, train_id = old_workflow(server, "train_then_apply")
    graph[train_id]["inputs"].update(CHEAP, weight_decay=0.25, filename_prefix="old/conflict")
    graph["opts"] = {"class_type": "BLoRAAlgorithmOptions", "inputs": {
        "rslora": False, "init": "gaussian", "optimizer": "AdamW", "weight_decay": 1e-4, "loraplus_ratio": 1.0,
        "dora_wd": False, "lokr_factor": -1, "lokr_decompose_both": False, "lokr_full_matrix": False,
        "adalora_target_rank": 0, "adalora_warmup": 0.1, "adalora_final": 0.2, "adalora_interval": 10,
        "adalora_orth_reg": 0.5}}
    graph[train_id]["inputs"]["algorithm_options"] = ["opts", 0]
    pid, msgs = server.run(copy.deepcopy(graph), timeout=300, expect_success=False)
    error = execution_error(msgs)
    assert error is not None and error["node_id"] == train_id
    assert "`weight_decay` moved from Train B-LoRA to the B-LoRA Algorithm Options node" in error["exception_message"]
    assert not (server.output_dir / "loras" / "old" / "conflict_00001_.safetensors").exists()
