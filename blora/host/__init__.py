"""The one place the core meets the host (imports ``comfy``; never imported by the core). ``realise`` turns a plan
into host patches; ``compat`` names the host internals the pack relies on."""
from .architecture import require_architecture
from .patch import model_weight_shapes
from .realise import patched_clone

__all__ = ["model_weight_shapes", "patched_clone", "require_architecture"]
