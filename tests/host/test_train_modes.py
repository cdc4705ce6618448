"""How Train B-LoRA trains, in the real host on the tiny SDXL-architecture model: factored kinds on the activations
(no merged weight), DoRA/LoHa as weight functions; what each gradient_checkpointing mode recomputes, and that every
mode and offload train the same adapter; the on_step callback (interface for validation previews) and the
``multiplier`` every trained layer exposes."""
from __future__ import annotations

import importlib

import pytest
import torch
from blora_testkit.train_fixtures import model, node, one_thread, vae  # noqa: F401
from blora_testkit.tiny_sdxl import tiny_conditioning

from blora.adapters.trainable import Trainable
from blora.train.recipe import CHECKPOINTING, TrainConfig

FAST = dict(rank=4, alpha=4.0, learning_rate=1e-2, steps=2, resolution=64, training_dtype="fp32",
            save_precision="fp32", gradient_checkpointing="off")


@pytest.fixture
def host(pack):
    return importlib.import_module("blora.host.train")


def image(seed=0):
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def run(host, model, vae, prefix="t/blora", on_step=None, **settings):
    config = TrainConfig(**dict(FAST, **settings))
    with torch.inference_mode():  # as the executor runs a node
        if config.seeds > 1:
            return host.train_runs(model, vae, image(), tiny_conditioning(0), config, filename_prefix=prefix,
                                   on_step=on_step)
        return host.train_blora(model, vae, image(), tiny_conditioning(0), config, filename_prefix=prefix,
                                on_step=on_step)


def assert_same_modules(a, b, atol):
    assert a.modules.keys() == b.modules.keys()
    for path, m in a.modules.items():
        for name, t in m.tensors.items():
            err = (t.float() - b.modules[path].tensors[name].float()).abs().max().item()
            assert err <= atol, f"{path}.{name} differs by {err:.3g}"


@pytest.mark.parametrize("algorithm, on_activations", [("LoRA", True), ("AdaLoRA", True), ("LoKr", True),
                                                       ("DoRA", False), ("LoHa", False)])
def test_factored_kinds_train_on_the_activations_the_others_as_weight_functions(host, model, vae, host_dirs,
                                                                                algorithm, on_activations):
    seen = {}

    def on_step(done, state):
        if done == 0:
            unet = state.unet
            for path, adapter in state.adapters.items():
                layer = unet.get_submodule(path)
                functions = [f for f in getattr(layer, "weight_function", []) if isinstance(f, Trainable)]
                seen[path] = (adapter.on_activations, len(layer._forward_hooks), functions == [adapter])

    out = run(host, model, vae, on_step=on_step, algorithm=algorithm, adalora_interval=1)
    assert len(seen) == 16 and out.adapter.modules
    # a hook and no weight function, or a weight function and no hook
    assert set(seen.values()) == {(True, 1, False)} if on_activations else {(False, 0, True)}


def _calls(model, names):
    unet = model.model.diffusion_model
    counts = dict.fromkeys(names, 0)

    def counter(name):
        def hook(module, args, kwargs):
            counts[name] += 1
        return hook
    handles = [unet.get_submodule(n).register_forward_pre_hook(counter(n), with_kwargs=True) for n in names]
    return counts, handles


@pytest.mark.parametrize("mode, block_calls, out_calls", [("off", 1, 1), ("trained blocks", 2, 1),
                                                          ("all above", 2, 2)])
def test_each_checkpointing_mode_recomputes_what_it_says(host, model, vae, host_dirs, mode, block_calls, out_calls):
    """One step: a trained transformer block runs once, or again in backward ("trained blocks", "all above");
    the output layer (above the trained blocks, not one of them) runs again only with "all above". (Counted on
    a child: a recomputation calls the checkpointed module's forward, not the module.)"""
    names = ["output_blocks.0.1.transformer_blocks.0.norm1", "out.2", "input_blocks.1.0"]
    counts, handles = _calls(model, names)
    try:
        run(host, model, vae, steps=1, gradient_checkpointing=mode)
    finally:
        for h in handles:
            h.remove()
    assert counts == {names[0]: block_calls, "out.2": out_calls, "input_blocks.1.0": 1}


@pytest.mark.parametrize("algorithm", ["LoRA", "DoRA"])
def test_every_checkpointing_mode_and_offload_train_the_same_adapter(host, model, vae, host_dirs, algorithm):
    runs = {mode: run(host, model, vae, prefix=f"t/{mode}", gradient_checkpointing=mode, algorithm=algorithm)
            for mode in CHECKPOINTING}
    runs["offload"] = run(host, model, vae, prefix="t/offload", gradient_checkpointing="off", offload=True,
                          algorithm=algorithm)
    runs["offload, trained blocks"] = run(host, model, vae, prefix="t/offload2", offload=True, algorithm=algorithm,
                                          gradient_checkpointing="trained blocks")
    reference = runs.pop("off")
    assert max(abs(t.float()).max().item() for m in reference.adapter.modules.values()
               for t in m.tensors.values()) > 1e-3
    for name, out in runs.items():
        assert out.losses == pytest.approx(reference.losses, rel=1e-5), name
        assert_same_modules(out.adapter, reference.adapter, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["LoRA", "DoRA"])
def test_on_step_sees_every_step_and_multiplier_zero_is_the_base_layer(host, model, vae, host_dirs, algorithm):
    """on_step(done, state) runs before the first step and after each; a forward there with every trained
    layer's multiplier at 0 gives the untrained output, at 1 the trained one; doing so leaves training exactly as
    without the callback (previews must not change the weights)."""
    calls, outputs = [], {}

    def forward(state):
        sample = state.samples[state.config.seed][0]
        with torch.no_grad():
            return state.unet(sample.x0, torch.tensor([500.0]), context=sample.context, y=sample.y, control=None,
                              transformer_options=dict(state.transformer_options))

    def on_step(done, state):
        calls.append((done, len(state.read_losses())))
        if done in (0, 2):
            outputs[done] = forward(state)
        if done == 2:
            for a in state.adapters.values():
                a.multiplier = 0.0
            outputs["off"] = forward(state)
            for a in state.adapters.values():
                a.multiplier = 1.0

    watched = run(host, model, vae, prefix="t/watched", on_step=on_step, algorithm=algorithm, steps=3)
    plain = run(host, model, vae, prefix="t/plain", algorithm=algorithm, steps=3)
    assert calls == [(0, 0), (1, 1), (2, 2), (3, 3)]
    torch.testing.assert_close(outputs["off"], outputs[0], rtol=1e-5, atol=1e-5)
    assert (outputs[2] - outputs[0]).abs().max() > 1e-4
    assert watched.losses == plain.losses
    assert_same_modules(watched.adapter, plain.adapter, atol=0.0)


def test_seeds_run_through_the_same_loop_with_on_step(host, model, vae, host_dirs):
    steps = []
    outs = run(host, model, vae, seeds=2, on_step=lambda done, state: steps.append((done, state.adapters and
                                                                                   state.config.seeds)))
    assert steps == [(0, 2), (1, 2), (2, 2)] and len(outs) == 2
    assert [len(o.losses) for o in outs] == [2, 2] and outs[0].path != outs[1].path


def test_offload_keeps_only_inputs_for_the_layers_outside_checkpointed_blocks(host, model, vae, host_dirs,
                                                                              monkeypatch):
    """With offload, the region's Linear and conv layers outside the checkpointed blocks run again in backward
    (so a streamed weight is not held until then); inside "all above" every layer is already checkpointed."""
    wrappers = importlib.import_module("blora.host.train_wrappers")
    backward, ran = wrappers._Recomputed.backward, []
    monkeypatch.setattr(wrappers._Recomputed, "backward",
                        staticmethod(lambda ctx, grad: (ran.append(1), backward(ctx, grad))[1]))
    unet = model.model.diffusion_model
    targets = [p for p, m in unet.named_modules() if ".transformer_blocks." in p and ".attn" in p
               and isinstance(m, torch.nn.Linear) and p.startswith(("output_blocks.0.", "output_blocks.1."))]
    region = wrappers.grad_region(unet, targets)
    outside = wrappers.offload_units(region, wrappers.checkpoint_units(unet, targets, "trained blocks"))
    assert outside and not wrappers.offload_units(region, wrappers.checkpoint_units(unet, targets, "all above"))
    run(host, model, vae, steps=1, offload=True, gradient_checkpointing="trained blocks")
    assert 0 < len(ran) <= len(outside)
