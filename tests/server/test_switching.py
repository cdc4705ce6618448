"""Switching adapters without reloading: 50 prompts queued on one server alternate between two B-LoRAs and between
Apply B-LoRA, B-LoRA Strength Schedule and K-LoRA Fuse on the same base model. The checkpoint is loaded once (its
loader is cached in every later prompt), resident memory stays flat, and the same configuration gives the same
latent whenever it comes back (switching leaves nothing behind in the base weights)."""
from __future__ import annotations

import statistics

import torch

from blora_testkit.loras import ROLE_BLOCKS, attention_shapes, make_pairs, write_original
from blora_testkit.workflows import read_latent

PROMPTS = 50
KINDS = ("apply", "schedule", "klora")
CYCLE = 6  # configurations repeat every lcm(2 adapters, 3 kinds) prompts
RSS_GROWTH_LIMIT = 40 * 2 ** 20  # bytes between the second decile and the last decile of prompts


def model_node(kind: str) -> dict:
    if kind == "apply":
        return {"class_type": "BLoRAApply", "inputs": {
            "model": ["1", 0], "content": ["2", 0], "style": ["2", 0], "content_strength": 1.0,
            "style_strength": 0.8, "layout_strength": 1.0, "strength_mode": "linear"}}
    if kind == "schedule":
        return {"class_type": "BLoRASchedule", "inputs": {
            "model": ["1", 0], "content": ["2", 0], "style": ["2", 0], "content_schedule": "1.0",
            "style_schedule": "0:0, 1:1", "layout_schedule": "1.0"}}
    return {"class_type": "KLoRAFuse", "inputs": {
        "model": ["1", 0], "subject": ["2", 0], "style": ["3", 0], "subject_strength": 1.0, "style_strength": 1.0,
        "pattern": "s"}}


def graph(ckpt: str, kind: str, first: str, second: str, seed: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "BLoRALoader", "inputs": {"lora_name": first}},
        "3": {"class_type": "BLoRALoader", "inputs": {"lora_name": second}},
        "4": model_node(kind),
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "seed": seed,
            "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": prefix}},
    }


def test_fifty_prompts_switch_adapters_without_reloading(server):
    shapes = attention_shapes(server.models_dir / "checkpoints" / server.ckpt_name)
    names = []
    for seed in (1, 2):
        pairs = make_pairs(shapes, list(ROLE_BLOCKS.values()), seed=seed, up_std=0.3)
        names.append(write_original(server.models_dir / "blora" / f"switch_{seed}.safetensors", pairs).name)
    rss, latents, loads = [], {}, 0
    for i in range(PROMPTS):
        first, second = (names[0], names[1]) if i % 2 == 0 else (names[1], names[0])
        kind = KINDS[i % len(KINDS)]
        pid, messages = server.run(graph(server.ckpt_name, kind, first, second, seed=i % CYCLE,
                                         prefix=f"switch/{i:02d}"), timeout=120)
        executed = {m["data"].get("node") for m in messages if m["type"] == "executing"}
        loads += "1" in executed
        if i > 0:
            cached = {n for m in messages if m["type"] == "execution_cached" for n in m["data"]["nodes"]}
            assert "1" in cached, f"prompt {i}: the checkpoint loader ran again"
        latents[i] = read_latent(next(f for f in server.output_files(pid) if f.suffix == ".latent"))
        rss.append(server.rss())
    assert loads == 1
    for i in range(CYCLE, PROMPTS):  # the same configuration again, after five others: the same latent
        assert torch.equal(latents[i], latents[i - CYCLE]), f"prompt {i} differs from prompt {i - CYCLE}"
    assert not torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], latents[2])
    early, late = statistics.median(rss[5:15]), statistics.median(rss[-10:])
    report = (f"RSS over {PROMPTS} prompts: first {rss[0] / 2 ** 20:.1f} MiB, prompts 6-15 median "
              f"{early / 2 ** 20:.1f} MiB, last 10 median {late / 2 ** 20:.1f} MiB, max {max(rss) / 2 ** 20:.1f} MiB")
    print(report)
    assert late - early < RSS_GROWTH_LIMIT, report
