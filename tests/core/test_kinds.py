"""blora.adapters.kinds: one module per adapter kind behind one registry; Tucker/CP cores; no kind branches
elsewhere."""
import re
from pathlib import Path

import pytest
import torch

from blora.adapters.adapter import ModuleAdapter, delta_weight
from blora.formats.dialects import SUFFIXES
from blora.errors import AdapterFileError, BLoRAError
from blora.formats.keys import from_canonical, to_canonical
from blora.adapters.kinds import KINDS

CONV = "output_blocks.1.0.in_layers.2"  # a 3x3 conv of SDXL (out 1280, in 2560 at full size)
KOHYA = "lora_unet_output_blocks_1_0_in_layers_2"


def _tucker_reference(core, a, b):
    """out[p, r, k, l] = (aᵀ · core[:, :, k, l] · b)[p, r], one spatial tap at a time."""
    out = torch.empty(a.shape[1], b.shape[1], *core.shape[2:])
    for k in range(core.shape[2]):
        for l in range(core.shape[3]):
            out[:, :, k, l] = a.T @ core[:, :, k, l] @ b
    return out


def test_registry_names_every_kind_once_and_its_suffixes_are_read():
    assert list(KINDS) == ["lora", "loha", "lokr", "full"]
    read = {(suffix, kind, name) for suffix, kind, name in SUFFIXES}
    for kind in KINDS.values():
        for name, suffix in kind.suffixes((".lora_down.weight", ".lora_up.weight")).items():
            assert name in kind.allowed()
            assert (suffix, None if name == "diff_b" else kind.name, name) in read, (kind.name, suffix)


def test_unknown_kind_is_refused_naming_the_known_ones():
    with pytest.raises(BLoRAError, match=r"unknown adapter kind 'ia3' \(known: lora, loha, lokr, full\)"):
        ModuleAdapter("ia3", {})


def test_a_lycoris_tucker_loha_reads_and_its_delta_is_the_tucker_product():
    g = torch.Generator().manual_seed(0)
    r, out, inp = 3, 8, 6
    t = {"hada_t1": torch.randn(r, r, 3, 3, generator=g), "hada_w1_a": torch.randn(r, out, generator=g),
         "hada_w1_b": torch.randn(r, inp, generator=g), "hada_t2": torch.randn(r, r, 3, 3, generator=g),
         "hada_w2_a": torch.randn(r, out, generator=g), "hada_w2_b": torch.randn(r, inp, generator=g)}
    state = {f"{KOHYA}.{k}": v for k, v in t.items()} | {f"{KOHYA}.alpha": torch.tensor(1.5)}
    module = to_canonical(state).modules[CONV]
    assert module.kind == "loha" and module.rank == r and module.out_in == (out, inp)
    expected = _tucker_reference(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * \
        _tucker_reference(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]) * (1.5 / r)
    assert torch.allclose(delta_weight(module), expected, rtol=1e-5, atol=1e-5)
    again = to_canonical(from_canonical(to_canonical(state), "kohya")).modules[CONV]
    assert torch.equal(delta_weight(again), delta_weight(module))


def test_a_tucker_loha_with_a_wrong_core_names_the_key():
    g = torch.Generator().manual_seed(0)
    state = {f"{KOHYA}.hada_t1": torch.randn(3, 3, 3, 3, generator=g),
             f"{KOHYA}.hada_t2": torch.randn(2, 2, 3, 3, generator=g)}
    state |= {f"{KOHYA}.hada_w{i}_{s}": torch.randn(3, 8, generator=g) for i in (1, 2) for s in "ab"}
    with pytest.raises(AdapterFileError, match="LoHa Tucker factors .* inconsistent shapes"):
        to_canonical(state, source="bad.safetensors")


def test_lokr_tucker_w2_and_locon_mid_cores_give_the_reference_delta():
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(2, 4, generator=g)
    t2, a2, b2 = torch.randn(3, 3, 3, 3, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 6, generator=g)
    lokr = ModuleAdapter("lokr", {"w1": w1, "t2": t2, "w2a": a2, "w2b": b2}, alpha=6.0)
    w2 = _tucker_reference(t2, a2, b2)
    expected = torch.stack([torch.stack([w1[i, j] * w2 for j in range(4)], 1) for i in range(2)], 0)
    expected = expected.reshape(10, 24, 3, 3) * (6.0 / 3)  # (i, a, j, b, k, l): out i·5+a, in j·6+b
    assert torch.allclose(delta_weight(lokr), expected, rtol=1e-5, atol=1e-5)
    down, mid, up = torch.randn(2, 6, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g), \
        torch.randn(5, 2, 1, 1, generator=g)
    locon = ModuleAdapter("lora", {"down": down, "mid": mid, "up": up}, alpha=2.0)
    ref = torch.einsum("or,rskl,si->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    assert torch.allclose(delta_weight(locon), ref, rtol=1e-5, atol=1e-5)


def test_no_module_outside_blora_kinds_branches_on_a_kind_name():
    root = Path(__file__).resolve().parents[2] / "blora"
    pattern = re.compile(r"""\.kind\s*[!=]=\s*["']|["'](lora|loha|lokr|full)["']""")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "kinds" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
