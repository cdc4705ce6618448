"""K-LoRA: training-free fusion of a subject LoRA and a style LoRA (Ouyang et al., CVPR 2025, arXiv 2502.18461).

Per Linear layer holding both LoRAs, with ΔW_c (subject/content) and ΔW_s (style):

    K   = r_c · r_s                                   (clamped to the number of weights)
    S_c = sum of the K largest |ΔW_c|,  S_s = sum of the K largest |ΔW_s|
    γ   = trimmed mean over layers of ‖ΔW_c‖₁ / ‖ΔW_s‖₁   (drop ratios ≥ 3 × the mean, average again)
    use ΔW_c at progress p  iff  (S_c / γ) / (S_s · S(p)) > 1,  else ΔW_s

S(p) is the time scale of the pattern (``TIME_SCALES``), p the sampling progress (0 at the first step, 1 at the
last). The official code (HVision-NKU/K-LoRA, klora.py) computes ``scale = alpha · t/T + beta`` and for pattern
``s*`` takes ``scale % alpha``; its inference script sets alpha = 1.5 and beta = 0.5 for ``s``, beta = 1.5 · 0.85
for ``s*``. So:

    s:   S(p) = 1.5 p + 0.5                      (monotone: a layer switches at most once, content → style)
    s*:  S(p) = (1.5 p + 1.275) mod 1.5          (sawtooth: 1.275 → 1.5 over p ∈ [0, 0.15), drops to 0 at
                                                  p = 0.15, then rises to 1.275 at p = 1)

The rule is rewritten as ``S(p) < R`` with the per-layer threshold ``R = S_c / (γ · S_s)``, computed once; at run
time each layer compares the shared scalar S(p) with its R (one float compare per layer and call). ``content_
intervals`` gives the same rule as progress intervals (one interval for ``s``: the switch point; up to two for
``s*``).

Degenerate cases: S_s = 0 (zero style delta) → R = ∞, always content; S_c = 0 < S_s → R = 0, always style; both
zero → style (the rule's ratio is NaN, which is not > 1). Layers with a zero delta on either side are left out of
γ; with no layer left, γ = 1. Layers in only one LoRA are not fused: they take that LoRA. The subject/style
strengths scale the deltas only: they cancel out of the rule (S_c, γ and S_s scale together), so the selection is
computed at strength 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..errors import BLoRAError

TRIM_FACTOR = 3.0


@dataclass(frozen=True)
class TimeScale:
    """S(p) = alpha · p + beta, taken modulo alpha when ``wrap`` (the sawtooth of pattern ``s*``)."""

    alpha: float
    beta: float
    wrap: bool = False

    def __call__(self, progress: float) -> float:
        if not self.wrap:
            return self.alpha * progress + self.beta
        turns = progress + self.beta / self.alpha  # S / alpha before the modulo
        if abs(turns - round(turns)) < 1e-9:  # on a wrap point: 0, whatever the rounding of p (3/20 → 0.15)
            turns = float(round(turns))
        return self.alpha * (turns - math.floor(turns))

    def segments(self) -> list[tuple[float, float, float]]:
        """Linear pieces (start, end, S(start)) covering [0, 1]; S rises with slope alpha on each."""
        cuts = [0.0]
        if self.wrap:  # S wraps where alpha·p + beta crosses a multiple of alpha: p = k - beta/alpha
            k = math.floor(self.beta / self.alpha) + 1
            while k - self.beta / self.alpha < 1.0:
                cuts.append(k - self.beta / self.alpha)
                k += 1
        cuts.append(1.0)
        return [(a, b, self(0.0) if i == 0 else 0.0) for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]


TIME_SCALES: dict[str, TimeScale] = {
    "s": TimeScale(1.5, 0.5),
    "s*": TimeScale(1.5, 1.5 * 0.85, wrap=True),
}


def time_scale(pattern: str) -> TimeScale:
    if pattern not in TIME_SCALES:
        raise BLoRAError(f"unknown K-LoRA pattern {pattern!r}: choose one of {', '.join(TIME_SCALES)}")
    return TIME_SCALES[pattern]


def _top_k(magnitudes: torch.Tensor, k: int) -> float:
    """Sum of the k largest magnitudes (all of them when k ≥ numel), in float64."""
    if k >= magnitudes.numel():
        return float(magnitudes.sum(dtype=torch.float64))
    return float(torch.topk(magnitudes, k, sorted=False).values.sum(dtype=torch.float64))


def fusion_k(rank_c: int, rank_s: int, delta: torch.Tensor) -> int:
    """K = r_c · r_s; a rank of 0 (full-rank kinds) counts as min(out, in)."""
    full = min(int(delta.shape[0]), int(delta[0].numel()))
    return max(1, (rank_c or full) * (rank_s or full))


def trimmed_gamma(ratios: Sequence[float]) -> float:
    """Mean of the ratios after dropping those ≥ 3 × the mean (1.0 for no ratios)."""
    if not ratios:
        return 1.0
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < TRIM_FACTOR * mean]
    return sum(kept) / len(kept) if kept else mean


@dataclass(frozen=True)
class FusedLayer:
    """The selection of one layer holding both LoRAs: its threshold R = S_c / (γ · S_s)."""

    threshold: float

    def uses_content(self, scale: float) -> bool:
        """The K-LoRA rule at time scale S(p) = ``scale``."""
        return scale < self.threshold


@dataclass(frozen=True)
class FusionPlan:
    """Per-layer selection for a run: ``fused`` layers switch between the two deltas; ``subject_only`` and
    ``style_only`` layers take their one LoRA."""

    pattern: str
    gamma: float
    fused: Mapping[str, FusedLayer]
    subject_only: tuple[str, ...]
    style_only: tuple[str, ...]

    def uses_content(self, path: str, progress: float) -> bool:
        return self.fused[path].uses_content(time_scale(self.pattern)(progress))

    def content_intervals(self, path: str) -> list[tuple[float, float]]:
        """Progress intervals [lo, hi) where the layer uses the content delta (hi = inf includes p = 1)."""
        return content_intervals(self.fused[path].threshold, self.pattern)

    def switch_points(self) -> dict[str, float]:
        """For pattern ``s``: the progress at which each fused layer switches to style (0: style from the start,
        inf: content throughout)."""
        if time_scale(self.pattern).wrap:
            raise BLoRAError(f"pattern {self.pattern!r} is not monotone: use content_intervals")
        return {p: (iv[0][1] if iv else 0.0) for p, iv in ((p, self.content_intervals(p)) for p in self.fused)}


def content_intervals(threshold: float, pattern: str) -> list[tuple[float, float]]:
    """Where S(p) < threshold on [0, 1], as half-open intervals [lo, hi); hi = inf when the last one reaches 1."""
    scale = time_scale(pattern)
    out: list[tuple[float, float]] = []
    pieces = scale.segments()
    for i, (a, b, s0) in enumerate(pieces):
        end = a + (threshold - s0) / scale.alpha if math.isfinite(threshold) else math.inf
        if end <= a:
            continue
        last = i == len(pieces) - 1
        hi = end if end <= b else (math.inf if last else b)
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((a, hi))
    return out


@dataclass(frozen=True)
class LayerStats:
    """What the rule needs of one layer: top-K sums and L1 norms of both deltas."""

    top_c: float
    top_s: float
    l1_c: float
    l1_s: float


def layer_stats(delta_c: torch.Tensor, delta_s: torch.Tensor, rank_c: int, rank_s: int, path: str = "") -> LayerStats:
    """Top-K sums (K = r_c · r_s) and L1 norms of one layer's two deltas (any dtype; math in float32/64)."""
    if tuple(delta_c.shape) != tuple(delta_s.shape):
        raise BLoRAError(f"K-LoRA: layer {path!r} has shape {tuple(delta_c.shape)} in the subject LoRA but "
                         f"{tuple(delta_s.shape)} in the style LoRA (LoRAs for different models?)")
    k = fusion_k(rank_c, rank_s, delta_c)
    a_c, a_s = delta_c.detach().float().abs().reshape(-1), delta_s.detach().float().abs().reshape(-1)
    return LayerStats(_top_k(a_c, k), _top_k(a_s, k), float(a_c.sum(dtype=torch.float64)),
                      float(a_s.sum(dtype=torch.float64)))


def _threshold(top_c: float, top_s: float, gamma: float) -> float:
    if top_s == 0.0:
        return math.inf if top_c > 0.0 else 0.0
    return top_c / (gamma * top_s)


def plan_from_stats(stats: Mapping[str, LayerStats], subject_only: Sequence[str] = (),
                    style_only: Sequence[str] = (), pattern: str = "s") -> FusionPlan:
    """The K-LoRA selection from per-layer statistics (layers in both LoRAs): γ over the layers with two non-zero
    deltas, then each layer's threshold R = S_c / (γ · S_s)."""
    time_scale(pattern)
    gamma = trimmed_gamma([st.l1_c / st.l1_s for st in stats.values() if st.l1_c > 0.0 and st.l1_s > 0.0])
    fused = {p: FusedLayer(_threshold(st.top_c, st.top_s, gamma)) for p, st in stats.items()}
    return FusionPlan(pattern=pattern, gamma=gamma, fused=fused, subject_only=tuple(subject_only),
                      style_only=tuple(style_only))

