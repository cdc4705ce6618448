"""DoRA over a base weight (blora.adapters.dora): the two renderings against their textbook formulas, in float64."""
import pytest
import torch

from blora.adapters.adapter import ModuleAdapter
from blora.adapters.dora import dora_weight
from blora.errors import BLoRAError


def _module(out=6, inp=5, rank=2, scale_shape=None, norm=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"down": torch.randn(rank, inp, generator=g), "up": torch.randn(out, rank, generator=g)}
    m = 1.0 + torch.rand(*scale_shape, generator=g)
    return ModuleAdapter("lora", t, alpha=1.0, dora_scale=m, dora_norm=norm), g


def test_per_output_row_normalises_the_adapted_weight():
    module, g = _module(scale_shape=(6, 1), norm="adapted")
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    adapted = w + 0.5 * module.tensors["up"].double() @ module.tensors["down"].double()  # alpha 1 / rank 2
    want = module.dora_scale.double() * adapted / adapted.norm(dim=1, keepdim=True)
    got = dora_weight(module, w)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got.double().norm(dim=1), module.dora_scale.double().flatten(), rtol=1e-6)  # rows = m
    stock = module.dora_scale.double() * adapted / w.norm(dim=1, keepdim=True)
    assert (got.double() - stock).abs().max() > 1e-3  # the host's output-axis branch is another weight


def test_per_input_column_matches_the_host_formula_with_eps():
    module, g = _module(scale_shape=(1, 5))
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    adapted = w + 0.5 * module.tensors["up"].double() @ module.tensors["down"].double()
    want = adapted * module.dora_scale.double() / (adapted.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps)
    assert torch.allclose(dora_weight(module, w).double(), want, rtol=1e-6, atol=1e-6)


def test_refuses_a_module_without_or_with_an_unplaceable_scale():
    module, g = _module(scale_shape=(6, 1))  # output-axis scale not marked 'adapted': no rendering chosen
    with pytest.raises(BLoRAError, match="neither per output row"):
        dora_weight(module, torch.zeros(6, 5))
    plain = ModuleAdapter("lora", dict(module.tensors))
    with pytest.raises(BLoRAError, match="no DoRA"):
        dora_weight(plain, torch.zeros(6, 5))
