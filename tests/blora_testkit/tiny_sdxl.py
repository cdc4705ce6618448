"""A tiny SDXL-architecture model built with the host's own classes (host layers only).

Block names are the real SDXL names (input_blocks.4.1 ... output_blocks.5.1, middle_block.1): channel widths and
depths are small so a sample runs in well under a second on CPU.
"""
from __future__ import annotations

import torch

TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "dtype": torch.float32,
    "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1], "channel_mult": [1, 2, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 16,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
CONTEXT_DIM = 64
POOLED_DIM = 1280


def tiny_model_config():
    """A `comfy.supported_models.SDXL` subclass instance configured for the tiny UNet."""
    import comfy.supported_models

    class TinySDXL(comfy.supported_models.SDXL):
        unet_config = dict(TINY_UNET_CONFIG)
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    return TinySDXL(dict(TINY_UNET_CONFIG))


def init_weights_(module: torch.nn.Module, seed: int = 0) -> None:
    """comfy ops skip initialisation: fill every parameter deterministically (small random values)."""
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {f"{m_name}.weight" if m_name else "weight" for m_name, m in module.named_modules()
                    if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 1:
                fill = torch.ones(p.shape) if name in norm_weights else torch.zeros(p.shape)
                p.copy_(fill + 0.01 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def tiny_sdxl_model(seed: int = 0):
    """A ModelPatcher around a tiny SDXL-architecture `model_base.SDXL`, on CPU, fp32, weights initialised."""
    import comfy.model_management
    import comfy.model_patcher

    config = tiny_model_config()
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights_(model.diffusion_model, seed)
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload)


def tiny_conditioning(seed: int = 0, batch: int = 1, tokens: int = 77):
    """CONDITIONING as the host passes it: [[context (B, tokens, 64), {"pooled_output": (B, 1280)}]]."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, CONTEXT_DIM, generator=gen)
    pooled = torch.randn(batch, POOLED_DIM, generator=gen)
    return [[context, {"pooled_output": pooled}]]
