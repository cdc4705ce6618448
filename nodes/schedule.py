"""B-LoRA Strength Schedule: content, style and layout strengths that change over the sampling steps."""
from __future__ import annotations

from comfy_api.latest import io

from ..blora.adapters.adapter import Adapter
from ..blora.host.realise import scheduled_clone
from ..blora.compose.strength_schedule import parse_schedule
from .types import BLoRA, role_inputs

SCHEDULE_HELP = ("Keyframes progress:strength separated by commas, e.g. '0:1.0, 0.6:0.3' (progress 0 = first step, "
                 "1 = last step of the run; linear between keyframes, held before the first and after the last). "
                 "One number is a constant strength, exactly as Apply B-LoRA.")


def _schedule_input(role: str, default: str) -> io.String.Input:
    return io.String.Input(f"{role}_schedule", default=default, tooltip=f"Strength of the {role} block over the "
                           f"sampling steps. {SCHEDULE_HELP}")


class BLoRASchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRASchedule", display_name="B-LoRA Strength Schedule", category="B-LoRA/schedule",
            description="Apply the content, style and layout blocks of B-LoRAs with strengths that follow the "
                        "sampling progress of each run (any sampler and step count). Constant schedules are "
                        "ordinary patches; scheduled blocks update their layers' weights at every step.",
            inputs=[
                io.Model.Input("model", tooltip="SDXL- or FLUX.1-architecture model; a patched clone is returned."),
                *role_inputs(),
                _schedule_input("content", "1.0"),
                _schedule_input("style", "0:0.0, 0.3:1.0"),
                _schedule_input("layout", "1.0"),
            ],
            outputs=[io.Model.Output(tooltip="The model with the blocks applied on their schedules.")])

    @classmethod
    def execute(cls, model: io.Model.Type, content_schedule: str = "1.0", style_schedule: str = "1.0",
                layout_schedule: str = "1.0", content: Adapter | None = None, style: Adapter | None = None,
                layout: Adapter | None = None) -> io.NodeOutput:
        roles = {role: (adapter, parse_schedule(text, f"{role}_schedule"))
                 for role, adapter, text in (("content", content, content_schedule),
                                             ("style", style, style_schedule),
                                             ("layout", layout, layout_schedule))}
        return io.NodeOutput(scheduled_clone(model, roles))


NODES = [BLoRASchedule]
