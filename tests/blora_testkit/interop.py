"""The interop layer's kit: a tiny diffusers UNet with SDXL's block layout, views of its attention Linears by
diffusers or LDM names, and per-module deltas as a library's own forward pass gives them and as the pack reads them.

Imports diffusers lazily (tests/interop skips without it); nothing here is used by the core layer.
"""
from __future__ import annotations

import copy
import functools
from typing import Mapping

import torch
from torch import nn

from blora.adapters.adapter import Adapter, delta_weight
from blora.adapters.dora import dora_weight
from blora.arch.sdxl import diffusers_to_ldm, ldm_to_diffusers

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CONTEXT = 64


def tiny_unet(seed: int = 0):
    """A fresh copy of ``built_unet(seed)`` (building one costs seconds, copying a fraction)."""
    return copy.deepcopy(built_unet(seed))


@functools.lru_cache(maxsize=2)
def built_unet(seed: int):
    """diffusers UNet2DConditionModel with SDXL's layout: down blocks (plain, cross-attn, cross-attn), mid block
    with attention, up blocks (cross-attn, cross-attn, plain), 2 resnets per down block and 3 per up block, text_time
    conditioning; the last level has 2 transformer layers (SDXL: 10) so transformer_blocks.1 exists. Its attention
    blocks therefore have SDXL's names: down_blocks.2.attentions.1 (layout), up_blocks.0.attentions.0/1
    (content/style). float64, so that forward differences measure an adapter's delta to ~1e-12 of its size."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=CONTEXT, attention_head_dim=(2, 4, 8),
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80).double().eval()


def attention_linears(unet: nn.Module) -> dict[str, nn.Linear]:
    """diffusers name -> nn.Linear of every attention projection B-LoRA targets (attn1/attn2 to_q/k/v/out.0)."""
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) and ".attn" in n and n.endswith(tuple("." + t for t in TARGETS))}


def fresh_linears(seed: int = 0) -> dict[str, nn.Linear]:
    """Copies of the tiny UNet's attention Linears by diffusers name (LyCORIS needs no more than these; copying
    them costs a fraction of copying the UNet)."""
    return copy.deepcopy(attention_linears(built_unet(seed)))


def view(named: Mapping[str, nn.Module]) -> nn.Module:
    """A container whose ``named_modules`` yields ``named`` under the given dotted names, holding the same module
    objects (a LyCORIS network built on it patches the UNet's own Linears)."""
    root = nn.Module()
    for name, module in named.items():
        parent = root
        *parents, leaf = name.split(".")
        for part in parents:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, module)
    return root


def ldm_view(unet: nn.Module) -> nn.Module:
    """The attention Linears under their LDM (ComfyUI / kohya) names, e.g. output_blocks.1.1.transformer_blocks.0…"""
    return view({diffusers_to_ldm(n): m for n, m in attention_linears(unet).items()})


def forward_delta(linear: nn.Module, base_weight: torch.Tensor, base_bias: torch.Tensor | None) -> torch.Tensor:
    """ΔW (out, in) of a Linear as its current forward pass gives it: forward(I) − (I Wᵀ + b), transposed."""
    eye = torch.eye(base_weight.shape[1], dtype=base_weight.dtype)
    with torch.no_grad():
        return (linear(eye) - nn.functional.linear(eye, base_weight, base_bias)).T.contiguous()


def snapshot(unet: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """diffusers name -> (W, b) copies of the attention Linears before any adapter touches them."""
    return {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in attention_linears(unet).items()}


def library_deltas(modules: Mapping[str, nn.Module], base: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """diffusers name -> ΔW from each module's own forward (the library's adapter active)."""
    return {n: forward_delta(m, *base[n]) for n, m in modules.items()}


def pack_deltas(adapter: Adapter, base: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """diffusers name -> ΔW as the pack renders the adapter over the base weights (DoRA: W' − W)."""
    out = {}
    for path, module in adapter.modules.items():
        name = ldm_to_diffusers(path)
        w = base[name][0].float()
        out[name] = (dora_weight(module, w) - w) if module.dora_scale is not None else delta_weight(module)
        out[name] = out[name].double()
    return out


def assert_same_deltas(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], rtol: float = 1e-5,
                       what: str = "", base: Mapping[str, tuple] | None = None) -> None:
    """Same modules, and per module max|got − want| <= rtol · max|want| (the pack computes in float32). With
    ``base`` (DoRA, which rescales the whole weight W + ΔW) the bound is rtol · max|W + want|."""
    assert set(got) == set(want), f"{what}: modules differ: {sorted(set(got) ^ set(want))[:4]}"
    for name in want:
        err = (got[name].double() - want[name].double()).abs().max().item()
        scale = want[name].double().abs().max().item()
        if base is not None:
            assert scale > 0, f"{what}: {name}: zero delta (the test would prove nothing)"
            scale = (base[name][0].double() + want[name].double()).abs().max().item()
        assert scale > 0, f"{what}: {name}: zero delta (the test would prove nothing)"
        assert err <= rtol * scale, f"{what}: {name}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def randomize_(module: nn.Module, seed: int, std: float = 0.05) -> None:
    """Fill a module's adapter parameters with seeded noise (libraries start one factor at zero: a zero delta proves
    nothing); DoRA magnitudes keep the library's own start (the base weight's norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.requires_grad and "magnitude" not in name and "dora_scale" not in name and p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
