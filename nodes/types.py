"""Socket types and shared input factories."""
from __future__ import annotations

from comfy_api.latest import io

from ..blora.compose.block_weights import STRENGTH_MODES

BLoRA = io.Custom("BLORA")
"""A ``blora.Adapter``: modules keyed by canonical path, with source, dialect, metadata and trigger."""


def intermediate_output() -> dict:
    """Schema fields for a node whose UI output is part of what it shows (the loader's block map): on hosts whose
    schema has ``has_intermediate_output`` (ComfyUI 0.33+), the host keeps that UI output when the node is cached,
    sends it again and writes it to /history, as for an output node, without running the node for its own sake.
    Older hosts (0.3.64) keep the UI output of cached nodes in /history by themselves."""
    fields = getattr(io.Schema, "__dataclass_fields__", {})
    return {"has_intermediate_output": True} if "has_intermediate_output" in fields else {}


def strength(name: str, tooltip: str, default: float = 1.0) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=-10.0, max=10.0, step=0.01, tooltip=tooltip)


ROLE_BLOCKS = {"content": "SDXL output_blocks.0.1, OUT0; FLUX.1 single_blocks.0-9",
               "style": "SDXL output_blocks.1.1, OUT1; FLUX.1 single_blocks.10-37",
               "layout": "SDXL input_blocks.8.1, IN08; FLUX.1 has none"}


def role_inputs(verb: str = "is applied") -> list:
    """Optional ``content``, ``style`` and ``layout`` BLORA inputs: each gives only its own block."""
    return [BLoRA.Input(role, optional=True, tooltip=f"B-LoRA whose {role} block ({where}) {verb}.")
            for role, where in ROLE_BLOCKS.items()]


def role_strength_inputs() -> list:
    """The content, style and layout strengths and the strength mode, as Apply B-LoRA and Batch Entry take them."""
    return [
        strength("content_strength", "Strength of the content block; negative values subtract it."),
        strength("style_strength", "Strength of the style block; negative values subtract it."),
        strength("layout_strength", "Strength of the layout block; negative values subtract it."),
        io.Combo.Input("strength_mode", options=list(STRENGTH_MODES), default="linear",
                       tooltip="linear: ComfyUI's LoRA strength. alpha_squared: the original B-LoRA "
                               "inference scale (strength s acts like linear s², sign kept)."),
    ]
