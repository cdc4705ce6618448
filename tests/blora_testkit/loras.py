"""Adapter files for the tiny checkpoint, written independently of the pack (TEST-ONLY; torch + safetensors).

Pairs are ``{canonical module path: (down (r, in), up (out, r))}`` with scale 1 (no alpha in the original
dialect, alpha = rank in kohya), so every dialect written from the same pairs means the same ΔW = up @ down.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROLE_BLOCKS = {"content": "output_blocks.0.1", "style": "output_blocks.1.1", "layout": "input_blocks.8.1"}
# FLUX.1 (SplitFlux's split, tiny FLUX: 12 single blocks): a content block, a style block; no layout role
FLUX_ROLE_BLOCKS = {"content": "single_blocks.2", "style": "single_blocks.11"}
_TARGET = re.compile(r"^model\.diffusion_model\.((?:input|output)_blocks\.\d+\.1|middle_block\.1)"
                     r"\.transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)\.weight$")
_FLUX_TARGET = re.compile(r"^model\.diffusion_model\.(single_blocks\.\d+\.linear[12]"
                          r"|double_blocks\.\d+\.(?:img|txt)_attn\.(?:qkv|proj))\.weight$")


def attention_shapes(checkpoint: Path | str) -> dict[str, tuple[int, int]]:
    """(out, in) of every B-LoRA target Linear in the checkpoint's diffusion model: SDXL's attn1/attn2
    to_q/k/v/out.0, or FLUX.1's single-block linear1/linear2 and double-block attention qkv/proj."""
    with safe_open(str(checkpoint), framework="pt") as f:
        return {k[len("model.diffusion_model."):-len(".weight")]: tuple(f.get_slice(k).get_shape())
                for k in f.keys() if _TARGET.match(k) or _FLUX_TARGET.match(k)}


def block_of(path: str) -> str:
    if path.startswith(("single_blocks.", "double_blocks.")):
        return ".".join(path.split(".")[:2])
    return path.split(".transformer_blocks.")[0]


def make_pairs(shapes: dict, blocks, rank: int = 4, seed: int = 0, up_std: float = 0.2) -> dict:
    """Random low-rank pairs (deterministic in ``seed``) for every target module of ``blocks``."""
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for path in sorted(p for p in shapes if block_of(p) in set(blocks)):
        out_f, in_f = shapes[path]
        down = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        pairs[path] = (down, torch.randn(out_f, rank, generator=gen) * up_std)
    return pairs


def only_blocks(pairs: dict, blocks) -> dict:
    return {p: v for p, v in pairs.items() if block_of(p) in set(blocks)}


def to_diffusers(block: str) -> str:
    """LDM attention block -> diffusers name (SDXL index rule, num_res_blocks 2)."""
    kind, index = block.split(".")[0], int(block.split(".")[1])
    if kind == "output_blocks":
        return f"up_blocks.{index // 3}.attentions.{index % 3}"
    if kind == "input_blocks":
        return f"down_blocks.{(index - 1) // 3}.attentions.{(index - 1) % 3}"
    return "mid_block.attentions.0"


def write_kohya(path: Path | str, pairs: dict, metadata: dict | None = None) -> Path:
    """kohya LDM dialect (what stock LoraLoader reads), explicit alpha = rank (scale 1)."""
    sd = {}
    for p, (down, up) in pairs.items():
        key = "lora_unet_" + p.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(sd, str(path), metadata=metadata)
    return Path(path)


def write_comfy(path: Path | str, pairs: dict, metadata: dict | None = None) -> Path:
    """ComfyUI's own dialect (``diffusion_model.single_blocks.0.linear1.lora_down.weight``), alpha = rank."""
    sd = {}
    for p, (down, up) in pairs.items():
        sd[f"diffusion_model.{p}.lora_down.weight"] = down.contiguous()
        sd[f"diffusion_model.{p}.lora_up.weight"] = up.contiguous()
        sd[f"diffusion_model.{p}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(sd, str(path), metadata=metadata)
    return Path(path)


def write_original(path: Path | str, pairs: dict, metadata: dict | None = None) -> Path:
    """The original B-LoRA (diffusers) dialect: ``unet.up_blocks.0.attentions.1....to_k.lora.down.weight``,
    no alpha. Stock ComfyUI drops these keys; the pack must read them."""
    sd = {}
    for p, (down, up) in pairs.items():
        block = block_of(p)
        key = "unet." + to_diffusers(block) + p[len(block):]
        sd[f"{key}.lora.down.weight"] = down.contiguous()
        sd[f"{key}.lora.up.weight"] = up.contiguous()
    save_file(sd, str(path), metadata=metadata)
    return Path(path)


def write_sd15_lora(path: Path | str, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA for SD1.5 (kohya diffusers-style keys, 320-1280 channels, 768-wide context, lora_te_ keys)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
                                "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (1280, 768),
                                "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q": (1280, 1280),
                                "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) * 0.01
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return Path(path)
