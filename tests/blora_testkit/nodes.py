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
    clone = node_cls.PREPARE_CLASS_CLONE(hidden or {})
    call = make_locked_method_func(node_cls, node_cls.FUNCTION, clone)
    with torch.inference_mode(inference_mode):
        out = call(**inputs)
        if asyncio.iscoroutine(out):
            out = asyncio.run(out)
    ui = out.ui if out.ui is None or isinstance(out.ui, dict) else out.ui.as_dict()
    return out.result, ui


def fingerprint(node_cls, **inputs: Any):
    """What the executor compares to decide whether to re-run the node (V3 fingerprint_inputs)."""
    return node_cls.fingerprint_inputs(**inputs)
