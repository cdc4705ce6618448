"""Load B-LoRA: read any adapter dialect into a BLORA value, with its trigger and a one-line summary."""
from __future__ import annotations

import os

from comfy_api.latest import io

from ..blora.formats.files import read_adapter
from ..blora.formats.report import inspect_adapter
from ..blora.train.loss_history import loss_map, losses_in
from .folders import adapter_files, adapter_path
from .types import BLoRA, intermediate_output


def ui_report(adapter, report, lora_name: str) -> dict:
    """The JSON-able block map the front-end draws: the inspection report plus the fields it relies on."""
    out = dict(report.to_dict())
    out.setdefault("dialect", adapter.dialect)
    out.setdefault("roles", adapter.roles())
    out.setdefault("num_params", adapter.num_params)
    out["blocks"] = [b.slot for b in adapter.blocks()]
    alphas = sorted({m.alpha for m in adapter.modules.values() if m.alpha is not None})
    out["alpha"] = alphas or None  # None: the file stores no alpha (scale 1)
    out["file"] = lora_name
    return out


class BLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRALoader", display_name="Load B-LoRA", category="B-LoRA",
            description="Read a B-LoRA (or any SDXL or FLUX.1 LoRA, LoHa, LoKr, DoRA) in any common key dialect: "
                        "original B-LoRA/diffusers, PEFT, kohya, LyCORIS, ComfyUI, ai-toolkit. Connect it to Apply "
                        "B-LoRA.",
            inputs=[io.Combo.Input("lora_name", options=adapter_files(),
                                   tooltip="Adapter file from models/blora or models/loras (.safetensors).")],
            outputs=[BLoRA.Output(display_name="blora", tooltip="The adapter, every module of the file."),
                     io.String.Output(display_name="trigger",
                                      tooltip="Trigger token from the file's metadata, or empty."),
                     io.String.Output(display_name="summary",
                                      tooltip="One line: dialect, blocks and roles, rank, alpha, parameters; for a "
                                              "file this pack trained, its steps and final loss."),
                     io.Custom("LOSS_MAP").Output(display_name="loss_map",
                                                  tooltip="The per-step loss a file this pack trained records "
                                                          "(for Plot Loss Graph); empty for other files.")],
            **intermediate_output())

    @classmethod
    def fingerprint_inputs(cls, lora_name: str) -> tuple:
        try:
            stat = os.stat(adapter_path(lora_name))
        except OSError:
            return (lora_name,)
        return (lora_name, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, lora_name: str) -> io.NodeOutput:
        adapter = read_adapter(adapter_path(lora_name))
        report = inspect_adapter(adapter)
        return io.NodeOutput(adapter, adapter.trigger or "", report.summary(), loss_map(losses_in(adapter.metadata)),
                             ui={"blora": [ui_report(adapter, report, lora_name)]})


NODES = [BLoRALoader]
