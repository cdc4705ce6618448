"""The one place the core meets the host's model patcher (imports ``comfy``; never imported by the core)."""
from .patch import model_weight_shapes, patched_clone, require_sdxl

__all__ = ["model_weight_shapes", "patched_clone", "require_sdxl"]
