"""Adapter modules as the host's own patches, and the deltas the host would add: the helpers the realiser
(``blora.host.realise``) uses. Nothing here patches a model.

Each adapter is written in the kohya LDM dialect (``blora.formats.keys.from_canonical``) and handed to
``comfy.lora.load_lora`` with the host's key map, so the patched weights are exactly those stock
``LoraLoaderModelOnly`` gives for the same kohya file (LoRA, LoHa, LoKr and DoRA alike, and a module's bias
difference ``diff_b``, which the host adds to the layer's bias as b + s·Δb). What the host would skip quietly
(modules missing from the model, shape mismatches, keys it cannot load) is refused before patching.

One exception: per-output-row DoRA (a PEFT ``lora_magnitude_vector`` or a LyCORIS (out, 1) ``dora_scale``,
``ModuleAdapter.dora_norm == "adapted"``), which stock ComfyUI does not read (PEFT) or renders with the norm of the
un-adapted weight (its output-axis branch), unlike PEFT and LyCORIS. Such a module is rendered here with PEFT's
formula against the model's current weight W and handed to the host as a full-rank diff
D = m ⊙ (W + ΔW) / ‖W + ΔW‖_row − W, so strength s gives W + s·D (ComfyUI's DoRA strength).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import comfy.lora
import torch

from ..adapters.adapter import Adapter, ModuleAdapter
from ..compose.plan import Static
from ..adapters.dora import dora_weight
from ..errors import ArchitectureError, BLoRAError
from ..formats.dialects import UNET_PREFIX
from ..formats.keys import from_canonical
from ..adapters.kinds.full import Full
from . import compat
from .routed import RoutedLinear
from .timed import LayerDelta

SHOWN = 5  # module names quoted in an error before "… and N more"
PEFT_DORA = "adapted"  # ModuleAdapter.dora_norm of PEFT/paper DoRA


def weight_key(path: str) -> str:
    return f"{UNET_PREFIX}{path}.weight"


def bias_key(path: str) -> str:
    return f"{UNET_PREFIX}{path}.bias"


def model_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """Canonical module path -> weight shape, for every weight of the model's diffusion model.

    model: a ModelPatcher (or a ``comfy.model_base.BaseModel``)."""
    base = getattr(model, "model", model)
    return {k[len(UNET_PREFIX):-len(".weight")]: tuple(v.shape) for k, v in base.state_dict().items()
            if k.startswith(UNET_PREFIX) and k.endswith(".weight")}


def _kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def listing(names: Sequence[str]) -> str:
    more = f" … and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def key_map(model) -> dict[str, str]:
    """The host's kohya name -> weight key map of the model's UNet."""
    return comfy.lora.model_lora_keys_unet(model.model, {})


def host_patches(adapter: Adapter, key_map: Mapping[str, str]) -> dict:
    """Host patch dict (weight key or bias key -> host weight adapter) for every module of a UNet-only adapter.

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
                         f"{len(stray) + len(refused)} module(s): {listing(stray + refused)}")
    return patches


def current_weight(key_patches: Mapping[str, list], path: str, key: str | None = None) -> torch.Tensor:
    """fp32 weight of module ``path`` (or any ``key``) as the model renders it (its stored weight, never an in-place
    patched one, with the model's own patches). key_patches: ``ModelPatcher.get_key_patches(UNET_PREFIX)``."""
    key = weight_key(path) if key is None else key
    w, patches = compat.stored_weight(key_patches, key)
    return compat.render(patches, w, key) if patches else w


def peft_dora_diff(module: ModuleAdapter, weight: torch.Tensor, dtype: torch.dtype) -> ModuleAdapter:
    """The full-rank diff D = m ⊙ (W + ΔW) / ‖W + ΔW‖_row − W of a PEFT DoRA module (PEFT's formula: norm of the
    adapted weight over all but the output axis, no eps; an all-zero row stays zero), as a ``full`` module of dtype."""
    w = weight.to(next(iter(module.tensors.values())).device, torch.float32)
    diff = dora_weight(module, w) - w
    extra = {"diff_b": module.tensors["diff_b"]} if "diff_b" in module.tensors else {}
    return ModuleAdapter(Full.name, {"diff": diff.to(dtype), **extra})


def render_peft_dora(path: str, module: ModuleAdapter, key_patches: Mapping[str, list]) -> ModuleAdapter:
    """``module`` itself, or for a PEFT DoRA module its diff against the model's current weight (module docstring)."""
    if module.dora_norm != PEFT_DORA:
        return module
    stored = compat.stored_dtype(key_patches, weight_key(path))
    dtype = stored if stored.itemsize >= 2 else torch.bfloat16  # 8-bit weights: a 16-bit diff
    return peft_dora_diff(module, current_weight(key_patches, path), dtype)


def _low_rank(module: ModuleAdapter):
    """The module's (up, down) weight factors when its ΔW is exactly scale · up @ down (no DoRA), else None."""
    return None if module.dora_scale is not None else module.spec.low_rank(module.tensors)


def _bias_delta(key_patches, patches: Mapping, path: str, strength: float = 1.0) -> torch.Tensor | None:
    """The bias difference the host adds for ``patches`` at ``strength`` (fp32), or None without one."""
    key = bias_key(path)
    if key not in patches:
        return None
    b, _ = compat.stored_weight(key_patches, key)
    return compat.render([compat.patch_tuple(patches[key], strength)], b.clone(), key) - b


def timed_delta(key_patches, keys: Mapping[str, str], path: str, part: Static) -> tuple[LayerDelta, LayerDelta | None]:
    """(weight delta, bias delta or None) ``part``'s module adds at strength 1, float32: a plain LoRA's weight as its
    factors (scale · up, down), the rest as (host-patched tensor − stored tensor) by the host's calculate_weight on
    the unpatched tensor. keys: ``key_map(model)``."""
    module = render_peft_dora(path, part.module, key_patches)
    patches = host_patches(Adapter(modules={path: module}, source=part.source), keys)
    bias = _bias_delta(key_patches, patches, path)
    bias = LayerDelta(dense=bias) if bias is not None else None
    f = _low_rank(module)
    if f is not None:
        return LayerDelta(up=f.up.float() * module.scale, down=f.down.float()), bias
    key = weight_key(path)
    w, _ = compat.stored_weight(key_patches, key)
    patched = compat.render([compat.patch_tuple(patches[key])], w.clone(), key)
    return LayerDelta(dense=patched - w), bias


def routed_dense(key_patches, keys: Mapping[str, str], path: str, per_entry: Sequence[Sequence[Static]]) -> RoutedLinear:
    """Each entry's ΔW (and Δb) as the host renders it on the model's current weight."""
    wkey, bkey = weight_key(path), bias_key(path)
    base_w = current_weight(key_patches, path)
    dense = torch.zeros(len(per_entry), *base_w.shape)
    bias = None
    for e, parts in enumerate(per_entry):
        w = base_w.clone()
        b_patches = []
        for part in parts:
            module = render_peft_dora(path, part.module, key_patches)
            adapter = Adapter(modules={path: module}, source=f"{path} (entry {e + 1})")
            patches = host_patches(adapter, keys)
            w = compat.render([compat.patch_tuple(patches[wkey], part.strength)], w, wkey)
            if bkey in patches:
                b_patches.append(compat.patch_tuple(patches[bkey], part.strength))
        dense[e] = (w - base_w).cpu()
        if b_patches:
            if bias is None:
                bias = torch.zeros(len(per_entry), base_w.shape[0])
            base_bias, _ = compat.stored_weight(key_patches, bkey)
            bias[e] = (compat.render(b_patches, base_bias.clone(), bkey) - base_bias).cpu()
    return RoutedLinear(path, dense=dense, bias=bias)
