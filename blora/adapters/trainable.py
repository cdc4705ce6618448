"""The trainable form every kind shares: ``Trainable``, whose parameters are the kind's own tensors (so a trained
module exports as that kind with no conversion). Two ways to train it, the same function of the weights:

- on the activations (``on_activations``: kinds whose delta is a product of small factors, no DoRA): the frozen
  layer runs as is and ``output_delta(x)`` = multiplier · scale · ΔW x is added to its output, computed from the
  factors (LoRA: (x Aᵀ) Bᵀ; LoKr: w1 X w2ᵀ on x reshaped, never the dense Kronecker product); no merged weight;
- as a weight function W -> W' (``forward``; DoRA, LoHa), which the host runs on the layer's weight:

    W' = W + multiplier · scale · ΔW(tensors)                       (the kind's delta)
    DoRA: W' = W + multiplier · (D − W), D = m ⊙ (W + scale · ΔW) / (‖W + scale · ΔW‖_col + eps),  m: (1, in)

``multiplier`` (default 1) scales the delta in both modes (0: the base layer; previews of some blocks only).

The DoRA form is the input-axis one stock ComfyUI renders from a ``dora_scale`` of shape (1, in)
(``comfy.weight_adapter.base.weight_decompose``) and LyCORIS computes with ``wd_on_out=False``: column norms over
the output axis, eps = float32 eps, all in float32; as in the DoRA paper (and PEFT) the norm is a constant in
backward. Parameters are float32; the output has the weight's dtype. Subclasses (one per kind) add ``create``.
"""
from __future__ import annotations

import math
from typing import ClassVar, Mapping

import torch

from ..errors import BLoRAError
from .kinds.base import KINDS, ModuleAdapter

DORA_EPS = torch.finfo(torch.float32).eps


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_col: the norm over the output axis of each input column, (out, in) -> (1, in), float32."""
    return weight.float().norm(dim=0, keepdim=True)


def dora_forward(merged: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """m * W' / (||W'||_col + eps), the norm a constant in backward (``norm``: that of ``merged``, when known)."""
    return merged * (magnitude / ((column_norm(merged) if norm is None else norm).detach() + DORA_EPS))


def initial_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """DoRA's magnitude at the start: ||W||_col + eps, so that W' = W before any step."""
    return column_norm(weight) + DORA_EPS


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """torch's kaiming_uniform_(a=sqrt(5)) on a (rows, cols) tensor, drawn from ``generator``: U(±1/sqrt(cols))."""
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) / math.sqrt(cols)


class Trainable(torch.nn.Module):
    """A trainable adapter of one Linear weight (out, in). kind: its ``KINDS`` name; plus: parameter names LoRA+
    trains at ``loraplus_ratio`` times the learning rate (the factor that starts at zero, as LoRA's up)."""

    kind: ClassVar[str]
    plus: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tensors: Mapping[str, torch.Tensor], scale: float, magnitude: torch.Tensor | None = None):
        super().__init__()
        self.names = tuple(tensors)
        for name, t in tensors.items():
            self.register_parameter(name, torch.nn.Parameter(t.detach().float().clone()))
        self.register_parameter("magnitude", None if magnitude is None else
                                torch.nn.Parameter(magnitude.detach().float().clone()))
        self.scale = float(scale)
        self.multiplier = 1.0

    #: the kind's delta can be applied to activations from its factors, cheaper than a merged weight
    factored: ClassVar[bool] = False

    @property
    def on_activations(self) -> bool:
        """Trained on the activations (``output_delta``) rather than as a weight function (``forward``)."""
        return self.factored and self.magnitude is None

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier · scale · ΔW x for inputs x (..., in) -> (..., out), in x's dtype, differentiable."""
        return self.apply_delta(x) * (self.scale * self.multiplier)

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x without scale (kinds with factors override it; this default goes through the dense delta)."""
        delta = KINDS[self.kind].delta(self.tensors())
        return torch.nn.functional.linear(x, delta.to(x.dtype))

    @classmethod
    def from_module(cls, module: ModuleAdapter) -> "Trainable":
        """Continue training a saved module of this kind: scale as the file renders it (stored alpha / rank)."""
        if module.kind != cls.kind:
            raise BLoRAError(f"a {KINDS[cls.kind].label} cannot continue from a {module.spec.label} module")
        ds = module.dora_scale
        if ds is not None and (ds.ndim != 2 or ds.shape[0] != 1):
            raise BLoRAError(f"DoRA magnitude of shape {tuple(ds.shape)} cannot be trained further: expected the "
                             f"input-axis form (1, in)")
        tensors = {n: t for n, t in module.tensors.items() if n != "diff_b"}
        return cls.build(tensors, module.scale, ds)

    @classmethod
    def build(cls, tensors: Mapping[str, torch.Tensor], scale: float,
              magnitude: torch.Tensor | None = None) -> "Trainable":
        """An adapter with these (canonical) tensors."""
        return cls(tensors, scale, magnitude)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.names}

    @property
    def rank(self) -> int:
        return KINDS[self.kind].rank(self.tensors())

    @property
    def stored_alpha(self) -> float:
        """The alpha a file stores so that alpha / rank loaders render ``scale``."""
        return self.scale * self.rank

    def delta(self) -> torch.Tensor:
        """scale · ΔW, (out, in), float32, differentiable."""
        return self.scale * KINDS[self.kind].delta(self.tensors())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight function: W -> W' (module doc)."""
        if self.multiplier == 0.0:
            return weight
        base = weight.float()
        if self.magnitude is None:
            merged = base + self.delta().reshape(weight.shape) * self.multiplier
        else:
            merged = base + self.delta().reshape(weight.shape)
            merged = dora_forward(merged, self.magnitude, self._step_norm(weight, merged))
            if self.multiplier != 1.0:
                merged = base + (merged - base) * self.multiplier
        return merged.to(weight.dtype)

    def _step_norm(self, weight: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        """DoRA's ||W'||_col, computed once per optimizer step: W' changes only when a parameter does (an in-place
        update bumps its version), so every call in between (micro-batches, checkpoint recomputation) reuses it."""
        key = (weight.data_ptr(), weight.shape, weight.dtype, weight.device,
               tuple(p._version for p in self.parameters() if p is not self.magnitude))
        cached = getattr(self, "_norm", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                self._norm = cached = key, column_norm(merged.detach())
        return cached[1]

    def export(self, alpha: float, dtype: torch.dtype = torch.float32) -> ModuleAdapter:
        """The trained module as a ModuleAdapter of this kind (detached copies in ``dtype``); ``alpha``: the
        stored alpha (scale · rank)."""
        tensors = {n: t.detach().to(dtype).clone() for n, t in self.tensors().items()}
        ds = None if self.magnitude is None else self.magnitude.detach().to(dtype).clone()
        return ModuleAdapter(self.kind, tensors, alpha=float(alpha), dora_scale=ds)

    # The host's weight-function protocol (ModelPatcher moves weight functions with the model).
    def move_to(self, device: torch.device) -> int:
        self.to(device)
        return self.passive_memory_usage()

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
