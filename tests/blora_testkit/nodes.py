"""Run a V3 node class the way the host's executor does (host layers only).

``run_node(BLoRAApply, model=m, content=a)`` finalizes the schema, makes the class clone the executor makes
(``PREPARE_CLASS_CLONE``), calls the normalized execute method through the host's locked-method wrapper, under
``torch.inference_mode()`` as ``execution.py`` does, and returns ``(result tuple, ui dict or None)``.
"""
from __future__ import annotations

import asyncio
from typing import Any


def run_node(node_cls, *, hidden: dict | None = None, inference_mode: bool = True, **inputs: Any):
    import torch
    from comfy_api.internal import make_locked_method_func

    node_cls.GET_SCHEMA()
    node_cls.VALIDATE_CLASS()
    clone = node_cls.PREPARE_CLASS_CLONE(_clone_data(node_cls, hidden or {}))
    call = make_locked_method_func(node_cls, node_cls.FUNCTION, clone)
    with torch.inference_mode(inference_mode):
        out = call(**inputs)
        if asyncio.iscoroutine(out):
            out = asyncio.run(out)
    ui = out.ui if out.ui is None or isinstance(out.ui, dict) else out.ui.as_dict()
    return out.result, ui


def _clone_data(node_cls, hidden: dict):
    """What ``PREPARE_CLASS_CLONE`` takes on this host: the hidden inputs themselves (0.3.64:
    ``PREPARE_CLASS_CLONE(hidden_inputs)``), or the executor's v3 data holding them under ``"hidden_inputs"``
    (0.33: ``PREPARE_CLASS_CLONE(v3_data)``, built by ``execution.get_input_data``). Keys are ``io.Hidden`` values
    such as ``"UNIQUE_ID"``."""
    import inspect

    params = list(inspect.signature(node_cls.PREPARE_CLASS_CLONE).parameters)
    if params and params[0] == "hidden_inputs":
        return dict(hidden)
    return {"hidden_inputs": dict(hidden)}


def fingerprint(node_cls, **inputs: Any):
    """What the executor compares to decide whether to re-run the node (V3 fingerprint_inputs)."""
    return node_cls.fingerprint_inputs(**inputs)


def write_lora(folder, name: str, state_dict: dict, metadata: dict | None = None):
    """Save ``state_dict`` as ``folder/name`` (safetensors, contiguous tensors); returns the path."""
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(folder) / name
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)
    return path


def unload_all() -> None:
    """Unpatch whatever patcher the host's model management holds loaded. Clones share the base model's modules:
    while a patched clone is loaded (e.g. after sampling with it) the base model's tensors are the patched ones,
    and another patcher's ``patch_model`` skips modules already marked as patched."""
    import comfy.model_management

    if comfy.model_management.current_loaded_models:
        comfy.model_management.unload_all_models()


def model_state(patcher) -> dict:
    """A copy of every tensor of the patcher's model with no patcher loaded (for before/after comparisons)."""
    unload_all()
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def patched_weights(patcher) -> dict:
    """The diffusion-model weights the host computes for ``patcher`` (its own ``patch_model``, under
    ``torch.inference_mode()`` as in the executor), then unpatched: canonical path -> weight."""
    import torch

    unload_all()
    with torch.inference_mode():
        patcher.patch_model()
    try:
        return {k[len("diffusion_model."):-len(".weight")]: v.detach().clone()
                for k, v in patcher.model.state_dict().items()
                if k.startswith("diffusion_model.") and k.endswith(".weight")}
    finally:
        patcher.unpatch_model()


def tiny_sample(patcher, seed: int = 0, steps: int = 3, size: int = 8):
    """A few euler steps of the host's own sampler on fixed noise and conditioning: the latent it returns."""
    import comfy.sample
    import torch

    from .tiny_sdxl import tiny_conditioning

    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    positive, negative = tiny_conditioning(seed + 1), tiny_conditioning(seed + 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops gain nothing from threads, and lose a lot on a busy machine
    try:
        with torch.inference_mode():
            return comfy.sample.sample(patcher, noise, steps, 2.0, "euler", "normal", positive, negative,
                                       torch.zeros_like(noise), disable_pbar=True, seed=seed)
    finally:
        torch.set_num_threads(threads)


def load_blora(nodes, name: str):
    """The adapter that Load B-LoRA (the pack's ``nodes`` package) reads from ``name`` in the loras folders."""
    return run_node(nodes.load.BLoRALoader, lora_name=name)[0][0]
