"""Trainable adapters on the host's ModelPatcher, and the temporary state training needs on the shared UNet.

- ``trainable_clone``: a clone of the input ModelPatcher with one weight wrapper per targeted Linear
  (``ModelPatcher.add_weight_wrapper``); nothing else is wrapped.
- ``frozen_aliases``: while training, every UNet parameter is replaced by a zero-copy alias of the same storage
  that is an ordinary (not inference-mode) tensor with ``requires_grad=False``. Weights a node receives are
  inference tensors, which autograd refuses to save for backward; the aliases cost no memory and no copies, and
  since no host parameter requires grad, nothing before the first adapter is recorded for backward (the input
  side and the middle block do no backward work for the default preset). The original Parameter objects are
  put back on exit, even after an error or an interrupt: the base weights are never written.
- ``checkpointed``: gradient checkpointing of the layers from the first trained layer to the output.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.utils.checkpoint

from ..adapters.trainable import Trainable
from .dynamic_vram import keep_weight_functions

UNET_PREFIX = "diffusion_model."


def weight_key(path: str) -> str:
    return f"{UNET_PREFIX}{path}.weight"


def trainable_clone(model, adapters: Mapping[str, Trainable], compute_dtype: torch.dtype | None):
    """A clone of ``model`` whose targeted weights go through their adapter (W -> adapter(W)) in every forward.

    compute_dtype: set as the clone's manual-cast dtype when it differs from the weights' dtype."""
    clone = model.clone()
    if compute_dtype is not None and compute_dtype != clone.model.get_dtype():
        clone.set_model_compute_dtype(compute_dtype)
    for path, adapter in adapters.items():
        clone.add_weight_wrapper(weight_key(path), adapter)
    return keep_weight_functions(clone)


def _alias(t: torch.Tensor) -> torch.nn.Parameter:
    """A frozen Parameter over an ordinary tensor sharing ``t``'s storage (no copy), outside any autograd graph,
    carrying the attributes the host set on ``t`` (0.33's dynamic loader tags weights with ``_model_dtype``, the
    dtype its VRAM copy is cast to; without the tag a cast would size the copy by the stored dtype)."""
    with torch.inference_mode(False):
        alias = torch.nn.Parameter(torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.size(), t.stride()), requires_grad=False)
    for name, value in vars(t).items():
        setattr(alias, name, value)
    return alias


@contextlib.contextmanager
def frozen_aliases(module: torch.nn.Module) -> Iterator[None]:
    """Swap every parameter of ``module`` for a frozen alias of its storage; restore the originals on exit."""
    originals = []
    try:
        for owner in module.modules():
            for name, p in list(owner._parameters.items()):
                if p is None:
                    continue
                originals.append((owner, name, p))
                owner._parameters[name] = _alias(p)
        yield
    finally:
        for owner, name, p in originals:
            owner._parameters[name] = p


def strip_wrappers(module: torch.nn.Module, adapters: Mapping[str, Trainable]) -> None:
    """Remove the adapters from the modules' weight functions (the host would on its next load; this makes sure
    no later call of the shared UNet runs them)."""
    ours = {id(a) for a in adapters.values()}
    for m in module.modules():
        functions = getattr(m, "weight_function", None)
        if functions and any(id(f) in ours for f in functions):
            m.weight_function = [f for f in functions if id(f) not in ours]


def unet_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's layers in execution order: each child of the input, middle and output blocks, then ``out``."""
    layers = []
    for group in ("input_blocks", "middle_block", "output_blocks"):
        blocks = getattr(unet, group, None)
        if blocks is None:
            continue
        if group == "middle_block":
            layers += [(f"middle_block.{j}", layer) for j, layer in enumerate(blocks)]
            continue
        for i, block in enumerate(blocks):
            layers += [(f"{group}.{i}.{j}", layer) for j, layer in enumerate(block)]
    layers.append(("out", unet.out))
    return layers


def grad_region(unet: torch.nn.Module, targets: list[str]) -> list[tuple[str, torch.nn.Module]]:
    """The layers backward goes through: from the first layer holding a target to the end."""
    layers = unet_layers(unet)
    hit = [i for i, (name, _) in enumerate(layers) if any(t.startswith(name + ".") for t in targets)]
    return layers[min(hit):] if hit else []


def _checkpointing_forward(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


@contextlib.contextmanager
def checkpointed(layers: list[tuple[str, torch.nn.Module]], enabled: bool = True) -> Iterator[None]:
    """Run each layer's forward under non-reentrant gradient checkpointing; restore the forwards on exit."""
    patched = []
    try:
        for _, layer in (layers if enabled else []):
            patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = _checkpointing_forward(layer.forward)
        yield
    finally:
        for layer, previous in patched:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
