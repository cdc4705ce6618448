"""Apply B-LoRA (content, style and layout blocks with their own strengths) and B-LoRA Block Weights."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..blora.adapters.adapter import Adapter
from ..blora.host import patched_clone
from ..blora.compose.block_weights import block_weight_parts, parse_block_weights, role_parts
from .types import BLoRA, role_inputs, role_strength_inputs

log = logging.getLogger(__name__)

WEIGHTS_EXAMPLE = ("content=1.0, style=1.0\n# OUT1=0.6, input_blocks.8.1=0.3\n"
                   "# output_blocks.0.1.transformer_blocks.3=0\n")


class BLoRAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRAApply", display_name="Apply B-LoRA", category="B-LoRA",
            description="Patch an SDXL model with the content block (output_blocks.0.1) of one B-LoRA, the style "
                        "block (output_blocks.1.1) of another and optionally a layout block (input_blocks.8.1), "
                        "each with its own strength; or a FLUX.1 model with the content blocks (single_blocks.0-9) "
                        "and style blocks (single_blocks.10-37) SplitFlux found. Returns a patched clone; the input "
                        "model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="SDXL- or FLUX.1-architecture model (the adapters' own); a patched "
                                                "clone is returned."),
                *role_inputs(),
                *role_strength_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with the B-LoRA blocks applied.")])

    @classmethod
    def execute(cls, model: io.Model.Type, content_strength: float = 1.0, style_strength: float = 1.0,
                layout_strength: float = 1.0, strength_mode: str = "linear", content: Adapter | None = None,
                style: Adapter | None = None, layout: Adapter | None = None) -> io.NodeOutput:
        parts = role_parts({"content": (content, content_strength), "style": (style, style_strength),
                            "layout": (layout, layout_strength)}, strength_mode)
        return io.NodeOutput(patched_clone(model, parts))


class BLoRABlockWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRABlockWeights", display_name="B-LoRA Block Weights", category="B-LoRA",
            description="Apply every module of an adapter with a strength per block (or per transformer block, "
                        "attention or projection inside a block), written as text.",
            inputs=[
                io.Model.Input("model", tooltip="SDXL- or FLUX.1-architecture model (the adapters' own); a patched "
                                                "clone is returned."),
                BLoRA.Input("blora", tooltip="The adapter to apply (all of its blocks)."),
                io.String.Input("weights", multiline=True, default=WEIGHTS_EXAMPLE,
                                tooltip="Entries name=value, separated by commas or new lines; # starts a comment. "
                                        "Names: content, style, layout, LBW slots (IN04 … OUT5), LDM or diffusers "
                                        "block names, optionally followed by a sub-path such as "
                                        ".transformer_blocks.3.attn2; for FLUX.1: content, style, boundary, "
                                        "double_blocks.N, single_blocks.N (S12), sub-paths such as .linear1 or "
                                        ".img_attn.qkv. default=… sets unlisted blocks (1.0 if not given). The "
                                        "most specific entry wins."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the adapter applied at the given block strengths.")])

    @classmethod
    def execute(cls, model: io.Model.Type, blora: Adapter, weights: str) -> io.NodeOutput:
        block_weights = parse_block_weights(weights, blora.architecture)
        for entry in block_weights.unused(blora.modules):
            log.warning("%s: block weights entry %r (%s) matches no module of this file", blora.source,
                        entry.text, entry.position)
        return io.NodeOutput(patched_clone(model, block_weight_parts(blora, block_weights)))


NODES = [BLoRAApply, BLoRABlockWeights]
