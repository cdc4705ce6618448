"""What a feature wants done to the model, as data: a ``Plan`` of per-layer entries the host realiser
(``blora.host.realise``) turns into host patches on a clone. No host import here.

Entries (each names one layer by its canonical path, ``output_blocks.1.1.transformer_blocks.0.attn2.to_k``):

- ``Static``: an adapter module added at a strength, W + s·ΔW and b + s·Δb (Apply B-LoRA, Block Weights, constant
  schedules, the layers of K-LoRA that keep one LoRA throughout, the modules every Batch Apply entry shares).
- ``Timed``: a module whose strength follows the sampling progress p: W + f(p)·s·ΔW (strength schedules), f a
  signal named in ``Plan.signals``.
- ``Switched``: K-LoRA's switch between two modules: the first while the signal is below the threshold, else the
  second.
- ``Routed``: one Static list per batch entry; row r of a sampled batch uses entry r mod N (Batch Apply).
- ``Trained``: a trainable layer object (``blora.adapters.trainable.Trainable``, ``blora.train.seeds.SeedsLoRA`` …) installed
  as a weight function (mode "weight": W -> layer(W)) or as an activation hook (mode "activation": the layer's output
  += layer.delta(x)).

Every entry treats the module's bias difference (``diff_b``) as the host's own LoRA loader does: b + s·Δb.
A plan lists entries in order; entries on one layer apply in that order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch

from ..adapters.adapter import Adapter, ModuleAdapter

log = logging.getLogger(__name__)

TEXT_ENCODER_PREFIXES = ("te1:", "te2:")
MODES = ("weight", "activation")


@dataclass(frozen=True)
class Static:
    """module added at strength; source names the file in errors (modules of one source and strength become one
    set of host patches)."""

    module: ModuleAdapter
    strength: float
    source: str = ""


@dataclass(frozen=True)
class Timed:
    """part at strength × the signal's value at the current sampling progress."""

    part: Static
    signal: str


@dataclass(frozen=True)
class Switched:
    """first while the signal is below threshold, else second (each at its own strength)."""

    first: Static
    second: Static
    signal: str
    threshold: float


@dataclass(frozen=True)
class Routed:
    """Per batch entry, the parts applied to its rows (an entry may have none)."""

    entries: tuple[tuple[Static, ...], ...]


@dataclass(frozen=True, eq=False)
class Trained:
    """A trainable layer object. mode "weight": a weight function W -> layer(W) (``layer.forward(weight)``);
    mode "activation": output += layer.delta(x) (``layer.delta(input)``)."""

    layer: Any
    mode: str = "activation"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"trainable layer mode {self.mode!r}: choose one of {', '.join(MODES)}")


Entry = Union[Static, Timed, Switched, Routed, Trained]


@dataclass
class Widen:
    """Multi-seed training with shared draws: the batch is widened from ``rows`` to seeds·rows (seed-major) at
    every layer of ``layers`` (canonical layer paths of every UNet layer from the first trained one to the end, e.g.
    ``output_blocks.0.1`` …, ``out``: a forward pre-hook widens each batch-sized argument), skip connections included
    (an output_block_patch)."""

    seeds: int
    rows: int
    layers: tuple[str, ...]


@dataclass
class Plan:
    """Entries (path, entry) in order; signals: name -> f(progress in [0, 1]); compute_dtype: the clone's compute
    dtype (manual cast) when it should differ from the weights' (training); widen: see Widen."""

    entries: list[tuple[str, Entry]] = field(default_factory=list)
    signals: dict[str, Callable[[float], float]] = field(default_factory=dict)
    compute_dtype: Any = None
    widen: Widen | None = None

    def add(self, path: str, entry: Entry) -> "Plan":
        self.entries.append((path, entry))
        return self

    def of(self, kind: type) -> Iterator[tuple[str, Any]]:
        """(path, entry) of one entry type, in order."""
        return ((p, e) for p, e in self.entries if isinstance(e, kind))


def unet_modules(adapter: Adapter) -> dict[str, ModuleAdapter]:
    """The adapter's UNet modules (text-encoder modules left out and logged: B-LoRA patches the MODEL only)."""
    te = [p for p in adapter.modules if p.startswith(TEXT_ENCODER_PREFIXES)]
    if te:
        log.info("%s: %d text-encoder modules ignored (B-LoRA patches the MODEL only)", adapter.source or "adapter",
                 len(te))
    return {p: m for p, m in adapter.modules.items() if not p.startswith(TEXT_ENCODER_PREFIXES)}


def static_plan(parts: Sequence[tuple[Adapter, float]], plan: Plan | None = None) -> Plan:
    """Each (adapter, strength) part's UNet modules as Static entries, in order (strength 0 included: the realiser
    checks them against the model and then skips them)."""
    plan = Plan() if plan is None else plan
    for adapter, strength in parts:
        for path, module in unet_modules(adapter).items():
            plan.add(path, Static(module, float(strength), adapter.source))
    return plan


def timed_plan(parts: Mapping[str, tuple[Adapter, Callable[[float], float]]], plan: Plan | None = None) -> Plan:
    """signal name -> (adapter, f): every UNet module of the adapter at strength f(progress)."""
    plan = Plan() if plan is None else plan
    for signal, (adapter, fn) in parts.items():
        plan.signals[signal] = fn
        for path, module in unet_modules(adapter).items():
            plan.add(path, Timed(Static(module, 1.0, adapter.source), signal))
    return plan


def trained_plan(layers: Mapping[str, Any], mode: str | None = None, compute_dtype: Any = None,
                 widen: Widen | None = None) -> Plan:
    """path -> trainable layer object, each installed in ``mode`` ("weight" or "activation"); None: per layer,
    "activation" when the layer says ``on_activations`` (factored kinds without DoRA), else "weight"."""
    plan = Plan(compute_dtype=compute_dtype, widen=widen)
    for path, layer in layers.items():
        chosen = mode or ("activation" if getattr(layer, "on_activations", False) else "weight")
        plan.add(path, Trained(layer, chosen))
    return plan


def same_parts(a: Sequence[Static], b: Sequence[Static]) -> bool:
    """True when two lists of parts change a layer identically (same strengths, same tensors)."""
    if len(a) != len(b):
        return False
    return all(x.strength == y.strength and (x.module is y.module or same_module(x.module, y.module))
               for x, y in zip(a, b))


def same_module(a: ModuleAdapter, b: ModuleAdapter) -> bool:
    """True when two modules hold the same kind, alpha, DoRA form and tensors."""
    if (a.kind, a.alpha, a.dora_norm, a.tensors.keys()) != (b.kind, b.alpha, b.dora_norm, b.tensors.keys()):
        return False
    pairs = [(a.tensors[k], b.tensors[k]) for k in a.tensors] + [(a.dora_scale, b.dora_scale)]
    return all(x is y or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))
               for x, y in pairs)


SHARED_SOURCE = "B-LoRA batch (shared by every entry)"


def batched_plan(entries: Sequence[Sequence[tuple[Adapter, float]]]) -> Plan:
    """Batch Apply: image i of a sampled batch uses entries[i mod N] (lists of (adapter, strength) parts). A layer
    every entry changes the same way is Static (patched into the weights); the others are Routed."""
    per_entry = [[(unet_modules(a), a.source, float(s)) for a, s in parts] for parts in entries]
    paths = sorted({p for parts in per_entry for mods, _, s in parts if s != 0.0 for p in mods})
    plan = Plan()
    shared: dict[tuple[int, float], list[tuple[str, ModuleAdapter]]] = {}
    for path in paths:
        rows = tuple(tuple(Static(mods[path], s, src) for mods, src, s in parts if s != 0.0 and path in mods)
                     for parts in per_entry)
        if all(same_parts(rows[0], r) for r in rows):
            for j, part in enumerate(rows[0]):
                shared.setdefault((j, part.strength), []).append((path, part.module))
        else:
            plan.add(path, Routed(rows))
    statics = Plan()
    for (_, strength), modules in shared.items():
        for path, module in modules:
            statics.add(path, Static(module, strength, SHARED_SOURCE))
    statics.entries += plan.entries
    return statics
