"""The per-step training loss, kept in a trained file's metadata and handed to the host's "Plot Loss Graph".

In the file: ``blora.loss``, a JSON list with one number per optimizer step (4 significant digits, no spaces:
about 7 bytes a step), the steps of earlier runs first when training resumed. In the graph: the host's LOSS_MAP,
``{"loss": [float, ...]}`` (what stock TrainLoraNode outputs and LossGraphNode reads, 0.3.64 and 0.33).
"""
from __future__ import annotations

import json
import math
from typing import Mapping, Sequence

LOSS_KEY = "blora.loss"
FINAL_WINDOW = 10  # the "final loss" is the mean of the last steps: one step's loss is as noisy as its timestep


def encode_losses(losses: Sequence[float]) -> str:
    """``[0.1234,0.09876,...]``: compact JSON, 4 significant digits; non-finite values become null."""
    return json.dumps([float(f"{x:.4g}") if math.isfinite(x) else None for x in map(float, losses)],
                      separators=(",", ":"))


def losses_in(metadata: Mapping[str, str]) -> list[float]:
    """The per-step losses a file records ([] when it records none or the entry is unreadable)."""
    try:
        values = json.loads(metadata.get(LOSS_KEY) or "[]")
    except ValueError:
        return []
    if not isinstance(values, list):
        return []
    return [float(v) if isinstance(v, (int, float)) else math.nan for v in values]


def loss_map(losses: Sequence[float]) -> dict[str, list[float]]:
    """The host's LOSS_MAP value."""
    return {"loss": [float(x) for x in losses]}


def final_loss(losses: Sequence[float]) -> float:
    """Mean of the last FINAL_WINDOW finite losses (nan when there are none)."""
    tail = [x for x in losses[-FINAL_WINDOW:] if math.isfinite(x)]
    return sum(tail) / len(tail) if tail else math.nan


def training_summary(metadata: Mapping[str, str]) -> str:
    """``trained 1000 steps, final loss 0.0812`` for a file this pack trained, else ""."""
    losses = losses_in(metadata)
    if not losses:
        return ""
    steps = metadata.get("blora.steps", str(len(losses)))
    window = min(FINAL_WINDOW, len(losses))
    return f"trained {steps} steps, final loss {final_loss(losses):.4g} (mean of last {window})"
