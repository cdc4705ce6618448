"""Train B-LoRA with ``seeds`` > 1: N B-LoRAs, each from its own initialisation (seed, seed + 1, …), in one batched
forward and backward on the host's model patcher (``blora.train.seeds`` holds the stacked adapters).

Seed n's adapter equals, to floating-point tolerance, what a single-seed run with the same initialisation and the
same draws gives. Two modes for the draws (timesteps, noise, image order, flips):

- ``shared`` (default): every seed sees the draws of ``seed``. Then every layer below the first trained layer gets
  the same input for every seed, so it runs once, on B rows; the batch is widened to N·B rows (seed-major) at the
  first trained layer (a forward pre-hook on each layer of the trained region widens x, emb and context, and an
  ``output_block_patch`` widens the skip connections). No backward runs below it either way, so N seeds cost about
  one forward of the lower UNet plus N of the trained region: the reason this is the default. Seed n is the run
  with initialisation seed + n and the draws of seed.
- ``own``: seed n draws from seed + n, so seed n is exactly the single-seed run with ``seed = seed + n``; the whole
  UNet runs on N·B rows.

Each seed's rows go through its own adapter: a forward hook on every targeted Linear adds
``scale · (x A_nᵀ) B_nᵀ`` to the base layer's output (the base weight is never written). Only plain LoRA is
batched; other algorithms are refused with a clear error (train those seeds one at a time).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import comfy.model_management
import comfy.utils
import torch
from einops import repeat

from ..adapters.adapter import Adapter
from ..errors import BLoRAError
from ..adapters.kinds.lora import TrainableLoRA
from ..train.seeds import SeedsLoRA, clip_per_seed, seeds_of
from ..train.recipe import TrainConfig, diffusion_loss, make_optimizer, select_targets, training_target
from .dynamic_vram import is_dynamic, restream_weights, training_flag
from .output_files import check_prefix, save_target
from .patch import patched_clone, require_sdxl
from .train import LOAD_ALL_MEMORY, TrainOutcome, linear_paths
from .train_inputs import NoiseSchedule, noise_schedule, prepare_samples
from .train_loop import PREVIEW_INTERVAL_S, draw_batch, preview_decoder, progress_sender
from .train_save import base_model_fingerprint, save_dtype, train_metadata, write_trained
from .train_wrappers import checkpointed, frozen_aliases, grad_region, trainable_clone

log = logging.getLogger(__name__)


@dataclass
class SeedsState:
    config: TrainConfig
    unet: torch.nn.Module
    schedule: NoiseSchedule
    samples: dict[int, list]  # per seed: its training views (augmentations are drawn from the seed)
    adapters: dict[str, SeedsLoRA]
    optimizer: torch.optim.Optimizer
    transformer_options: dict
    dtype: torch.dtype
    device: torch.device
    latent_format: object | None = None
    denoised: torch.Tensor | None = None  # each seed's first x0 estimate, side by side (1, C, h, N·w)
    losses: list[list[float]] = field(default_factory=list)  # per step: one loss per seed
    model: object | None = None  # the training clone (ModelPatcher); previews sample with it


def check_seeds_config(config: TrainConfig) -> None:
    if config.algorithm != "LoRA":
        raise BLoRAError(f"seeds > 1 batches plain LoRA only; {config.algorithm} cannot be trained as stacked "
                         f"factors: set seeds to 1 and train each seed on its own")
    if config.training_dtype == "fp16":
        raise BLoRAError("seeds > 1 does not train in fp16 (one loss scale would tie the seeds together): use bf16 "
                         "or fp32")


def _draws(state: SeedsState, seed: int, draw: int):
    """One micro-batch's draws from (seed, draw), as a single-seed run with that seed makes them."""
    return draw_batch(state.config, state.schedule, state.samples[seed], state.device, seed, draw)


def micro_losses(state: SeedsState, draw: int) -> torch.Tensor:
    """Each seed's loss on one micro-batch, (N,)."""
    c, ms, n = state.config, state.schedule.model_sampling, state.config.seeds
    if c.seed_draws == "shared":
        parts = [_draws(state, c.seed, draw)]
    else:
        parts = [_draws(state, s, draw) for s in seeds_of(c.seed, n)]
    x0, context, y, noise, sigma = (torch.cat(t) for t in zip(*parts))
    xc = ms.calculate_input(sigma, ms.noise_scaling(sigma, noise, x0))
    t = ms.timestep(sigma).float()
    out = state.unet(xc.to(state.dtype), t, context=context.to(state.dtype), y=y.to(state.dtype), control=None,
                     transformer_options=dict(state.transformer_options))
    target = training_target(state.schedule.prediction, x0, noise, sigma)
    if c.seed_draws == "shared":
        x0, noise, sigma, target = (repeat(v, "b ... -> (n b) ...", n=n) for v in (x0, noise, sigma, target))
    rows = out.shape[0] // n
    if state.latent_format is not None:
        with torch.no_grad():
            firsts = slice(0, None, rows)
            noisy = ms.noise_scaling(sigma[firsts], noise[firsts], x0[firsts])
            x0_hat = ms.calculate_denoised(sigma[firsts], out[firsts].detach().float(), noisy)
            state.denoised = torch.cat(list(x0_hat), dim=-1)[None]
    return torch.stack([diffusion_loss(out[k * rows:(k + 1) * rows], target[k * rows:(k + 1) * rows])
                        for k in range(n)])


def train_step(state: SeedsState, step: int) -> list[float]:
    c, acc = state.config, state.config.grad_accumulation
    total = torch.zeros(c.seeds)
    for micro in range(acc):
        losses = micro_losses(state, step * acc + micro)
        (losses.sum() / acc).backward()
        total += losses.detach().float().cpu() / acc
    bad = [s for s, v in zip(seeds_of(c.seed, c.seeds), total.tolist()) if not math.isfinite(v)]
    if bad:
        raise BLoRAError(f"the loss of seed(s) {bad} became non-finite at step {step + 1}: lower the learning rate "
                         f"or train in fp32/bf16; nothing more is written")
    if c.max_grad_norm > 0:
        clip_per_seed(state.adapters.values(), c.max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return total.tolist()


@contextlib.contextmanager
def routed_rows(unet: torch.nn.Module, adapters: dict[str, SeedsLoRA]) -> Iterator[None]:
    """Forward hooks: each targeted Linear adds its seeds' deltas to its output."""
    handles = [unet.get_submodule(p).register_forward_hook(
        lambda module, inputs, output, a=a: output + a.delta(inputs[0]).to(output.dtype)) for p, a in adapters.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _widen(t, seeds: int, rows: int):
    if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == rows:
        return repeat(t, "b ... -> (n b) ...", n=seeds)
    return t


@contextlib.contextmanager
def widened_from(layers, seeds: int, rows: int) -> Iterator[None]:
    """Shared draws: the layers of the trained region get every batch-sized tensor argument widened from ``rows``
    to seeds·rows (seed-major); what runs before them ran once."""
    def hook(module, args, kwargs):
        return tuple(_widen(a, seeds, rows) for a in args), {k: _widen(v, seeds, rows) for k, v in kwargs.items()}

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for _, layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def skip_widener(seeds: int):
    """``output_block_patch``: a skip connection saved before the widening gets widened to match h."""
    def patch(h, hsp, transformer_options):
        if hsp is not None and h.shape[0] == seeds * hsp.shape[0]:
            hsp = repeat(hsp, "b ... -> (n b) ...", n=seeds)
        return h, hsp
    return patch


def _new_adapters(model, targets: list[str], config: TrainConfig) -> dict[str, SeedsLoRA]:
    """Seed n's adapters drawn exactly as a single-seed run with seed + n draws them (targets in the same order)."""
    unet, device = model.model.diffusion_model, model.load_device
    singles = []
    for s in seeds_of(config.seed, config.seeds):
        generator = torch.Generator().manual_seed(s)
        singles.append({p: TrainableLoRA.create(unet.get_submodule(p).weight.to(device), config.rank, config.scale,
                                                False, generator, config.init) for p in targets})
    return {p: SeedsLoRA([single[p] for single in singles]) for p in targets}


def _loop(state: SeedsState, node_id, on_checkpoint, on_step=None) -> None:
    c = state.config
    bar = comfy.utils.ProgressBar(c.steps, node_id=node_id)
    send = progress_sender(node_id)
    previewer = preview_decoder(state)
    state.latent_format = state.latent_format if previewer is not None else None
    start = last_preview = time.monotonic()
    if on_step is not None:
        on_step(0, state)
    for step in range(c.steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        state.losses.append(train_step(state, step))
        preview = None
        if previewer is not None and (time.monotonic() - last_preview >= PREVIEW_INTERVAL_S or step + 1 == c.steps):
            preview, last_preview = previewer.decode_latent_to_preview_image("JPEG", state.denoised), time.monotonic()
        bar.update_absolute(step + 1, c.steps, preview)
        if send is not None:
            losses = state.losses[-1]
            send({"step": step + 1, "steps": c.steps, "loss": sum(losses) / len(losses), "losses": losses,
                  "seeds": seeds_of(c.seed, c.seeds), "elapsed": time.monotonic() - start})
        done = step + 1
        if c.save_every and done % c.save_every == 0 and done < c.steps:
            on_checkpoint(done)
        if on_step is not None:
            on_step(done, state)


def train_blora_seeds(model, vae, images, positive, config: TrainConfig, filename_prefix: str = "blora",
                      node_id: str | None = None, on_step=None) -> list[TrainOutcome]:
    """Train ``config.seeds`` B-LoRAs at once; one file per seed, ``<prefix>_seed<S>_<NNNNN>_.safetensors``.
    Returns one TrainOutcome per seed (its model is the input model with that seed's B-LoRA)."""
    check_seeds_config(config)
    require_sdxl(model)
    schedule = noise_schedule(model)
    targets = select_targets(linear_paths(model), config)
    check_prefix(filename_prefix)
    seeds = seeds_of(config.seed, config.seeds)
    augmented = config.random_crop or config.color_jitter > 0
    view_seeds = seeds if config.seed_draws == "own" and augmented else [config.seed]
    prepared = {s: prepare_samples(model, vae, images, positive, config.resolution, config.flip,
                                   batch_size=config.batch_size, random_crop=config.random_crop,
                                   color_jitter=config.color_jitter, seed=s) for s in view_seeds}
    samples = {s: prepared.get(s, prepared[config.seed]) for s in seeds}
    saves = {s: save_target(f"{filename_prefix}_seed{s}") for s in seeds}
    base = base_model_fingerprint(model)
    dtype = save_dtype(config)

    def save(adapters: dict[str, SeedsLoRA], step: int, final: bool, losses: list[list[float]]) -> list[Adapter]:
        written = []
        for n, s in enumerate(seeds):
            single = replace(config, seed=s, seeds=1)
            meta = train_metadata(single, step, base, schedule.prediction, [row[n] for row in losses])
            meta.update({"blora.seed_draws": config.seed_draws, "blora.draw_seed": str(
                config.seed if config.seed_draws == "shared" else s)})
            adapter = Adapter(modules={p: a.single(n).export(a.scale * config.rank, dtype)
                                       for p, a in sorted(adapters.items())}, dialect="kohya")
            target = saves[s]
            written.append(write_trained(adapter, target, target.final if final else target.checkpoint(step), meta))
        return written

    with torch.inference_mode(False):
        adapters = _new_adapters(model, targets, config)
        clone = trainable_clone(model, {}, config.dtype)
        if config.seed_draws == "shared":
            clone.set_model_output_block_patch(skip_widener(config.seeds))
        comfy.model_management.load_models_gpu([clone], memory_required=LOAD_ALL_MEMORY, force_full_load=True)
        unet = clone.model.diffusion_model
        if is_dynamic(clone):  # VRAM copies streamed during an earlier sampling run are inference tensors
            restream_weights(unet)
        state = SeedsState(config, unet, schedule, samples, adapters, make_optimizer(adapters, config),
                           dict(clone.model_options.get("transformer_options", {})),
                           clone.model.manual_cast_dtype or clone.model.get_dtype(), clone.load_device,
                           latent_format=clone.model.latent_format, model=clone)
        region = grad_region(unet, targets)
        widen = widened_from(region, config.seeds, config.batch_size) if config.seed_draws == "shared" \
            else contextlib.nullcontext()
        start = time.monotonic()
        with frozen_aliases(unet), routed_rows(unet, adapters), widen, \
                checkpointed(region, config.gradient_checkpointing != "off"), torch.enable_grad(), training_flag():
            _loop(state, node_id, lambda step: save(adapters, step, False, state.losses), on_step)
        elapsed = time.monotonic() - start
        written = save(adapters, config.steps, True, state.losses)
    per_seed = [[step[n] for step in state.losses] for n in range(config.seeds)]
    log.info("B-LoRA trained %d seeds (%s draws): %d steps in %.1fs, final losses %s, saved %s", config.seeds,
             config.seed_draws, config.steps, elapsed, [f"{v[-1]:.4g}" for v in per_seed],
             ", ".join(a.source for a in written))
    return [TrainOutcome(patched_clone(model, [(a, 1.0)]), a, losses, a.source, elapsed)
            for a, losses in zip(written, per_seed)]
