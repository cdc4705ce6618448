"""The in-memory form every dialect is read into, and pure tensor operations on it.

Module paths are canonical: UNet modules by their LDM path inside the diffusion model
(``output_blocks.1.1.transformer_blocks.3.attn2.to_k``), text-encoder modules with a ``te1:`` / ``te2:`` prefix and
their transformers path (``te1:text_model.encoder.layers.0.self_attn.q_proj``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import torch

from .blocks import SDXL_BLOCKS, Block, block_of, resolve_block
from .errors import ArchitectureError, BLoRAError

# Tensor names each adapter kind holds (optional ones in the second tuple).
KIND_TENSORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lora": (("down", "up"), ("mid", "diff_b")),
    "loha": (("w1a", "w1b", "w2a", "w2b"), ("t1", "t2", "diff_b")),
    "lokr": ((), ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2", "diff_b")),
    "full": (("diff",), ("diff_b",)),
}


@dataclass(frozen=True)
class ModuleAdapter:
    """Adapter of one weight.

    kind ``lora``: down (r, in[, kh, kw]), up (out, r[, 1, 1]), optional mid (r, r, kh, kw);
    ``loha``: w1a (out, r), w1b (r, in), w2a (out, r), w2b (r, in), optional t1, t2;
    ``lokr``: w1 or (w1a, w1b), and w2 or (w2a, w2b), optional t2; ``full``: diff (out, in) or (n,), optional diff_b.
    Every kind may carry diff_b (out,): a bias difference (ComfyUI's trainer writes one beside each LoRA), which
    delta_weight ignores (it is the weight's delta); the host applies it to the bias.
    alpha: as stored in the file; None when the file stores none (scale 1, i.e. alpha = rank).
    dora_scale: DoRA magnitude as stored ((out, 1) output axis or (1, in) input axis), or None.
    dora_norm: None = render dora_scale as the host does (kohya/LyCORIS files); "adapted" = PEFT/paper DoRA
    (a PEFT ``lora_magnitude_vector``): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output row, which ``blora.host`` renders
    itself (stock ComfyUI's output-axis branch divides by the un-adapted ‖W‖ instead).
    """

    kind: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    dora_norm: str | None = None

    def __post_init__(self) -> None:
        if self.dora_norm not in (None, "adapted"):
            raise BLoRAError(f"unknown DoRA norm {self.dora_norm!r} (None or 'adapted')")
        if self.kind not in KIND_TENSORS:
            raise BLoRAError(f"unknown adapter kind {self.kind!r}")
        required, optional = KIND_TENSORS[self.kind]
        missing = [n for n in required if n not in self.tensors]
        extra = [n for n in self.tensors if n not in required + optional]
        if missing or extra:
            raise BLoRAError(f"{self.kind} adapter: missing tensors {missing}, unexpected {extra}")
        if self.kind == "lora" and self.tensors["down"].shape[0] != self.tensors["up"].shape[1]:
            raise BLoRAError(f"rank mismatch: down {tuple(self.tensors['down'].shape)}, "
                             f"up {tuple(self.tensors['up'].shape)}")

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["w1b"].shape[0])
        if self.kind == "lokr":
            return int(t["w2b"].shape[0] if "w2b" in t else t["w1b"].shape[0] if "w1b" in t else 0)
        return 0

    @property
    def scale(self) -> float:
        """alpha / rank, as ComfyUI applies it (1.0 without alpha, and for full-rank or un-factored kinds)."""
        if self.alpha is None or self.rank == 0:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def out_in(self) -> tuple[int, int]:
        """(out, in) of the weight this adapts (first two dims)."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["up"].shape[0]), int(t["down"].shape[1])
        if self.kind == "full":  # 1-D for norm weights: (n,)
            return tuple(int(s) for s in t["diff"].shape[:2])
        w = delta_weight(self)
        return int(w.shape[0]), int(w.shape[1])

    @property
    def num_params(self) -> int:
        n = sum(int(v.numel()) for v in self.tensors.values())
        return n + (int(self.dora_scale.numel()) if self.dora_scale is not None else 0)

    def to(self, dtype: torch.dtype) -> "ModuleAdapter":
        ds = self.dora_scale.to(dtype) if self.dora_scale is not None else None
        return replace(self, tensors={k: v.to(dtype) for k, v in self.tensors.items()}, dora_scale=ds)


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


def _kron_factor(t: Mapping[str, torch.Tensor], full: str, a: str, b: str) -> torch.Tensor:
    if full in t:
        return t[full].float()
    return t[a].float() @ t[b].float() if t[a].ndim == 2 else torch.einsum("ij...,jk...->ik...", t[a].float(), t[b].float())


def delta_weight(module: ModuleAdapter, strength: float = 1.0) -> torch.Tensor:
    """ΔW = strength · scale · (up @ down | (w1a w1b) ⊙ (w2a w2b) | w1 ⊗ w2 | diff), float32, shape (out, in[, k, k]).

    DoRA is not applied here (it needs the base weight); see ``blora.dora``."""
    t = module.tensors
    if module.kind == "lora":
        down, up = t["down"].float(), t["up"].float()
        if "mid" in t:
            raise BLoRAError("LoCon tucker (lora mid) delta is only applied by the host, not in the core")
        if down.ndim == 2:
            w = up @ down
        else:  # conv: up (out, r, 1, 1), down (r, in, kh, kw)
            w = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    elif module.kind == "loha":
        if "t1" in t:
            raise BLoRAError("LoHa with tucker tensors is only applied by the host, not in the core")
        w = (t["w1a"].float() @ t["w1b"].float()) * (t["w2a"].float() @ t["w2b"].float())
    elif module.kind == "lokr":
        w1 = _kron_factor(t, "w1", "w1a", "w1b")
        w2 = _kron_factor(t, "w2", "w2a", "w2b")
        if w2.ndim == 4:
            w1 = w1[..., None, None]
        w = torch.kron(w1, w2)
    else:
        w = t["diff"].float()
    return w * (strength * module.scale)


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
