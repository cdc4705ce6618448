"""SDXL attention blocks: one frozen record each, addressable by LDM name, diffusers name, LBW slot and role.

Index rule for SDXL (num_res_blocks = [2, 2, 2]):
    down_blocks.x.attentions.i -> input_blocks.(1 + 3x + i).1
    mid_block.attentions.0     -> middle_block.1
    up_blocks.x.attentions.i   -> output_blocks.(3x + i).1
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BlockNameError

NUM_RES_BLOCKS = 2  # SDXL: down blocks have 2 resnets, up blocks 3 (= NUM_RES_BLOCKS + 1)


@dataclass(frozen=True)
class Block:
    """One attention block (a SpatialTransformer) of the SDXL UNet.

    ldm: ComfyUI / LDM module path (``output_blocks.1.1``); diffusers: ``up_blocks.0.attentions.1``;
    slot: LBW slot name (``OUT1``); width: channels at full SDXL width; depth: transformer blocks at full SDXL
    depth; role: ``content`` / ``style`` / ``layout`` or None.
    """

    ldm: str
    diffusers: str
    slot: str
    width: int
    depth: int
    role: str | None = None

    @property
    def kohya(self) -> str:
        """Prefix of kohya LDM-style key names: ``lora_unet_output_blocks_1_1``."""
        return "lora_unet_" + self.ldm.replace(".", "_")


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
