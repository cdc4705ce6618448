"""The style-grid example through a real server: one prompt, four style B-LoRAs, one KSampler at batch 4; image i
equals image i of a separate Apply B-LoRA + KSampler run of style i (same batch, so the same noise per image)."""
from __future__ import annotations

import copy

import pytest
import torch

from blora_testkit.loras import ROLE_BLOCKS, attention_shapes, make_pairs, write_original
from blora_testkit.workflows import load_api_example, read_image, read_latent

np = pytest.importorskip("numpy")

EXAMPLE = "style_grid"
BATCH = 4
LATENT_RTOL = 1e-5  # routed deltas vs patched weights: float32 rounding only


def prepared(server) -> dict:
    graph = load_api_example(EXAMPLE, server.ckpt_name)
    shapes = attention_shapes(server.models_dir / "checkpoints" / server.ckpt_name)
    for nid, node in graph.items():
        if node["class_type"] == "BLoRALoader":
            pairs = make_pairs(shapes, ROLE_BLOCKS.values(), seed=100 + int(nid), up_std=0.5)
            node["inputs"]["lora_name"] = write_original(server.models_dir / "loras" / f"grid_{nid}.safetensors",
                                                         pairs).name
        elif node["class_type"] == "EmptyLatentImage":
            node["inputs"]["batch_size"] = BATCH
    sampler = next(nid for nid, node in graph.items() if node["class_type"] == "KSampler")
    graph["latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                              "filename_prefix": "latents/grid"}}
    return graph


def separate(graph: dict, entry_id: str) -> dict:
    """The graph with Batch Apply replaced by Apply B-LoRA of that entry's inputs (every image uses it)."""
    g = copy.deepcopy(graph)
    apply_id = next(nid for nid, node in g.items() if node["class_type"] == "BLoRABatchApply")
    entry = {k: v for k, v in g[entry_id]["inputs"].items() if k != "batch"}
    g[apply_id] = {"class_type": "BLoRAApply", "inputs": {**entry, "model": g[apply_id]["inputs"]["model"]}}
    for nid in [n for n, node in g.items() if node["class_type"] == "BLoRABatchEntry"]:
        del g[nid]
    return g


def outputs(server, graph):
    pid, _msgs = server.run(graph, timeout=240)
    files = server.output_files(pid)
    return (read_latent(next(f for f in files if f.suffix == ".latent")),
            read_image(next(f for f in files if f.suffix == ".png")))


def test_style_grid_images_equal_separate_apply_runs(server):
    graph = prepared(server)
    latent, grid = outputs(server, graph)
    assert latent.shape == (BATCH, 4, 8, 8)
    assert grid.shape == (128, 128, 3)  # 2 x 2 images of 64 px
    entries = sorted((nid for nid, node in graph.items() if node["class_type"] == "BLoRABatchEntry"), key=int)
    assert len(entries) == BATCH
    for i, entry_id in enumerate(entries):
        alone_latent, alone_grid = outputs(server, separate(graph, entry_id))
        err = (latent[i] - alone_latent[i]).abs().max().item()
        assert err <= LATENT_RTOL * alone_latent[i].abs().max().item(), f"image {i}: latent differs by {err}"
        r, c = divmod(i, 2)
        cell = (slice(64 * r, 64 * r + 64), slice(64 * c, 64 * c + 64))
        diff = np.abs(grid[cell].astype(int) - alone_grid[cell].astype(int)).max()
        assert diff <= 1, f"image {i}: grid cell differs by {diff} levels"
    assert min((latent[i] - latent[j]).abs().max().item() for i in range(BATCH) for j in range(i)) > 1e-2
