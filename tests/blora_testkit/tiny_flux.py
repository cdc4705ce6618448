"""A tiny FLUX.1-architecture model built with the host's own classes (``comfy.supported_models.Flux`` ->
``comfy.model_base.Flux`` -> ``comfy.ldm.flux.model.Flux``; host layers only).

Block and layer names are the real FLUX.1 ones (double_blocks.N.img_attn.qkv, single_blocks.N.linear1 ...); widths
are small and there are 2 double and 12 single blocks, so the SplitFlux content preset (single_blocks.0-9) and two
style blocks (10, 11: the boundary) exist, and a sample runs in well under a second on CPU.
"""
from __future__ import annotations

import dataclasses

import torch

HIDDEN = 64
CONTEXT_DIM = 32
POOLED_DIM = 32
LATENT_CHANNELS = 16
DOUBLE, SINGLE = 2, 12
TINY_FLUX_CONFIG = {
    "image_model": "flux", "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
    "vec_in_dim": POOLED_DIM, "context_in_dim": CONTEXT_DIM, "hidden_size": HIDDEN, "mlp_ratio": 4.0,
    "num_heads": 4, "depth": DOUBLE, "depth_single_blocks": SINGLE, "axes_dim": [4, 6, 6], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def tiny_flux_unet_config() -> dict:
    """The config, with the fields this host's FluxParams has and the tiny config lacks at their FLUX.1 values
    (0.33 added txt_ids_dims without a default; 0.3.64 does not know it)."""
    from comfy.ldm.flux.model import FluxParams

    config = dict(TINY_FLUX_CONFIG)
    fields = {f.name: f for f in dataclasses.fields(FluxParams)}
    if "txt_ids_dims" in fields:
        config["txt_ids_dims"] = []
    return config


def tiny_flux_model_config():
    import comfy.supported_models

    config = tiny_flux_unet_config()

    class TinyFlux(comfy.supported_models.Flux):
        unet_config = dict(config)

    return TinyFlux(dict(config))


def tiny_flux_model(seed: int = 0):
    """A ModelPatcher around a tiny FLUX.1-architecture ``model_base.Flux``, on CPU, fp32, weights initialised."""
    import comfy.model_management
    import comfy.model_patcher

    from .tiny_sdxl import init_weights_

    config = tiny_flux_model_config()
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_flux_conditioning(seed: int = 0, tokens: int = 8, guidance: float = 3.5):
    """CONDITIONING as the host passes it for FLUX dev: [[T5 context, {"pooled_output": CLIP-L, "guidance": g}]]."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=gen),
             {"pooled_output": torch.randn(1, POOLED_DIM, generator=gen), "guidance": guidance}]]


def tiny_flux_sample(patcher, seed: int = 0, steps: int = 3, size: int = 8):
    """A few euler steps of the host's own sampler (FLUX's flow-matching sampling) on fixed noise: the latent."""
    import comfy.sample

    noise = torch.randn(1, LATENT_CHANNELS, size, size, generator=torch.Generator().manual_seed(seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple",
                                       tiny_flux_conditioning(seed + 1), tiny_flux_conditioning(seed + 2),
                                       torch.zeros_like(noise), disable_pbar=True, seed=seed)
    finally:
        torch.set_num_threads(threads)
