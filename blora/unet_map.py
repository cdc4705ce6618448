"""Every weight-holding module of the SDXL UNet and both text encoders, in LDM and diffusers naming.

Built from the SDXL index rule (num_res_blocks = [2, 2, 2], three levels, attention on levels 1 and 2):
    down_blocks.x.resnets.i       -> input_blocks.(1 + 3x + i).0     (resnet inner names renamed, see RESNET)
    down_blocks.x.attentions.i    -> input_blocks.(1 + 3x + i).1     (inner names unchanged)
    down_blocks.x.downsamplers.0.conv -> input_blocks.(3 + 3x).0.op
    mid_block.resnets.{0,1}       -> middle_block.{0,2};  mid_block.attentions.0 -> middle_block.1
    up_blocks.x.resnets.i         -> output_blocks.(3x + i).0;  up_blocks.x.attentions.i -> output_blocks.(3x + i).1
    up_blocks.x.upsamplers.0.conv -> output_blocks.(3x + 2).(2 if the level has attention else 1).conv
plus conv_in, time_embedding, add_embedding, conv_norm_out and conv_out. Transformer depths are the full SDXL
ones (2 at 640 channels, 10 at 1280), so smaller SDXL-architecture models are subsets.

Text encoders use the transformers CLIP structure (``text_model.encoder.layers.N.self_attn.q_proj``): te1 is
CLIP-L (12 layers), te2 OpenCLIP bigG (32 layers).

Kohya names replace every ``.`` with ``_``; the tables index those spellings too, so a name such as
``lora_unet_output_blocks_1_1_transformer_blocks_3_attn2_to_k`` splits back into its module path unambiguously.
"""
from __future__ import annotations

from typing import Iterator

NUM_RES_BLOCKS = 2
LEVELS = 3
DOWN_ATTENTION_DEPTH = {1: 2, 2: 10}   # diffusers down level -> transformer blocks per attention
UP_ATTENTION_DEPTH = {0: 10, 1: 2}     # diffusers up level -> transformer blocks per attention
MID_ATTENTION_DEPTH = 10
TE_LAYERS = {"te1": 12, "te2": 32}

RESNET = {  # diffusers resnet inner name -> LDM inner name
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
ATTENTION_INNER = ("norm", "proj_in", "proj_out")
TRANSFORMER_INNER = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
BASIC = {  # diffusers -> LDM
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}
ALIASES = {"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
TE_LAYER_INNER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
TE_BASIC = ("text_model.embeddings.token_embedding", "text_model.embeddings.position_embedding",
            "text_model.final_layer_norm", "text_projection")


def _resnet(diffusers: str, ldm: str, skip: bool) -> Iterator[tuple[str, str]]:
    for d, l in RESNET.items():
        if d != "conv_shortcut" or skip:
            yield f"{diffusers}.{d}", f"{ldm}.{l}"


def _attention(diffusers: str, ldm: str, depth: int) -> Iterator[tuple[str, str]]:
    for inner in ATTENTION_INNER:
        yield f"{diffusers}.{inner}", f"{ldm}.{inner}"
    for t in range(depth):
        for inner in TRANSFORMER_INNER:
            yield f"{diffusers}.transformer_blocks.{t}.{inner}", f"{ldm}.transformer_blocks.{t}.{inner}"


def _down() -> Iterator[tuple[str, str]]:
    for x in range(LEVELS):
        for i in range(NUM_RES_BLOCKS):
            n = 1 + (NUM_RES_BLOCKS + 1) * x + i
            # the first resnet of a level changes the width (except level 0): it has a skip projection
            yield from _resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0", skip=(i == 0 and x > 0))
            if x in DOWN_ATTENTION_DEPTH:
                yield from _attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1",
                                      DOWN_ATTENTION_DEPTH[x])
        if x < LEVELS - 1:
            yield f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{(NUM_RES_BLOCKS + 1) * (x + 1)}.0.op"


def _middle() -> Iterator[tuple[str, str]]:
    yield from _resnet("mid_block.resnets.0", "middle_block.0", skip=False)
    yield from _attention("mid_block.attentions.0", "middle_block.1", MID_ATTENTION_DEPTH)
    yield from _resnet("mid_block.resnets.1", "middle_block.2", skip=False)


def _up() -> Iterator[tuple[str, str]]:
    for x in range(LEVELS):
        for i in range(NUM_RES_BLOCKS + 1):
            n = (NUM_RES_BLOCKS + 1) * x + i
            # every up resnet takes the concatenated skip input: all have a skip projection
            yield from _resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0", skip=True)
            if x in UP_ATTENTION_DEPTH:
                yield from _attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", UP_ATTENTION_DEPTH[x])
        if x < LEVELS - 1:
            c = 2 if x in UP_ATTENTION_DEPTH else 1
            yield f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{(NUM_RES_BLOCKS + 1) * x + NUM_RES_BLOCKS}.{c}.conv"


def sdxl_unet_modules() -> tuple[tuple[str, str], ...]:
    """(diffusers path, LDM path) of every weight-holding module of the full SDXL UNet, in model order."""
    return tuple(BASIC.items()) + tuple(_down()) + tuple(_middle()) + tuple(_up())


def te_modules(encoder: str) -> tuple[str, ...]:
    """Module paths (transformers CLIP naming) of text encoder ``te1`` or ``te2``."""
    layers = tuple(f"text_model.encoder.layers.{n}.{inner}"
                   for n in range(TE_LAYERS[encoder]) for inner in TE_LAYER_INNER)
    return TE_BASIC[:2] + layers + TE_BASIC[2:]


def _underscored(names: dict[str, str]) -> dict[str, str]:
    table = {k.replace(".", "_"): v for k, v in names.items()}
    if len(table) != len(names):
        raise AssertionError("module names collide once dots become underscores")
    return table


UNET_MODULES = sdxl_unet_modules()
DIFFUSERS_TO_LDM: dict[str, str] = {**dict(UNET_MODULES), **ALIASES}
LDM_TO_DIFFUSERS: dict[str, str] = {ldm: d for d, ldm in UNET_MODULES}
KOHYA_UNET: dict[str, str] = _underscored({**DIFFUSERS_TO_LDM, **{ldm: ldm for ldm in LDM_TO_DIFFUSERS}})
TE_PATHS: dict[str, frozenset[str]] = {te: frozenset(te_modules(te)) for te in TE_LAYERS}
KOHYA_TE: dict[str, dict[str, str]] = {te: _underscored({p: p for p in TE_PATHS[te]}) for te in TE_LAYERS}


def diffusers_to_ldm(path: str) -> str | None:
    """LDM path of a diffusers UNet module path (``up_blocks.0.attentions.1.proj_in`` -> ``output_blocks.1.1.proj_in``),
    also in the old attention-processor spelling (``attn1.processor.to_q``, ``to_out``); None if not SDXL."""
    path = path.replace(".processor.", ".")
    if path.endswith(".to_out"):
        path += ".0"
    return DIFFUSERS_TO_LDM.get(path)


def ldm_to_diffusers(path: str) -> str | None:
    """Diffusers path of an LDM UNet module path; None if the SDXL UNet has no such module."""
    return LDM_TO_DIFFUSERS.get(path)


def is_sdxl_module(path: str) -> bool:
    """Whether ``path`` (LDM naming) is a weight-holding module of the SDXL UNet."""
    return path in LDM_TO_DIFFUSERS


def kohya_to_module(name: str) -> str | None:
    """LDM path of an underscore-spelled UNet module name (kohya LDM or kohya diffusers style, no prefix)."""
    return KOHYA_UNET.get(name)


def kohya_to_te(encoder: str, name: str) -> str | None:
    """CLIP module path of an underscore-spelled text-encoder module name (no ``lora_te1_`` prefix)."""
    return KOHYA_TE[encoder].get(name)
