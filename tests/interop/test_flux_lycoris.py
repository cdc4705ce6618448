"""LyCORIS (lycoris-lora) on FLUX.1: LoRA, LoHa and LoKr networks built by LyCORIS on a tiny diffusers
FluxTransformer2DModel (diffusers names: SimpleTuner's ``lycoris_transformer_blocks_0_attn_to_q``) and on Linears
with the host's names and fused shapes (sd-scripts' ``lora_unet_double_blocks_0_img_attn_qkv``) read in the pack with
the deltas LyCORIS's own forward gives (split parts as rows of the fused layer); the pack's ``lycoris`` file of the
host-named network loads back in LyCORIS (``create_lycoris_from_weights``) with the same deltas."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")

from safetensors.torch import load_file  # noqa: E402

from blora.adapters.adapter import delta_weight  # noqa: E402
from blora.arch import flux  # noqa: E402
from blora.formats.files import read_adapter, write_adapter  # noqa: E402
from blora_testkit.flux_dialects import flux_shapes  # noqa: E402
from blora_testkit.flux_interop import HIDDEN, tiny_transformer  # noqa: E402
from blora_testkit.interop import forward_delta, randomize_, view  # noqa: E402

RANK, ALPHA = 4, 2.0
CASES = {"lora": dict(algo="lora"), "loha": dict(algo="loha"), "lokr": dict(algo="lokr", factor=4),
         "lokr-full": dict(algo="lokr", factor=4, full_matrix=True)}


def _diffusers_linears():
    model = tiny_transformer()
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and flux.diffusers_to_host(n) is not None and "blocks" in n}


def _host_linears(seed=0):
    torch.manual_seed(seed)
    return {p: nn.Linear(i, o, dtype=torch.float64) for p, (o, i) in flux_shapes(HIDDEN, double=1, single=1).items()}


def _network(linears, prefix, case, seed):
    from lycoris import LycorisNetwork, create_lycoris

    base = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in linears.items()}
    old = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        net = create_lycoris(view(linears), 1.0, linear_dim=RANK, linear_alpha=ALPHA, preset="full", **CASES[case])
    finally:
        LycorisNetwork.LORA_PREFIX = old
    net.apply_to()
    randomize_(net, seed)
    return net, base


def _rows(adapter, name):
    path, piece = flux.diffusers_to_host(name)
    d = delta_weight(adapter.modules[path]).double()
    a, b = piece.rows(d.shape[1]) if piece else (0, d.shape[0])
    return d[a:b]


def _close(got, want, what):
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"{what}: {err}"


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_on_diffusers_flux_reads_as_fused_rows(tmp_path, case):
    linears = _diffusers_linears()
    net, base = _network(linears, "lycoris", case, seed=1)
    path = tmp_path / f"{case}.safetensors"
    net.save_weights(str(path), None, {})
    assert any(k.startswith("lycoris_single_transformer_blocks_0_attn_to_q.") for k in load_file(str(path)))
    adapter = read_adapter(path)
    assert adapter.unmapped == () and adapter.architecture.name == "flux"
    for name, module in linears.items():
        _close(_rows(adapter, name), forward_delta(module, *base[name]), f"{case} {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_on_host_names_reads_and_the_packs_file_loads_back(tmp_path, case):
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    linears = _host_linears()
    net, base = _network(linears, "lora_unet", case, seed=2)
    source = tmp_path / "src.safetensors"
    net.save_weights(str(source), None, {})
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in load_file(str(source)))
    adapter = read_adapter(source)
    for name, module in linears.items():
        _close(delta_weight(adapter.modules[name]).double(), forward_delta(module, *base[name]), f"{case} {name}")
    written = write_adapter(adapter, tmp_path, "to_lycoris", dialect="lycoris")
    fresh = _host_linears()
    old = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        net2, _ = create_lycoris_from_weights(1.0, None, view(fresh), weights_sd=load_file(str(written)))
    finally:
        LycorisNetwork.LORA_PREFIX = old
    net2.apply_to()
    assert len(net2.loras) == len(fresh)
    for name, module in fresh.items():
        w, b = module.weight.detach().clone(), module.bias.detach().clone()
        _close(forward_delta(module, w, b), delta_weight(adapter.modules[name]).double(), f"{case} {name} back")
