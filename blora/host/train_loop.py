"""The training loop, one for every algorithm and for 1..N seeds: one optimizer step per ``step``, each of
``grad_accumulation`` micro-batches; host progress (``comfy.utils.ProgressBar``) and an interrupt check every step,
a ``blora.train.progress`` server message when a server runs, checkpoints and ``on_step`` through callbacks.

Seeds: ``config.seeds`` adapters stacked per layer (``blora.train.seeds``), batch rows seed-major; each seed's loss is
its own mean, and the seeds' losses are summed for backward (no parameter is shared, so each seed gets exactly its
single-seed gradient). One seed is the same code with N = 1.

GPU path: the forward runs under autocast in the training dtype (bf16/fp16 on CUDA), AdamW is fused where torch
has it (``blora.train.recipe.make_optimizer``), and nothing in a step waits for the device: the losses stay on it until they
are read (``TrainState.read_losses``: when a progress message shows them, at a checkpoint and at the end), and the
non-finite check happens there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import comfy.model_management
import comfy.utils
import latent_preview
import torch
from einops import repeat

from ..train.adalora import RankAllocator
from ..errors import BLoRAError
from ..train.seeds import clip_per_seed, seeds_of
from ..train.dataset import sample_bucketed_batch
from ..train.recipe import (TrainConfig, diffusion_loss, sample_flips, sample_noise, sample_timesteps, step_generator,
                            training_target)
from . import compat
from .train_inputs import NoiseSchedule, Sample, batch_of, buckets

PROGRESS_EVENT = "blora.train.progress"
PREVIEW_INTERVAL_S = 1.0  # at most one preview image a second (decoding one costs a little)
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class TrainState:
    """Everything one step needs. unet: the loaded diffusion model (adapters installed: ``train_wrappers``);
    samples: per draw seed, its training views; adapters: path -> Trainable (one seed) or stacked module (seeds);
    dtype: the UNet's input dtype; steps_before: steps done by earlier runs (resume), so a resumed run draws new
    noise; losses: per step read so far, one loss per seed."""

    config: TrainConfig
    unet: torch.nn.Module
    schedule: NoiseSchedule
    samples: dict[int, list[Sample]]
    adapters: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    transformer_options: dict
    dtype: torch.dtype
    device: torch.device
    steps_before: int = 0
    latent_format: object | None = None
    denoised: torch.Tensor | None = None  # each seed's first x0 estimate of the last micro-batch, side by side
    allocator: RankAllocator | None = None  # AdaLoRA: regulariser and rank budget
    losses: list[list[float]] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)  # losses of steps not read back yet, on the device
    model: object | None = None  # the training clone (ModelPatcher) the adapters are on; previews sample with it

    @property
    def seeds(self) -> list[int]:
        return seeds_of(self.config.seed, self.config.seeds)

    def read_losses(self) -> list[list[float]]:
        """Bring the losses of the steps since the last read to the host (one transfer) and check them; returns
        every step's losses. Raises BLoRAError at the first non-finite one (nothing more is written)."""
        if self.pending:
            first = len(self.losses)
            rows = torch.stack(self.pending).cpu().tolist()
            self.pending.clear()
            for i, row in enumerate(rows):
                bad = [s for s, v in zip(self.seeds, row) if not (v == v and abs(v) != float("inf"))]
                if bad:
                    step = self.steps_before + first + i + 1
                    who = "the loss" if len(row) == 1 else f"the loss of seed(s) {bad}"
                    raise BLoRAError(f"{who} became non-finite at step {step}: lower the learning rate or train in "
                                     f"fp32/bf16; nothing more is written")
            self.losses += rows
        return self.losses


def draw_batch(config: TrainConfig, schedule: NoiseSchedule, samples: list[Sample], device: torch.device, seed: int,
               draw: int) -> tuple[torch.Tensor, ...]:
    """(x0, context, y, guidance, noise, sigma) of one micro-batch (guidance: None for models without one); every
    random draw comes from (seed, draw)."""
    g = step_generator(seed, draw)
    indices = sample_bucketed_batch(buckets(samples, config.batch_size), config.batch_size, g)
    flips = sample_flips(config.batch_size, config.flip, g)
    timesteps = sample_timesteps(config.batch_size, len(schedule.sigmas), g)
    x0, context, y, guidance = batch_of(samples, indices, flips)
    noise, sigma = sample_noise(x0.shape, g), schedule.sigmas[timesteps]
    return x0, context, y, guidance, to_device(noise, device), to_device(sigma, device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU draw on the training device; on CUDA through pinned memory without blocking, so the host does not
    wait for the device's queued work (an ordinary copy from pageable memory would)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _autocast(state: TrainState):
    """bf16/fp16 autocast on CUDA; nothing elsewhere (the CPU runs the dtype the host casts to)."""
    enabled = state.device.type == "cuda" and state.config.dtype in AUTOCAST_DTYPES
    return torch.autocast(state.device.type, dtype=state.config.dtype, enabled=enabled)


def _joined(parts: tuple) -> torch.Tensor | None:
    return parts[0] if len(parts) == 1 or parts[0] is None else torch.cat(parts)


def micro_losses(state: TrainState, draw: int) -> torch.Tensor:
    """Each seed's loss on one micro-batch, (N,); every random draw comes from (draw seed, draw). Shared draws:
    the batch holds B rows (widened to N·B at the first trained layer); own draws: N·B rows, seed-major."""
    c, ms, n = state.config, state.schedule.model_sampling, state.config.seeds
    draw_seeds = [c.seed] if c.seed_draws == "shared" else state.seeds
    parts = [draw_batch(c, state.schedule, state.samples[s], state.device, s, draw) for s in draw_seeds]
    x0, context, y, guidance, noise, sigma = (_joined(t) for t in zip(*parts))
    xc = ms.calculate_input(sigma, ms.noise_scaling(sigma, noise, x0))
    t = ms.timestep(sigma).float()
    extra = {} if guidance is None else {"guidance": guidance.to(state.device, torch.float32)}
    with _autocast(state):
        out = state.unet(xc.to(state.dtype), t, context=context.to(state.dtype), y=y.to(state.dtype), control=None,
                         transformer_options=dict(state.transformer_options), **extra)
    target = training_target(state.schedule.prediction, x0, noise, sigma)
    if n > 1 and c.seed_draws == "shared":
        x0, noise, sigma, target = (repeat(v, "b ... -> (n b) ...", n=n) for v in (x0, noise, sigma, target))
    rows = out.shape[0] // n
    if state.latent_format is not None:
        with torch.no_grad():
            firsts = slice(0, None, rows)
            noisy = ms.noise_scaling(sigma[firsts], noise[firsts], x0[firsts])
            x0_hat = ms.calculate_denoised(sigma[firsts], out[firsts].detach().float(), noisy)
            state.denoised = torch.cat(list(x0_hat), dim=-1)[None]
    if n == 1:
        return diffusion_loss(out, target)[None]
    return torch.stack([diffusion_loss(out[k * rows:(k + 1) * rows], target[k * rows:(k + 1) * rows])
                        for k in range(n)])


def clip_gradients(state: TrainState) -> None:
    """Grad-norm clip at ``max_grad_norm``: over all parameters (one seed), or each seed's on their own."""
    c = state.config
    if c.max_grad_norm <= 0:
        return
    if c.seeds > 1:
        clip_per_seed(state.adapters.values(), c.max_grad_norm)
    else:
        torch.nn.utils.clip_grad_norm_([p for a in state.adapters.values() for p in a.parameters()], c.max_grad_norm)


def train_step(state: TrainState, step: int) -> torch.Tensor:
    """One optimizer step (gradient accumulation, grad-norm clip, LoRA+ groups; AdaLoRA: its regulariser joins
    the loss and its allocator runs after the step); returns each seed's mean diffusion loss (N,), on the device."""
    acc = state.config.grad_accumulation
    total = None
    for micro in range(acc):
        losses = micro_losses(state, (state.steps_before + step) * acc + micro)
        regulariser = state.allocator.regulariser() if state.allocator is not None else None
        objective = losses.sum() if regulariser is None else losses.sum() + regulariser
        state.scaler.scale(objective / acc).backward()
        part = losses.detach().float() / acc
        total = part if total is None else total + part
    state.scaler.unscale_(state.optimizer)
    clip_gradients(state)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.allocator is not None:
        state.allocator.update(step + 1)
    state.optimizer.zero_grad(set_to_none=True)
    return total


def progress_sender(node_id: str | None) -> Callable[[dict], None] | None:
    """Sends ``blora.train.progress`` to the prompt's client when a ComfyUI server runs in this process."""
    instance = compat.prompt_server()
    if instance is None or node_id is None:
        return None
    return lambda payload: instance.send_sync(PROGRESS_EVENT, dict(payload, node=node_id), instance.client_id)


def preview_decoder(state: TrainState):
    """The host's latent previewer (None unless previews are on: ``--preview-method``), as KSampler uses it."""
    if state.latent_format is None:
        return None
    return latent_preview.get_previewer(state.device, state.latent_format)


def _progress(state: TrainState, done: int, elapsed: float) -> dict:
    losses = state.read_losses()[-1]
    payload = {"step": done, "steps": state.config.steps, "loss": sum(losses) / len(losses), "elapsed": elapsed}
    if state.config.seeds > 1:
        payload.update(losses=losses, seeds=state.seeds)
    return payload


def run_loop(state: TrainState, node_id: str | None = None,
             on_checkpoint: Callable[[int, list[list[float]]], None] | None = None,
             on_step: Callable[[int, TrainState], None] | None = None) -> list[list[float]]:
    """Train ``config.steps`` steps; returns each step's losses (one per seed). ``on_step(done, state)`` runs
    before the first step (done 0) and after every optimizer step (validation previews hook in there: they draw
    from their own generators, never the training draws). Raises the host's InterruptProcessingException (checked
    before every step) when the user cancels; checkpoints already written stay."""
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
        state.pending.append(train_step(state, step))
        done = step + 1
        preview = None
        if previewer is not None and (time.monotonic() - last_preview >= PREVIEW_INTERVAL_S or done == c.steps):
            preview, last_preview = previewer.decode_latent_to_preview_image("JPEG", state.denoised), time.monotonic()
        bar.update_absolute(done, c.steps, preview)
        if send is not None:
            send(_progress(state, done, time.monotonic() - start))
        if on_checkpoint is not None and c.save_every and done % c.save_every == 0 and done < c.steps:
            on_checkpoint(done, state.read_losses())
        if on_step is not None:
            on_step(done, state)
    return state.read_losses()
