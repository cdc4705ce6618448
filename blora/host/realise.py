"""The one place a plan (``blora.compose.plan``) becomes host patches on a clone of a ModelPatcher, and the entry
points of every feature that patches the model (Apply B-LoRA and Block Weights: ``patched_clone``; strength
schedules: ``scheduled_clone``; K-LoRA: ``fused_clone``; Batch Apply: ``batched_clone``; training: ``realise`` with
``Trained`` entries, then ``installed`` around a loop that calls the UNet directly).

The mechanism per entry (weight and bias alike: a module's bias difference ``diff_b`` goes wherever its weight
delta goes):

- ``Static``: the host's own patches (``add_patches``) from its LoRA loader (``blora.host.patch``), exactly what
  stock ``LoraLoaderModelOnly`` gives; entries of one source and strength are one set of patches.
- ``Timed`` / ``Switched``: a weight function per layer weight and bias (``add_weight_wrapper``) over a precomputed
  delta, driven by a ``ProgressTracker`` registered as the clone's ``APPLY_MODEL`` wrapper (``blora.host.timed``).
- ``Routed``: a ``DIFFUSION_MODEL`` wrapper that, for each UNet call, hooks the routed Linear layers with each row's
  entry delta for that call only (``blora.host.routed``).
- ``Trained``: mode "weight": ``add_weight_wrapper`` (W -> layer(W)); mode "activation": forward hooks adding
  ``layer.output_delta(x)`` to the layer's output, registered per UNet call by a ``DIFFUSION_MODEL`` wrapper (so the
  clone samples with them, e.g. previews) or for a whole training run by ``installed`` (which a loop calling the
  UNet directly needs: checkpointed layers recompute with the hooks in place).

Everything is checked before the clone is made (a supported architecture that every adapter is for, every module
present with its shape, routed modules Linear layers, every module loaded by the host); the input model is never
modified.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from functools import partial
from typing import Iterator, Mapping, Sequence

import comfy.patcher_extension
import torch
from einops import repeat

from ..adapters.adapter import Adapter, check_fits
from ..compose.plan import (Entry, Plan, Routed, Static, Switched, Timed, Trained, batched_plan, static_plan,
                            timed_plan)
from ..errors import ArchitectureError, BLoRAError
from ..compose.klora import FusionPlan, layer_stats, plan_from_stats, time_scale
from ..compose.strength_schedule import Schedule, is_constant, strength_at
from ..compose.block_weights import role_parts
from . import compat
from .architecture import require_architecture
from .patch import (UNET_PREFIX, bias_key, host_patches, key_map, listing, model_weight_shapes, render_peft_dora,
                    routed_dense, timed_delta, weight_key)
from .routed import RoutedLinear, adder, factors, low_rank, row_entries
from .timed import LayerDelta, ProgressTracker, ScaledDelta, SwitchedDelta

log = logging.getLogger(__name__)

TIMED_KEY = "blora.dynamic"
ROUTED_KEY = "blora.batch_apply"
TRAINED_KEY = "blora.trained"
KLORA_SIGNAL = "klora.scale"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --- deltas ----------------------------------------------------------------------------------------------------------

class Deltas:
    """The weight and bias deltas (float32, strength 1) the host adds for plan parts on ``model``, computed once
    per (path, module): ``of(path, part)`` -> (LayerDelta, LayerDelta or None)."""

    def __init__(self, model):
        self.model = model
        self._key_patches = self._keys = None
        self._cache: dict[tuple[str, int], tuple[LayerDelta, LayerDelta | None]] = {}

    @property
    def key_patches(self):
        if self._key_patches is None:
            self._key_patches = self.model.get_key_patches(UNET_PREFIX)
        return self._key_patches

    @property
    def keys(self):
        if self._keys is None:
            self._keys = key_map(self.model)
        return self._keys

    def of(self, path: str, part: Static) -> tuple[LayerDelta, LayerDelta | None]:
        key = (path, id(part.module))
        if key not in self._cache:
            self._cache[key] = timed_delta(self.key_patches, self.keys, path, part)
        return self._cache[key]


def _delta_dtype(model) -> torch.dtype:
    cast = getattr(model.model, "manual_cast_dtype", None)
    dtype = cast if cast is not None else model.model_dtype()
    return dtype if dtype in _FLOATS else torch.float16


# --- checks ----------------------------------------------------------------------------------------------------------

def _parts(entry: Entry) -> list[Static]:
    if isinstance(entry, Static):
        return [entry]
    if isinstance(entry, Timed):
        return [entry.part]
    if isinstance(entry, Switched):
        return [entry.first, entry.second]
    if isinstance(entry, Routed):
        return [p for parts in entry.entries for p in parts]
    return []


def _check(model, plan: Plan) -> None:
    """Every adapter module against the model (in plan order, naming its source); routed layers are Linear."""
    parts = [(path, part) for path, entry in plan.entries for part in _parts(entry)]
    if not parts and any(True for _ in plan.of(Trained)):
        return  # training checks its model itself
    shapes = model_weight_shapes(model)
    require_architecture(model, [Adapter(modules={path: part.module}, source=part.source) for path, part in parts],
                         shapes)
    for path, part in parts:
        check_fits(Adapter(modules={path: part.module}, source=part.source), shapes)
    for path, _ in plan.of(Routed):
        module = model.model.diffusion_model.get_submodule(path)
        if not isinstance(module, torch.nn.Linear):
            raise BLoRAError(f"B-LoRA Batch Apply cannot give each image its own adapter at {path!r}: it is a "
                             f"{type(module).__name__}, and only Linear layers are routed per image. Apply these "
                             f"entries with separate Apply B-LoRA nodes and samplers, or make them agree on this "
                             f"module")


# --- static entries --------------------------------------------------------------------------------------------------

def _static_sets(plan: Plan) -> list[tuple[str, float, dict]]:
    """Static entries (strength 0 left out) as (source, strength, {path: module}) sets, in order: an entry joins
    the last set of its source and strength unless its layer is in that set or in a later one."""
    sets: list[tuple[str, float, dict]] = []
    for path, entry in plan.of(Static):
        if entry.strength == 0.0:
            continue
        target = None
        for i in range(len(sets) - 1, -1, -1):
            source, strength, modules = sets[i]
            if path in modules:
                break
            if (source, strength) == (entry.source, entry.strength):
                target = modules
                break
        if target is None:
            target = {}
            sets.append((entry.source, entry.strength, target))
        target[path] = entry.module
    return sets


def _static_patches(model, plan: Plan, deltas: Deltas) -> list[tuple[dict, float, str]]:
    sets = _static_sets(plan)
    if not sets:
        return []
    rendered = [(source, strength, {p: render_peft_dora(p, m, deltas.key_patches) for p, m in modules.items()})
                for source, strength, modules in sets]
    return [(host_patches(Adapter(modules=modules, source=source), deltas.keys), strength, source)
            for source, strength, modules in rendered]


def _add_static(clone, loaded: list[tuple[dict, float, str]]) -> None:
    for patches, strength, source in loaded:
        accepted = set(clone.add_patches(patches, strength))
        refused = sorted(str(k) for k in patches if k not in accepted)
        if refused:
            raise BLoRAError(f"{source or 'adapter'}: the model refused {len(refused)} patch(es): {listing(refused)}")
        log.debug("%s: %d modules patched at strength %g", source or "adapter", len(patches), strength)


# --- timed entries ---------------------------------------------------------------------------------------------------

def _zeros_like(delta: LayerDelta) -> LayerDelta:
    return LayerDelta(dense=torch.zeros_like(delta.tensors[0]))


def _timed_functions(model, plan: Plan, deltas: Deltas, tracker: ProgressTracker) -> dict[str, ScaledDelta]:
    """weight or bias key -> its weight function."""
    dtype, device = _delta_dtype(model), model.offload_device
    functions: dict[str, ScaledDelta] = {}
    for path, entry in plan.entries:
        if isinstance(entry, Timed):
            w, b = deltas.of(path, entry.part)
            s = entry.part.strength
            functions[weight_key(path)] = ScaledDelta(tracker, entry.signal, w.prepared(s, dtype, device))
            if b is not None:
                functions[bias_key(path)] = ScaledDelta(tracker, entry.signal, b.prepared(s, dtype, device))
        elif isinstance(entry, Switched):
            (wc, bc), (ws, bs) = deltas.of(path, entry.first), deltas.of(path, entry.second)
            sc, ss = entry.first.strength, entry.second.strength
            functions[weight_key(path)] = SwitchedDelta(tracker, entry.signal, entry.threshold,
                                                        wc.prepared(sc, dtype, device), ws.prepared(ss, dtype, device))
            if bc is not None or bs is not None:
                bc, bs = bc or _zeros_like(bs), bs or _zeros_like(bc)
                functions[bias_key(path)] = SwitchedDelta(tracker, entry.signal, entry.threshold,
                                                          bc.prepared(sc, dtype, device),
                                                          bs.prepared(ss, dtype, device))
    return functions


def _add_timed(clone, tracker: ProgressTracker, functions: Mapping[str, ScaledDelta]) -> None:
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TIMED_KEY, tracker.apply_model)
    offload = clone.offload_device
    clone.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, TIMED_KEY,
                                lambda patcher, unpatch_all: [f.move_to(offload) for f in functions.values()])
    for key, fn in functions.items():
        clone.add_weight_wrapper(key, fn)


# --- routed entries --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _output_hooks(unet: torch.nn.Module, hooks: Mapping[str, object]) -> Iterator[None]:
    """Forward hooks (path -> hook(module, inputs, output)) on the UNet's layers while the body runs."""
    handles = []
    try:
        for path, hook in hooks.items():
            handles.append(unet.get_submodule(path).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class RowRouter:
    """The ``DIFFUSION_MODEL`` wrapper of Routed entries: per call, hooks that add each row's entry delta."""

    def __init__(self, routed: dict[str, RoutedLinear], num_entries: int):
        self.routed = routed
        self.num_entries = num_entries

    def __call__(self, executor, x, *args, **kwargs):
        entry = row_entries(x, compat.transformer_options_of(args, kwargs), self.num_entries)
        with _output_hooks(compat.wrapped_object(executor), {p: adder(r, entry) for p, r in self.routed.items()}):
            return executor(x, *args, **kwargs)


def _routed(plan: Plan, deltas: Deltas) -> tuple[dict[str, RoutedLinear], int]:
    routed, count = {}, 0
    for path, entry in plan.of(Routed):
        count = len(entry.entries)
        if all(low_rank(p.module) is not None for parts in entry.entries for p in parts):
            routed[path] = factors(path, entry.entries)
        else:
            routed[path] = routed_dense(deltas.key_patches, deltas.keys, path, entry.entries)
    return routed, count


# --- trained entries -------------------------------------------------------------------------------------------------

def _widen(t, seeds: int, rows: int):
    if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == rows:
        return repeat(t, "b ... -> (n b) ...", n=seeds)
    return t


def skip_widener(seeds: int):
    """``output_block_patch``: a skip connection saved before the widening gets widened to match h."""
    def patch(h, hsp, transformer_options):
        if hsp is not None and h.shape[0] == seeds * hsp.shape[0]:
            hsp = repeat(hsp, "b ... -> (n b) ...", n=seeds)
        return h, hsp
    return patch


class TrainedHooks:
    """Activation-mode trainable layers (and Plan.widen): hooks per UNet call (the clone's DIFFUSION_MODEL wrapper)
    unless ``installed`` holds them for a whole run."""

    def __init__(self, layers: dict[str, object], widen, weight_functions: list):
        self.layers = layers
        self.widen = widen
        self.weight_functions = weight_functions
        self.held = False

    @contextlib.contextmanager
    def hooks(self, unet: torch.nn.Module) -> Iterator[None]:
        handles = []
        try:
            if self.widen is not None:
                seeds, rows = self.widen.seeds, self.widen.rows

                def widen(module, args, kwargs):
                    return tuple(_widen(a, seeds, rows) for a in args), {k: _widen(v, seeds, rows)
                                                                         for k, v in kwargs.items()}
                handles += [unet.get_submodule(p).register_forward_pre_hook(widen, with_kwargs=True)
                            for p in self.widen.layers]
            handles += [unet.get_submodule(p).register_forward_hook(
                lambda module, inputs, output, a=a: output + a.output_delta(inputs[0]).to(output.dtype))
                for p, a in self.layers.items()]
            yield
        finally:
            for h in handles:
                h.remove()

    def __call__(self, executor, x, *args, **kwargs):
        if self.held:
            return executor(x, *args, **kwargs)
        with self.hooks(compat.wrapped_object(executor)):
            return executor(x, *args, **kwargs)


def _add_trained(clone, plan: Plan) -> bool:
    """Install the Trained entries; True when weight functions were added."""
    weight = {p: e.layer for p, e in plan.of(Trained) if e.mode == "weight"}
    activation = {p: e.layer for p, e in plan.of(Trained) if e.mode == "activation"}
    if plan.compute_dtype is not None and plan.compute_dtype != clone.model.get_dtype():
        clone.set_model_compute_dtype(plan.compute_dtype)
    for path, layer in weight.items():
        clone.add_weight_wrapper(weight_key(path), layer)
    if activation or plan.widen is not None or weight:
        hooks = TrainedHooks(activation, plan.widen, list(weight.values()))
        if activation or plan.widen is not None:
            clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, TRAINED_KEY, hooks)
        if plan.widen is not None:
            clone.set_model_output_block_patch(skip_widener(plan.widen.seeds))
        clone.set_attachments(TRAINED_KEY, hooks)
    return bool(weight)


@contextlib.contextmanager
def installed(clone) -> Iterator[dict]:
    """For a loop that calls the loaded UNet directly (training): the clone's activation hooks (and widening) held on
    the UNet for the whole body, and on exit taken off, with the trainable weight functions stripped from the
    modules. Yields the transformer_options to pass the UNet (``compat.call_options``)."""
    hooks: TrainedHooks | None = clone.get_attachment(TRAINED_KEY)
    unet = clone.model.diffusion_model
    if hooks is None:
        yield compat.call_options(clone)
        return
    hooks.held = True
    try:
        with hooks.hooks(unet):
            yield compat.call_options(clone)
    finally:
        hooks.held = False
        compat.strip_functions(unet, hooks.weight_functions)


# --- the realiser ----------------------------------------------------------------------------------------------------

def realise(model, plan: Plan, deltas: Deltas | None = None):
    """A clone of ``model`` (ModelPatcher) with ``plan`` installed (module docstring). deltas: a ``Deltas`` of
    ``model`` already holding some of the plan's deltas (K-LoRA computes them for its statistics)."""
    _check(model, plan)
    deltas = Deltas(model) if deltas is None else deltas
    loaded = _static_patches(model, plan, deltas)
    tracker = ProgressTracker(plan.signals)
    functions = _timed_functions(model, plan, deltas, tracker)
    routed, num_entries = _routed(plan, deltas)
    clone = model.clone()
    _add_static(clone, loaded)
    wrapped = False
    if functions:
        _add_timed(clone, tracker, functions)
        wrapped = True
    if routed:
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, ROUTED_KEY,
                                   RowRouter(routed, num_entries))
    wrapped = _add_trained(clone, plan) or wrapped
    return compat.keep_weight_functions(clone) if wrapped else clone


# --- feature entry points --------------------------------------------------------------------------------------------

def patched_clone(model, parts: Sequence[tuple[Adapter, float]]):
    """A clone of ``model`` with each adapter added at its strength: W' = W + s·ΔW, b' = b + s·Δb per module (Apply
    B-LoRA, Block Weights, a trained model). Text-encoder modules are ignored; strength-0 parts are checked, then
    skipped. PEFT DoRA modules are rendered with PEFT's formula against the input model's current weight."""
    return realise(model, static_plan(parts))


def scheduled_clone(model, roles: Mapping[str, tuple[Adapter | None, Schedule]]):
    """A clone of ``model`` with each role's block from its adapter at the strength its schedule gives at the
    current sampling progress. Constant schedules are ordinary patches (exactly Apply B-LoRA's); the others get a
    weight function per layer weight (and bias): W + s(p)·D."""
    constant = {r: (a, sch[0].strength) for r, (a, sch) in roles.items() if a is not None and is_constant(sch)}
    dynamic = {r: (a, sch) for r, (a, sch) in roles.items() if a is not None and not is_constant(sch)}
    plan = static_plan(role_parts(constant))
    timed = {}
    for role, (adapter, schedule) in dynamic.items():
        (part, _), = role_parts({role: (adapter, 1.0)})
        timed[role] = (part, partial(strength_at, schedule))
    timed_plan(timed, plan)
    if dynamic:
        log.info("B-LoRA schedule: %d layers follow a schedule (%s)", sum(1 for _ in plan.of(Timed)),
                 ", ".join(dynamic))
    return realise(model, plan)


def _check_pair(subject: Adapter, style: Adapter) -> None:
    for path in subject.modules.keys() & style.modules.keys():
        a, b = subject.modules[path].out_in, style.modules[path].out_in
        if a != b:
            raise ArchitectureError(f"K-LoRA: module {path!r} is {a} in the subject LoRA ({subject.source or '?'}) "
                                    f"but {b} in the style LoRA ({style.source or '?'}): LoRAs for different models")


def _steady_layers(fusion: FusionPlan) -> tuple[list[str], list[str]]:
    """Fused layers whose choice holds over the whole run [0, 1]: (always subject, always style)."""
    choice = {p: fusion.content_intervals(p) for p in fusion.fused}
    return [p for p, iv in choice.items() if iv == [(0.0, float("inf"))]], [p for p, iv in choice.items() if not iv]


def fused_clone(model, subject: Adapter, style: Adapter, subject_strength: float, style_strength: float,
                pattern: str = "s") -> tuple[object, FusionPlan]:
    """A clone of ``model`` with K-LoRA fusion of ``subject`` and ``style`` (UNet modules; see blora.compose.klora).
    Layers in one LoRA only, and layers in both whose choice holds over the whole run, are ordinary patches; the
    others switch per model call between the two deltas (weight and bias)."""
    scale = time_scale(pattern)
    _check_pair(subject, style)
    unet_c = [p for p in subject.modules if not p.startswith("te")]
    unet_s = [p for p in style.modules if not p.startswith("te")]
    both = [p for p in unet_c if p in style.modules]
    _check(model, static_plan([(replace(subject, modules={p: subject.modules[p] for p in both}), 1.0),
                               (replace(style, modules={p: style.modules[p] for p in both}), 1.0)]))
    deltas = Deltas(model)
    parts_c = {p: Static(subject.modules[p], subject_strength, subject.source) for p in both}
    parts_s = {p: Static(style.modules[p], style_strength, style.source) for p in both}
    stats = {p: layer_stats(deltas.of(p, parts_c[p])[0].dense32(), deltas.of(p, parts_s[p])[0].dense32(),
                            subject.modules[p].rank, style.modules[p].rank, p) for p in both}
    fusion = plan_from_stats(stats, [p for p in unet_c if p not in style.modules],
                             [p for p in unet_s if p not in subject.modules], pattern)
    static_c, static_s = _steady_layers(fusion)
    only_c = [p for p in unet_c if p not in style.modules] + static_c
    only_s = [p for p in unet_s if p not in subject.modules] + static_s
    plan = Plan(signals={KLORA_SIGNAL: scale})
    for p in only_c:
        plan.add(p, Static(subject.modules[p], subject_strength, subject.source))
    for p in only_s:
        plan.add(p, Static(style.modules[p], style_strength, style.source))
    switching = [p for p in fusion.fused if p not in static_c and p not in static_s]
    for p in switching:
        plan.add(p, Switched(parts_c[p], parts_s[p], KLORA_SIGNAL, fusion.fused[p].threshold))
    log.info("K-LoRA (%s): %d layers switch during the run, %d keep the subject and %d the style throughout, "
             "gamma %.4g; %d subject-only, %d style-only", pattern, len(switching), len(static_c), len(static_s),
             fusion.gamma, len(fusion.subject_only), len(fusion.style_only))
    return realise(model, plan, deltas), fusion


def batched_clone(model, entries: Sequence[Sequence[tuple[Adapter, float]]]):
    """A clone of ``model`` where image i of a sampled batch uses ``entries[i % N]`` (lists of (Adapter, strength)
    parts, as Apply B-LoRA takes them): modules every entry changes alike are patched into the weights, the others
    routed per row (``blora.compose.plan.batched_plan``, ``blora.host.routed``)."""
    if not entries:
        raise BLoRAError("B-LoRA Batch Apply: the batch has no entries")
    shapes = model_weight_shapes(model)
    require_architecture(model, [a for parts in entries for a, _ in parts], shapes)
    for parts in entries:  # every part is checked, strength 0 included (as Apply B-LoRA checks them)
        for adapter, _ in parts:
            check_fits(adapter, shapes)
    plan = batched_plan(entries)
    clone = realise(model, plan)
    routed = sum(1 for _ in plan.of(Routed))
    if routed:
        log.info("B-LoRA batch: %d entries, %d modules patched (shared), %d routed per image", len(entries),
                 sum(1 for _ in plan.of(Static)), routed)
    return clone


# --- one seed of stacked seeds (validation previews) ----------------------------------------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def hooks_set_aside(module: torch.nn.Module) -> Iterator[None]:
    """Every forward (pre-)hook of ``module`` and its children removed while the body runs, then put back."""
    saved = []
    try:
        for m in module.modules():
            kept = {name: getattr(m, name) for name in _HOOK_DICTS if getattr(m, name, None)}
            for name, hooks in kept.items():
                setattr(m, name, type(hooks)())
            if kept:
                saved.append((m, kept))
        yield
    finally:
        for m, kept in saved:
            for name, hooks in kept.items():
                setattr(m, name, hooks)


@contextlib.contextmanager
def one_seed(unet: torch.nn.Module, adapters: Mapping[str, torch.nn.Module], n: int) -> Iterator[None]:
    """Stacked seeds (``blora.train.seeds.SeedsLoRA``): every row of the batch goes through seed n's adapters
    (``seed_delta``), the training hooks (activation deltas, widening) set aside while the body runs."""
    with hooks_set_aside(unet):
        handles = [unet.get_submodule(p).register_forward_hook(
            lambda module, inputs, output, a=a: output + a.seed_delta(n, inputs[0]).to(output.dtype))
            for p, a in adapters.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
