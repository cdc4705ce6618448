"""Train B-LoRA on the host's own model patcher, one seed or several (``train_runs``; ``train_blora`` for one,
``blora.host.train_seeds.train_blora_seeds`` for N), every algorithm through ``blora.train.algorithms.REGISTRY``.

Architectures: SDXL and FLUX.1 (``blora.host.architecture.require_architecture``; the targets, schedule, prediction
target and conditioning follow the model's: ``blora.train.recipe.select_targets``, ``train_inputs``).

Order of work: every check that can fail on the inputs (architecture, schedule, targets, file name, images,
conditioning, resume file) runs before training starts, so bad input writes nothing. Training runs under
``torch.inference_mode(False)`` on a clone of the input ModelPatcher, loaded through
``comfy.model_management.load_models_gpu`` (fully, or partly with ``offload``: the host streams the rest); the
adapters are installed by the plan realiser (``train_wrappers.training_plan``: on the activations, or as weight
functions for DoRA and LoHa; ``realise.installed`` holds them for the run); the base weights are only read. The
loop is ``train_loop.run_loop``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import comfy.model_management
import torch

from ..adapters.adapter import Adapter, check_fits
from ..train.algorithms import (check_resume, check_stackable, export, new_adapters, rank_allocator, resumed_adapters,
                                stacked_adapters)
from ..arch import block_of
from ..errors import BLoRAError
from ..train.loss_history import losses_in
from ..train.seeds import seeds_of
from ..train.recipe import TrainConfig, make_optimizer, select_targets
from .compat import is_dynamic, restream_weights
from .architecture import require_architecture
from .patch import model_weight_shapes
from .realise import installed, patched_clone, realise
from .train_inputs import NoiseSchedule, noise_schedule, prepare_samples
from .train_loop import TrainState, run_loop
from .output_files import check_prefix, save_target
from .train_save import base_model_fingerprint, save_dtype, steps_in, train_metadata, write_trained
from .train_wrappers import training_plan, training_session

log = logging.getLogger(__name__)
LOAD_ALL_MEMORY = 1e20  # ask load_models_gpu to free everything else: training needs the room


@dataclass
class TrainOutcome:
    """model: the input model's clone with the trained adapter at strength 1; adapter: the trained B-LoRA;
    losses: one per step; path: the file written; elapsed: seconds spent in the loop; ranks: LBW slot -> mean rank
    per module of the trained blocks (AdaLoRA moves rank between modules)."""

    model: Any
    adapter: Adapter
    losses: list[float]
    path: str
    elapsed: float
    ranks: dict[str, float] = field(default_factory=dict)


def linear_paths(model) -> list[str]:
    """Canonical paths of the UNet's Linear layers."""
    return [n for n, m in model.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]


def _target_weights(model, targets: list[str], device=None) -> dict[str, torch.Tensor]:
    unet = model.model.diffusion_model
    return {p: unet.get_submodule(p).weight if device is None else unet.get_submodule(p).weight.to(device)
            for p in targets}


def block_ranks(targets: list[str], adapter: Adapter) -> dict[str, float]:
    """LBW slot -> mean rank of the targets in that block (a module the file leaves out counts as 0)."""
    ranks: dict[str, list[int]] = {}
    for path in targets:
        block = block_of(path)
        module = adapter.modules.get(path)
        ranks.setdefault(block.slot if block else "other", []).append(module.rank if module is not None else 0)
    return {slot: sum(r) / len(r) for slot, r in ranks.items()}


def _views(model, vae, images, positive, config: TrainConfig) -> dict[int, list]:
    """Training views per draw seed: augmentations are drawn from the seed, so with own draws and augmentation on
    each seed gets its own views; otherwise every seed uses those of ``config.seed``."""
    augmented = config.random_crop or config.color_jitter > 0
    seeds = seeds_of(config.seed, config.seeds)
    view_seeds = seeds if config.seed_draws == "own" and augmented else [config.seed]
    prepared = {s: prepare_samples(model, vae, images, positive, config.resolution, config.flip,
                                   batch_size=config.batch_size, random_crop=config.random_crop,
                                   color_jitter=config.color_jitter, seed=s) for s in view_seeds}
    return {s: prepared.get(s, prepared[config.seed]) for s in seeds}


def _adapters(model, targets: list[str], config: TrainConfig, resume: Adapter | None) -> dict[str, torch.nn.Module]:
    """Fresh (or resumed) adapters of ``config.algorithm`` (``algorithms.REGISTRY``), stacked per seed when
    ``config.seeds`` > 1."""
    weights = _target_weights(model, targets, model.load_device)
    if config.seeds > 1:
        return stacked_adapters(weights, config)
    if resume is not None:
        return resumed_adapters(resume, model.load_device, config)
    return new_adapters(weights, config)


def _fit(model, adapters, targets, samples, schedule: NoiseSchedule, config: TrainConfig, node_id, on_checkpoint,
         on_step, steps_before) -> list[list[float]]:
    clone = realise(model, training_plan(model.model.diffusion_model, adapters, config))
    comfy.model_management.load_models_gpu([clone], memory_required=LOAD_ALL_MEMORY,
                                           force_full_load=not config.offload)
    base = clone.model
    unet = base.diffusion_model
    if is_dynamic(clone):  # VRAM copies streamed during an earlier sampling run are inference tensors
        restream_weights(unet)
    with installed(clone) as options, training_session(unet, adapters, targets, config):
        state = TrainState(config, unet, schedule, samples, adapters, make_optimizer(adapters, config),
                           torch.amp.GradScaler(clone.load_device.type, enabled=config.training_dtype == "fp16"),
                           dict(options), base.manual_cast_dtype or base.get_dtype(), clone.load_device, steps_before,
                           latent_format=base.latent_format, allocator=rank_allocator(adapters, config),
                           model=clone)
        return run_loop(state, node_id, on_checkpoint, on_step)


def _per_seed(adapters: dict[str, torch.nn.Module], n: int, seeds: int) -> dict[str, torch.nn.Module]:
    return adapters if seeds == 1 else {p: a.single(n) for p, a in adapters.items()}


def train_runs(model, vae, images, positive, config: TrainConfig, filename_prefix: str = "blora",
               resume: Adapter | None = None, node_id: str | None = None,
               on_step: Callable[[int, TrainState], None] | None = None) -> list[TrainOutcome]:
    """Train ``config.seeds`` B-LoRAs (1: one) for ``config.steps`` steps on ``images`` (IMAGE) with ``positive``
    (CONDITIONING), save each under ``<output>/loras/`` and return one TrainOutcome per seed. One seed writes
    ``<prefix>_<NNNNN>_.safetensors``; seeds > 1 ``<prefix>_seed<S>_<NNNNN>_.safetensors`` each. ``on_step(done,
    state)``: before the first step and after every step (``train_loop.run_loop``). Raises BLoRAError subclasses
    for bad input (before anything is written) and the host's InterruptProcessingException on cancel."""
    check_stackable(config)
    if resume is not None and config.seeds > 1:
        raise BLoRAError("resume_from works with seeds = 1: resume one seed's file on its own")
    architecture = require_architecture(model)
    schedule = noise_schedule(model)
    targets = select_targets(linear_paths(model), config, architecture.name)
    if resume is not None:
        check_fits(resume, model_weight_shapes(model))
        check_resume(resume, _target_weights(model, targets), config)
    check_prefix(filename_prefix)
    seeds = seeds_of(config.seed, config.seeds)
    samples = _views(model, vae, images, positive, config)
    saves = [save_target(filename_prefix if config.seeds == 1 else f"{filename_prefix}_seed{s}") for s in seeds]
    steps_before = steps_in(resume.metadata) if resume is not None else 0
    losses_before = losses_in(resume.metadata) if resume is not None else []
    base = base_model_fingerprint(model)

    def save(adapters, done: int, final: bool, losses: list[list[float]]) -> list[Adapter]:
        written = []
        for n, (s, target) in enumerate(zip(seeds, saves)):
            single = config if config.seeds == 1 else replace(config, seed=s, seeds=1)
            meta = train_metadata(single, steps_before + done, base, schedule.prediction,
                                  losses_before + [row[n] for row in losses], architecture.name)
            if config.seeds > 1:
                meta.update({"blora.seed_draws": config.seed_draws,
                             "blora.draw_seed": str(config.seed if config.seed_draws == "shared" else s)})
            exported = Adapter(modules=export(_per_seed(adapters, n, config.seeds), save_dtype(config)),
                               dialect="kohya")
            written.append(write_trained(exported, target, target.final if final else target.checkpoint(done), meta))
        return written

    with torch.inference_mode(False):
        adapters = _adapters(model, targets, config, resume)
        start = time.monotonic()
        losses = _fit(model, adapters, targets, samples, schedule, config, node_id,
                      lambda step, so_far: save(adapters, step, False, so_far), on_step, steps_before)
        elapsed = time.monotonic() - start
        written = save(adapters, config.steps, True, losses)
    per_seed = [[row[n] for row in losses] for n in range(config.seeds)]
    log.info("B-LoRA trained (%s, %d seed(s), checkpointing %s%s): %d steps in %.1fs, final loss %s, saved %s",
             config.algorithm, config.seeds, config.gradient_checkpointing, ", offload" if config.offload else "",
             config.steps, elapsed, ", ".join(f"{v[-1]:.4g}" for v in per_seed), ", ".join(a.source for a in written))
    return [TrainOutcome(patched_clone(model, [(a, 1.0)]), a, seed_losses, a.source, elapsed,
                         block_ranks(targets, a)) for a, seed_losses in zip(written, per_seed)]


def train_blora(model, vae, images, positive, config: TrainConfig, filename_prefix: str = "blora",
                resume: Adapter | None = None, node_id: str | None = None,
                on_step: Callable[[int, TrainState], None] | None = None) -> TrainOutcome:
    """One B-LoRA (``config.seeds`` must be 1): ``train_runs``'s only outcome; the file is
    ``<output>/loras/<prefix>_<NNNNN>_.safetensors``."""
    if config.seeds != 1:
        raise BLoRAError(f"train_blora trains one seed; seeds = {config.seeds}: use train_blora_seeds")
    return train_runs(model, vae, images, positive, config, filename_prefix, resume, node_id, on_step)[0]
