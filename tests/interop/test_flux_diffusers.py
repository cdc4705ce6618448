"""FLUX.1 against diffusers' own FluxTransformer2DModel (tiny config, float64) and PEFT:
- a PEFT LoRA on diffusers' split layers (to_q, to_k, to_v, proj_mlp, add_*_proj ...) reads in the pack as the host's
  fused layers (img_attn.qkv, txt_attn.qkv, linear1), each part's rows equal to what PEFT's forward adds;
- a host-named (kohya) FLUX LoRA written by the pack as ``peft`` loads into diffusers (``load_lora_adapter``) and the
  whole transformer's forward equals the forward of a copy whose weights got the pack's ΔW rows by hand."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from blora.adapters.adapter import delta_weight  # noqa: E402
from blora.arch import flux  # noqa: E402
from blora.formats.keys import from_canonical, to_canonical  # noqa: E402
from blora_testkit.flux_dialects import flux_shapes, make_flux_state_dict  # noqa: E402
from blora_testkit.flux_interop import HIDDEN, forward, tiny_transformer  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
           "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
           "norm1_context.linear", "norm.linear"]


def host_path(diffusers_name: str):
    return flux.diffusers_to_host(diffusers_name)


def test_peft_lora_on_split_layers_reads_as_the_fused_rows_peft_adds():
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = tiny_transformer()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    model = inject_adapter_in_model(config, model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    sd = {"transformer." + k: v for k, v in get_peft_model_state_dict(model).items()}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 8, "transformer.r": 4})}
    adapter = to_canonical(sd, "peft_flux.safetensors", meta)
    assert adapter.unmapped == () and adapter.architecture.name == "flux"
    x = torch.randn(3, HIDDEN, dtype=torch.float64, generator=g)
    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        path, piece = host_path(name)
        delta = delta_weight(adapter.modules[path]).double()
        rows = piece.rows(delta.shape[1]) if piece else (0, delta.shape[0])
        xin = torch.randn(3, module.base_layer.in_features, dtype=torch.float64, generator=g) \
            if module.base_layer.in_features != HIDDEN else x
        with torch.no_grad():
            added = module(xin) - module.base_layer(xin)
        expected = xin @ delta[rows[0]:rows[1]].T
        assert added.shape == expected.shape, (name, added.shape, expected.shape)
        err = (added - expected).abs().max().item()
        assert err <= 1e-6 * expected.abs().max().item(), (name, err, expected.abs().max().item(), added.abs().max().item())
        checked += 1
    assert checked == 2 * 14 + 2 * 6 + 1  # 14 per double block, 6 per single block, the top-level proj_out


def test_pack_peft_file_loads_in_diffusers_with_the_hosts_deltas():
    """kohya (fused host names) -> pack -> peft (split) -> diffusers' load_lora_adapter: forward equal to the model
    whose split weights got the rows of the pack's fused ΔW."""
    base = tiny_transformer()
    shapes = flux_shapes(hidden=HIDDEN, double=2, single=2)
    sd, _ = make_flux_state_dict("kohya", shapes, rank=4, seed=3, alpha=2.0)
    sd = {k: v.double() for k, v in sd.items()}
    adapter = to_canonical(sd, "kohya_flux.safetensors")
    deltas = {p: sd[f"lora_unet_{p.replace('.', '_')}.lora_up.weight"] @ sd[f"lora_unet_{p.replace('.', '_')}.lora_down.weight"]
              * (2.0 / 4) for p in shapes}  # float64: the file's own ΔW
    peft_sd = from_canonical(adapter, "peft")
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight" in peft_sd

    with_lora = copy.deepcopy(base)
    with_lora.load_lora_adapter({k: v for k, v in peft_sd.items()}, prefix="transformer", adapter_name="blora")
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in by_hand.named_modules():
            found = host_path(name) if isinstance(module, torch.nn.Linear) else None
            if not found or found[0] not in deltas:
                continue
            path, piece = found
            delta = deltas[path].double()
            a, b = piece.rows(delta.shape[1]) if piece else (0, delta.shape[0])
            module.weight += delta[a:b]
    out_lora, out_hand, out_base = forward(with_lora), forward(by_hand), forward(base)
    assert not torch.allclose(out_lora, out_base)
    torch.testing.assert_close(out_lora, out_hand, rtol=1e-9, atol=1e-10)


def test_diffusers_own_kohya_converter_lands_every_part_where_the_pack_does():
    """diffusers' sd-scripts -> diffusers converter (FluxPipeline.lora_state_dict), at FLUX.1's real widths (hidden
    3072; it assumes them), splits a kohya FLUX file into the same parts with the same ΔW rows as the pack's reader,
    and the pack reads diffusers' converted file back to the kohya file's ΔW."""
    from diffusers import FluxPipeline

    shapes = flux_shapes(hidden=3072, double=1, single=1)
    sd, deltas = make_flux_state_dict("kohya", shapes, rank=2, seed=4, alpha=1.0)
    converted = FluxPipeline.lora_state_dict(dict(sd))
    converted = converted[0] if isinstance(converted, tuple) else converted
    names = {k[len("transformer."):-len(".lora_A.weight")] for k in converted if k.endswith(".lora_A.weight")}
    assert len(names) == 14 + 6
    for name in names:
        path, piece = flux.diffusers_to_host(name)
        a, b = piece.rows(3072) if piece else (0, deltas[path].shape[0])
        theirs = (converted[f"transformer.{name}.lora_B.weight"].float()
                  @ converted[f"transformer.{name}.lora_A.weight"].float())
        torch.testing.assert_close(theirs, deltas[path][a:b], rtol=1e-4, atol=1e-6, msg=name)
    back = to_canonical(converted, "diffusers_converted.safetensors")
    assert set(back.modules) == set(deltas)
    for path, expected in deltas.items():
        torch.testing.assert_close(delta_weight(back.modules[path]), expected, rtol=1e-4, atol=1e-6, msg=path)
