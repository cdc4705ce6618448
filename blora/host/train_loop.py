"""The training loop: one optimizer step per ``step``, each of ``grad_accumulation`` micro-batches; host progress
(``comfy.utils.ProgressBar``) and an interrupt check every step, a ``blora.train.progress`` server message when a
server runs, checkpoints through a callback."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import comfy.model_management
import comfy.utils
import latent_preview
import torch

from ..train.adalora import RankAllocator
from ..errors import BLoRAError
from ..adapters.trainable import Trainable
from ..train.dataset import sample_bucketed_batch
from ..train.recipe import (TrainConfig, diffusion_loss, sample_flips, sample_noise, sample_timesteps, step_generator,
                            training_target)
from .train_inputs import NoiseSchedule, Sample, batch_of, buckets

PROGRESS_EVENT = "blora.train.progress"
PREVIEW_INTERVAL_S = 1.0  # at most one preview image a second (decoding one costs a little)


@dataclass
class TrainState:
    """Everything one step needs. unet: the loaded diffusion model (with the adapters as weight wrappers);
    dtype: the UNet's input dtype; steps_before: steps done by earlier runs
    (resume), so a resumed run draws new noise."""

    config: TrainConfig
    unet: torch.nn.Module
    schedule: NoiseSchedule
    samples: list[Sample]
    adapters: dict[str, Trainable]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    transformer_options: dict
    dtype: torch.dtype
    device: torch.device
    steps_before: int = 0
    latent_format: object | None = None
    denoised: torch.Tensor | None = None  # the last micro-batch's x0 estimate (first item), kept for previews
    allocator: RankAllocator | None = None  # AdaLoRA: regulariser and rank budget
    model: object | None = None  # the training clone (ModelPatcher) the adapters are on; previews sample with it


def draw_batch(config: TrainConfig, schedule: NoiseSchedule, samples: list[Sample], device: torch.device, seed: int,
               draw: int) -> tuple[torch.Tensor, ...]:
    """(x0, context, y, noise, sigma) of one micro-batch; every random draw comes from (seed, draw)."""
    g = step_generator(seed, draw)
    indices = sample_bucketed_batch(buckets(samples, config.batch_size), config.batch_size, g)
    flips = sample_flips(config.batch_size, config.flip, g)
    timesteps = sample_timesteps(config.batch_size, len(schedule.sigmas), g)
    x0, context, y = batch_of(samples, indices, flips)
    noise = sample_noise(x0.shape, g).to(device)
    return x0, context, y, noise, schedule.sigmas[timesteps].to(device)


def micro_loss(state: TrainState, draw: int) -> torch.Tensor:
    """Loss of one micro-batch; every random draw comes from (seed, draw)."""
    ms = state.schedule.model_sampling
    x0, context, y, noise, sigma = draw_batch(state.config, state.schedule, state.samples, state.device,
                                              state.config.seed, draw)
    xc = ms.calculate_input(sigma, ms.noise_scaling(sigma, noise, x0))
    t = ms.timestep(sigma).float()
    out = state.unet(xc.to(state.dtype), t, context=context.to(state.dtype), y=y.to(state.dtype), control=None,
                     transformer_options=dict(state.transformer_options))
    if state.latent_format is not None:
        with torch.no_grad():
            noisy = ms.noise_scaling(sigma[:1], noise[:1], x0[:1])
            state.denoised = ms.calculate_denoised(sigma[:1], out[:1].detach().float(), noisy)
    return diffusion_loss(out, training_target(state.schedule.prediction, x0, noise, sigma))


def train_step(state: TrainState, step: int) -> float:
    """One optimizer step (gradient accumulation, grad-norm clip, LoRA+ groups; AdaLoRA: its regulariser joins
    the loss and its allocator runs after the step); returns the mean diffusion loss."""
    c, acc = state.config, state.config.grad_accumulation
    total = 0.0
    for micro in range(acc):
        loss = micro_loss(state, (state.steps_before + step) * acc + micro)
        regulariser = state.allocator.regulariser() if state.allocator is not None else None
        state.scaler.scale((loss if regulariser is None else loss + regulariser) / acc).backward()
        total += loss.item() / acc
    if not math.isfinite(total):
        raise BLoRAError(f"the loss became {total} at step {state.steps_before + step + 1}: lower the learning rate "
                         f"or train in fp32/bf16; nothing more is written")
    state.scaler.unscale_(state.optimizer)
    if c.max_grad_norm > 0:
        params = [p for a in state.adapters.values() for p in a.parameters()]
        torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.allocator is not None:
        state.allocator.update(step + 1)
    state.optimizer.zero_grad(set_to_none=True)
    return total


def progress_sender(node_id: str | None) -> Callable[[dict], None] | None:
    """Sends ``blora.train.progress`` to the prompt's client when a ComfyUI server runs in this process."""
    server = sys.modules.get("server")  # the host's server module, loaded only when a server runs
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or node_id is None:
        return None
    return lambda payload: instance.send_sync(PROGRESS_EVENT, dict(payload, node=node_id), instance.client_id)


def preview_decoder(state: TrainState):
    """The host's latent previewer (None unless previews are on: ``--preview-method``), as KSampler uses it."""
    if state.latent_format is None:
        return None
    return latent_preview.get_previewer(state.device, state.latent_format)


def run_loop(state: TrainState, node_id: str | None = None,
             on_checkpoint: Callable[[int, list[float]], None] | None = None,
             on_step: Callable[[int, TrainState], None] | None = None) -> list[float]:
    """Train ``config.steps`` steps; returns the loss of each. Raises the host's InterruptProcessingException
    (checked before every step) when the user cancels; checkpoints already written stay. ``on_step(done, state)``
    runs before the first step (done = 0) and after every optimizer step (validation previews)."""
    c = state.config
    bar = comfy.utils.ProgressBar(c.steps, node_id=node_id)
    send = progress_sender(node_id)
    previewer = preview_decoder(state)
    state.latent_format = state.latent_format if previewer is not None else None
    losses: list[float] = []
    start = last_preview = time.monotonic()
    if on_step is not None:
        on_step(0, state)
    for step in range(c.steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        losses.append(train_step(state, step))
        preview = None
        if previewer is not None and (time.monotonic() - last_preview >= PREVIEW_INTERVAL_S or step + 1 == c.steps):
            preview, last_preview = previewer.decode_latent_to_preview_image("JPEG", state.denoised), time.monotonic()
        bar.update_absolute(step + 1, c.steps, preview)
        if send is not None:
            send({"step": step + 1, "steps": c.steps, "loss": losses[-1], "elapsed": time.monotonic() - start})
        done = step + 1
        if on_checkpoint is not None and c.save_every and done % c.save_every == 0 and done < c.steps:
            on_checkpoint(done, losses)
        if on_step is not None:
            on_step(done, state)
    return losses
