"""The temporary state training needs on the shared UNet, besides its trainable layers (those the plan realiser
installs: ``training_plan`` says how; ``blora.host.realise.installed`` holds them for the run).

- ``training_plan``: the adapters as ``Trained`` plan entries: on the activations (``output_delta``: LoRA, rsLoRA,
  LoRA+, AdaLoRA, LoKr; stacked seeds) or as weight functions (DoRA, LoHa); with shared seed draws, the widening of
  the batch to N·B rows from the first trained layer on (``Widen``).
- ``frozen_aliases``: while training, every UNet parameter is replaced by a zero-copy alias of the same storage
  that is an ordinary (not inference-mode) tensor with ``requires_grad=False``. Weights a node receives are
  inference tensors, which autograd refuses to save for backward; the aliases cost no memory and no copies, and
  since no host parameter requires grad, nothing before the first adapter is recorded for backward (the input
  side and the middle block do no backward work for the default preset). The original Parameter objects are
  put back on exit, even after an error or an interrupt: the base weights are never written.
- ``checkpoint_units``: what gradient checkpointing recomputes: nothing (``off``), the transformer blocks holding
  trained layers (``trained blocks``, the default, as the minimal loop does) or every layer from the first trained
  one to the output (``all above``); ``checkpointed`` installs it.
- ``offloaded``: with ``offload``, the Linear and conv layers of the backward region outside those units keep only
  their input for backward and run again there (so a weight streamed to the device for one call is not held by
  the graph until backward: the host's trainer does the same for its offloading).
- ``training_session``: all of the above, and grad mode and the host's training flag, for the loop's duration.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Mapping

import torch
import torch.utils.checkpoint

from ..compose.plan import Plan, Widen, trained_plan
from . import compat
from .compat import training_flag


def _alias(t: torch.Tensor) -> torch.nn.Parameter:
    """A frozen Parameter over an ordinary tensor sharing ``t``'s storage (no copy), outside any autograd graph,
    carrying the attributes the host set on ``t`` (0.33's dynamic loader tags weights with ``_model_dtype``, the
    dtype its VRAM copy is cast to; without the tag a cast would size the copy by the stored dtype)."""
    with torch.inference_mode(False):
        alias = torch.nn.Parameter(torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.size(), t.stride()), requires_grad=False)
    return compat.copy_host_tags(t, alias)


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
def _forwards_replaced(modules, make) -> Iterator[None]:
    """Each module's forward replaced by ``make(forward)``; the originals restored on exit."""
    patched = []
    try:
        for module in modules:
            patched.append((module, module.__dict__.get("forward")))
            module.forward = make(module.forward)
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextlib.contextmanager
def checkpointed(layers: list[tuple[str, torch.nn.Module]], enabled: bool = True) -> Iterator[None]:
    """Run each layer's forward under non-reentrant gradient checkpointing; restore the forwards on exit."""
    with _forwards_replaced([layer for _, layer in layers] if enabled else [], _checkpointing_forward):
        yield


_BLOCK = re.compile(r"^(.*\.transformer_blocks\.\d+)\.")


def trained_blocks(unet: torch.nn.Module, targets: list[str]) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks holding targets (a target outside any: the UNet layer holding it), in UNet order."""
    region = grad_region(unet, targets)
    names = set()
    for t in targets:
        block = _BLOCK.match(t)
        if block is not None:
            names.add(block.group(1))
        else:
            names.update(name for name, _ in region if t.startswith(name + "."))
    order = {name: i for i, (name, _) in enumerate(unet.named_modules())}
    return [(n, unet.get_submodule(n)) for n in sorted(names, key=lambda n: order.get(n, 0))]


def checkpoint_units(unet: torch.nn.Module, targets: list[str], mode: str) -> list[tuple[str, torch.nn.Module]]:
    """What backward recomputes for a ``gradient_checkpointing`` mode (``blora.train.recipe.CHECKPOINTING``)."""
    if mode == "off":
        return []
    if mode == "all above":
        return grad_region(unet, targets)
    return trained_blocks(unet, targets)


class _Recomputed(torch.autograd.Function):
    """y = forward(x) keeping only x: backward runs forward again under grad and back-propagates through it (the
    weights it uses are streamed again; parameters it reaches, an adapter's, get their gradients there)."""

    @staticmethod
    def forward(ctx, x, forward):
        ctx.save_for_backward(x)
        ctx.run = forward
        with torch.no_grad():
            return forward(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        run, ctx.run = ctx.run, None
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            torch.autograd.backward(run(x), grad)
        return x.grad, None


def _recomputing_forward(forward):
    def run(x, *args, **kwargs):
        if args or kwargs or not torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
            return forward(x, *args, **kwargs)
        return _Recomputed.apply(x, forward)
    return run


def offload_units(region: list[tuple[str, torch.nn.Module]], units: list[tuple[str, torch.nn.Module]],
                  weight_functions=()):
    """The Linear and conv modules of the backward region outside the checkpointed units, but those trained as
    weight functions (their adapter's parameters must see the forward's graph)."""
    inside = {id(m) for _, unit in units for m in unit.modules()} | {id(m) for m in weight_functions}
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return [m for _, layer in region for m in layer.modules() if isinstance(m, kinds) and id(m) not in inside]


@contextlib.contextmanager
def offloaded(modules) -> Iterator[None]:
    """Each module keeps only its input for backward (``_Recomputed``)."""
    with _forwards_replaced(modules, _recomputing_forward):
        yield


def training_plan(unet: torch.nn.Module, adapters: Mapping[str, torch.nn.Module], config) -> Plan:
    """The trainable layers as a plan for the realiser: each adapter on the activations when it says
    ``on_activations``, else as a weight function; compute dtype the training dtype; seeds with shared draws widen
    the batch at every layer from the first trained one (``grad_region``)."""
    widen = None
    if config.seeds > 1 and config.seed_draws == "shared":
        layers = tuple(name for name, _ in grad_region(unet, list(adapters)))
        widen = Widen(seeds=config.seeds, rows=config.batch_size, layers=layers)
    return trained_plan(adapters, compute_dtype=config.dtype, widen=widen)


@contextlib.contextmanager
def training_session(unet: torch.nn.Module, adapters: Mapping[str, torch.nn.Module], targets: list[str], config,
                     ) -> Iterator[None]:
    """Everything the loop needs on the loaded UNet besides the trainable layers (``realise.installed``), undone on
    exit (even after an error or an interrupt): frozen aliases, checkpointing per ``config.gradient_checkpointing``,
    offloaded layers (``config.offload``), grad mode, the training flag."""
    region = grad_region(unet, targets)
    units = checkpoint_units(unet, targets, config.gradient_checkpointing)
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_aliases(unet))
        stack.enter_context(checkpointed(units))
        if config.offload:
            weight_functions = [unet.get_submodule(p) for p, a in adapters.items()
                                if not getattr(a, "on_activations", False)]
            stack.enter_context(offloaded(offload_units(region, units, weight_functions)))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(training_flag())
        yield
