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
import torch

from ..errors import BLoRAError
from ..trainable import TrainableLoRA
from ..training import (TrainConfig, diffusion_loss, sample_batch, sample_flips, sample_noise, sample_timesteps,
                        step_generator, training_target)
from .train_inputs import ModelSchedule, Sample, batch_of

PROGRESS_EVENT = "blora.train.progress"


@dataclass
class TrainState:
    """Everything one step needs. unet: the loaded diffusion model (with the adapters as weight wrappers);
    dtype: the UNet's input dtype; steps_before: steps done by earlier runs
    (resume), so a resumed run draws new noise."""

    config: TrainConfig
    unet: torch.nn.Module
    schedule: ModelSchedule
    samples: list[Sample]
    adapters: dict[str, TrainableLoRA]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    transformer_options: dict
    dtype: torch.dtype
    device: torch.device
    steps_before: int = 0


def micro_loss(state: TrainState, draw: int) -> torch.Tensor:
    """Loss of one micro-batch; every random draw comes from (seed, draw)."""
    c, ms, sigmas = state.config, state.schedule.model_sampling, state.schedule.sigmas
    g = step_generator(c.seed, draw)
    indices = sample_batch(len(state.samples), c.batch_size, g)
    flips = sample_flips(c.batch_size, c.flip, g)
    timesteps = sample_timesteps(c.batch_size, len(sigmas), g)
    x0, context, y = batch_of(state.samples, indices, flips)
    noise = sample_noise(x0.shape, g).to(state.device)
    sigma = sigmas[timesteps].to(state.device)
    xc = ms.calculate_input(sigma, ms.noise_scaling(sigma, noise, x0))
    t = ms.timestep(sigma).float()
    out = state.unet(xc.to(state.dtype), t, context=context.to(state.dtype), y=y.to(state.dtype), control=None,
                     transformer_options=dict(state.transformer_options))
    return diffusion_loss(out, training_target(state.schedule.prediction, x0, noise, sigma))


def train_step(state: TrainState, step: int) -> float:
    """One optimizer step (gradient accumulation, grad-norm clip, LoRA+ groups); returns the mean loss."""
    c, acc = state.config, state.config.grad_accumulation
    total = 0.0
    for micro in range(acc):
        loss = micro_loss(state, (state.steps_before + step) * acc + micro)
        state.scaler.scale(loss / acc).backward()
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
    state.optimizer.zero_grad(set_to_none=True)
    return total


def progress_sender(node_id: str | None) -> Callable[[dict], None] | None:
    """Sends ``blora.train.progress`` to the prompt's client when a ComfyUI server runs in this process."""
    server = sys.modules.get("server")  # the host's server module, loaded only when a server runs
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or node_id is None:
        return None
    return lambda payload: instance.send_sync(PROGRESS_EVENT, dict(payload, node=node_id), instance.client_id)


def run_loop(state: TrainState, node_id: str | None = None,
             on_checkpoint: Callable[[int], None] | None = None) -> list[float]:
    """Train ``config.steps`` steps; returns the loss of each. Raises the host's InterruptProcessingException
    (checked before every step) when the user cancels; checkpoints already written stay."""
    c = state.config
    bar = comfy.utils.ProgressBar(c.steps, node_id=node_id)
    send = progress_sender(node_id)
    losses: list[float] = []
    start = time.monotonic()
    for step in range(c.steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        losses.append(train_step(state, step))
        bar.update(1)
        if send is not None:
            send({"step": step + 1, "steps": c.steps, "loss": losses[-1], "elapsed": time.monotonic() - start})
        done = step + 1
        if on_checkpoint is not None and c.save_every and done % c.save_every == 0 and done < c.steps:
            on_checkpoint(done)
    return losses
