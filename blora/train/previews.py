"""Validation previews of a training run: when to sample, which trained layers each view keeps, the prompts, and
how a row of previews is laid out. Pure torch; the host side (sampling with the host's sampler on the training
model) is ``blora.host.train_previews``.

A preview row is one seed at one step, three images from the same noise: ``content`` (only the content block's
adapters on), ``style`` (only the style block's) and ``both`` (every trained layer on). The views switch layers
through their ``multiplier`` (1: on, 0: off); nothing else of the run changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..arch import block_of
from ..errors import BLoRAError

VIEWS = ("content", "style", "both")  # the columns of a row, left to right
TRIGGER_PLACEHOLDERS = ("[v]", "[s]")  # the content and the style token in a prompt (README: 'A [v] in [s] style')
DEFAULT_PROMPTS = {"content": "A [v]", "style": "A bird in [s] style", "both": "A [v] in [s] style"}


@dataclass(frozen=True)
class ValidationSettings:
    """How previews are sampled. every: steps between two rows (0: only at the start and the end); steps, cfg,
    sampler, scheduler, seed: the host's sampler settings (the same noise for every view, seed and step);
    width, height: image size in pixels; trigger: the token the training caption used (the pack's default
    caption is 'A [v]'); prompts: one per view, where [v] and [s] stand for the trigger."""

    every: int = 250
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    width: int = 1024
    height: int = 1024
    trigger: str = "[v]"
    content_prompt: str = DEFAULT_PROMPTS["content"]
    style_prompt: str = DEFAULT_PROMPTS["style"]
    both_prompt: str = DEFAULT_PROMPTS["both"]
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.every < 0:
            problems.append(f"`every` should be 0 (start and end only) or a number of steps, got {self.every!r}.")
        if self.steps < 1:
            problems.append(f"`steps` should be at least 1, got {self.steps!r}.")
        if not (math.isfinite(self.cfg) and self.cfg > 0):
            problems.append(f"`cfg` should be a positive number, got {self.cfg!r}.")
        if self.seed < 0:
            problems.append(f"`seed` should be at least 0, got {self.seed!r}.")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 64 or value % 8:
                problems.append(f"`{name}` should be a multiple of 8, at least 64, got {value!r}.")
        if problems:
            raise BLoRAError("invalid validation settings: " + " ".join(problems))

    def prompt(self, view: str) -> str:
        """The prompt of one view with [v] and [s] replaced by the trigger."""
        text = {"content": self.content_prompt, "style": self.style_prompt, "both": self.both_prompt}[view]
        for placeholder in TRIGGER_PLACEHOLDERS:
            text = text.replace(placeholder, self.trigger)
        return text

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the latent: 1/8 of the image."""
        return self.height // 8, self.width // 8


def preview_steps(total: int, every: int) -> list[int]:
    """The steps (optimizer steps done) after which a row is sampled: 0, every, 2·every, …, and ``total``."""
    marks = set(range(0, total, every)) if every > 0 else {0}
    return sorted(marks | {total})


def is_preview_step(done: int, total: int, every: int) -> bool:
    return done == 0 or done == total or (every > 0 and done % every == 0 and done < total)


def view_multipliers(paths: Iterable[str], view: str) -> dict[str, float]:
    """The multiplier of each trained layer in one view: ``both`` keeps every layer; ``content`` and ``style``
    keep only the layers of that role's block (a layer of another block, e.g. layout, is off)."""
    if view not in VIEWS:
        raise BLoRAError(f"unknown preview view {view!r}: one of {', '.join(VIEWS)}")
    if view == "both":
        return {p: 1.0 for p in paths}
    result = {}
    for path in paths:
        block = block_of(path)
        result[path] = 1.0 if block is not None and block.role == view else 0.0
    return result


def preview_row(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """One row: the views' images (each (1, H, W, 3) or (H, W, 3), values in [0, 1]) side by side, (1, H, V·W, 3)."""
    frames = [img[0] if img.ndim == 4 else img for img in images]
    return torch.cat(frames, dim=1)[None].clamp(0, 1)


def preview_grid(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows (each (1, H, W, 3)) stacked top to bottom into one IMAGE (1, R·H, W, 3)."""
    if not rows:
        raise BLoRAError("no preview rows to lay out")
    return torch.cat([r[0] for r in rows], dim=0)[None]
