"""LoKr (LyCORIS): ΔW = w1 ⊗ w2 (Kronecker product), each factor full or low-rank (w1a @ w1b, w2a @ w2b), w2
optionally a Tucker product ``tucker(t2, w2a, w2b)`` (conv layers).

Tensors: w1 (out_l, in_m) or w1a (out_l, r), w1b (r, in_m); w2 (out_k, in_n[, kh, kw]) or w2a (out_k, r),
w2b (r, in_n[·kh·kw]); Tucker: t2 (r, r, kh, kw), w2a (r, out_k), w2b (r, in_n). The weight is (out_l·out_k,
in_m·in_n[, kh, kw]). Rank (what alpha is divided by, as ComfyUI and LyCORIS do): w2b's first dim when w2 is
factored, else w1b's; 0 when both are full (alpha ignored, scale 1).
"""
from __future__ import annotations

import torch

from .base import Kind, Tensors, mm, register, tucker


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
                continue
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
