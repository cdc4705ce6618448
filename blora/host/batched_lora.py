"""Many adapters over one model in one batch: row r of every UNet call goes through the adapter of its image.

``batched_clone(model, entries)`` takes N entries (each a list of (Adapter, strength) parts, as Apply B-LoRA
takes them) and returns one clone of the ModelPatcher on which image i of a sampled batch uses entry i mod N:

- a module every entry adapts the same way (same tensors, same strength) is patched into the weights, as Apply
  B-LoRA does (no cost per step); with one entry, or entries that agree everywhere, the clone is exactly
  ``patched_clone``;
- a module where entries differ is *routed*: its Linear keeps the base weight and each row gets its entry's delta,
  ``y_r = x_r Wᵀ + x_r ΔW_{a(r)}ᵀ (+ Δb_{a(r)})``. Modules whose kind stores ΔW as two factors (plain LoRA) stay factors,
  ``x_r ΔWᵀ = s·(x_r A_{a(r)}ᵀ) B_{a(r)}ᵀ`` with the ranks of an entry's parts concatenated and entries padded to
  the largest rank with zeros; every other kind the host renders (LoHa, LoKr, DoRA, full diffs) is rendered by
  the host's own ``comfy.lora.calculate_weight`` against the model's current weight and routed as a dense ΔW.

The rows are routed by a ``diffusion_model`` wrapper (``comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL``, added
to the clone with ``add_wrapper_with_key``): for each UNet call it works out a(r) from the call's batch and
registers forward hooks on the routed Linear layers for that call only, so nothing stays on the shared modules
and other packs' wrappers and patches compose with it. The sampler batches CFG as chunks of the latent batch
(``transformer_options["cond_or_uncond"]``, one entry per chunk: [cond rows…, uncond rows…] or one chunk per call
when the host runs them separately), so row r is image ``r mod (rows / chunks)``; an image's cond and uncond rows
use the same entry.

Modules that cannot be routed per row (anything but a Linear layer, e.g. a norm weight or a conv) are refused when
the entries differ there, naming the module.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import comfy.lora
import comfy.patcher_extension
import torch
from einops import einsum

from ..adapters.adapter import Adapter, ModuleAdapter, check_fits
from ..errors import BLoRAError
from .patch import (UNET_PREFIX, _render_peft_dora, _unet_part, current_weight, host_patches, model_weight_shapes,
                    patched_clone, require_sdxl)

log = logging.getLogger(__name__)

WRAPPER_KEY = "blora.batch_apply"
Parts = Sequence[tuple[Adapter, float]]
ModuleParts = tuple[tuple[ModuleAdapter, float], ...]


@dataclass
class RoutedLinear:
    """The per-entry deltas of one Linear layer, float32 on the CPU (moved on first use).

    factors: down (N, R, in) and up (N, out, R) with scale and strength folded into up; or dense (N, out, in).
    bias: (N, out) bias deltas or None."""

    path: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._cache: dict[tuple, tuple] = {}

    @property
    def num_entries(self) -> int:
        return int((self.down if self.dense is None else self.dense).shape[0])

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = tuple(None if t is None else t.to(device, dtype)
                                     for t in (self.down, self.up, self.dense, self.bias))
        return self._cache[key]

    def delta(self, x: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
        """The rows' output deltas: x (rows, ..., in), entry (rows,) long -> (rows, ..., out)."""
        down, up, dense, bias = self._on(x.device, x.dtype)
        if dense is None:
            hidden = einsum(x, down[entry], "b ... i, b r i -> b ... r")
            out = einsum(hidden, up[entry], "b ... r, b o r -> b ... o")
        else:
            out = einsum(x, dense[entry], "b ... i, b o i -> b ... o")
        if bias is not None:
            rows = bias[entry]
            out = out + rows.reshape(rows.shape[0], *([1] * (out.ndim - 2)), rows.shape[1])
        return out


def rows_to_images(rows: int, transformer_options: dict) -> torch.Tensor:
    """Image index of each row of one UNet call: the host stacks CFG chunks of the whole latent batch
    (``cond_or_uncond`` has one entry per chunk), so row r belongs to image r mod (rows / chunks)."""
    chunks = len(transformer_options.get("cond_or_uncond") or ()) or 1
    per_chunk = rows // chunks if rows % chunks == 0 else rows
    return torch.arange(rows) % per_chunk


class RowRouter:
    """The ``diffusion_model`` wrapper: per call, hooks that add each row's entry delta to the routed Linears."""

    def __init__(self, routed: dict[str, RoutedLinear], num_entries: int):
        self.routed = routed
        self.num_entries = num_entries

    def __call__(self, executor, x, *args, **kwargs):
        unet = executor.class_obj
        options = kwargs.get("transformer_options")
        if options is None:
            options = args[4] if len(args) > 4 else {}
        entry = (rows_to_images(x.shape[0], options) % self.num_entries).to(x.device)
        handles = []
        try:
            for path, routed in self.routed.items():
                handles.append(unet.get_submodule(path).register_forward_hook(_adder(routed, entry)))
            return executor(x, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def _adder(routed: RoutedLinear, entry: torch.Tensor):
    def hook(module, inputs, output):
        x = inputs[0]
        if x.shape[0] != entry.shape[0]:
            raise BLoRAError(f"B-LoRA Batch Apply: layer {routed.path} got {x.shape[0]} rows in a call of "
                             f"{entry.shape[0]}; another extension changed the batch inside the model")
        return output + routed.delta(x, entry).to(output.dtype)
    return hook


def _same(a: ModuleParts, b: ModuleParts) -> bool:
    if len(a) != len(b):
        return False
    for (ma, sa), (mb, sb) in zip(a, b):
        if sa != sb or ma is not mb and not _same_module(ma, mb):
            return False
    return True


def _same_module(a: ModuleAdapter, b: ModuleAdapter) -> bool:
    if (a.kind, a.alpha, a.dora_norm, a.tensors.keys()) != (b.kind, b.alpha, b.dora_norm, b.tensors.keys()):
        return False
    pairs = [(a.tensors[k], b.tensors[k]) for k in a.tensors] + [(a.dora_scale, b.dora_scale)]
    return all(x is y or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))
               for x, y in pairs)


def _low_rank(module: ModuleAdapter):
    """The module's ΔW as factors (up, down) without scale, when its kind stores exactly that and nothing else
    changes the layer (no DoRA magnitude, no bias difference); else None."""
    if module.dora_scale is not None or "diff_b" in module.tensors:
        return None
    return module.spec.low_rank(module.tensors)


def _factors(path: str, per_entry: list[ModuleParts]) -> RoutedLinear:
    downs, ups = [], []
    for parts in per_entry:
        factors = [(_low_rank(m), s * m.scale) for m, s in parts]
        downs.append([f.down.float() for f, _ in factors])
        ups.append([f.up.float() * scale for f, scale in factors])
    out_f, in_f = next(m for parts in per_entry for m, _ in parts).out_in
    rank = max(sum(d.shape[0] for d in ds) for ds in downs)
    down = torch.zeros(len(per_entry), rank, in_f)
    up = torch.zeros(len(per_entry), out_f, rank)
    for e, (ds, us) in enumerate(zip(downs, ups)):
        if ds:
            r = sum(d.shape[0] for d in ds)
            down[e, :r] = torch.cat(ds, 0)
            up[e, :, :r] = torch.cat(us, 1)
    return RoutedLinear(path, down=down, up=up)


def _dense(model, key_patches, key_map, path: str, per_entry: list[ModuleParts]) -> RoutedLinear:
    """Each entry's ΔW (and Δb) as the host renders it on the model's current weight."""
    weight_key, bias_key = UNET_PREFIX + path + ".weight", UNET_PREFIX + path + ".bias"
    base_w = current_weight(key_patches, path)
    dense = torch.zeros(len(per_entry), *base_w.shape)
    bias = None
    for e, parts in enumerate(per_entry):
        w = base_w.clone()
        b_patches = []
        for module, strength in parts:
            adapter = Adapter(modules={path: module}, source=f"{path} (entry {e + 1})")
            patches = host_patches(adapter, key_map)
            w = comfy.lora.calculate_weight([(strength, patches[weight_key], 1.0, None, None)], w, weight_key)
            if bias_key in patches:
                b_patches.append((strength, patches[bias_key], 1.0, None, None))
        dense[e] = (w - base_w).cpu()
        if b_patches:
            if bias is None:
                bias = torch.zeros(len(per_entry), base_w.shape[0])
            (b0, convert), *_ = key_patches[bias_key]
            base_bias = convert(b0.to(torch.float32, copy=True), inplace=True)
            bias[e] = (comfy.lora.calculate_weight(b_patches, base_bias.clone(), bias_key) - base_bias).cpu()
    return RoutedLinear(path, dense=dense, bias=bias)


def _check_linear(model, path: str) -> None:
    module = model.model.diffusion_model.get_submodule(path)
    if not isinstance(module, torch.nn.Linear):
        raise BLoRAError(f"B-LoRA Batch Apply cannot give each image its own adapter at {path!r}: it is a "
                         f"{type(module).__name__}, and only Linear layers are routed per image. Apply these "
                         f"entries with separate Apply B-LoRA nodes and samplers, or make them agree on this module")


def batched_clone(model, entries: Sequence[Parts]):
    """A clone of ``model`` where image i of a sampled batch uses ``entries[i % N]`` (module docstring).

    entries: N lists of (Adapter, strength) parts. Everything is checked before the clone is made (SDXL model,
    modules present with their shapes, routed modules are Linear layers); the input model is never modified."""
    if not entries:
        raise BLoRAError("B-LoRA Batch Apply: the batch has no entries")
    shapes = model_weight_shapes(model)
    require_sdxl(model, shapes)
    prepared: list[list[tuple[Adapter, float]]] = []
    for parts in entries:
        unet = [(_unet_part(a), float(s)) for a, s in parts]
        for adapter, _ in unet:
            check_fits(adapter, shapes)
        prepared.append(_render_peft_dora(model, [(a, s) for a, s in unet if a.modules and s != 0.0]))
    paths = sorted({p for parts in prepared for a, _ in parts for p in a.modules})
    per_path = {p: [tuple((a.modules[p], s) for a, s in parts if p in a.modules) for parts in prepared]
                for p in paths}
    shared = {p: per_entry[0] for p, per_entry in per_path.items() if all(_same(per_entry[0], o) for o in per_entry)}
    routed_paths = [p for p in paths if p not in shared]
    for path in routed_paths:
        _check_linear(model, path)

    groups: dict[tuple[int, float], dict[str, ModuleAdapter]] = {}
    for path, parts in shared.items():
        for j, (module, strength) in enumerate(parts):
            groups.setdefault((j, strength), {})[path] = module
    clone = patched_clone(model, [(Adapter(modules=mods, source="B-LoRA batch (shared by every entry)"), s)
                                  for (_, s), mods in groups.items()])
    if not routed_paths:
        return clone
    routed = {}
    key_patches = key_map = None
    for path in routed_paths:
        per_entry = per_path[path]
        if all(_low_rank(m) is not None for parts in per_entry for m, _ in parts):
            routed[path] = _factors(path, per_entry)
            continue
        if key_patches is None:
            key_patches = model.get_key_patches(UNET_PREFIX)
            key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        routed[path] = _dense(model, key_patches, key_map, path, per_entry)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                               RowRouter(routed, len(entries)))
    log.info("B-LoRA batch: %d entries, %d modules patched (shared), %d routed per image (%d as factors)",
             len(entries), len(shared), len(routed), sum(r.dense is None for r in routed.values()))
    return clone
