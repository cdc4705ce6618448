"""B-LoRA Batch Entry / B-LoRA Batch Apply: a grid of B-LoRAs sampled in one pass (image i of the batch uses
entry i), and B-LoRA Image Grid to lay the batch out."""
from __future__ import annotations

import math

import torch
from comfy_api.latest import io
from einops import rearrange

from ..blora.adapters.adapter import Adapter
from ..blora.errors import BLoRAError
from ..blora.host.realise import batched_clone
from ..blora.compose.block_weights import role_parts
from .types import role_inputs, role_strength_inputs

BLoRABatch = io.Custom("BLORA_BATCH")
"""A tuple of entries, each a tuple of (Adapter, linear strength) parts as Apply B-LoRA would apply them."""


class BLoRABatchEntry(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRABatchEntry", display_name="B-LoRA Batch Entry", category="B-LoRA/batch",
            description="Add one entry (content, style and layout blocks with strengths, as Apply B-LoRA takes them) "
                        "to a B-LoRA batch. Chain entries: the first entry is image 0 of the sampled batch.",
            inputs=[
                BLoRABatch.Input("batch", optional=True, tooltip="Entries so far (none: this is the first)."),
                *role_inputs("is applied to this entry's image"),
                *role_strength_inputs(),
            ],
            outputs=[BLoRABatch.Output(display_name="BLORA_BATCH", tooltip="The entries with this one appended.")])

    @classmethod
    def execute(cls, content_strength: float = 1.0, style_strength: float = 1.0, layout_strength: float = 1.0,
                strength_mode: str = "linear", batch: tuple | None = None, content: Adapter | None = None,
                style: Adapter | None = None, layout: Adapter | None = None) -> io.NodeOutput:
        parts = role_parts({"content": (content, content_strength), "style": (style, style_strength),
                            "layout": (layout, layout_strength)}, strength_mode)
        return io.NodeOutput(tuple(batch or ()) + (tuple(parts),))


class BLoRABatchApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRABatchApply", display_name="B-LoRA Batch Apply", category="B-LoRA/batch",
            description="One model, many B-LoRAs: image i of the sampled batch uses entry i (i mod the number of "
                        "entries), in one sampling pass. Each image matches a separate Apply B-LoRA + KSampler "
                        "run of its entry. Blocks every entry applies alike are patched into the weights; where "
                        "entries differ, each image's rows go through their own adapter.",
            inputs=[
                io.Model.Input("model", tooltip="SDXL- or FLUX.1-architecture model; a clone is returned."),
                BLoRABatch.Input("batch", tooltip="Entries from B-LoRA Batch Entry nodes."),
            ],
            outputs=[io.Model.Output(tooltip="The model that applies entry i to image i of the batch. Set the "
                                             "latent batch size to the number of entries.")])

    @classmethod
    def execute(cls, model: io.Model.Type, batch: tuple) -> io.NodeOutput:
        return io.NodeOutput(batched_clone(model, [list(parts) for parts in batch]))


class BLoRAImageGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRAImageGrid", display_name="B-LoRA Image Grid", category="B-LoRA/batch",
            description="Lay a batch of images out as one grid image, row by row (image 0 top left).",
            inputs=[
                io.Image.Input("images", tooltip="A batch of images of one size."),
                io.Int.Input("columns", default=0, min=0, max=64,
                             tooltip="Images per row; 0: the smallest square grid that holds the batch."),
            ],
            outputs=[io.Image.Output(tooltip="One image: the grid (empty cells black).")])

    @classmethod
    def execute(cls, images, columns: int = 0) -> io.NodeOutput:
        count = int(images.shape[0])
        if count == 0:
            raise BLoRAError("B-LoRA Image Grid: the batch is empty")
        columns = columns or math.ceil(math.sqrt(count))
        rows = math.ceil(count / columns)
        pad = rows * columns - count
        if pad:
            images = torch.cat([images, images.new_zeros(pad, *images.shape[1:])])
        grid = rearrange(images, "(r c) h w ch -> 1 (r h) (c w) ch", r=rows, c=columns)
        return io.NodeOutput(grid.contiguous())


NODES = [BLoRABatchEntry, BLoRABatchApply, BLoRAImageGrid]
