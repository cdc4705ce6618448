"""Training algorithms: LyCORIS's LoKr/LoHa layout and initialisation, DoRA on any kind, exports that render the
trained delta, AdaLoRA's budget schedule, importance scores, masking and per-module-rank export."""
import math

import pytest
import torch

from blora.train.adalora import BudgetSchedule, RankAllocator, TrainableSVD, budget_schedule
from blora.adapters.adapter import delta_weight
from blora.train.algorithms import REGISTRY, export, new_adapters, rank_allocator
from blora.errors import BLoRAError
from blora.adapters.kinds.loha import TrainableLoHa
from blora.adapters.kinds.lokr import TrainableLoKr, factorization
from blora.train.recipe import ALGORITHMS, TrainConfig, param_groups


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dimension, factor, split", [
    (128, -1, (8, 16)), (640, -1, (20, 32)), (1280, -1, (32, 40)), (2048, -1, (32, 64)), (127, -1, (1, 127)),
    (1280, 4, (4, 320)), (1280, 16, (16, 80)), (250, 8, (5, 50)), (360, 16, (15, 24))])
def test_lokr_factorization_is_lycoris(dimension, factor, split):
    """Examples from LyCORIS's docstring and SDXL's sizes. 360 with factor 16: the docstring says (12, 30), LyCORIS's
    code (which decides the files) gives (15, 24)."""
    assert factorization(dimension, factor) == split


@pytest.mark.parametrize("rank, options, shapes, scale", [
    (4, {}, {"w1": (8, 8), "w2a": (16, 4), "w2b": (4, 8)}, 0.5),
    (2, {"decompose_both": True}, {"w1a": (8, 2), "w1b": (2, 8), "w2a": (16, 2), "w2b": (2, 8)}, 1.0),
    (4, {"decompose_both": True}, {"w1": (8, 8), "w2a": (16, 4), "w2b": (4, 8)}, 0.5),  # 4 is not < 8/2
    (8, {}, {"w1": (8, 8), "w2": (16, 8)}, 1.0),  # rank >= max(16, 8)/2: full w2, both full: scale 1
    (4, {"full_matrix": True}, {"w1": (8, 8), "w2": (16, 8)}, 1.0),
    (4, {"factor": 4}, {"w1": (4, 4), "w2a": (32, 4), "w2b": (4, 16)}, 0.5),
])
def test_lokr_layout_follows_lycoris_and_starts_at_zero(rank, options, shapes, scale):
    weight = torch.randn(128, 64)
    a = TrainableLoKr.create(weight, rank, 2.0 / rank, False, gen(), **options)
    assert {n: tuple(t.shape) for n, t in a.tensors().items()} == shapes
    assert a.scale == pytest.approx(scale)
    assert torch.equal(a.delta(), torch.zeros(128, 64)) and torch.equal(a(weight), weight)
    bound = {n: 1 / math.sqrt(t.shape[1]) for n, t in a.tensors().items() if n in ("w1", "w1a", "w1b", "w2a")}
    assert all(0 < float(getattr(a, n).detach().abs().max()) <= b for n, b in bound.items())  # kaiming-uniform(a=sqrt(5))


def test_loha_init_is_lycoris():
    a = TrainableLoHa.create(torch.randn(256, 512), 32, 1.0, False, gen())
    assert {n: tuple(t.shape) for n, t in a.tensors().items()} == {"w1a": (256, 32), "w1b": (32, 512),
                                                                     "w2a": (256, 32), "w2b": (32, 512)}
    std = {n: float(t.detach().std()) for n, t in a.tensors().items()}
    assert std["w1a"] == pytest.approx(0.1, rel=0.05) and std["w1b"] == pytest.approx(1.0, rel=0.05)
    assert std["w2b"] == pytest.approx(1.0, rel=0.05) and torch.equal(a.w2a, torch.zeros(256, 32))
    assert torch.equal(a.delta(), torch.zeros(256, 512))


def _perturbed(algorithm: str, **options):
    config = TrainConfig(rank=4, alpha=3.0, algorithm=algorithm, **options)
    weights = {"output_blocks.1.1.transformer_blocks.0.attn1.to_q": torch.randn(128, 64, generator=gen(1)),
               "output_blocks.0.1.transformer_blocks.0.attn2.to_k": torch.randn(64, 32, generator=gen(2))}
    adapters = new_adapters(weights, config)
    with torch.no_grad():
        for a in adapters.values():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=gen(3)) * 0.1)
    return config, weights, adapters


@pytest.mark.parametrize("algorithm, options", [("LoRA", {}), ("DoRA", {}), ("LoKr", {}), ("LoHa", {}),
                                                ("LoKr", {"dora_wd": True, "lokr_decompose_both": True}),
                                                ("LoHa", {"dora_wd": True}), ("AdaLoRA", {"adalora_target_rank": 2})])
def test_export_renders_the_trained_weight_and_resumes_exactly(algorithm, options):
    config, weights, adapters = _perturbed(algorithm, **options)
    modules = export(adapters, torch.float32)
    for path, module in modules.items():
        a, w = adapters[path], weights[path]
        assert module.kind == REGISTRY[algorithm].kind
        assert torch.allclose(delta_weight(module), a.delta(), atol=1e-6)
        assert (module.dora_scale is not None) == (algorithm == "DoRA" or options.get("dora_wd", False))
        resumed = REGISTRY[algorithm].resumed(module)
        assert torch.allclose(resumed(w), a(w), atol=1e-6)


def test_dora_on_lokr_and_loha_starts_at_the_weight_and_is_the_input_axis_form():
    w = torch.randn(128, 64, generator=gen(4))
    for a in (TrainableLoKr.create(w, 4, 1.0, True, gen()), TrainableLoHa.create(w, 4, 1.0, True, gen())):
        assert tuple(a.magnitude.shape) == (1, 64) and torch.allclose(a(w), w, atol=1e-5)


def test_loraplus_speeds_up_the_factor_that_starts_at_zero():
    for algorithm, fast in (("LoRA", {"up"}), ("LoHa", {"w2a"}), ("LoKr", {"w2b", "w2"}), ("AdaLoRA", {"up"})):
        config, _, adapters = _perturbed(algorithm, loraplus_ratio=16.0)
        groups = param_groups(adapters, config)
        names = {id(p): n for a in adapters.values() for n, p in a.named_parameters()}
        assert {names[id(p)] for p in groups[1]["params"]} == fast and groups[1]["lr"] == 16 * groups[0]["lr"]
    assert tuple(REGISTRY) == ALGORITHMS


def test_settings_of_one_algorithm_are_checked():
    with pytest.raises(BLoRAError, match="`dora_wd` applies to LoKr and LoHa"):
        TrainConfig(algorithm="LoRA", dora_wd=True)
    with pytest.raises(BLoRAError, match=r"`adalora_target_rank` should be between 1 and rank \(8\).*got 16"):
        TrainConfig(algorithm="AdaLoRA", rank=8, adalora_target_rank=16)
    assert TrainConfig(algorithm="AdaLoRA", rank=8).adalora_target == 4
    with pytest.raises(BLoRAError, match="adding up to less than 1"):
        TrainConfig(algorithm="AdaLoRA", adalora_warmup=0.5, adalora_final=0.5)


# ---------------------------------------------------------------- AdaLoRA

def test_budget_holds_then_falls_as_a_cubic_then_holds_at_the_target():
    s = BudgetSchedule(initial=100, target=40, steps=20, warmup=4, final=6, interval=3)
    assert [s.at(t).total for t in (1, 4)] == [100, 100] and not s.at(4).mask
    for t in range(5, 15):
        assert s.at(t).total == int(60 * (1 - (t - 4) / 10) ** 3 + 40) and s.at(t).mask == (t % 3 == 0)
    assert all(s.at(t).total == 40 and s.at(t).mask for t in range(15, 21))
    assert budget_schedule(64, 16, 8, 100, 0.1, 0.2, 10) == BudgetSchedule(64, 64, 100, 10, 20, 10)  # never above


def test_allocator_keeps_the_most_important_triplets_and_export_has_a_rank_per_module():
    """Module a's triplets get large gradients, module b's small ones: the budget moves to a."""
    adapters = {name: TrainableSVD.create(torch.zeros(6, 5), 4, 0.5, gen(i)) for i, name in enumerate("ab")}
    for a in adapters.values():
        with torch.no_grad():
            a.singular.fill_(1.0)
    allocator = RankAllocator(adapters, BudgetSchedule(8, 4, 1, 0, 1, 1), orth_reg=0.0)
    for name, a in adapters.items():
        size = 10.0 if name == "a" else 0.01
        for p in a.parameters():
            p.grad = torch.full_like(p, size) * torch.arange(1, p.shape[-1] + 1 if p is a.up else 2).float() \
                if p is a.up else torch.full_like(p, size)
    assert allocator.update(1).total == 4
    assert allocator.ranks() == {"a": 4, "b": 0}
    modules = export(adapters, torch.float32)
    assert list(modules) == ["a"] and modules["a"].rank == 4 and modules["a"].alpha == pytest.approx(0.5 * 4)
    for a in adapters.values():
        with torch.no_grad():
            a.singular.zero_()
    with pytest.raises(BLoRAError, match="pruned to rank 0"):
        export(adapters, torch.float32)


def test_orthogonality_regulariser_is_zero_for_orthonormal_factors_and_weights_the_mean():
    q = torch.linalg.qr(torch.randn(8, 3, generator=gen()))[0]
    a = TrainableSVD({"down": q.T, "up": q, "singular": torch.ones(3, 1)}, 1.0)
    b = TrainableSVD({"down": 2 * q.T, "up": q, "singular": torch.ones(3, 1)}, 1.0)
    allocator = RankAllocator({"a": a, "b": b}, BudgetSchedule(6, 3, 10, 0, 0, 1), orth_reg=0.5)
    assert float(a.orthogonality().detach()) == pytest.approx(0.0, abs=1e-5)
    assert float(allocator.regulariser().detach()) == pytest.approx(0.5 * float(torch.linalg.matrix_norm(3 * torch.eye(3))) / 4,
                                                             rel=1e-4)


def test_rank_allocator_only_for_adalora():
    _, _, adapters = _perturbed("LoRA")
    assert rank_allocator(adapters, TrainConfig(rank=4, alpha=3.0)) is None
    config, _, adapters = _perturbed("AdaLoRA", adalora_target_rank=2, steps=10)
    allocator = rank_allocator(adapters, config)
    assert (allocator.schedule.initial, allocator.schedule.target) == (8, 4)


def _trained(a):
    """``a`` with every parameter random (a fresh adapter's delta is zero)."""
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(7)))
    return a


ACTIVATION_CASES = {
    "LoRA": lambda w: REGISTRY["LoRA"].fresh(w, TrainConfig(rank=4, alpha=2.0), gen()),
    "AdaLoRA": lambda w: REGISTRY["AdaLoRA"].fresh(w, TrainConfig(rank=4, alpha=2.0, algorithm="AdaLoRA"), gen()),
    "LoKr": lambda w: TrainableLoKr.create(w, 2, 0.5, False, gen()),
    "LoKr decompose_both": lambda w: TrainableLoKr.create(w, 2, 0.5, False, gen(), decompose_both=True),
    "LoKr full": lambda w: TrainableLoKr.create(w, 2, 0.5, False, gen(), full_matrix=True),
}


@pytest.mark.parametrize("case", ACTIVATION_CASES)
@pytest.mark.parametrize("multiplier", [1.0, 0.25])
def test_factored_kinds_add_on_the_activations_what_their_weight_function_adds(case, multiplier):
    """Training on the activations is the weight function's layer: x·W'ᵀ = x·Wᵀ + output_delta(x), for every
    factored kind, at any multiplier; gradients reach the same parameters with the same values."""
    weight, x = torch.randn(48, 40, generator=gen(1)), torch.randn(2, 5, 40, generator=gen(2))
    a = _trained(ACTIVATION_CASES[case](weight))
    a.multiplier = multiplier
    assert a.on_activations
    merged = x @ a(weight).T
    added = x @ weight.T + a.output_delta(x)
    torch.testing.assert_close(added, merged, rtol=1e-5, atol=1e-4)
    grads = []
    for out in (merged, added):
        a.zero_grad()
        (out * torch.randn(out.shape, generator=gen(3))).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in a.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm, options", [("DoRA", {}), ("LoHa", {}), ("LoKr", {"dora_wd": True})])
def test_dora_and_loha_stay_weight_functions_and_multiplier_scales_their_change(algorithm, options):
    weight = torch.randn(48, 40, generator=gen(1))
    a = _trained(REGISTRY[algorithm].fresh(weight, TrainConfig(rank=4, algorithm=algorithm, **options), gen()))
    assert not a.on_activations
    full = a(weight)
    a.multiplier = 0.0
    assert torch.equal(a(weight), weight)
    a.multiplier = 0.5
    torch.testing.assert_close(a(weight), weight + 0.5 * (full - weight), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, weight, atol=1e-3)


def test_dora_norm_is_computed_once_per_step_and_follows_every_update():
    """The column norm is reused between optimizer steps (a checkpoint recomputation, another micro-batch) and
    recomputed after one; the layer is always exactly the uncached DoRA weight."""
    weight = torch.randn(24, 16, generator=gen(1))
    a = _trained(REGISTRY["DoRA"].fresh(weight, TrainConfig(rank=4, algorithm="DoRA"), gen()))
    calls = []
    import blora.adapters.trainable as trainable

    def counted(w):
        calls.append(1)
        return torch.linalg.vector_norm(w.float(), dim=0, keepdim=True)

    original, trainable.column_norm = trainable.column_norm, counted
    try:
        optimizer = torch.optim.SGD(a.parameters(), lr=0.1)
        for _ in range(2):
            first, again = a(weight), a(weight)
            assert torch.equal(first, again)
            merged = weight + a.delta()
            torch.testing.assert_close(first, merged * (a.magnitude / (merged.norm(dim=0, keepdim=True) + 1.2e-7)),
                                       rtol=1e-6, atol=1e-6)
            first.sum().backward()
            optimizer.step()
        assert len(calls) == 2
    finally:
        trainable.column_norm = original
