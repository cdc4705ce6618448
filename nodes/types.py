"""Socket types and shared input factories."""
from __future__ import annotations

from comfy_api.latest import io

BLoRA = io.Custom("BLORA")
"""A ``blora.Adapter``: modules keyed by canonical path, with source, dialect, metadata and trigger."""


def strength(name: str, tooltip: str, default: float = 1.0) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=-10.0, max=10.0, step=0.01, tooltip=tooltip)
