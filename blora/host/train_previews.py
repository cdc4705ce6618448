"""Validation previews while Train B-LoRA runs: at step 0, every ``every`` steps and at the end, the host's own
sampler (``comfy.sample.sample``, as KSampler calls it) runs on the training model itself (no second copy) for the
views content only, style only and both, from one noise seed, and the VAE decodes them.

Views switch trained layers through their ``multiplier`` (``blora.train.previews.view_multipliers``); every
multiplier is put back before the next training step. With stacked seeds (``SeedsLoRA``, applied by forward hooks
that split the batch per seed) the training hooks are set aside while a preview samples, and seed n's delta is
added to every row instead. Sampling runs under ``torch.no_grad`` inside ``torch.random.fork_rng``: it records no
graph and leaves the global random state as it found it (training draws come from ``step_generator`` anyway), so
the trained weights are the same with previews on or off.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import comfy.sample
import folder_paths
import torch

from ..errors import BLoRAError
from ..train.seeds import SeedsLoRA
from . import compat
from .realise import one_seed
from ..train.previews import VIEWS, ValidationSettings, is_preview_step, preview_grid, preview_row, view_multipliers

log = logging.getLogger(__name__)
PREVIEW_EVENT = "blora.train.preview"


@dataclass
class Validation:
    """Validation settings with the prompts encoded: conditioning per view (positive) and the negative."""

    settings: ValidationSettings
    positive: dict[str, Any]  # view -> CONDITIONING
    negative: Any


@dataclass
class PreviewRow:
    """One seed's row at one step: image (1, H, 3·W, 3) in [0, 1]; seed: its initialisation seed."""

    step: int
    seed: int
    image: torch.Tensor


@contextlib.contextmanager
def multipliers(adapters: dict[str, Any], values: dict[str, float]) -> Iterator[None]:
    """Set each adapter's ``multiplier``; put the old values back on exit."""
    before = {p: a.multiplier for p, a in adapters.items()}
    try:
        for p, a in adapters.items():
            a.multiplier = values[p]
        yield
    finally:
        for p, a in adapters.items():
            a.multiplier = before[p]


def _rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


class PreviewSampler:
    """The ``on_step(done, state)`` callback of a training run: samples a row per seed at the preview steps.

    state: the loop's state (``config``, ``adapters``, ``model``: the training clone, ``unet``). send: called with
    each new row (the node shows it live). rows: every row so far, in order; seconds: the time previews took."""

    def __init__(self, validation: Validation, vae, seeds: list[int], send: Callable[[PreviewRow], None] | None = None):
        self.validation = validation
        self.vae = vae
        self.seeds = seeds
        self.send = send
        self.rows: list[PreviewRow] = []
        self.seconds = 0.0

    def __call__(self, done: int, state) -> None:
        if not is_preview_step(done, state.config.steps, self.validation.settings.every):
            return
        start = time.monotonic()
        with torch.random.fork_rng(devices=_rng_devices()), torch.no_grad():
            for n, seed in enumerate(self.seeds):
                images = [self._view(state, n, view) for view in VIEWS]
                row = PreviewRow(done, seed, preview_row(images).cpu())
                self.rows.append(row)
                if self.send is not None:
                    self.send(row)
        self.seconds += time.monotonic() - start

    def _view(self, state, n: int, view: str) -> torch.Tensor:
        adapters = state.adapters
        values = view_multipliers(list(adapters), view)
        stacked = any(isinstance(a, SeedsLoRA) for a in adapters.values())
        routing = one_seed(state.unet, adapters, n) if stacked else contextlib.nullcontext()
        model = getattr(state, "model", None)
        if model is None:  # the loop's state must carry the training clone it samples with
            raise BLoRAError("validation previews need the training model on the loop state (state.model)")
        with multipliers(adapters, values), routing:
            latent = self._sample(model, view)
        return self.vae.decode(latent)

    def _sample(self, model, view: str) -> torch.Tensor:
        s = self.validation.settings
        h, w = s.latent_size
        latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, h, w))
        noise = comfy.sample.prepare_noise(latent, s.seed)
        return comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler, s.scheduler,
                                   self.validation.positive[view], self.validation.negative, latent,
                                   disable_pbar=True, seed=s.seed)

    def final_grid(self) -> torch.Tensor | None:
        """The last step's rows (one per seed), top to bottom, as one IMAGE."""
        if not self.rows:
            return None
        last = self.rows[-1].step
        return preview_grid([r.image for r in self.rows if r.step == last])


def save_png(image: torch.Tensor, path: str) -> str:
    """Write an IMAGE row (1, H, W, 3) as a PNG, atomically (a temporary name, then a rename)."""
    from PIL import Image

    array = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    tmp = path + ".tmp"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def preview_name(trained_file: str, step: int) -> str:
    """Beside ``<name>_00001_.safetensors``: ``<name>_00001_preview_step000100.png``."""
    stem = trained_file[:-len(".safetensors")] if trained_file.endswith(".safetensors") else trained_file
    return f"{stem.rstrip('_')}_preview_step{step:06d}.png"


def save_rows(rows: list[PreviewRow], trained_files: dict[int, str]) -> list[dict]:
    """Save every row beside its seed's trained file; returns their /view references (type ``output``):
    {step, seed, filename, subfolder, type}, in the order of the rows."""
    output_dir = folder_paths.get_output_directory()
    refs = []
    for row in rows:
        path = save_png(row.image, preview_name(trained_files[row.seed], row.step))
        folder, name = os.path.split(os.path.relpath(path, output_dir))
        refs.append({"step": row.step, "seed": row.seed, "filename": name, "subfolder": folder.replace(os.sep, "/"),
                     "type": "output"})
    return refs


LIVE_SUBFOLDER = "blora_previews"


def live_sender(node_id: str | None) -> Callable[[PreviewRow], None] | None:
    """While a ComfyUI server runs in this process: each new row is written to the temp folder and announced to
    the prompt's client as ``blora.train.preview`` {node, step, seed, image: {filename, subfolder, type}}."""
    post = compat.client_sender(PREVIEW_EVENT)
    if post is None or node_id is None:
        return None
    run = uuid.uuid4().hex[:8]
    folder = os.path.join(folder_paths.get_temp_directory(), LIVE_SUBFOLDER)

    def send(row: PreviewRow) -> None:
        os.makedirs(folder, exist_ok=True)
        name = f"train_{node_id}_{run}_seed{row.seed}_step{row.step:06d}.png"
        save_png(row.image, os.path.join(folder, name))
        post({"node": node_id, "step": row.step, "seed": row.seed,
              "image": {"filename": name, "subfolder": LIVE_SUBFOLDER, "type": "temp"}})
    return send
