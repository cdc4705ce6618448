"""Weights that change over the sampling steps, in the host: strength schedules and K-LoRA.

Mechanism (host APIs present in ComfyUI 0.3.64 and later):

- ``ProgressTracker``: one per patched clone. A keyed ``APPLY_MODEL`` wrapper (``add_wrapper_with_key``, composes
  with other packs' wrappers) reads the current sigma (``transformer_options["sigmas"]``) and the run's full sigma
  schedule (``transformer_options["sample_sigmas"]``, set by the sampler for every run, any sampler, batched or
  unbatched CFG) and turns them into the sampling progress (``blora.compose.strength_schedule.sampling_progress``: step i of n is
  i/(n-1)). Its signals (a schedule's strength, K-LoRA's time scale S(p)) are evaluated once per model call.
- Per-layer weight functions (``add_weight_wrapper``; the host runs them in ``comfy.ops`` on the layer's weight
  as cast for the forward) add a precomputed delta: ``ScaledDelta`` W + s(p)·D, ``SwitchedDelta`` W + ΔW_c or ΔW_s.
  Deltas (``LayerDelta``) are prepared once, in the weight dtype on the offload device: a plain LoRA as its factors
  (scale·up, down), added with one ``addmm`` (on CPU about 3× cheaper than adding a dense delta, and ~100× less
  memory); every other kind (DoRA, LoHa, LoKr, full diffs) as the dense difference the host's own
  ``comfy.lora.calculate_weight`` makes, so it behaves exactly as an ordinary patch. They move with the model
  (``move_to``) and back when it is detached (an ``ON_DETACH`` callback).
- Only the scheduled / fused layers get a weight function; everything else is an ordinary patch or untouched.
  State lives in the objects registered on the clone (no module or class state); a new run (a new sigma
  schedule) resets it.

Progress is that of the run in flight: a run split over two KSamplerAdvanced nodes (start/end steps) is two runs,
each from 0 to 1. A model call outside a sampler (no ``sample_sigmas``) is at progress 0.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from functools import partial
from typing import Callable, Mapping, Sequence

import comfy.lora
import comfy.patcher_extension
import torch

from ..adapters.adapter import Adapter
from ..errors import ArchitectureError
from ..compose.klora import FusionPlan, layer_stats, plan_from_stats, time_scale
from ..compose.strength_schedule import Schedule, is_constant, sampling_progress, strength_at
from ..compose.block_weights import role_parts
from .dynamic_vram import keep_weight_functions
from .patch import patched_clone

log = logging.getLogger(__name__)

WRAPPER_KEY = "blora.dynamic"
KLORA_SIGNAL = "klora.scale"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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


def _weight_key(path: str) -> str:
    return f"diffusion_model.{path}.weight"


def _delta_dtype(model) -> torch.dtype:
    cast = getattr(model.model, "manual_cast_dtype", None)
    dtype = cast if cast is not None else model.model_dtype()
    return dtype if dtype in _FLOATS else torch.float16


def _low_rank(module):
    """The module's (up, down) factors when its delta is exactly scale · up @ down (no DoRA), else None."""
    return None if module.dora_scale is not None else module.spec.low_rank(module.tensors)


def layer_deltas(model, adapter: Adapter) -> dict[str, LayerDelta]:
    """path -> the delta each UNet module of ``adapter`` adds at strength 1 (float32): plain LoRAs as factors
    (scale · up, down), the rest as (host-patched weight − W) computed with the host's calculate_weight on the
    unpatched weight. Checks the adapter against the model (patched_clone's checks)."""
    unet = {p: m for p, m in adapter.modules.items() if not p.startswith("te")}
    probe = patched_clone(model, [(replace(adapter, modules=unet), 1.0)])
    factors = {p: _low_rank(m) for p, m in unet.items()}
    out = {p: LayerDelta(up=f.up.float() * unet[p].scale, down=f.down.float())
           for p, f in factors.items() if f is not None}
    others = [p for p in unet if p not in out]
    originals = model.get_key_patches("diffusion_model.") if others else {}
    for path in others:
        key = _weight_key(path)
        new = probe.patches.get(key, [])[len(model.patches.get(key, [])):]
        base, convert = originals[key][0]
        w = convert(base.to(torch.float32, copy=True), inplace=True)
        patched = comfy.lora.calculate_weight(new, w.clone(), key, intermediate_dtype=torch.float32)
        out[path] = LayerDelta(dense=patched - w)
    return out


def _attach(model, tracker: ProgressTracker, functions: Mapping[str, ScaledDelta]):
    """Register the tracker and the per-layer functions on ``model`` (a clone) and return it."""
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, tracker.apply_model)
    offload = model.offload_device
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY,
                                lambda patcher, unpatch_all: [f.move_to(offload) for f in functions.values()])
    for path, fn in functions.items():
        model.add_weight_wrapper(_weight_key(path), fn)
    return keep_weight_functions(model)


def scheduled_clone(model, roles: Mapping[str, tuple[Adapter | None, Schedule]]):
    """A clone of ``model`` with each role's block from its adapter at the strength its schedule gives at the
    current sampling progress. Constant schedules are ordinary patches (exactly Apply B-LoRA's); the others get a
    weight function per layer: W + s(p)·D."""
    constant = {r: (a, sch[0].strength) for r, (a, sch) in roles.items() if a is not None and is_constant(sch)}
    dynamic = {r: (a, sch) for r, (a, sch) in roles.items() if a is not None and not is_constant(sch)}
    out = patched_clone(model, role_parts(constant))
    if not dynamic:
        return out
    tracker = ProgressTracker({role: partial(strength_at, sch) for role, (_, sch) in dynamic.items()})
    functions = {}
    dtype = _delta_dtype(model)
    for role, (adapter, _) in dynamic.items():
        (part, _), = role_parts({role: (adapter, 1.0)})
        for path, delta in layer_deltas(model, part).items():
            functions[path] = ScaledDelta(tracker, role, delta.prepared(1.0, dtype, model.offload_device))
    log.info("B-LoRA schedule: %d layers follow a schedule (%s)", len(functions), ", ".join(dynamic))
    return _attach(out, tracker, functions)


def _unet_only(adapter: Adapter, paths) -> Adapter:
    return replace(adapter, modules={p: adapter.modules[p] for p in paths})


def _check_pair(subject: Adapter, style: Adapter) -> None:
    for path in subject.modules.keys() & style.modules.keys():
        a, b = subject.modules[path].out_in, style.modules[path].out_in
        if a != b:
            raise ArchitectureError(f"K-LoRA: module {path!r} is {a} in the subject LoRA ({subject.source or '?'}) "
                                    f"but {b} in the style LoRA ({style.source or '?'}): LoRAs for different models")


def _steady_layers(plan: FusionPlan) -> tuple[list[str], list[str]]:
    """Fused layers whose choice holds over the whole run [0, 1]: (always subject, always style)."""
    choice = {p: plan.content_intervals(p) for p in plan.fused}
    return [p for p, iv in choice.items() if iv == [(0.0, math.inf)]], [p for p, iv in choice.items() if not iv]


def fused_clone(model, subject: Adapter, style: Adapter, subject_strength: float, style_strength: float,
                pattern: str = "s") -> tuple[object, FusionPlan]:
    """A clone of ``model`` with K-LoRA fusion of ``subject`` and ``style`` (UNet modules; see blora.compose.klora).
    Layers in one LoRA only, and layers in both whose choice holds over the whole run, are ordinary patches; the
    others switch per model call between the two deltas."""
    time_scale(pattern)
    _check_pair(subject, style)
    unet_c = [p for p in subject.modules if not p.startswith("te")]
    unet_s = [p for p in style.modules if not p.startswith("te")]
    both = [p for p in unet_c if p in style.modules]
    delta_c = layer_deltas(model, _unet_only(subject, both))
    delta_s = layer_deltas(model, _unet_only(style, both))
    stats = {p: layer_stats(delta_c[p].dense32(), delta_s[p].dense32(), subject.modules[p].rank,
                            style.modules[p].rank, p) for p in both}
    plan = plan_from_stats(stats, [p for p in unet_c if p not in style.modules],
                           [p for p in unet_s if p not in subject.modules], pattern)
    static_c, static_s = _steady_layers(plan)
    singles = [(_unet_only(subject, [p for p in unet_c if p not in style.modules] + static_c), subject_strength),
               (_unet_only(style, [p for p in unet_s if p not in subject.modules] + static_s), style_strength)]
    out = patched_clone(model, [(a, s) for a, s in singles if a.modules])
    tracker = ProgressTracker({KLORA_SIGNAL: time_scale(pattern)})
    dtype, device = _delta_dtype(model), model.offload_device
    functions = {p: SwitchedDelta(tracker, KLORA_SIGNAL, plan.fused[p].threshold,
                                  delta_c[p].prepared(subject_strength, dtype, device),
                                  delta_s[p].prepared(style_strength, dtype, device))
                 for p in plan.fused if p not in static_c and p not in static_s}
    log.info("K-LoRA (%s): %d layers switch during the run, %d keep the subject and %d the style throughout, "
             "gamma %.4g; %d subject-only, %d style-only", pattern, len(functions), len(static_c), len(static_s),
             plan.gamma, len(plan.subject_only), len(plan.style_only))
    if not functions:
        return out, plan
    return _attach(out, tracker, functions), plan
