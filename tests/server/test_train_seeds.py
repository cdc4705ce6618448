"""Train B-LoRA with seeds = 2 through a real server: one file per seed, the progress events and the node's UI output
carry one loss per seed, and a second prompt samples both trained seeds side by side with B-LoRA Batch Apply."""
from __future__ import annotations

import pytest
import torch

from blora_testkit.workflows import read_latent

np = pytest.importorskip("numpy")

TRAIN = {"blocks": "content+style", "layer_filter": "", "rank": 4, "alpha": 4.0, "algorithm": "LoRA",
         "rslora": False, "learning_rate": 1e-2, "loraplus_ratio": 1.0, "optimizer": "AdamW", "weight_decay": 1e-4,
         "steps": 3, "batch_size": 1, "grad_accumulation": 1, "resolution": 64, "flip": False, "seed": 7,
         "training_dtype": "fp32", "gradient_checkpointing": True, "save_every": 0,
         "filename_prefix": "seeds/subject", "resume_from": "none", "seeds": 2, "seed_draws": "shared",
         "save_precision": "fp32"}


def write_png(path):
    from PIL import Image

    gen = np.random.default_rng(0)
    Image.fromarray(gen.uniform(0, 255, (64, 64, 3)).astype(np.uint8)).save(path)


def train_graph(ckpt):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "subject.png"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "A [v]", "clip": ["1", 1]}},
        "4": {"class_type": "BLoRATrain", "inputs": {**TRAIN, "model": ["1", 0], "vae": ["1", 2],
                                                      "images": ["2", 0], "positive": ["3", 0]}},
    }


def grid_graph(ckpt, files):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    batch = None
    for i, name in enumerate(files):
        g[f"l{i}"] = {"class_type": "BLoRALoader", "inputs": {"lora_name": name}}
        g[f"e{i}"] = {"class_type": "BLoRABatchEntry", "inputs": {
            "content": [f"l{i}", 0], "style": [f"l{i}", 0], "content_strength": 1.0, "style_strength": 1.0,
            "layout_strength": 1.0, "strength_mode": "linear", **({"batch": batch} if batch else {})}}
        batch = [f"e{i}", 0]
    g.update({
        "a": {"class_type": "BLoRABatchApply", "inputs": {"model": ["1", 0], "batch": batch}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"text": "A [v]", "clip": ["1", 1]}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "z": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": len(files)}},
        "k": {"class_type": "KSampler", "inputs": {"model": ["a", 0], "positive": ["p", 0], "negative": ["n", 0],
                                                   "latent_image": ["z", 0], "seed": 0, "steps": 2, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "s": {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "latents/seeds"}},
    })
    return g


def test_seeds_train_in_one_prompt_and_sample_side_by_side(server):
    write_png(server.input_dir / "subject.png")
    pid, msgs = server.run(train_graph(server.ckpt_name), timeout=240)
    folder = server.output_dir / "loras" / "seeds"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == ["subject_seed7_00001_.safetensors", "subject_seed8_00001_.safetensors"]
    events = [m["data"] for m in msgs if m["type"] == "blora.train.progress"]
    assert [e["step"] for e in events] == [1, 2, 3]
    assert all(len(e["losses"]) == 2 and e["seeds"] == [7, 8] for e in events)
    ui = server.history(pid)["outputs"]["4"]
    assert ui["seeds"] == [7, 8] and [len(v) for v in ui["seed_losses"]] == [3, 3]
    assert [e["losses"] for e in events] == [list(v) for v in zip(*ui["seed_losses"])]

    from blora.formats.files import read_adapter

    a, b = (read_adapter(folder / f) for f in files)
    path = sorted(a.modules)[0]
    assert not torch.equal(a.modules[path].tensors["down"], b.modules[path].tensors["down"])

    pid, _msgs = server.run(grid_graph(server.ckpt_name, [f"seeds/{f}" for f in files]), timeout=240)
    latent = read_latent(next(f for f in server.output_files(pid) if f.suffix == ".latent"))
    assert latent.shape[0] == 2 and (latent[0] - latent[1]).abs().max() > 1e-3
