"""Train B-LoRA's settings nodes: together with the node they hold every setting the node had before the split (the
paper's recipe by default), a graph wired with them trains exactly what the old single node trained, and the old
inputs still run (API workflows saved before the split) or fail saying what moved."""
from __future__ import annotations

import importlib

import pytest
import torch
from blora_testkit.nodes import run_node
from blora_testkit.train_fixtures import model, node, one_thread, vae  # noqa: F401
from blora_testkit.tiny_sdxl import tiny_conditioning

from blora.errors import BLoRAError
from blora.formats.files import read_adapter

# Train B-LoRA's inputs before the split (the example workflows of that time are test fixtures in
# tests/blora_testkit/old_workflows).
OLD_INPUTS = ["model", "vae", "images", "positive", "blocks", "layer_filter", "rank", "alpha", "algorithm", "rslora",
              "learning_rate", "loraplus_ratio", "optimizer", "weight_decay", "steps", "batch_size",
              "grad_accumulation", "resolution", "flip", "seed", "training_dtype", "gradient_checkpointing",
              "save_every", "filename_prefix", "resume_from", "init", "training_set", "random_crop", "color_jitter",
              "save_precision", "seeds", "seed_draws", "dora_wd", "lokr_factor", "lokr_decompose_both",
              "lokr_full_matrix", "adalora_target_rank", "adalora_warmup", "adalora_final", "adalora_interval",
              "adalora_orth_reg"]
GROUP_NODES = {"algorithm_options": "BLoRAAlgorithmOptions", "augmentation": "BLoRAAugmentation",
               "checkpoints": "BLoRACheckpoints", "memory": "BLoRAMemoryOptions"}
MAIN = dict(blocks="content+style", layer_filter="", rank=4, alpha=4.0, algorithm="LoRA", learning_rate=1e-2, steps=3,
            resolution=64, seed=0, seeds=1, seed_draws="shared", training_dtype="fp32", filename_prefix="s/blora")
MOVED = dict(rslora=True, init="kaiming_uniform", optimizer="AdamW", weight_decay=1e-3, loraplus_ratio=4.0, flip=True,
             batch_size=1, grad_accumulation=2, gradient_checkpointing=False, save_every=0, save_precision="fp32",
             resume_from="none")


@pytest.fixture
def settings(pack):
    return importlib.import_module(pack.__name__ + ".nodes.train_settings")


def schema_inputs(cls) -> dict:
    return {i.id: i for i in cls.define_schema().inputs}


def test_node_and_settings_nodes_hold_every_old_input_with_the_recipe_defaults(node, settings):
    from blora.train.recipe import TrainConfig

    main = schema_inputs(node)
    groups = {key: schema_inputs(cls) for key, cls in zip(settings.GROUPS, settings.SETTINGS_NODES)}
    assert [cls.define_schema().node_id for cls in settings.SETTINGS_NODES] == list(GROUP_NODES.values())
    names = [n for n in main if n not in GROUP_NODES and n != "validation"] + [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(OLD_INPUTS + ["offload"]) and len(names) == len(set(names))
    assert len([i for i in main.values() if not i.optional]) <= 15  # down from 41 inputs
    d = TrainConfig()
    for inputs in [main, *groups.values()]:
        for name, i in inputs.items():
            if hasattr(d, name):
                assert i.default == d.gradient_checkpointing if name == "gradient_checkpointing" else \
                    i.default == getattr(d, name), name
    assert groups["memory"]["gradient_checkpointing"].options == ["off", "trained blocks", "all above"]
    assert d.gradient_checkpointing == "trained blocks" and d.offload is False


def image():
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))


def train(node, model, vae, **inputs):
    (_m, blora, _l, _p), ui = run_node(node, hidden={"UNIQUE_ID": "3"}, model=model, vae=vae, images=image(),
                                       positive=tiny_conditioning(0), **MAIN, **inputs)
    return blora


def group_values(settings, moved: dict) -> dict:
    """The settings nodes' outputs for ``moved`` (run as the executor runs them), keyed by Train B-LoRA input."""
    out = {}
    for key, cls in zip(settings.GROUPS, settings.SETTINGS_NODES):
        names = settings.GROUPS[key].names()
        defaults = {n: i.default for n, i in schema_inputs(cls).items()}
        (value,), _ = run_node(cls, **{n: moved.get(n, defaults[n]) for n in names})
        out[key] = value
    return out


def test_settings_nodes_train_exactly_what_the_old_inputs_trained(node, settings, model, vae, host_dirs):
    old = train(node, model, vae, **MOVED)
    new = train(node, model, vae, **group_values(settings, MOVED))
    files = sorted((host_dirs / "output" / "loras" / "s").glob("*.safetensors"))
    assert len(files) == 2
    a, b = (read_adapter(f) for f in files)
    assert a.metadata["blora.train.rslora"] == "True" and a.metadata["blora.train.gradient_checkpointing"] == "off"
    assert {k: v for k, v in a.metadata.items() if k.startswith("blora.train.")} == \
        {k: v for k, v in b.metadata.items() if k.startswith("blora.train.")}
    for path, m in old.modules.items():
        assert all(torch.equal(t, new.modules[path].tensors[n]) for n, t in m.tensors.items())


def test_an_old_input_beside_its_wired_settings_node_says_what_moved(node, settings, model, vae, host_dirs):
    wired = group_values(settings, {})
    with pytest.raises(BLoRAError, match="`weight_decay` moved from Train B-LoRA to the B-LoRA Algorithm Options node "
                                         "wired into `algorithm_options`"):
        train(node, model, vae, weight_decay=0.5, **wired)
    assert not (host_dirs / "output" / "loras" / "s").exists()
    memory = dict(wired["memory"], gradient_checkpointing="off")
    with pytest.raises(BLoRAError, match="`gradient_checkpointing` moved .* B-LoRA Memory Options"):
        train(node, model, vae, gradient_checkpointing=True, memory=memory)
    train(node, model, vae, gradient_checkpointing=False, rank_dropout=0.1, memory=memory)  # the same; unknown: ignored
    assert len(list((host_dirs / "output" / "loras" / "s").glob("*.safetensors"))) == 1
