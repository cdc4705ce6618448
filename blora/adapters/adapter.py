"""The in-memory form every dialect is read into, and pure tensor operations on it.

Each module is a ``ModuleAdapter`` of one kind (``blora.adapters.kinds``). Module paths are canonical: UNet modules by their
LDM path inside the diffusion model (``output_blocks.1.1.transformer_blocks.3.attn2.to_k``), text-encoder modules
with a ``te1:`` / ``te2:`` prefix and their transformers path (``te1:text_model.encoder.layers.0.self_attn.q_proj``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from ..blocks import SDXL_BLOCKS, Block, block_of, resolve_block
from ..errors import ArchitectureError, BLoRAError
from .kinds import ModuleAdapter, delta_weight

__all__ = ["Adapter", "ModuleAdapter", "delta_weight", "select", "merge", "check_fits"]


@dataclass(frozen=True)
class Adapter:
    """All modules of one adapter file (or of a merge), keyed by canonical module path."""

    modules: Mapping[str, ModuleAdapter]
    source: str = ""
    dialect: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    unmapped: tuple[str, ...] = ()
    trigger: str = ""

    def blocks(self) -> list[Block]:
        """Attention blocks this adapter touches, in SDXL order."""
        seen = {block_of(p) for p in self.modules} - {None}
        return [b for b in SDXL_BLOCKS if b in seen]

    def roles(self) -> list[str]:
        return [b.role for b in self.blocks() if b.role]

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())


def select(adapter: Adapter, blocks: Iterable[str | Block]) -> Adapter:
    """The modules of ``adapter`` inside the given blocks (any name the registry knows). Empty selection: error."""
    wanted = {b if isinstance(b, Block) else resolve_block(b) for b in blocks}
    if not wanted:
        raise BLoRAError("empty block selection: name at least one block or role")
    modules = {p: m for p, m in adapter.modules.items() if block_of(p) in wanted}
    return replace(adapter, modules=modules)


def merge(parts: Mapping[str, Adapter | None]) -> Adapter:
    """One adapter holding each role's (or block's) modules from its own source: {"content": A, "style": B}.

    Keys are roles or block names; each part contributes only its modules inside that block."""
    modules: dict[str, ModuleAdapter] = {}
    sources, triggers = [], []
    for name, adapter in parts.items():
        if adapter is None:
            continue
        part = select(adapter, [name])
        modules.update(part.modules)
        sources.append(f"{name}={adapter.source or '?'}")
        if adapter.trigger:
            triggers.append(adapter.trigger)
    if not modules:
        raise BLoRAError("merge: none of the given adapters holds the requested blocks")
    meta = {"blora.sources": ", ".join(sources)}
    return Adapter(modules=modules, source="merge(" + ", ".join(sources) + ")", dialect="merged",
                   metadata=meta, trigger=" ".join(dict.fromkeys(triggers)))


def check_fits(adapter: Adapter, weight_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ArchitectureError (naming the file and module) unless every UNet module exists in the model with the
    same (out, in) shape. weight_shapes: canonical module path -> weight shape."""
    for path, module in adapter.modules.items():
        if path.startswith("te"):
            continue
        shape = weight_shapes.get(path)
        if shape is None:
            raise ArchitectureError(f"{adapter.source or 'adapter'}: module {path!r} does not exist in this model "
                                    f"(is the LoRA for another architecture, or the model not SDXL?)")
        if tuple(shape[:2]) != module.out_in:
            raise ArchitectureError(f"{adapter.source or 'adapter'}: module {path!r} expects a weight of shape "
                                    f"{module.out_in}, the model has {tuple(shape[:2])} (a LoRA for another "
                                    f"architecture or model size)")
