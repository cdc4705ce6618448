"""LoHa (LyCORIS): ΔW = (w1a @ w1b) ⊙ (w2a @ w2b), rank = w1b's first dim.

Tensors: w1a (out, r), w1b (r, in), w2a (out, r), w2b (r, in); conv weights: w1b/w2b (r, in·kh·kw) reshaped to
the weight. Tucker form (LyCORIS ``use_tucker`` on conv layers): t1, t2 (r, r, kh, kw) cores with w1a, w2a
(r, out) and w1b, w2b (r, in): each factor is ``tucker(t, a, b)`` (out, in, kh, kw).
"""
from __future__ import annotations

import torch

from .base import Kind, Tensors, mm, register, tucker
from ..trainable import Trainable, initial_magnitude

NAMES = ("w1a", "w1b", "w2a", "w2b")


@register
class LoHa(Kind):
    name, label = "loha", "LoHa"
    required, optional = NAMES, ("t1", "t2")
    read_suffixes = {".hada_w1_a": "w1a", ".hada_w1_b": "w1b", ".hada_w2_a": "w2a", ".hada_w2_b": "w2b",
                     ".hada_t1": "t1", ".hada_t2": "t2"}
    kohya_suffixes = {n: s for s, n in read_suffixes.items()}

    def rank(self, t: Tensors) -> int:
        return int(t["w1b"].shape[0])

    def check(self, t: Tensors) -> str | None:
        shapes = [tuple(t[n].shape) for n in NAMES]
        if ("t1" in t) != ("t2" in t):
            return "LoHa Tucker form needs both t1 and t2"
        if "t1" in t:
            t1, t2 = t["t1"], t["t2"]
            ok = (t1.ndim == 4 and t2.shape == t1.shape and all(t[n].ndim == 2 for n in NAMES)
                  and t["w1a"].shape[0] == t1.shape[0] and t["w1b"].shape[0] == t1.shape[1]
                  and t["w2a"].shape[0] == t2.shape[0] and t["w2b"].shape[0] == t2.shape[1]
                  and t["w1a"].shape[1] == t["w2a"].shape[1] and t["w1b"].shape[1] == t["w2b"].shape[1])
            return None if ok else (f"LoHa Tucker factors t1 {tuple(t1.shape)}, t2 {tuple(t2.shape)}, "
                                    f"w1a/w1b/w2a/w2b {shapes} have inconsistent shapes")
        if any(t[n].ndim != 2 for n in NAMES):
            return f"LoHa factors w1a/w1b/w2a/w2b must be 2-D matrices, found shapes {shapes}"
        ok = (t["w1a"].shape[1] == t["w1b"].shape[0] and t["w2a"].shape[1] == t["w2b"].shape[0]
              and t["w1a"].shape[0] == t["w2a"].shape[0] and t["w1b"].shape[1:] == t["w2b"].shape[1:])
        return None if ok else f"LoHa factors w1a/w1b/w2a/w2b have inconsistent shapes {shapes}"

    def out_in(self, t: Tensors) -> tuple[int, int]:
        if "t1" in t:
            return int(t["w1a"].shape[1]), int(t["w1b"].shape[1])
        return int(t["w1a"].shape[0]), int(t["w1b"].shape[1])

    def delta(self, t: Tensors) -> torch.Tensor:
        if "t1" in t:
            return tucker(t["t1"], t["w1a"], t["w1b"]) * tucker(t["t2"], t["w2a"], t["w2b"])
        return mm(t["w1a"], t["w1b"]) * mm(t["w2a"], t["w2b"])


class TrainableLoHa(Trainable):
    """LoHa of one Linear weight (out, in) with LyCORIS's initialisation (``LohaModule``): w1a ~ N(0, 0.1²),
    w1b ~ N(0, 1), w2a = 0, w2b ~ N(0, 1), so ΔW = 0 at the start; scale alpha/rank. DoRA: input-axis magnitude."""

    kind = LoHa.name
    plus = ("w2a",)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, scale: float, dora: bool,
               generator: torch.Generator) -> "TrainableLoHa":
        out_features, in_features = weight.shape
        tensors = {"w1a": torch.randn(out_features, rank, generator=generator) * 0.1,
                   "w1b": torch.randn(rank, in_features, generator=generator),
                   "w2a": torch.zeros(out_features, rank),
                   "w2b": torch.randn(rank, in_features, generator=generator)}
        magnitude = initial_magnitude(weight) if dora else None
        return cls({n: t.to(weight.device) for n, t in tensors.items()}, scale, magnitude)
