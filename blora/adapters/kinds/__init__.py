"""Adapter kinds, one module each (``lora``, ``loha``, ``lokr``, ``full``), behind ``base.Kind``; ``KINDS`` is the
registry every other module consults (reader, writers, inspect, host patch, fusion, schedules, trainer).

DoRA is a variant any kind may carry (``ModuleAdapter.dora_scale``), not a kind.
"""
from . import lora, loha, lokr, full  # noqa: F401,I001  (each registers its kind, in this order)
from .base import KINDS, Kind, LowRank, ModuleAdapter, delta_weight, kind_of

__all__ = ["KINDS", "Kind", "LowRank", "ModuleAdapter", "delta_weight", "kind_of"]
