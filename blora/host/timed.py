"""Weights that change over the sampling steps (the realiser's mechanism for ``Timed`` and ``Switched`` plan
entries: strength schedules and K-LoRA). No host entry point is called here; ``blora.host.realise`` registers them.

- ``ProgressTracker``: one per realised clone, registered as its keyed ``APPLY_MODEL`` wrapper. It reads the current
  sigma (``transformer_options["sigmas"]``) and the run's full sigma schedule (``transformer_options["sample_sigmas"]``,
  set by the sampler for every run, any sampler, batched or unbatched CFG) and turns them into the sampling progress
  (``blora.compose.strength_schedule.sampling_progress``: step i of n is i/(n-1)). Its signals (a schedule's strength, K-LoRA's time
  scale S(p)) are evaluated once per model call.
- Per-layer weight functions (registered for the layer's weight and, when the module has a bias difference, for its
  bias; the host runs them in ``comfy.ops`` on the tensor as cast for the forward) add a precomputed delta:
  ``ScaledDelta`` W + s(p)·D, ``SwitchedDelta`` W + ΔW_c or ΔW_s. Deltas (``LayerDelta``) are prepared once, in the
  weight dtype on the offload device: a plain LoRA as its factors (scale·up, down), added with one ``addmm`` (on CPU
  about 3× cheaper than adding a dense delta, and ~100× less memory); every other kind (DoRA, LoHa, LoKr, full
  diffs) and every bias difference as the dense difference the host's own ``comfy.lora.calculate_weight`` makes, so
  it behaves exactly as an ordinary patch. They move with the model (``move_to``) and back when it is detached.
- State lives in these objects (no module or class state); a new run (a new sigma schedule) resets it.

Progress is that of the run in flight: a run split over two KSamplerAdvanced nodes (start/end steps) is two runs,
each from 0 to 1. A model call outside a sampler (no ``sample_sigmas``) is at progress 0.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..compose.strength_schedule import sampling_progress


class ProgressTracker:
    """Sampling progress of the model call in flight, and the values of named signals (functions of progress)
    at it. Registered on a clone as its APPLY_MODEL wrapper."""

    def __init__(self, signals: Mapping[str, Callable[[float], float]]):
        self.signals = dict(signals)
        self._run: object = None  # the sample_sigmas tensor of the run seen last
        self._sigmas: tuple[float, ...] = ()
        self.progress = 0.0
        self.values = {name: fn(0.0) for name, fn in self.signals.items()}

    def update(self, sigma: float, sample_sigmas) -> None:
        if sample_sigmas is not self._run:  # a new run: read its schedule once
            self._run = sample_sigmas
            self._sigmas = tuple(float(s) for s in sample_sigmas.tolist()) if sample_sigmas is not None else ()
        self.progress = sampling_progress(sigma, self._sigmas) if self._sigmas else 0.0
        self.values = {name: fn(self.progress) for name, fn in self.signals.items()}

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        options = transformer_options if transformer_options is not None else {}
        sigma = options.get("sigmas", t)
        self.update(float(sigma.max()) if torch.is_tensor(sigma) else float(sigma), options.get("sample_sigmas"))
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


class LayerDelta:
    """One layer's weight delta: low-rank factors up (out, r) @ down (r, in) for a plain LoRA (cheap to add and
    to keep), else dense (out, in, …) from the host's calculate_weight (DoRA, LoHa, LoKr, full diffs)."""

    def __init__(self, dense: torch.Tensor | None = None, up: torch.Tensor | None = None,
                 down: torch.Tensor | None = None):
        self.tensors = [dense] if dense is not None else [up, down]
        self._cast: tuple[tuple, list[torch.Tensor]] | None = None

    def dense32(self) -> torch.Tensor:
        """The delta as a dense float32 tensor (for statistics)."""
        if len(self.tensors) == 1:
            return self.tensors[0].float()
        return self.tensors[0].float() @ self.tensors[1].float()

    def prepared(self, scale: float, dtype: torch.dtype, device) -> "LayerDelta":
        """scale · delta in ``dtype`` on ``device`` (the form kept for sampling)."""
        first = self.tensors[0].float() * scale
        return LayerDelta(*([first.to(device, dtype)] if len(self.tensors) == 1 else
                            [None, first.to(device, dtype), self.tensors[1].to(device, dtype)]))

    def add_to(self, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """weight + alpha · delta, the delta cast to the weight's device and dtype (cached)."""
        key = (weight.device, weight.dtype)
        if self._cast is None or self._cast[0] != key:
            self._cast = key, [t.to(device=weight.device, dtype=weight.dtype) for t in self.tensors]
        t = self._cast[1]  # out of place: never write into a tensor the host might share with the model
        return torch.add(weight, t[0], alpha=alpha) if len(t) == 1 else torch.addmm(weight, t[0], t[1], alpha=alpha)

    def move_to(self, device) -> int:
        self.tensors = [t.to(device) for t in self.tensors]
        self._cast = None
        return sum(t.numel() * t.element_size() for t in self.tensors)


class ScaledDelta:
    """Weight function W + s·D, s the tracker's signal (a schedule's strength) at the current progress."""

    def __init__(self, tracker: ProgressTracker, signal: str, delta: LayerDelta):
        self.tracker, self.signal, self.deltas = tracker, signal, [delta]

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.tracker.values[self.signal]
        return weight if s == 0.0 else self.deltas[0].add_to(weight, s)

    def move_to(self, device=None) -> int:
        return sum(d.move_to(device) for d in self.deltas) if device is not None else 0


class SwitchedDelta(ScaledDelta):
    """Weight function W + ΔW_c while the signal (K-LoRA's S(p)) is below the layer's threshold, else W + ΔW_s."""

    def __init__(self, tracker: ProgressTracker, signal: str, threshold: float, content: LayerDelta,
                 style: LayerDelta):
        super().__init__(tracker, signal, content)
        self.deltas.append(style)
        self.threshold = threshold

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.deltas[0 if self.tracker.values[self.signal] < self.threshold else 1].add_to(weight)


