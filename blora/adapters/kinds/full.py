"""Full diff: ΔW = diff, stored as it is (ComfyUI's ``.diff``; ``.w_norm`` of LyCORIS norm layers). No rank."""
from __future__ import annotations

import torch

from .base import Kind, Tensors, register


@register
class Full(Kind):
    name, label = "full", "full diff"
    required = ("diff",)
    read_suffixes = {".diff": "diff", ".w_norm": "diff"}
    kohya_suffixes = {"diff": ".diff"}

    def out_in(self, t: Tensors) -> tuple[int, int]:  # 1-D for norm weights: (n,)
        return tuple(int(s) for s in t["diff"].shape[:2])

    def delta(self, t: Tensors) -> torch.Tensor:
        return t["diff"].float()
