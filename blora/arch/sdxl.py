"""SDXL, stated once: its attention blocks (one ``Block`` each, by LDM name, diffusers name, LBW slot and role) and
every weight-holding module of its UNet and both text encoders, in LDM and diffusers naming.

Index rule for SDXL (num_res_blocks = [2, 2, 2], three levels, attention on levels 1 and 2):
    down_blocks.x.resnets.i       -> input_blocks.(1 + 3x + i).0     (resnet inner names renamed, see RESNET)
    down_blocks.x.attentions.i    -> input_blocks.(1 + 3x + i).1     (inner names unchanged)
    down_blocks.x.downsamplers.0.conv -> input_blocks.(3 + 3x).0.op
    mid_block.resnets.{0,1}       -> middle_block.{0,2};  mid_block.attentions.0 -> middle_block.1
    up_blocks.x.resnets.i         -> output_blocks.(3x + i).0;  up_blocks.x.attentions.i -> output_blocks.(3x + i).1
    up_blocks.x.upsamplers.0.conv -> output_blocks.(3x + 2).(2 if the level has attention else 1).conv
plus conv_in, time_embedding, add_embedding, conv_norm_out and conv_out. Transformer depths are the full SDXL
ones (2 at 640 channels, 10 at 1280), so smaller SDXL-architecture models are subsets.

Roles (B-LoRA, Frenkel et al., ECCV 2024, arXiv 2403.14572): content = output_blocks.0.1, style = output_blocks.1.1;
layout = input_blocks.8.1 (community, InstantStyle).

Text encoders use the transformers CLIP structure (``text_model.encoder.layers.N.self_attn.q_proj``): te1 is
CLIP-L (12 layers), te2 OpenCLIP bigG (32 layers).

Kohya names replace every ``.`` with ``_``; the tables index those spellings too, so a name such as
``lora_unet_output_blocks_1_1_transformer_blocks_3_attn2_to_k`` splits back into its module path unambiguously.
"""
from __future__ import annotations

import re
from typing import Iterator

from ..errors import BlockNameError
from . import Architecture, Block, register

NUM_RES_BLOCKS = 2  # SDXL: down blocks have 2 resnets, up blocks 3 (= NUM_RES_BLOCKS + 1)

def down_to_ldm(x: int, i: int) -> str:
    return f"input_blocks.{1 + (NUM_RES_BLOCKS + 1) * x + i}.1"


def up_to_ldm(x: int, i: int) -> str:
    return f"output_blocks.{(NUM_RES_BLOCKS + 1) * x + i}.1"


ROLES = {"content": "output_blocks.0.1", "style": "output_blocks.1.1", "layout": "input_blocks.8.1"}

SDXL_BLOCKS: tuple[Block, ...] = (
    Block(down_to_ldm(1, 0), "down_blocks.1.attentions.0", "IN04", 640, 2),
    Block(down_to_ldm(1, 1), "down_blocks.1.attentions.1", "IN05", 640, 2),
    Block(down_to_ldm(2, 0), "down_blocks.2.attentions.0", "IN07", 1280, 10),
    Block(down_to_ldm(2, 1), "down_blocks.2.attentions.1", "IN08", 1280, 10, "layout"),
    Block("middle_block.1", "mid_block.attentions.0", "MID", 1280, 10),
    Block(up_to_ldm(0, 0), "up_blocks.0.attentions.0", "OUT0", 1280, 10, "content"),
    Block(up_to_ldm(0, 1), "up_blocks.0.attentions.1", "OUT1", 1280, 10, "style"),
    Block(up_to_ldm(0, 2), "up_blocks.0.attentions.2", "OUT2", 1280, 10),
    Block(up_to_ldm(1, 0), "up_blocks.1.attentions.0", "OUT3", 640, 2),
    Block(up_to_ldm(1, 1), "up_blocks.1.attentions.1", "OUT4", 640, 2),
    Block(up_to_ldm(1, 2), "up_blocks.1.attentions.2", "OUT5", 640, 2),
)

LBW_SLOTS = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT0", "OUT1", "OUT2", "OUT3", "OUT4", "OUT5")

_BY_NAME: dict[str, Block] = {}
for _b in SDXL_BLOCKS:
    for _name in (_b.ldm, _b.diffusers, "unet." + _b.diffusers, "diffusion_model." + _b.ldm, _b.slot.lower(),
                  _b.kohya, "lora_unet_" + _b.diffusers.replace(".", "_")):
        _BY_NAME[_name.lower()] = _b
    if _b.role:
        _BY_NAME[_b.role] = _b
del _b, _name


def resolve_block(name: str) -> Block:
    """The block for any name the registry knows: role, LDM, diffusers (with or without ``unet.``), LBW slot
    (``OUT1``, case-insensitive), or kohya prefix. Raises BlockNameError naming the name and the choices."""
    block = _BY_NAME.get(name.strip().lower())
    if block is None:
        choices = ", ".join(list(ROLES) + [b.slot for b in SDXL_BLOCKS])
        raise BlockNameError(f"unknown block {name!r}: use a role, an LBW slot ({choices}), an LDM name such as "
                             f"'output_blocks.1.1' or a diffusers name such as 'up_blocks.0.attentions.1'")
    return block


def role_block(role: str) -> Block:
    """The block that plays ``role`` (content, style, layout)."""
    if role not in ROLES:
        raise BlockNameError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    return resolve_block(ROLES[role])


_LDM_BLOCK = re.compile(r"^(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)(\.|$)")


def block_of(module: str) -> Block | None:
    """The attention block holding a canonical (LDM) module path, or None (resnets, embeddings, ...)."""
    m = _LDM_BLOCK.match(module)
    return _BY_NAME.get(m.group(1)) if m else None


# --- every module of the UNet and the text encoders ---

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


def resolve_name(name: str, underscore: bool) -> tuple[str, None] | None:
    """(LDM path, None) of a UNet module name without its dialect prefix: kohya spelling (LDM or diffusers layout)
    when ``underscore``, else a diffusers or LDM dotted path. None if it names no SDXL UNet module. (The second item
    is the piece of a fused layer; SDXL has none.)"""
    if underscore:
        path = kohya_to_module(name)
    else:
        path = diffusers_to_ldm(name) or (name if is_sdxl_module(name) else None)
    return (path, None) if path is not None else None


ARCHITECTURE = register(Architecture(
    name="sdxl", title="SDXL", article="an", blocks=SDXL_BLOCKS,
    roles={role: (ldm,) for role, ldm in ROLES.items()},
    block_pattern=_LDM_BLOCK,
    signature=tuple(ROLES.values()),
    diffusers_prefix="unet.",
    citation="B-LoRA (Frenkel et al., ECCV 2024, arXiv 2403.14572); layout: InstantStyle (community)",
    sub_path=re.compile(
        r"^(proj_in|proj_out|norm"
        r"|transformer_blocks(\.\d+(\.(attn[12](\.(to_q|to_k|to_v|to_out(\.0)?))?"
        r"|norm[123]|ff(\.net(\.\d+(\.proj)?)?)?))?)?)$"),
    is_module=is_sdxl_module,
    resolve_name=resolve_name,
    diffusers_names=lambda path: ((ldm_to_diffusers(path), None),) if ldm_to_diffusers(path) else None,
))
