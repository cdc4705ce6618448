"""K-LoRA Fuse: training-free fusion of a subject LoRA and a style LoRA, layer by layer and step by step."""
from __future__ import annotations

from comfy_api.latest import io

from ..blora.adapters.adapter import Adapter
from ..blora.compose.klora import TIME_SCALES
from ..blora.host.realise import fused_clone
from .types import BLoRA, strength


class KLoRAFuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KLoRAFuse", display_name="K-LoRA Fuse", category="B-LoRA",
            description="K-LoRA (CVPR 2025): in every Linear layer both LoRAs adapt, use the subject or the style "
                        "LoRA at each step, chosen by comparing their top-K weight magnitudes with a time scale "
                        "that favours the subject early and the style late. Layers in one LoRA only take it. "
                        "Works with ordinary SDXL and FLUX.1 LoRAs, no training.",
            inputs=[
                io.Model.Input("model", tooltip="SDXL- or FLUX.1-architecture model; a fused clone is returned."),
                BLoRA.Input("subject", tooltip="The subject (content) LoRA."),
                BLoRA.Input("style", tooltip="The style LoRA."),
                strength("subject_strength", "Scale of the subject LoRA's deltas where it is used (the selection "
                                             "does not depend on it)."),
                strength("style_strength", "Scale of the style LoRA's deltas where it is used (the selection does "
                                           "not depend on it)."),
                io.Combo.Input("pattern", options=list(TIME_SCALES), default="s",
                               tooltip="Time scale S(t). s: 1.5·t/T + 0.5, each layer switches once from subject "
                                       "to style. s*: the official code's sawtooth ((1.5·t/T + 1.275) mod 1.5): "
                                       "style-leaning over the first 15% of the run, then subject again, turning "
                                       "to style layer by layer."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the two LoRAs fused.")])

    @classmethod
    def execute(cls, model: io.Model.Type, subject: Adapter, style: Adapter, subject_strength: float = 1.0,
                style_strength: float = 1.0, pattern: str = "s") -> io.NodeOutput:
        fused, _ = fused_clone(model, subject, style, subject_strength, style_strength, pattern)
        return io.NodeOutput(fused)


NODES = [KLoRAFuse]
