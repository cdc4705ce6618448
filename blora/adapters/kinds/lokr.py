"""LoKr (LyCORIS): ΔW = w1 ⊗ w2 (Kronecker product), each factor full or low-rank (w1a @ w1b, w2a @ w2b), w2
optionally a Tucker product ``tucker(t2, w2a, w2b)`` (conv layers).

Tensors: w1 (out_l, in_m) or w1a (out_l, r), w1b (r, in_m); w2 (out_k, in_n[, kh, kw]) or w2a (out_k, r),
w2b (r, in_n[·kh·kw]); Tucker: t2 (r, r, kh, kw), w2a (r, out_k), w2b (r, in_n). The weight is (out_l·out_k,
in_m·in_n[, kh, kw]). Rank (what alpha is divided by, as ComfyUI and LyCORIS do): w2b's first dim when w2 is
factored, else w1b's; 0 when both are full (alpha ignored, scale 1).
"""
from __future__ import annotations

import torch

from .base import KINDS, Kind, Tensors, mm, register, tucker
from ..trainable import Trainable, initial_magnitude, kaiming_uniform


@register
class LoKr(Kind):
    name, label = "lokr", "LoKr"
    required, optional = (), ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")
    read_suffixes = {".lokr_w1": "w1", ".lokr_w1_a": "w1a", ".lokr_w1_b": "w1b", ".lokr_w2": "w2",
                     ".lokr_w2_a": "w2a", ".lokr_w2_b": "w2b", ".lokr_t2": "t2"}
    kohya_suffixes = {n: s for s, n in read_suffixes.items()}

    def rank(self, t: Tensors) -> int:
        return int(t["w2b"].shape[0] if "w2b" in t else t["w1b"].shape[0] if "w1b" in t else 0)

    def check(self, t: Tensors) -> str | None:
        for f, a, b in (("w1", "w1a", "w1b"), ("w2", "w2a", "w2b")):
            if f in t:
                if t[f].ndim not in ((2,) if f == "w1" else (2, 4)):
                    return f"LoKr {f} of shape {tuple(t[f].shape)} is not a matrix"
                continue
            if any(n in t and t[n].ndim != 2 for n in (a, b)):
                return f"LoKr {a}/{b} must be 2-D matrices, found {[tuple(t[n].shape) for n in (a, b) if n in t]}"
            if not (a in t and b in t):
                return f"LoKr needs {f} or both {a} and {b} with matching rank"
            if f == "w2" and "t2" in t:
                if not (t["t2"].ndim == 4 and t[a].shape[0] == t["t2"].shape[0] and t[b].shape[0] == t["t2"].shape[1]):
                    return (f"LoKr Tucker factors t2 {tuple(t['t2'].shape)}, w2a {tuple(t[a].shape)}, "
                            f"w2b {tuple(t[b].shape)} have inconsistent shapes")
            elif t[a].shape[1] != t[b].shape[0]:
                return f"LoKr needs {f} or both {a} and {b} with matching rank"
        return None

    @staticmethod
    def factor(t: Tensors, which: str) -> torch.Tensor:
        """w1 or w2 (float32), from the full tensor or its factors."""
        if which in t:
            return t[which].float()
        a, b = t[which + "a"], t[which + "b"]
        if which == "w2" and "t2" in t:
            return tucker(t["t2"], a, b)
        return mm(a, b)

    def delta(self, t: Tensors) -> torch.Tensor:
        w1, w2 = self.factor(t, "w1"), self.factor(t, "w2")
        if w2.ndim == 4:
            w1 = w1[..., None, None]
        return torch.kron(w1.contiguous(), w2.contiguous())


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m · n = dimension, as LyCORIS splits a dimension for LoKr: with ``factor`` > 0 dividing it,
    (factor, dimension / factor) sorted; otherwise the most balanced split whose smaller part is <= factor (any
    size for factor -1), e.g. 128 -> (8, 16), 320 -> (16, 20), 640 -> (20, 32), 1280 -> (32, 40)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt + dimension // nxt > m + n or nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return min(m, n), max(m, n)


class TrainableLoKr(Trainable):
    """LoKr of one Linear weight (out, in) = (out_l·out_k, in_m·in_n) with LyCORIS's layout and initialisation
    (``LokrModule``): out and in split by ``factorization(·, factor)``; w1 (out_l, in_m) full, or w1a @ w1b with
    ``decompose_both`` when rank < max(out_l, in_m)/2; w2 (out_k, in_n) as w2a @ w2b when rank < max(out_k, in_n)/2,
    else full (LyCORIS's automatic full matrix; ``full_matrix`` forces both full). Init: w1 (or w1a, w1b) and w2a
    kaiming-uniform(a=sqrt(5)), w2b (or a full w2) zero, so ΔW = 0 at the start. Scale alpha/rank, or 1 when both
    factors are full (alpha is then ignored by ComfyUI and LyCORIS alike)."""

    kind = LoKr.name
    plus = ("w2b", "w2")
    factored = True

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, scale: float, dora: bool, generator: torch.Generator,
               factor: int = -1, decompose_both: bool = False, full_matrix: bool = False) -> "TrainableLoKr":
        out_features, in_features = weight.shape
        out_l, out_k = factorization(out_features, factor)
        in_m, in_n = factorization(in_features, factor)
        tensors: dict[str, torch.Tensor] = {}
        if decompose_both and not full_matrix and rank < max(out_l, in_m) / 2:
            tensors["w1a"] = kaiming_uniform(out_l, rank, generator)
            tensors["w1b"] = kaiming_uniform(rank, in_m, generator)
        else:
            tensors["w1"] = kaiming_uniform(out_l, in_m, generator)
        if not full_matrix and rank < max(out_k, in_n) / 2:
            tensors["w2a"] = kaiming_uniform(out_k, rank, generator)
            tensors["w2b"] = torch.zeros(rank, in_n)
        else:
            tensors["w2"] = torch.zeros(out_k, in_n)
        module_scale = scale if KINDS[LoKr.name].rank(tensors) else 1.0
        magnitude = initial_magnitude(weight) if dora else None
        return cls({n: t.to(weight.device) for n, t in tensors.items()}, module_scale, magnitude)

    @property
    def stored_alpha(self) -> float:
        """scale · rank; 1 when both factors are full (no rank: ComfyUI and LyCORIS ignore it, scale 1)."""
        return self.scale * self.rank if self.rank else 1.0

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(w1 ⊗ w2) x as w1 X w2ᵀ with X = x reshaped (in_m, in_n): (w1 ⊗ w2)[i·K + k, j·N + n] = w1[i, j] w2[k, n],
        so y[i·K + k] = Σ_j,n w1[i, j] X[j, n] w2[k, n]; per row in_m·in_n·out_k + out_l·in_m·out_k multiply-adds
        instead of in·out (the dense Kronecker product is never made)."""
        t = self.tensors()
        w1, w2 = LoKr.factor(t, "w1").to(x.dtype), LoKr.factor(t, "w2").to(x.dtype)
        grid = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
        out = torch.matmul(torch.matmul(w1, grid), w2.transpose(0, 1))
        return out.reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0])
