"""blora.train.seeds: N stacked LoRA adapters of one layer, each seed's rows through its own factors, and gradient
clipping per seed, against single-seed TrainableLoRA and torch's clip_grad_norm_ (torch only)."""
from __future__ import annotations

import pytest
import torch

from blora.errors import BLoRAError
from blora.adapters.kinds.lora import TrainableLoRA
from blora.train.seeds import SeedsLoRA, clip_per_seed, seeds_of


def singles(n=3, out_f=6, in_f=5, rank=2):
    gen = torch.Generator().manual_seed(0)
    made = []
    for _ in range(n):
        lora = TrainableLoRA(torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen), 0.5)
        made.append(lora)
    return made


def test_each_seeds_rows_get_that_seeds_delta():
    parts = singles()
    stacked = SeedsLoRA(parts)
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3 * 2, 4, 5, generator=torch.Generator().manual_seed(2))  # 3 seeds x 2 rows, 4 tokens
    y = x @ weight.T + stacked.delta(x)
    for n, single in enumerate(parts):
        rows = slice(2 * n, 2 * n + 2)
        torch.testing.assert_close(y[rows], x[rows] @ single(weight).T, rtol=1e-5, atol=1e-6)
    with pytest.raises(BLoRAError, match="not 3 seeds"):
        stacked.delta(x[:4])
    stacked.multiplier = 0.5  # what training adds on the activations scales with it
    torch.testing.assert_close(stacked.output_delta(x), 0.5 * stacked.delta(x))
    assert stacked.on_activations


def test_gradients_and_clipping_are_per_seed():
    parts = singles()
    stacked = SeedsLoRA(parts)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    (stacked.delta(x) ** 2).sum().mul(40.0).backward()
    expected = []
    for n, single in enumerate(parts):
        (((x[n:n + 1] @ single.delta().T)) ** 2).sum().mul(40.0).backward()
        torch.nn.utils.clip_grad_norm_(list(single.parameters()), 1.0)
        expected.append((single.down.grad, single.up.grad))
    norms = clip_per_seed([stacked], 1.0)
    assert norms.shape == (3,) and (norms > 1.0).all()  # every seed was clipped
    for n, (down, up) in enumerate(expected):
        torch.testing.assert_close(stacked.down.grad[n], down)
        torch.testing.assert_close(stacked.up.grad[n], up)


def test_a_seed_exports_as_its_single_adapter_and_dora_is_refused():
    parts = singles(2)
    stacked = SeedsLoRA(parts)
    for n, single in enumerate(parts):
        assert torch.equal(stacked.single(n).delta(), single.delta())
    assert seeds_of(5, 3) == [5, 6, 7]
    dora = TrainableLoRA(parts[0].down, parts[0].up, 1.0, magnitude=torch.ones(1, 5))
    with pytest.raises(BLoRAError, match="plain LoRA"):
        SeedsLoRA([dora])
