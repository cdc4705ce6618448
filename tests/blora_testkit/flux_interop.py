"""The interop layer's FLUX kit: a tiny diffusers FluxTransformer2DModel with FLUX.1's layout (float64) and one forward
pass of it. Imports diffusers lazily (tests/interop skips without it)."""
from __future__ import annotations

import torch

HIDDEN, HEADS = 32, 2


def tiny_transformer(seed: int = 0):
    """diffusers FluxTransformer2DModel with FLUX.1's layout: 2 double (transformer_blocks) and 2 single blocks,
    hidden 32 (2 heads of 16), mlp_ratio 4 as FLUX.1, guidance embedding (dev); float64."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=HIDDEN // HEADS, num_attention_heads=HEADS,
                                   joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
                                   axes_dims_rope=(4, 6, 6))
    return model.to(torch.float64).eval()


def forward(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens, text = 6, 5
    kwargs = dict(hidden_states=torch.randn(1, tokens, 8, generator=g, dtype=torch.float64),
                  encoder_hidden_states=torch.randn(1, text, 24, generator=g, dtype=torch.float64),
                  pooled_projections=torch.randn(1, 16, generator=g, dtype=torch.float64),
                  timestep=torch.tensor([0.7], dtype=torch.float64), guidance=torch.tensor([3.5], dtype=torch.float64),
                  img_ids=torch.zeros(tokens, 3, dtype=torch.float64), txt_ids=torch.zeros(text, 3, dtype=torch.float64),
                  return_dict=False)
    with torch.no_grad():
        return model(**kwargs)[0]
