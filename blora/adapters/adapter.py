"""The in-memory form every dialect is read into, and pure tensor operations on it.

Each module is a ``ModuleAdapter`` of one kind (``blora.adapters.kinds``). Module paths are canonical: denoiser modules by their
host path inside the diffusion model (SDXL ``output_blocks.1.1.transformer_blocks.3.attn2.to_k``, FLUX.1
``single_blocks.3.linear1``; ``blora.arch`` tells the architecture from them), text-encoder modules
with a ``te1:`` / ``te2:`` prefix and their transformers path (``te1:text_model.encoder.layers.0.self_attn.q_proj``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from .. import arch as architectures
from ..arch import Block, block_of
from ..errors import ArchitectureError, BLoRAError
from .kinds import ModuleAdapter, delta_weight

__all__ = ["Adapter", "ModuleAdapter", "delta_weight", "select", "merge", "check_fits"]

TEXT_ENCODER_PREFIXES = ("te1:", "te2:")


def is_text_encoder(path: str) -> bool:
    """Whether a canonical module path is a text encoder's (``te1:`` / ``te2:``) rather than the UNet's."""
    return path.startswith(TEXT_ENCODER_PREFIXES)


@dataclass(frozen=True)
class Adapter:
    """All modules of one adapter file (or of a merge), keyed by canonical module path."""

    modules: Mapping[str, ModuleAdapter]
    source: str = ""
    dialect: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    unmapped: tuple[str, ...] = ()
    trigger: str = ""

    @property
    def architecture(self) -> architectures.Architecture | None:
        """The architecture its denoiser modules belong to (None for a text-encoder-only adapter)."""
        return architectures.adapter_architecture(self.modules, self.source or "adapter")

    def blocks(self) -> list[Block]:
        """Blocks this adapter touches, in model order."""
        seen = {block_of(p) for p in self.modules} - {None}
        arch = self.architecture
        return [b for b in arch.blocks if b in seen] if arch else []

    def roles(self) -> list[str]:
        """Roles whose blocks it touches, in model order (SDXL: the block's role; FLUX: any block of the range)."""
        return list(dict.fromkeys(b.role for b in self.blocks() if b.role))

    def unet_modules(self) -> dict[str, ModuleAdapter]:
        """The modules that patch the UNet (MODEL), without the text encoders'."""
        return {p: m for p, m in self.modules.items() if not is_text_encoder(p)}

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())


def select(adapter: Adapter, blocks: Iterable[str | Block]) -> Adapter:
    """The modules of ``adapter`` inside the given blocks: Blocks, or names in the adapter's architecture (a role or
    preset means all its blocks: FLUX ``content`` is single_blocks.0-9). Empty selection: error."""
    arch = adapter.architecture
    wanted = {w for b in blocks for w in ((b,) if isinstance(b, Block) else architectures.resolve_blocks(b, arch))}
    if not wanted:
        raise BLoRAError("empty block selection: name at least one block or role")
    modules = {p: m for p, m in adapter.modules.items() if block_of(p) in wanted}
    return replace(adapter, modules=modules)


def merge(parts: Mapping[str, Adapter | None]) -> Adapter:
    """One adapter holding each role's (or block's) modules from its own source: {"content": A, "style": B}.

    Keys are roles or block names; each part contributes only its modules inside that block."""
    given = [a for a in parts.values() if a is not None]
    titles = {a.architecture.title for a in given if a.architecture is not None}
    if len(titles) > 1:
        raise ArchitectureError("merge: the adapters are for different architectures: " + ", ".join(
            f"{a.source or '?'} ({a.architecture.title if a.architecture else 'text encoder only'})" for a in given))
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
    for path, module in adapter.unet_modules().items():
        shape = weight_shapes.get(path)
        if shape is None:
            raise ArchitectureError(f"{adapter.source or 'adapter'}: module {path!r} does not exist in this model "
                                    f"(is the LoRA for another architecture or model?)")
        if tuple(shape[:2]) != module.out_in:
            raise ArchitectureError(f"{adapter.source or 'adapter'}: module {path!r} expects a weight of shape "
                                    f"{module.out_in}, the model has {tuple(shape[:2])} (a LoRA for another "
                                    f"architecture or model size)")
