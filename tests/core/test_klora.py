"""K-LoRA core: the selection rule against a straightforward port of the official code, γ, time scales, and the
degenerate cases."""
from __future__ import annotations

import math

import pytest
import torch

from blora.errors import BLoRAError
from blora.compose.klora import (TIME_SCALES, LayerStats, content_intervals, fusion_k, layer_stats, plan_from_stats,
                                 time_scale, trimmed_gamma)

# The official inference script's constants (HVision-NKU/K-LoRA inference_sd.py): alpha 1.5, beta 0.5 ("s") or
# 1.5 * 0.85 ("s*", followed by `scale % alpha`).
OFFICIAL = {"s": (1.5, 0.5, False), "s*": (1.5, 1.5 * 0.85, True)}


def official_scale(pattern: str, progress: float) -> float:
    alpha, beta, wrap = OFFICIAL[pattern]
    scale = alpha * progress + beta
    return scale % alpha if wrap else scale


def official_gamma(pairs) -> float:
    ratios = [float((bc @ ac).abs().sum()) / float((bs @ as_).abs().sum()) for (bc, ac), (bs, as_) in pairs]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept)


def official_choice(up_c, down_c, up_s, down_s, gamma, pattern, progress) -> str:
    """klora.py get_klora_weight, with t/T replaced by the real progress; top-k by a full sort."""
    k = up_c.shape[1] * up_s.shape[1]
    m1, m2 = up_c @ down_c, up_s @ down_s
    s1 = m1.abs().flatten().sort(descending=True).values[:k].sum().item() / gamma
    s2 = m2.abs().flatten().sort(descending=True).values[:k].sum().item() * official_scale(pattern, progress)
    return "content" if s1 / s2 > 1 else "style"


def random_pair(gen, out, inn, rank, scale=1.0):
    return (scale * torch.randn(out, rank, generator=gen), torch.randn(rank, inn, generator=gen) / inn ** 0.5)


@pytest.fixture
def layers():
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 24), (24, 24), (32, 16), (16, 16), (24, 32), (16, 40)] * 3
    out = []
    for i, (o, n) in enumerate(shapes):
        rc, rs = (2, 4) if i % 2 else (4, 3)
        out.append((f"output_blocks.1.1.transformer_blocks.{i}.attn1.to_q", random_pair(gen, o, n, rc, 1 + 0.2 * i),
                    random_pair(gen, o, n, rs, 1.5)))
    return out


def plan_fusion(subject, style, ranks, pattern):
    """The selection for two sets of per-layer deltas, built as the K-LoRA node builds it (layer_stats per layer
    in both, then plan_from_stats)."""
    time_scale(pattern)
    stats = {p: layer_stats(subject[p], style[p], *ranks.get(p, (0, 0)), path=p) for p in subject if p in style}
    return plan_from_stats(stats, [p for p in subject if p not in style], [p for p in style if p not in subject],
                           pattern)


def plan_for(layers, pattern):
    subject = {p: c[0] @ c[1] for p, c, _ in layers}
    style = {p: s[0] @ s[1] for p, _, s in layers}
    ranks = {p: (c[0].shape[1], s[0].shape[1]) for p, c, s in layers}
    return plan_fusion(subject, style, ranks, pattern)


def near_wrap(pattern, p):
    return TIME_SCALES[pattern].wrap and abs(p - 0.15) < 1e-6


@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_time_scale_is_the_official_formula(pattern):
    for i in range(1001):
        p = i / 1000
        if not near_wrap(pattern, p):
            assert time_scale(pattern)(p) == pytest.approx(official_scale(pattern, p), abs=1e-9)
    assert time_scale("s")(0.0) == 0.5 and time_scale("s")(1.0) == 2.0
    assert time_scale("s*")(0.0) == pytest.approx(1.275)
    assert time_scale("s*")(3 / 20) == 0.0  # the wrap point: 1.5 exactly wraps to 0


@pytest.mark.parametrize("pattern", ["s", "s*"])
@pytest.mark.parametrize("steps", [2, 7, 21, 30])
def test_selection_matches_the_official_rule(layers, pattern, steps):
    plan = plan_for(layers, pattern)
    gamma = official_gamma([(c, s) for _, c, s in layers])
    assert plan.gamma == pytest.approx(gamma, rel=1e-6)
    choices = set()
    for i in range(steps):
        p = i / (steps - 1)
        if near_wrap(pattern, p):
            continue
        for path, (uc, dc), (us, ds) in layers:
            want = official_choice(uc, dc, us, ds, gamma, pattern, p)
            got = "content" if plan.uses_content(path, p) else "style"
            assert got == want, (path, p)
            choices.add(got)
    if steps > 2:
        assert choices == {"content", "style"}  # the fixture exercises both branches


def test_pattern_s_switches_once_at_the_switch_point(layers):
    plan = plan_for(layers, "s")
    switches = plan.switch_points()
    assert 0 < sum(0 < v < 1 for v in switches.values())
    for path, at in switches.items():
        seq = [plan.uses_content(path, i / 200) for i in range(201)]
        assert seq == sorted(seq, reverse=True)  # content ... content, style ... style
        for i in range(201):
            if abs(i / 200 - at) > 1e-9:
                assert seq[i] == (i / 200 < at)


@pytest.mark.parametrize("pattern", ["s", "s*"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9, 1.0, 1.3, 1.4, 1.6, 2.0, 2.5, math.inf])
def test_content_intervals_agree_with_the_rule(pattern, threshold):
    intervals = content_intervals(threshold, pattern)
    scale = time_scale(pattern)
    for i in range(2001):
        p = i / 2000
        edges = [e for iv in intervals for e in iv] + [0.15]
        if any(abs(p - e) < 1e-6 for e in edges):
            continue
        inside = any(lo <= p < hi for lo, hi in intervals)
        assert inside == (scale(p) < threshold), (p, intervals)
    assert len(intervals) <= (1 if pattern == "s" else 2)


def test_sawtooth_gives_two_content_intervals():
    # R = 1.4: content early (S rises 1.275 → 1.5 and passes 1.4 at p = 1/12), style until the wrap at 0.15,
    # then content again to the end (S restarts from 0 and stays below 1.4).
    lo, hi = content_intervals(1.4, "s*")
    assert lo == (0.0, pytest.approx(1 / 12))
    assert hi == (pytest.approx(0.15), math.inf)


def test_gamma_drops_ratios_of_three_times_the_mean_or_more():
    assert trimmed_gamma([1.0, 1.0, 1.0, 9.0]) == 1.0  # 9 = 3 × mean 3: dropped
    assert trimmed_gamma([1.0, 2.0, 3.0]) == 2.0
    assert trimmed_gamma([]) == 1.0


def test_top_k_sums_and_k():
    t, zero = torch.tensor([[1.0, -5.0], [3.0, -2.0]]), torch.zeros(2, 2)
    assert [layer_stats(t, zero, rc, rs).top_c for rc, rs in ((1, 1), (1, 2), (9, 11))] == [5.0, 8.0, 11.0]
    assert layer_stats(zero, t, 1, 2) == LayerStats(top_c=0.0, top_s=8.0, l1_c=0.0, l1_s=11.0)
    assert fusion_k(4, 8, torch.zeros(16, 24)) == 32
    assert fusion_k(0, 8, torch.zeros(16, 24)) == 16 * 8  # full rank counts as min(out, in)


def test_strengths_do_not_change_the_selection(layers):
    base = plan_for(layers, "s")
    scaled = [(p, (2.5 * c[0], c[1]), (0.3 * s[0], s[1])) for p, c, s in layers]
    other = plan_for(scaled, "s")
    for path in base.fused:
        assert base.fused[path].threshold == pytest.approx(other.fused[path].threshold, rel=1e-6)


def test_zero_deltas_and_one_sided_layers(layers):
    subject = {p: c[0] @ c[1] for p, c, _ in layers}
    style = {p: s[0] @ s[1] for p, _, s in layers}
    ranks = {p: (c[0].shape[1], s[0].shape[1]) for p, c, s in layers}
    a, b, c = (layers[i][0] for i in range(3))
    style[a] = torch.zeros_like(style[a])
    subject[b] = torch.zeros_like(subject[b])
    subject[c], style[c] = torch.zeros_like(subject[c]), torch.zeros_like(style[c])
    subject["input_blocks.8.1.transformer_blocks.0.attn1.to_k"] = torch.ones(4, 4)
    style["output_blocks.0.1.transformer_blocks.0.attn1.to_k"] = torch.ones(4, 4)
    plan = plan_fusion(subject, style, ranks, "s")
    for p in (0.0, 0.5, 1.0):
        assert plan.uses_content(a, p)  # zero style delta: content throughout
        assert not plan.uses_content(b, p)  # zero content delta: style throughout
        assert not plan.uses_content(c, p)  # both zero: style (the delta is zero anyway)
    assert plan.subject_only == ("input_blocks.8.1.transformer_blocks.0.attn1.to_k",)
    assert plan.style_only == ("output_blocks.0.1.transformer_blocks.0.attn1.to_k",)
    # zero-delta layers are left out of gamma
    rest = [item for item in layers if item[0] not in (a, b, c)]
    assert plan.gamma == pytest.approx(official_gamma([(cc, ss) for _, cc, ss in rest]), rel=1e-6)


def test_shape_mismatch_and_unknown_pattern_are_named():
    path = "output_blocks.1.1.transformer_blocks.0.attn2.to_k"
    with pytest.raises(BLoRAError, match="attn2.to_k.*subject.*style"):
        plan_fusion({path: torch.ones(8, 4)}, {path: torch.ones(8, 6)}, {}, "s")
    with pytest.raises(BLoRAError, match="pattern 'x'"):
        plan_fusion({}, {}, {}, "x")
