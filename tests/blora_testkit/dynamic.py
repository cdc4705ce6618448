"""Helpers for tests of per-step weights (host layers only): random LoRAs on the tiny model, a sampling run, and a
weight function that records the weight in force at every model call."""
from __future__ import annotations

import torch


def make_lora(model, blocks, seed, rank=4, up_std=0.2, dora=False, source=None):
    """A ``blora.Adapter`` with a LoRA on every attention Linear of ``blocks`` (alpha = rank: scale 1);
    ``dora`` adds an output-axis dora_scale."""
    from blora.adapters.adapter import Adapter, ModuleAdapter

    gen = torch.Generator().manual_seed(seed)
    shapes = {k[len("diffusion_model."):-len(".weight")]: v.shape for k, v in model.model.state_dict().items()
              if k.startswith("diffusion_model.") and k.endswith(".weight") and ".attn" in k}
    modules = {}
    for path in sorted(p for p in shapes if any(p.startswith(b + ".") for b in blocks)):
        out_f, in_f = shapes[path]
        down = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        up = torch.randn(out_f, rank, generator=gen) * up_std
        scale = 1.0 + 0.1 * torch.rand(out_f, 1, generator=gen) if dora else None
        modules[path] = ModuleAdapter("lora", {"down": down, "up": up}, alpha=float(rank), dora_scale=scale)
    return Adapter(modules=modules, source=source or f"lora{seed}.safetensors", dialect="kohya")


def sample(model, steps=5, cfg=2.0, sampler="euler", scheduler="normal", seed=0, negative_tokens=77, size=8):
    """Sample the tiny model (8×8 latent); a negative of 5 tokens cannot be batched with the 77-token positive."""
    import comfy.sample
    from blora_testkit.tiny_sdxl import tiny_conditioning

    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    negative = tiny_conditioning(2, tokens=negative_tokens)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, tiny_conditioning(1), negative,
                                   latent, seed=seed, disable_pbar=True)


def with_weights(model, weights):
    """A clone of ``model`` whose UNet weights at these paths are replaced outright (the host's ``set`` patch, no
    LoRA/LyCORIS math of the host): an independent render of weights the test computed itself."""
    clone = model.clone()
    clone.add_patches({f"diffusion_model.{path}.weight": ("set", (w.detach(),)) for path, w in weights.items()},
                      1.0)
    return clone


def assert_renders_as(model, weights, base_model, atol=1e-4):
    """``model`` samples as the base model with ``weights`` set (within ``atol``), and those weights change the
    sample by far more than that (the comparison could fail)."""
    expected, got, base = sample(with_weights(base_model, weights)), sample(model), sample(base_model)
    assert torch.allclose(got, expected, atol=atol, rtol=0), (got - expected).abs().max()
    assert (expected - base).abs().max() > 100 * atol


class Recorder:
    """A weight function appended after the pack's: records the weight in force at each model call."""

    def __init__(self):
        self.weights = []

    def __call__(self, weight):
        self.weights.append(weight.detach().clone())
        return weight


def record(model, path):
    """(clone of model with a Recorder on module ``path``, the recorder)."""
    rec = Recorder()
    clone = model.clone()
    clone.add_weight_wrapper(f"diffusion_model.{path}.weight", rec)
    return clone, rec


def base_weight(model, path):
    """The unpatched weight (the host patches weights in place while a patched clone is loaded)."""
    key = f"diffusion_model.{path}.weight"
    return model.get_key_patches(key)[key][0][0].detach().clone()


def run(node, **inputs):
    """The node's first output."""
    from blora_testkit.nodes import run_node

    return run_node(node, **inputs)[0][0]
