"""Save B-LoRA (split by roles or blocks, convert dialect and dtype) and Merge B-LoRA (each role from its own file)."""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..blora.adapters.adapter import Adapter, merge, select
from ..blora.errors import BLoRAError
from ..blora.formats.files import DTYPES, write_adapter
from ..blora.host.output_files import save_target
from ..blora.compose.block_weights import role_parts
from .types import BLoRA, role_inputs

log = logging.getLogger(__name__)

FORMATS = ("kohya", "comfy", "diffusers", "peft")


def select_roles(adapter: Adapter, roles: str) -> Adapter:
    """``all``, or the modules inside a comma list of roles / block names (any naming the registry knows).
    Errors name the text: an empty list, an unknown name, or blocks this adapter does not have."""
    if roles.strip().lower() == "all":
        return adapter
    names = [n.strip() for n in roles.split(",") if n.strip()]
    if not names:
        raise BLoRAError(f"roles {roles!r}: empty selection; use 'all', 'content', 'style', 'layout' or block "
                         f"names separated by commas")
    part = select(adapter, names)
    if not part.modules:
        held = ", ".join(f"{b.slot} ({b.role or b.ldm})" for b in adapter.blocks()) or "no block of a known model"
        raise BLoRAError(f"{adapter.source or 'adapter'}: none of the blocks {roles!r} is in this adapter; it holds "
                         f"{held}")
    return part


def save_adapter(adapter: Adapter, filename_prefix: str, fmt: str, dtype: str, roles: str) -> tuple[str, str]:
    """Write into the output folder's loras/ with the host's counter naming (prefix_00001_.safetensors).
    Returns (file name, subfolder relative to the output folder)."""
    if fmt not in FORMATS or dtype not in DTYPES:
        raise BLoRAError(f"format must be one of {FORMATS} and dtype one of {tuple(DTYPES)}, got {fmt!r}, {dtype!r}")
    target = save_target(filename_prefix)  # refuses empty and escaping names before anything is written
    written = write_adapter(adapter, target.folder, target.final, dialect=fmt, dtype=DTYPES[dtype],
                            metadata={"blora.selection": roles.strip()})
    log.info("Save B-LoRA: %d modules written to %s", len(adapter.modules), written)
    return written.name, os.path.relpath(written.parent, folder_paths.get_output_directory()).replace(os.sep, "/")


class BLoRASave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRASave", display_name="Save B-LoRA", category="B-LoRA/tools", is_output_node=True,
            description="Write an adapter (or some of its blocks: a split) as a .safetensors file in the output "
                        "folder's loras/ subfolder, in the dialect and precision you choose, with metadata (roles, "
                        "sources, rank, alpha, trigger). Works on any SDXL or FLUX.1 LoRA.",
            inputs=[
                BLoRA.Input("blora", tooltip="The adapter to save (from Load B-LoRA or Merge B-LoRA)."),
                io.String.Input("filename_prefix", default="B-LoRA",
                                tooltip="File name prefix inside output/loras/ (subfolders allowed, no '..' or "
                                        "absolute paths); a counter is appended: prefix_00001_.safetensors."),
                io.String.Input("roles", default="all",
                                tooltip="Blocks to keep: all, content, style, layout, or a comma list of block "
                                        "names in any naming (OUT1, output_blocks.1.1, up_blocks.0.attentions.1; "
                                        "FLUX.1: content, style, boundary, single_blocks.12, S12)."),
                io.Combo.Input("format", options=list(FORMATS), default="kohya",
                               tooltip="kohya: what stock LoraLoader and most UIs read. comfy: ComfyUI's "
                                       "diffusion_model.* keys. diffusers: unet.* keys with lora.down/up (the "
                                       "original B-LoRA form; alpha folded into the weights). peft: lora_A/lora_B "
                                       "(FLUX.1: transformer.* keys with q/k/v split, as diffusers and ai-toolkit "
                                       "write them; alpha folded)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp16",
                               tooltip="Precision of the saved tensors (fp16 halves the size; fp32 is exact)."),
            ],
            outputs=[])

    @classmethod
    def execute(cls, blora: Adapter, filename_prefix: str = "B-LoRA", roles: str = "all", format: str = "kohya",
                dtype: str = "fp16") -> io.NodeOutput:
        name, subfolder = save_adapter(select_roles(blora, roles), filename_prefix, format, dtype, roles)
        saved = {"filename": name, "subfolder": subfolder, "type": "output"}
        return io.NodeOutput(ui={"text": [f"{subfolder}/{name}"], "blora_files": [saved]})


class BLoRAMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRAMerge", display_name="Merge B-LoRA", category="B-LoRA/tools",
            description="One adapter holding the content block of one B-LoRA, the style block of another and "
                        "optionally the layout block of a third; connect Save B-LoRA to share it as one file.",
            inputs=[
                *role_inputs("is taken"),
            ],
            outputs=[BLoRA.Output(display_name="blora", tooltip="The merged adapter.")])

    @classmethod
    def execute(cls, content: Adapter | None = None, style: Adapter | None = None,
                layout: Adapter | None = None) -> io.NodeOutput:
        roles = {"content": content, "style": style, "layout": layout}
        if all(a is None for a in roles.values()):
            raise BLoRAError("Merge B-LoRA: connect at least one of content, style, layout")
        role_parts({r: (a, 1.0) for r, a in roles.items()})  # each given adapter must hold its role's block
        return io.NodeOutput(merge(roles))


NODES = [BLoRASave, BLoRAMerge]
