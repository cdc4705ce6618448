"""Train a B-LoRA on the host's own model patcher: ``train_blora(model, vae, images, positive, config)``.

Order of work: every check that can fail on the inputs (architecture, schedule, targets, file name, images,
conditioning, resume file) runs before training starts, so bad input writes nothing. Training runs under
``torch.inference_mode(False)`` on a clone of the input ModelPatcher whose targeted Linears carry the adapters as
weight wrappers, loaded through ``comfy.model_management.load_models_gpu``; the base weights are only read.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import torch

from ..adapters.adapter import Adapter, check_fits
from ..train.algorithms import check_resume, export, new_adapters, rank_allocator, resumed_adapters
from ..blocks import block_of
from ..adapters.trainable import Trainable
from ..train.loss_history import losses_in
from ..train.recipe import TrainConfig, make_optimizer, select_targets
from .dynamic_vram import is_dynamic, restream_weights, training_flag
from .patch import model_weight_shapes, patched_clone, require_sdxl
from .train_inputs import NoiseSchedule, noise_schedule, prepare_samples
from .train_loop import TrainState, run_loop
from .output_files import check_prefix, save_target
from .train_save import base_model_fingerprint, save_dtype, steps_in, train_metadata, write_trained
from .train_wrappers import checkpointed, frozen_aliases, grad_region, strip_wrappers, trainable_clone

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


def _new_adapters(model, targets: list[str], config: TrainConfig, resume: Adapter | None) -> dict[str, Trainable]:
    device = model.load_device
    if resume is not None:
        return resumed_adapters(resume, device, config)
    return new_adapters(_target_weights(model, targets, device), config)


def block_ranks(targets: list[str], adapter: Adapter) -> dict[str, float]:
    """LBW slot -> mean rank of the targets in that block (a module the file leaves out counts as 0)."""
    ranks: dict[str, list[int]] = {}
    for path in targets:
        block = block_of(path)
        module = adapter.modules.get(path)
        ranks.setdefault(block.slot if block else "other", []).append(module.rank if module is not None else 0)
    return {slot: sum(r) / len(r) for slot, r in ranks.items()}


def _fit(model, adapters, samples, schedule: NoiseSchedule, config: TrainConfig, node_id, on_checkpoint,
         steps_before, on_step=None) -> list[float]:
    clone = trainable_clone(model, adapters, config.dtype)
    comfy.model_management.load_models_gpu([clone], memory_required=LOAD_ALL_MEMORY, force_full_load=True)
    base = clone.model
    unet = base.diffusion_model
    if is_dynamic(clone):  # VRAM copies streamed during an earlier sampling run are inference tensors
        restream_weights(unet)
    state = TrainState(config, unet, schedule, samples, adapters, make_optimizer(adapters, config),
                       torch.amp.GradScaler(clone.load_device.type, enabled=config.training_dtype == "fp16"),
                       dict(clone.model_options.get("transformer_options", {})),
                       base.manual_cast_dtype or base.get_dtype(), clone.load_device, steps_before,
                       latent_format=base.latent_format, allocator=rank_allocator(adapters, config), model=clone)
    try:
        checkpointing = config.gradient_checkpointing != "off"  # "all above" checkpoints the trained region here too
        with frozen_aliases(unet), checkpointed(grad_region(unet, list(adapters)), checkpointing), \
                torch.enable_grad(), training_flag():
            return run_loop(state, node_id, on_checkpoint, on_step)
    finally:
        strip_wrappers(unet, adapters)


def train_blora(model, vae, images, positive, config: TrainConfig, filename_prefix: str = "blora",
                resume: Adapter | None = None, node_id: str | None = None, on_step=None) -> TrainOutcome:
    """Train ``config.steps`` steps on ``images`` (IMAGE) with ``positive`` (CONDITIONING), save the file under
    ``<output>/loras/`` and return the patched model, the adapter and the losses. Raises BLoRAError subclasses
    for bad input (before anything is written) and the host's InterruptProcessingException on cancel.
    on_step(done, state): called at step 0 and after every step (``train_loop.run_loop``)."""
    require_sdxl(model)
    schedule = noise_schedule(model)
    targets = select_targets(linear_paths(model), config)
    if resume is not None:
        check_fits(resume, model_weight_shapes(model))
        check_resume(resume, _target_weights(model, targets), config)
    check_prefix(filename_prefix)
    samples = prepare_samples(model, vae, images, positive, config.resolution, config.flip,
                              batch_size=config.batch_size, random_crop=config.random_crop,
                              color_jitter=config.color_jitter, seed=config.seed)
    target = save_target(filename_prefix)
    steps_before = steps_in(resume.metadata) if resume is not None else 0
    losses_before = losses_in(resume.metadata) if resume is not None else []
    base = base_model_fingerprint(model)

    def save(adapters: dict[str, Trainable], filename: str, done: int, losses: list[float]) -> Adapter:
        meta = train_metadata(config, steps_before + done, base, schedule.prediction, losses_before + losses)
        exported = Adapter(modules=export(adapters, save_dtype(config)), dialect="kohya")
        return write_trained(exported, target, filename, meta)

    with torch.inference_mode(False):
        adapters = _new_adapters(model, targets, config, resume)
        start = time.monotonic()
        losses = _fit(model, adapters, samples, schedule, config, node_id,
                      lambda step, so_far: save(adapters, target.checkpoint(step), step, so_far), steps_before,
                      on_step)
        elapsed = time.monotonic() - start
        adapter = save(adapters, target.final, config.steps, losses)
    log.info("B-LoRA trained: %d steps in %.1fs, final loss %.4g, saved %s", config.steps, elapsed, losses[-1],
             adapter.source)
    return TrainOutcome(patched_clone(model, [(adapter, 1.0)]), adapter, losses, adapter.source, elapsed,
                        block_ranks(targets, adapter))
