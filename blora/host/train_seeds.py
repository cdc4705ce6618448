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
``scale · (x A_nᵀ) B_nᵀ`` to the base layer's output (the base weight is never written). Only algorithms the
registry can stack (``Algorithm.stacked``: plain LoRA) are batched; others are refused with a clear error (train
those seeds one at a time). Set-up, step and loop are the single-seed ones (``train.train_runs``,
``train_loop``), with N = ``config.seeds``.
"""
from __future__ import annotations

from ..adapters.adapter import Adapter
from ..train.algorithms import check_stackable
from ..train.recipe import TrainConfig
from .train import TrainOutcome, train_runs


def check_seeds_config(config: TrainConfig) -> None:
    """What ``seeds`` > 1 cannot batch is refused before anything is written (``algorithms.check_stackable``)."""
    check_stackable(config)


def train_blora_seeds(model, vae, images, positive, config: TrainConfig, filename_prefix: str = "blora",
                      node_id: str | None = None, resume: Adapter | None = None, on_step=None) -> list[TrainOutcome]:
    """Train ``config.seeds`` B-LoRAs at once; one file per seed, ``<prefix>_seed<S>_<NNNNN>_.safetensors``.
    Returns one TrainOutcome per seed (its model is the input model with that seed's B-LoRA)."""
    return train_runs(model, vae, images, positive, config, filename_prefix, resume, node_id, on_step)
