"""Socket types and shared input factories."""
from __future__ import annotations

from comfy_api.latest import io

BLoRA = io.Custom("BLORA")
"""A ``blora.Adapter``: modules keyed by canonical path, with source, dialect, metadata and trigger."""


def strength(name: str, tooltip: str, default: float = 1.0) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=-10.0, max=10.0, step=0.01, tooltip=tooltip)


ROLE_BLOCKS = {"content": "output_blocks.0.1, OUT0", "style": "output_blocks.1.1, OUT1",
               "layout": "input_blocks.8.1, IN08"}


def role_inputs(verb: str = "is applied") -> list:
    """Optional ``content``, ``style`` and ``layout`` BLORA inputs: each gives only its own block."""
    return [BLoRA.Input(role, optional=True, tooltip=f"B-LoRA whose {role} block ({where}) {verb}.")
            for role, where in ROLE_BLOCKS.items()]
