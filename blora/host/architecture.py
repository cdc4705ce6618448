"""Which architecture a host model is, and the refusal of an adapter for another one (``blora.arch`` holds the
facts; this module only reads the model's weight paths, ``patch.model_weight_shapes``)."""
from __future__ import annotations

from typing import Iterable, Mapping

from .. import arch
from ..adapters.adapter import Adapter
from .patch import model_weight_shapes


def model_name(model) -> str:
    base = getattr(model, "model", model)
    config = getattr(base, "model_config", None)
    return type(base).__name__ + (f" ({type(config).__name__})" if config is not None else "")


def model_architecture(model, shapes: Mapping[str, tuple[int, ...]] | None = None) -> arch.Architecture | None:
    """The model's architecture (SDXL, FLUX.1) from its weight paths, or None."""
    return arch.detect_model(shapes if shapes is not None else model_weight_shapes(model))


def require_architecture(model, adapters: Iterable[Adapter] = (), shapes: Mapping[str, tuple[int, ...]] | None = None,
                         supported: Iterable[str] | None = None) -> arch.Architecture:
    """The model's architecture; ArchitectureError (naming the model, the file and both architectures) when it is
    none the pack supports (or not in ``supported``), or an adapter is for another one."""
    return arch.require_match(shapes if shapes is not None else model_weight_shapes(model), model_name(model),
                              [(a.source or "adapter", a.modules) for a in adapters], supported)
