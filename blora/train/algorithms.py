"""The training algorithms of Train B-LoRA, as data: how each makes, continues and exports its trainable adapters.

| algorithm | trainable (``blora.adapters.kinds``, ``blora.train.adalora``)  | saved as (kohya / LyCORIS keys)                       |
|-----------|------------------------------------------------|-------------------------------------------------------|
| LoRA      | TrainableLoRA                                  | lora_down, lora_up, alpha                             |
| DoRA      | TrainableLoRA with a (1, in) magnitude          | + dora_scale (1, in): stock ComfyUI renders it exactly |
| LoKr      | TrainableLoKr (LyCORIS layout and init)         | lokr_w1[_a/_b], lokr_w2[_a/_b], alpha [+ dora_scale]   |
| LoHa      | TrainableLoHa (LyCORIS init)                    | hada_w1_a/_b, hada_w2_a/_b, alpha [+ dora_scale]       |
| AdaLoRA   | TrainableSVD + RankAllocator                    | lora_down, lora_up, alpha with a rank per module      |
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from .adalora import RankAllocator, TrainableSVD, budget_schedule
from ..adapters.adapter import Adapter, ModuleAdapter
from ..errors import BLoRAError
from ..adapters.kinds.loha import LoHa, TrainableLoHa
from ..adapters.kinds.lokr import LoKr, TrainableLoKr
from ..adapters.kinds.lora import LoRA, TrainableLoRA
from ..adapters.trainable import Trainable
from .seeds import SeedsLoRA, seeds_of
from .recipe import ALGORITHMS, TrainConfig


@dataclass(frozen=True)
class Algorithm:
    """fresh: a new adapter for a weight (out, in); resumed: an adapter continuing a saved module; kind: what the
    file holds; adaptive: ranks change while training (resume accepts lower ranks and pruned modules);
    lycoris_args: the LyCORIS network arguments of the run (kohya ``ss_network_args``), None for plain LoRA;
    stacked: how ``seeds`` > 1 stacks one fresh adapter per seed into one module (None: not batched per seed)."""

    name: str
    kind: str
    fresh: Callable[[torch.Tensor, TrainConfig, torch.Generator], Trainable]
    resumed: Callable[[ModuleAdapter], Trainable]
    adaptive: bool = False
    lycoris_args: Callable[[TrainConfig], dict[str, str]] | None = None
    stacked: Callable[[list[Trainable]], torch.nn.Module] | None = None


REGISTRY: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("LoRA", LoRA.name, lambda w, c, g: TrainableLoRA.create(w, c.rank, c.scale, False, g, c.init),
              TrainableLoRA.from_module, stacked=SeedsLoRA),
    Algorithm("DoRA", LoRA.name, lambda w, c, g: TrainableLoRA.create(w, c.rank, c.scale, True, g, c.init),
              TrainableLoRA.from_module),
    Algorithm("LoKr", LoKr.name, lambda w, c, g: TrainableLoKr.create(
        w, c.rank, c.scale, c.dora_wd, g, factor=c.lokr_factor, decompose_both=c.lokr_decompose_both,
        full_matrix=c.lokr_full_matrix), TrainableLoKr.from_module,
        lycoris_args=lambda c: {"algo": LoKr.name, "factor": str(c.lokr_factor), "decompose_both":
                                str(c.lokr_decompose_both), "full_matrix": str(c.lokr_full_matrix),
                                "dora_wd": str(c.dora_wd)}),
    Algorithm("LoHa", LoHa.name, lambda w, c, g: TrainableLoHa.create(w, c.rank, c.scale, c.dora_wd, g),
              TrainableLoHa.from_module, lycoris_args=lambda c: {"algo": LoHa.name, "dora_wd": str(c.dora_wd)}),
    Algorithm("AdaLoRA", LoRA.name, lambda w, c, g: TrainableSVD.create(w, c.rank, c.scale, g),
              TrainableSVD.from_module, adaptive=True),
)}
assert tuple(REGISTRY) == ALGORITHMS, "training.ALGORITHMS names the registry's algorithms, in order"


def new_adapters(weights: Mapping[str, torch.Tensor], config: TrainConfig) -> dict[str, Trainable]:
    """A fresh adapter per target (path -> weight (out, in) on the training device), drawn in path order from one
    generator seeded with ``config.seed``."""
    generator = torch.Generator().manual_seed(config.seed)
    algorithm = REGISTRY[config.algorithm]
    return {p: algorithm.fresh(weights[p], config, generator) for p in sorted(weights)}


def check_stackable(config: TrainConfig) -> None:
    """``seeds`` > 1 needs an algorithm the registry can stack per seed, and no fp16 (one loss scale would tie the
    seeds together). Raises BLoRAError."""
    if config.seeds > 1 and REGISTRY[config.algorithm].stacked is None:
        raise BLoRAError(f"seeds > 1 batches plain LoRA only; {config.algorithm} cannot be trained as stacked "
                         f"factors: set seeds to 1 and train each seed on its own")
    if config.seeds > 1 and config.training_dtype == "fp16":
        raise BLoRAError("seeds > 1 does not train in fp16 (one loss scale would tie the seeds together): use bf16 "
                         "or fp32")


def stacked_adapters(weights: Mapping[str, torch.Tensor], config: TrainConfig) -> dict[str, torch.nn.Module]:
    """``config.seeds`` fresh adapters per target, seed n's drawn exactly as a single-seed run with seed + n draws
    them, stacked into one module per target (``Algorithm.stacked``)."""
    check_stackable(config)
    singles = [new_adapters(weights, replace(config, seed=s, seeds=1)) for s in seeds_of(config.seed, config.seeds)]
    stack = REGISTRY[config.algorithm].stacked
    return {p: stack([single[p] for single in singles]) for p in sorted(weights)}


def _shapes(adapter: Trainable) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in adapter.tensors().items()}


def check_resume(resume: Adapter, weights: Mapping[str, torch.Tensor], config: TrainConfig) -> None:
    """A resumed file must hold the modules the settings select (AdaLoRA: a subset, the rest pruned), each of the
    form a fresh run with these settings makes (kind, tensor shapes, DoRA, scale; AdaLoRA: a rank up to ``rank``).
    Raises BLoRAError naming the file, the module and what differs."""
    name = resume.source or "resume_from"
    algorithm = REGISTRY[config.algorithm]
    targets = set(weights)
    missing, extra = sorted(targets - set(resume.modules)), sorted(set(resume.modules) - targets)
    if extra or (missing and not algorithm.adaptive):
        raise BLoRAError(f"{name}: holds {len(resume.modules)} modules, blocks {config.blocks!r} select "
                         f"{len(targets)} (missing {missing[:3]}, extra {extra[:3]}): use the blocks and "
                         f"layer_filter it was trained with")
    fresh = new_adapters({p: weights[p] for p in resume.modules}, config)
    for path, module in sorted(resume.modules.items()):
        want = fresh[path]
        stored = {n: tuple(t.shape) for n, t in module.tensors.items() if n != "diff_b"}
        shapes_ok = (module.rank <= config.rank and set(stored) == {"down", "up"}) if algorithm.adaptive else \
            stored == _shapes(want)
        dora = module.dora_scale is not None
        if module.kind != algorithm.kind or not shapes_ok or dora != (want.magnitude is not None) or \
                not math.isclose(module.scale, want.scale, rel_tol=1e-3):
            raise BLoRAError(f"{name} (module {path!r}): {module.spec.label}{' DoRA' if dora else ''} rank "
                             f"{module.rank}, scale {module.scale:g}, tensors {stored}; the node asks for "
                             f"{config.algorithm} rank {config.rank}, scale {want.scale:g}: set algorithm, rank, "
                             f"alpha, rslora and the LoKr options as the file was trained")


def resumed_adapters(resume: Adapter, device: torch.device, config: TrainConfig) -> dict[str, Trainable]:
    """Adapters continuing the file's modules (checked by ``check_resume``), on ``device``."""
    algorithm = REGISTRY[config.algorithm]
    return {p: algorithm.resumed(m).to(device) for p, m in sorted(resume.modules.items())}


def rank_allocator(adapters: Mapping[str, Trainable], config: TrainConfig) -> RankAllocator | None:
    """AdaLoRA's allocator for a run of ``config.steps`` steps (None for the other algorithms)."""
    if not REGISTRY[config.algorithm].adaptive:
        return None
    initial = sum(a.capacity for a in adapters.values())
    schedule = budget_schedule(initial, len(adapters), config.adalora_target, config.steps,
                               config.adalora_warmup, config.adalora_final, config.adalora_interval)
    return RankAllocator(adapters, schedule, config.adalora_orth_reg)


def kohya_metadata(config: TrainConfig) -> dict[str, str]:
    """The kohya ``ss_network_*`` keys other tools show: networks.lora, or lycoris.kohya with its algo and args."""
    lycoris = REGISTRY[config.algorithm].lycoris_args
    if lycoris is None:
        return {"ss_network_module": "networks.lora"}
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(lycoris(config))}


def export(adapters: Mapping[str, Trainable], dtype: torch.dtype) -> dict[str, ModuleAdapter]:
    """The trained modules as ModuleAdapters in ``dtype`` (stored alpha = scale · rank); modules AdaLoRA pruned to
    rank 0 are left out."""
    out = {}
    for path, a in sorted(adapters.items()):
        module = a.export(a.stored_alpha, dtype)
        if module is not None:
            out[path] = module
    if not out:
        raise BLoRAError("every module was pruned to rank 0: raise adalora_target_rank")
    return out
