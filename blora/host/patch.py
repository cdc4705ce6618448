"""Patch a ComfyUI ModelPatcher with adapters, through the host's own LoRA loader.

Each adapter is written in the kohya LDM dialect (``blora.formats.keys.from_canonical``) and handed to
``comfy.lora.load_lora`` with the host's key map, so the patched weights are exactly those stock
``LoraLoaderModelOnly`` gives for the same kohya file (LoRA, LoHa, LoKr and DoRA alike). What the host would skip
quietly (modules missing from the model, shape mismatches, keys it cannot load) is refused before patching.

One exception: per-output-row DoRA (a PEFT ``lora_magnitude_vector`` or a LyCORIS (out, 1) ``dora_scale``,
``ModuleAdapter.dora_norm == "adapted"``), which stock ComfyUI does not read (PEFT) or renders with the norm of the
un-adapted weight (its output-axis branch), unlike PEFT and LyCORIS. Such a module is rendered here with PEFT's formula against the model's current weight W and handed to the
host as a full-rank diff D = m ⊙ (W + ΔW) / ‖W + ΔW‖_row − W, so strength s gives W + s·D (ComfyUI's DoRA strength).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping, Sequence

import comfy.lora
import torch

from ..adapters.adapter import Adapter, ModuleAdapter, check_fits
from ..blocks import ROLES
from ..adapters.dora import dora_weight
from ..errors import ArchitectureError, BLoRAError
from ..formats.keys import from_canonical
from ..adapters.kinds.full import Full

log = logging.getLogger(__name__)

UNET_PREFIX = "diffusion_model."
TEXT_ENCODER_PREFIXES = ("te1:", "te2:")
SHOWN = 5  # module names quoted in an error before "… and N more"
PEFT_DORA = "adapted"  # ModuleAdapter.dora_norm of PEFT/paper DoRA


def model_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """Canonical module path -> weight shape, for every weight of the model's diffusion model.

    model: a ModelPatcher (or a ``comfy.model_base.BaseModel``)."""
    base = getattr(model, "model", model)
    return {k[len(UNET_PREFIX):-len(".weight")]: tuple(v.shape) for k, v in base.state_dict().items()
            if k.startswith(UNET_PREFIX) and k.endswith(".weight")}


def _model_name(model) -> str:
    base = getattr(model, "model", model)
    config = getattr(base, "model_config", None)
    return type(base).__name__ + (f" ({type(config).__name__})" if config is not None else "")


def require_sdxl(model, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise ArchitectureError unless the model has the SDXL attention blocks B-LoRA uses (content
    output_blocks.0.1, style output_blocks.1.1, layout input_blocks.8.1, each with transformer blocks)."""
    shapes = model_weight_shapes(model) if shapes is None else shapes
    for role, ldm in ROLES.items():
        prefix = ldm + ".transformer_blocks."
        if not any(p.startswith(prefix) for p in shapes):
            raise ArchitectureError(f"B-LoRA needs an SDXL-architecture model, got {_model_name(model)}: it has no "
                                    f"attention block {ldm} ({role} block)")


def _unet_part(adapter: Adapter) -> Adapter:
    """The adapter without text-encoder modules (this patches MODEL only), logging what it leaves out."""
    te = {p for p in adapter.modules if p.startswith(TEXT_ENCODER_PREFIXES)}
    if not te:
        return adapter
    log.info("%s: %d text-encoder modules ignored (B-LoRA patches the MODEL only)", adapter.source or "adapter",
             len(te))
    return replace(adapter, modules={p: m for p, m in adapter.modules.items() if p not in te})


def _kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _listing(names: Sequence[str]) -> str:
    more = f" … and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def host_patches(adapter: Adapter, key_map: Mapping[str, str]) -> dict:
    """Host patch dict (weight key -> host weight adapter) for every module of a UNet-only adapter.

    key_map: ``comfy.lora.model_lora_keys_unet`` of the target model. Raises if any module is not loaded."""
    state_dict = from_canonical(adapter, "kohya")
    to_load = {}
    for path in adapter.modules:
        name = _kohya_name(path)
        if name not in key_map:
            raise ArchitectureError(f"{adapter.source or 'adapter'}: module {path!r} is not in this model")
        to_load[name] = key_map[name]
    stray = sorted({k.split(".", 1)[0] for k in state_dict} - set(to_load))
    patches = comfy.lora.load_lora(state_dict, to_load, log_missing=False)
    refused = [p for p in adapter.modules if key_map[_kohya_name(p)] not in patches]
    if stray or refused:
        raise BLoRAError(f"{adapter.source or 'adapter'}: the host's LoRA loader did not load "
                         f"{len(stray) + len(refused)} module(s): {_listing(stray + refused)}")
    return patches


def current_weight(key_patches: Mapping[str, list], path: str) -> torch.Tensor:
    """fp32 weight of module ``path`` as the model renders it (its stored weight, never an in-place patched one, with
    the model's own patches). key_patches: ``ModelPatcher.get_key_patches(UNET_PREFIX)``."""
    key = UNET_PREFIX + path + ".weight"
    (weight, convert), *patches = key_patches[key]
    w = convert(weight.to(torch.float32, copy=True), inplace=True)
    return comfy.lora.calculate_weight(patches, w, key) if patches else w


def peft_dora_diff(module: ModuleAdapter, weight: torch.Tensor, dtype: torch.dtype) -> ModuleAdapter:
    """The full-rank diff D = m ⊙ (W + ΔW) / ‖W + ΔW‖_row − W of a PEFT DoRA module (PEFT's formula: norm of the
    adapted weight over all but the output axis, no eps; an all-zero row stays zero), as a ``full`` module of dtype."""
    w = weight.to(next(iter(module.tensors.values())).device, torch.float32)
    diff = dora_weight(module, w) - w
    extra = {"diff_b": module.tensors["diff_b"]} if "diff_b" in module.tensors else {}
    return ModuleAdapter(Full.name, {"diff": diff.to(dtype), **extra})


def _render_peft_dora(model, parts: Sequence[tuple[Adapter, float]]) -> list[tuple[Adapter, float]]:
    """The parts with every PEFT DoRA module replaced by its diff against the model's current weight."""
    if not any(m.dora_norm == PEFT_DORA for a, _ in parts for m in a.modules.values()):
        return list(parts)
    key_patches = model.get_key_patches(UNET_PREFIX)

    def render(path: str, module: ModuleAdapter) -> ModuleAdapter:
        if module.dora_norm != PEFT_DORA:
            return module
        stored = key_patches[UNET_PREFIX + path + ".weight"][0][0].dtype
        dtype = stored if stored.itemsize >= 2 else torch.bfloat16  # 8-bit weights: a 16-bit diff
        return peft_dora_diff(module, current_weight(key_patches, path), dtype)

    return [(replace(a, modules={p: render(p, m) for p, m in a.modules.items()}), s) for a, s in parts]


def patched_clone(model, parts: Sequence[tuple[Adapter, float]]):
    """A clone of ``model`` (ModelPatcher) with each adapter added at its strength: W' = W + s·ΔW per module.

    The base model is never modified. Everything is checked before the clone is patched: an SDXL-architecture
    model, every module present with its shape. Text-encoder modules are ignored; strength-0 parts are skipped.
    PEFT DoRA modules are rendered with PEFT's formula against the input model's current weight (module docstring)."""
    shapes = model_weight_shapes(model)
    require_sdxl(model, shapes)
    unet_parts = [(_unet_part(adapter), float(strength)) for adapter, strength in parts]
    for adapter, _ in unet_parts:
        check_fits(adapter, shapes)
    todo = [(a, s) for a, s in unet_parts if a.modules and s != 0.0]
    if not todo:
        return model.clone()
    todo = _render_peft_dora(model, todo)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = [(host_patches(adapter, key_map), strength, adapter) for adapter, strength in todo]
    clone = model.clone()
    for patches, strength, adapter in loaded:
        accepted = set(clone.add_patches(patches, strength))
        refused = sorted(str(k) for k in patches if k not in accepted)
        if refused:
            raise BLoRAError(f"{adapter.source or 'adapter'}: the model refused {len(refused)} patch(es): "
                             f"{_listing(refused)}")
        log.debug("%s: %d modules patched at strength %g", adapter.source or "adapter", len(patches), strength)
    return clone
