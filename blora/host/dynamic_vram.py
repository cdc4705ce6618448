"""The pack under the host's dynamic VRAM loader (``ModelPatcherDynamic``, ComfyUI 0.33+ on NVIDIA; on CPU the
host hands back a plain ModelPatcher). Feature checks only: on hosts without it every function here is a no-op.

What that loader does differently, read in 0.33's ``comfy/model_patcher.py`` and ``comfy/ops.py``:

- Weight wrappers (``add_weight_wrapper``) reach only the modules it streams through its VRAM buffer (the "vbar");
  modules of at most 16 KiB are force-loaded instead, and their ``weight_function`` list is left as it was: the
  wrappers of the patcher being loaded are skipped, and the functions a previous patcher put there stay.
  ``keep_weight_functions`` puts this patcher's wrappers on those modules when it loads (as the classic loader
  does for every module) and takes them off again when it is detached.
- A streamed weight stays resident in VRAM (``module._v_weight``) across patchers with the same patches; when it
  was streamed under ``torch.inference_mode()`` (any sampling) it is an inference tensor, which autograd cannot
  save for backward. ``restream_weights`` marks the resident copies stale, as the loader itself does when the
  patches change (``_v_signature = None``), so training streams fresh ordinary tensors.
- The host's own trainer raises ``comfy.model_management.in_training`` while it trains (some ops choose
  autograd-safe paths on it); ``training_flag`` does the same.
- Full loads (``load(full_load=True)``, ``patch_model(load_weights=True)``) are refused by assertion: the pack
  loads through ``comfy.model_management.load_models_gpu`` only.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import comfy.model_management
import comfy.patcher_extension
import torch

CALLBACK_KEY = "blora.dynamic_vram"


def is_dynamic(patcher) -> bool:
    """True for a patcher the dynamic VRAM loader handles."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def _param_owner(model: torch.nn.Module, key: str):
    path, _, param = key.rpartition(".")
    try:
        return model.get_submodule(path), param
    except AttributeError:
        return None, param


def _attach_missing(patcher, *_args) -> None:
    if not is_dynamic(patcher):
        return
    for key, functions in patcher.weight_wrapper_patches.items():
        module, param = _param_owner(patcher.model, key)
        current = getattr(module, f"{param}_function", None)
        if current is None:
            continue
        missing = [f for f in functions if not any(f is g for g in current)]
        if missing:  # a new list: the class attribute default is shared by every module
            setattr(module, f"{param}_function", list(current) + missing)


def _detach_ours(patcher, *_args) -> None:
    if not is_dynamic(patcher):
        return
    for key, functions in patcher.weight_wrapper_patches.items():
        module, param = _param_owner(patcher.model, key)
        current = getattr(module, f"{param}_function", None)
        if current and any(f is g for f in functions for g in current):
            setattr(module, f"{param}_function", [g for g in current if not any(f is g for f in functions)])


def keep_weight_functions(patcher):
    """Make ``patcher``'s weight wrappers apply to every module they name under the dynamic loader too (see the
    module docstring); returns ``patcher``. Call it on a clone after adding the wrappers."""
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, CALLBACK_KEY, _attach_missing)
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, CALLBACK_KEY, _detach_ours)
    return patcher


def restream_weights(module: torch.nn.Module) -> int:
    """Mark every VRAM-resident streamed weight under ``module`` stale (the loader's own ``set_dirty``): the next
    forward streams it again, in the grad mode then in force. Returns how many were marked."""
    marked = 0
    for m in module.modules():
        if getattr(m, "_v_signature", None) is not None:
            m._v_signature = None
            marked += 1
    return marked


@contextlib.contextmanager
def training_flag() -> Iterator[None]:
    """``comfy.model_management.in_training`` raised while the body runs (hosts that have the flag)."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before
