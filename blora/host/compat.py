"""Every private host attribute and calling convention the pack relies on, named once (each has a test against the
real host, both versions, in tests/host/test_host_compat.py). Feature checks only, never version numbers.

Host patch internals (``comfy/model_patcher.py``, ``comfy/lora.py``, ``comfy/ops.py``):

- ``ModelPatcher.weight_wrapper_patches``: key -> the weight functions ``add_weight_wrapper`` registered;
  ``load`` extends a module's ``weight_function`` / ``bias_function`` list with them (``functions_attr``).
- ``ModelPatcher.get_key_patches(prefix)``: key -> ``[(stored weight, convert function), *patch tuples]``.
- A patch tuple is ``(strength_patch, patch, strength_model, offset, function)``, as ``add_patches`` appends it and
  ``comfy.lora.calculate_weight`` reads it (``patch_tuple``).
- ``executor.class_obj``: the object a ``DIFFUSION_MODEL`` wrapper wraps (the UNet); the wrapper is called as
  ``wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs)``, transformer_options
  positional (the last dict after x) or by keyword (``transformer_options_of``).
- The sampler merges a patcher's ``wrappers`` into ``model_options["transformer_options"]["wrappers"]``; a direct
  UNet call (training) passes the same (``call_options``).
- ``server.PromptServer.instance`` (the running server, when there is one) and its ``send_sync`` / ``client_id``.

The dynamic VRAM loader (``ModelPatcherDynamic``, ComfyUI 0.33+ on NVIDIA; on CPU the host hands back a plain
ModelPatcher), read in 0.33's ``comfy/model_patcher.py`` and ``comfy/ops.py``:

- Weight wrappers reach only the modules it streams through its VRAM buffer; modules of at most 16 KiB are
  force-loaded instead and their ``weight_function`` list is left as it was. ``keep_weight_functions`` puts this
  patcher's wrappers on those modules when it loads and takes them off again when it is detached.
- A streamed weight stays resident (``module._v_weight``) while ``module._v_signature`` matches; one streamed under
  ``torch.inference_mode()`` is an inference tensor autograd cannot save. ``restream_weights`` marks the resident
  copies stale (``_v_signature = None``, the loader's own ``set_dirty``).
- It tags weights with ``_model_dtype`` (the dtype its VRAM copy is cast to): ``HOST_TENSOR_TAGS``; a tensor that
  stands in for a weight must carry the tags (``copy_host_tags``).
- ``comfy.model_management.in_training``: raised by the host's own trainer while it trains (``training_flag``).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

import comfy.lora
import comfy.model_management
import comfy.patcher_extension
import torch

CALLBACK_KEY = "blora.dynamic_vram"
HOST_TENSOR_TAGS = ("_model_dtype",)
WRAPPERS = "wrappers"


# --- patch tuples and stored weights -------------------------------------------------------------------------------

def patch_tuple(patch, strength: float = 1.0) -> tuple:
    """The tuple ``add_patches`` stores for ``patch`` at ``strength`` (strength_model 1, no offset, no function)."""
    return (strength, patch, 1.0, None, None)


def render(patches: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``weight`` with the host's patch tuples applied by the host's own ``comfy.lora.calculate_weight`` (fp32)."""
    return comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32)


def stored_weight(key_patches, key: str) -> tuple[torch.Tensor, list]:
    """(the stored weight converted to fp32 — never an in-place patched one —, the model's own patch tuples) of
    ``key``. key_patches: ``ModelPatcher.get_key_patches(prefix)``."""
    (weight, convert), *patches = key_patches[key]
    return convert(weight.to(torch.float32, copy=True), inplace=True), list(patches)


def stored_dtype(key_patches, key: str) -> torch.dtype:
    """The dtype ``key`` is stored in (key_patches: ``ModelPatcher.get_key_patches(prefix)``)."""
    return key_patches[key][0][0].dtype


def weight_functions(patcher) -> dict[str, list]:
    """key -> the weight functions registered on ``patcher`` (``add_weight_wrapper``)."""
    return patcher.weight_wrapper_patches


def functions_attr(key: str) -> tuple[str, str]:
    """(module path, the module attribute holding its functions) of a weight or bias key: 'weight_function' or
    'bias_function', the lists ``comfy.ops`` runs on the cast weight."""
    path, _, param = key.rpartition(".")
    return path, f"{param}_function"


# --- wrappers ------------------------------------------------------------------------------------------------------

def wrapped_object(executor):
    """The object a wrapper's executor runs (the UNet for a DIFFUSION_MODEL wrapper)."""
    return executor.class_obj


def transformer_options_of(args: tuple, kwargs: dict) -> dict:
    """The transformer_options a DIFFUSION_MODEL wrapper got: by keyword, or positionally as the last dict argument
    (SDXL's UNet: x, timesteps, context, y, control, transformer_options; FLUX: x, timestep, context, y, guidance,
    ref_latents, control, transformer_options)."""
    options = kwargs.get("transformer_options")
    if options is None:
        options = next((a for a in reversed(args) if isinstance(a, dict)), {})
    return options


def call_options(patcher) -> dict:
    """transformer_options for calling ``patcher``'s UNet directly (as the sampler does): the patcher's options with
    its wrappers merged in, so DIFFUSION_MODEL wrappers run."""
    options = dict(patcher.model_options.get("transformer_options", {}))
    options[WRAPPERS] = comfy.patcher_extension.merge_nested_dicts(
        dict(options.get(WRAPPERS, {})), patcher.wrappers, copy_dict1=True)
    return options


# --- the server ------------------------------------------------------------------------------------------------------

def prompt_server():
    """The running ComfyUI server (``server.PromptServer.instance``), or None when no server runs here."""
    server = sys.modules.get("server")  # the host's server module, loaded only when a server runs
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def client_sender(event: str) -> Callable[[dict], None] | None:
    """A function sending ``event`` to the prompt's client, or None when no server runs."""
    instance = prompt_server()
    if instance is None:
        return None
    return lambda payload: instance.send_sync(event, payload, instance.client_id)


# --- the dynamic VRAM loader ------------------------------------------------------------------------------------------

def is_dynamic(patcher) -> bool:
    """True for a patcher the dynamic VRAM loader handles."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def _owner(model: torch.nn.Module, key: str):
    path, attr = functions_attr(key)
    try:
        return model.get_submodule(path), attr
    except AttributeError:
        return None, attr


def _attach_missing(patcher, *_args) -> None:
    if not is_dynamic(patcher):
        return
    for key, functions in weight_functions(patcher).items():
        module, attr = _owner(patcher.model, key)
        current = getattr(module, attr, None)
        if current is None:
            continue
        missing = [f for f in functions if not any(f is g for g in current)]
        if missing:  # a new list: the class attribute default is shared by every module
            setattr(module, attr, list(current) + missing)


def _detach_ours(patcher, *_args) -> None:
    if not is_dynamic(patcher):
        return
    for key, functions in weight_functions(patcher).items():
        module, attr = _owner(patcher.model, key)
        current = getattr(module, attr, None)
        if current and any(f is g for f in functions for g in current):
            setattr(module, attr, [g for g in current if not any(f is g for f in functions)])


def keep_weight_functions(patcher):
    """Make ``patcher``'s weight wrappers apply to every module they name under the dynamic loader too (see the
    module docstring); returns ``patcher``. Call it on a clone after adding the wrappers."""
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, CALLBACK_KEY, _attach_missing)
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, CALLBACK_KEY, _detach_ours)
    return patcher


def strip_functions(module: torch.nn.Module, functions) -> int:
    """Take ``functions`` off every weight/bias function list under ``module`` (the host would on its next load;
    this makes sure no later call of the shared UNet runs them). Returns how many lists changed."""
    ours = {id(f) for f in functions}
    changed = 0
    for m in module.modules():
        for attr in ("weight_function", "bias_function"):
            current = getattr(m, attr, None)
            if current and any(id(f) in ours for f in current):
                setattr(m, attr, [f for f in current if id(f) not in ours])
                changed += 1
    return changed


def restream_weights(module: torch.nn.Module) -> int:
    """Mark every VRAM-resident streamed weight under ``module`` stale (the loader's own ``set_dirty``): the next
    forward streams it again, in the grad mode then in force. Returns how many were marked."""
    marked = 0
    for m in module.modules():
        if getattr(m, "_v_signature", None) is not None:
            m._v_signature = None
            marked += 1
    return marked


def copy_host_tags(source: torch.Tensor, target: torch.Tensor) -> Any:
    """Copy the attributes the host set on ``source`` (``HOST_TENSOR_TAGS`` and any other) onto ``target``."""
    for name, value in vars(source).items():
        setattr(target, name, value)
    return target


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
