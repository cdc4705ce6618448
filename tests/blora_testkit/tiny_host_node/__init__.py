"""TEST-ONLY ComfyUI custom node: teaches the stock CheckpointLoaderSimple the tiny SDXL- and FLUX.1-architecture
checkpoints.

Installed into the test server's custom_nodes/ only (never part of the real pack). Importing it puts ``TinySDXL``
and ``TinyFlux`` at the front of ``comfy.supported_models.models``; it registers no nodes.
"""
from __future__ import annotations

import comfy.supported_models

from .tiny_flux_models import TinyFlux
from .tiny_models import TinySDXL

NODE_CLASS_MAPPINGS: dict = {}  # a custom node module needs the attribute; this one adds no nodes


def register() -> None:
    """Put TinySDXL and TinyFlux first in the host's model list (once: re-imports do not add them again)."""
    models = comfy.supported_models.models
    for config in (TinySDXL, TinyFlux):
        if not any(getattr(m, "__name__", "") == config.__name__ and getattr(m, "TINY_TESTKIT", False)
                   for m in models):
            models.insert(0, config)


register()
