"""What every adapter kind states about itself, once: ``Kind`` (the base class) and ``LowRank`` (factors).

A kind is a stateless description of one way to store a weight update (LoRA, LoHa, LoKr, full diff). Everything
that depends on the kind goes through its ``Kind``: which tensors it holds and how each dialect spells them, its
rank, the (out, in) it adapts, shape checks, the delta, and (for kinds that can be trained) its trainable form.
Tensors are a mapping of canonical tensor names (``down``, ``w1a``…) to tensors; ``diff_b`` (a bias difference)
is allowed beside every kind and is never part of the delta. DoRA is not a kind: any module may carry a
``dora_scale`` (``blora.adapters.adapter.ModuleAdapter``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

import torch

from ...errors import BLoRAError

Tensors = Mapping[str, torch.Tensor]
BIAS = "diff_b"
DORA_NORMS = (None, "adapted")


@dataclass(frozen=True)
class LowRank:
    """ΔW = up @ down (scale not applied). up: (out, r), down: (r, in)."""

    up: torch.Tensor
    down: torch.Tensor


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 for 2-D a and b (the product of two factors)."""
    return a.float() @ b.float()


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A Tucker/CP product as LyCORIS and ComfyUI compute it: core (r, r, kh, kw), a (r, out), b (r, in) ->
    (out, in, kh, kw), float32 (``einsum('i j k l, j r, i p -> p r k l', core, b, a)``)."""
    return torch.einsum("ijkl,jr,ip->prkl", core.float(), b.float(), a.float())


class Kind:
    """One adapter kind. Subclasses set the class attributes and implement the methods.

    name: the id stored in ``ModuleAdapter.kind``; label: how people write it (``LoKr``); required / optional:
    canonical tensor names; read_suffixes: file suffix -> tensor name for every spelling any dialect uses;
    kohya_suffixes: tensor name -> suffix in the kohya/LyCORIS (extended) dialects; plain: tensor names a plain
    (down/up only) dialect can hold, empty when the kind needs an extended dialect.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    optional: ClassVar[tuple[str, ...]] = ()
    read_suffixes: ClassVar[Mapping[str, str]]
    kohya_suffixes: ClassVar[Mapping[str, str]]
    plain: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        return f"<adapter kind {self.name}>"

    def allowed(self) -> tuple[str, ...]:
        return self.required + self.optional + (BIAS,)

    def suffixes(self, down_up: tuple[str, str]) -> dict[str, str]:
        """tensor name -> file suffix when written in a dialect whose LoRA suffixes are ``down_up``."""
        return {**self.kohya_suffixes, BIAS: ".diff_b"}

    def rank(self, t: Tensors) -> int:
        """The rank ComfyUI divides alpha by (0: the kind has none; alpha is then ignored, scale 1)."""
        return 0

    def check(self, t: Tensors) -> str | None:
        """What is wrong with these tensors' shapes (None when they fit together)."""
        return None

    def delta(self, t: Tensors) -> torch.Tensor:
        """ΔW before alpha/rank scaling, float32, (out, in[, kh, kw])."""
        raise NotImplementedError

    def out_in(self, t: Tensors) -> tuple[int, int]:
        """(out, in) of the weight this adapts (first two dims)."""
        w = self.delta(t)
        return int(w.shape[0]), int(w.shape[1])

    def low_rank(self, t: Tensors) -> LowRank | None:
        """The delta as two factors up @ down, when the kind stores exactly that (no copy); else None."""
        return None

    def delta_bound(self, t: Tensors, scale: float) -> float | None:
        """A cheap upper bound on max|scale · ΔW| without computing ΔW, or None (then ΔW is computed)."""
        return None

    def fold_scale(self, t: Tensors, scale: float) -> dict[str, torch.Tensor]:
        """The tensors with ``scale`` multiplied in (for dialects that store no alpha)."""
        raise NotImplementedError(f"{self.label} has no plain form")


KINDS: dict[str, Kind] = {}


def register(cls: type[Kind]) -> type[Kind]:
    """Class decorator: add one instance of a Kind subclass to ``KINDS`` under its name."""
    KINDS[cls.name] = cls()
    return cls


def kind_of(name: str) -> Kind:
    if name not in KINDS:
        raise BLoRAError(f"unknown adapter kind {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]


@dataclass(frozen=True)
class ModuleAdapter:
    """Adapter of one weight: its kind (a ``KINDS`` name) and canonical tensors (see each kind's module).

    Every kind may carry diff_b (out,): a bias difference (ComfyUI's trainer writes one beside each LoRA), which
    delta_weight ignores (it is the weight's delta); the host applies it to the bias.
    alpha: as stored in the file; None when the file stores none (scale 1, i.e. alpha = rank).
    dora_scale: DoRA magnitude as stored ((out, 1) output axis or (1, in) input axis), or None; any kind may carry
    one. dora_norm: None = render dora_scale as the host does (an input-axis (1, in) scale, which the host renders
    exactly); "adapted" = per-output-row DoRA as PEFT, LyCORIS 3.2+ and the paper render it (a PEFT
    ``lora_magnitude_vector`` or an (out, 1) ``dora_scale``): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output row, which
    ``blora.host`` renders itself (stock ComfyUI's output-axis branch divides by the un-adapted ‖W‖ instead).
    """

    kind: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    dora_norm: str | None = None

    def __post_init__(self) -> None:
        if self.dora_norm not in DORA_NORMS:
            raise BLoRAError(f"unknown DoRA norm {self.dora_norm!r} (None or 'adapted')")
        spec = kind_of(self.kind)
        missing = [n for n in spec.required if n not in self.tensors]
        extra = [n for n in self.tensors if n not in spec.allowed()]
        if missing or extra:
            raise BLoRAError(f"{self.kind} adapter: missing tensors {missing}, unexpected {extra}")
        problem = spec.check(self.tensors)
        if problem:
            raise BLoRAError(problem)

    @property
    def spec(self) -> Kind:
        """The kind's description (``KINDS[kind]``)."""
        return KINDS[self.kind]

    @property
    def rank(self) -> int:
        return self.spec.rank(self.tensors)

    @property
    def scale(self) -> float:
        """alpha / rank, as ComfyUI applies it (1.0 without alpha, and for full-rank or un-factored kinds)."""
        if self.alpha is None or self.rank == 0:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def out_in(self) -> tuple[int, int]:
        """(out, in) of the weight this adapts (first two dims)."""
        return self.spec.out_in(self.tensors)

    @property
    def num_params(self) -> int:
        n = sum(int(v.numel()) for v in self.tensors.values())
        return n + (int(self.dora_scale.numel()) if self.dora_scale is not None else 0)

    def to(self, dtype: torch.dtype) -> "ModuleAdapter":
        ds = self.dora_scale.to(dtype) if self.dora_scale is not None else None
        return replace(self, tensors={k: v.to(dtype) for k, v in self.tensors.items()}, dora_scale=ds)


def delta_weight(module: ModuleAdapter, strength: float = 1.0) -> torch.Tensor:
    """ΔW = strength · scale · (the kind's delta), float32, shape (out, in[, kh, kw]).

    DoRA is not applied here (it needs the base weight; see ``blora.host.patch``)."""
    return module.spec.delta(module.tensors) * (strength * module.scale)
