"""LyCORIS (lycoris-lora) files on a tiny SDXL-layout diffusers UNet: what LyCORIS writes reads in the pack with the
deltas LyCORIS's own forward pass gives, and what the pack writes loads back in LyCORIS
(``create_lycoris_from_weights``) with the same deltas.

LyCORIS is inconsistent with itself for LoHa/LoKr: ``merge_to`` scales by alpha/dim twice, its forward once. The pack
follows the forward (what LyCORIS runs at inference, and what ComfyUI applies); a test below pins the difference."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
lycoris = pytest.importorskip("lycoris")

from safetensors.torch import load_file  # noqa: E402

from blora.formats.files import read_adapter, write_adapter  # noqa: E402
from blora_testkit.interop import (assert_same_deltas, diffusers_to_ldm, fresh_linears, library_deltas,  # noqa: E402
                                   pack_deltas, randomize_, view)

RANK, ALPHA = 4, 2.0
# name: create_lycoris options. LoKr factor 4 on widths 32..128 leaves w1 (4, 4) full and w2 factored ("one side").
CASES = {
    "lora": dict(algo="lora"),
    "loha": dict(algo="loha"),
    "lokr-one-side": dict(algo="lokr", factor=4),
    "lokr-both-sides": dict(algo="lokr", factor=4, decompose_both=True),
    "lokr-full": dict(algo="lokr", factor=4, full_matrix=True),
    "dora-output-axis": dict(algo="lora", dora_wd=True, wd_on_output=True),
    "dora-input-axis": dict(algo="lora", dora_wd=True, wd_on_output=False),
    "lokr-dora-output-axis": dict(algo="lokr", factor=4, dora_wd=True, wd_on_output=True),
    "loha-dora-input-axis": dict(algo="loha", dora_wd=True, wd_on_output=False),
}
# dialect the pack writes -> (LyCORIS key prefix, module names LyCORIS sees): kohya LDM names are what sd-scripts'
# SDXL UNet gives LyCORIS, kohya diffusers names what a diffusers UNet gives it.
TARGETS = {"lycoris": ("lora_unet", "ldm"), "kohya": ("lora_unet", "ldm"), "kohya_diffusers": ("lora_unet", "diffusers")}


def _dora(case: str, base):
    """DoRA cases are compared on the whole weight (see assert_same_deltas)."""
    return base if CASES[case].get("dora_wd") else None


def _snapshot(linears):
    return {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in linears.items()}


def _network_on(linears, naming: str):
    """The tiny UNet's attention Linears under diffusers names (LyCORIS on a diffusers UNet) or LDM names."""
    return view(linears if naming == "diffusers" else {diffusers_to_ldm(n): m for n, m in linears.items()})


def _train(case: str, seed: int, naming: str = "diffusers", prefix: str = "lycoris"):
    """A LyCORIS network of ``case`` on a fresh tiny UNet's attention Linears, with random weights, applied."""
    from lycoris import LycorisNetwork, create_lycoris

    linears = fresh_linears(seed=0)
    base = _snapshot(linears)
    old = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        net = create_lycoris(_network_on(linears, naming), 1.0, linear_dim=RANK, linear_alpha=ALPHA, preset="full",
                             **CASES[case])
    finally:
        LycorisNetwork.LORA_PREFIX = old
    net.apply_to()
    randomize_(net, seed)
    return linears, base, net


def _load_in_lycoris(path, prefix: str, naming: str):
    """Fresh copies of the tiny UNet's attention Linears (same base weights) with the file loaded by LyCORIS's own
    loader, applied."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    linears = fresh_linears(seed=0)
    base = _snapshot(linears)
    old = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        net, _ = create_lycoris_from_weights(1.0, None, _network_on(linears, naming), weights_sd=load_file(str(path)))
    finally:
        LycorisNetwork.LORA_PREFIX = old
    net.apply_to()
    return linears, base, net


# Every case under LyCORIS's own names on a diffusers UNet; a few under the kohya LDM names of sd-scripts' SDXL UNet.
READ = [(c, "diffusers", "lycoris") for c in CASES] + [(c, "ldm", "lora_unet") for c in ("lora", "lokr-full", "dora-output-axis")]
# Every case written back as lycoris; the other targets for one LoRA and one LoKr.
ROUND_TRIPS = [(c, "lycoris") for c in CASES] + [(c, t) for c in ("lora", "lokr-full") for t in ("kohya", "kohya_diffusers")]


@pytest.mark.parametrize("case,naming,prefix", READ)
def test_lycoris_files_read_with_lycoris_forward_deltas(tmp_path, case, naming, prefix):
    linears, base, net = _train(case, seed=1, naming=naming, prefix=prefix)
    path = tmp_path / f"{case}.safetensors"
    net.save_weights(str(path), None, {})
    expected = library_deltas(linears, base)
    adapter = read_adapter(path)
    assert adapter.unmapped == ()
    assert_same_deltas(pack_deltas(adapter, base), expected, what=f"{case} ({naming} names)", base=_dora(case, base))


@pytest.mark.parametrize("case,target", ROUND_TRIPS)
def test_pack_writes_load_back_in_lycoris(tmp_path, case, target):
    linears, base, net = _train(case, seed=2)
    source = tmp_path / "src.safetensors"
    net.save_weights(str(source), None, {})
    adapter = read_adapter(source)
    written = write_adapter(adapter, tmp_path, f"to_{target}", dialect=target)
    prefix, naming = TARGETS[target]
    if CASES[case].get("wd_on_output") is False:
        # LyCORIS's loader builds every DoRA module on the output axis and cannot copy a (1, in) scale in: it
        # refuses its own input-axis file as it refuses the pack's (ComfyUI and the pack read both).
        for path, pre, nam in ((source, "lycoris", "diffusers"), (written, prefix, naming)):
            with pytest.raises(RuntimeError, match="shape"):
                _load_in_lycoris(path, pre, nam)
        return
    linears2, base2, net2 = _load_in_lycoris(written, prefix, naming)
    assert len(net2.loras) == len(linears2), "LyCORIS did not load every module"
    assert_same_deltas(library_deltas(linears2, base2), pack_deltas(adapter, base),
                       what=f"{case} -> {target} -> LyCORIS", base=_dora(case, base))


@pytest.mark.parametrize("case", ["loha", "lokr-one-side"])
def test_lycoris_merge_to_scales_twice_and_the_pack_follows_its_forward(case):
    """LyCORIS's merge_to folds alpha/dim in twice for LoHa/LoKr, its forward once: with alpha/dim = 0.5 the merged
    delta is half the forward's. The pack (and ComfyUI) apply it once, as LyCORIS's inference forward does."""
    linears, base, net = _train(case, seed=3)
    forward = library_deltas(linears, base)
    net.restore()
    net.merge_to(1.0)
    merged = {n: m.weight.detach().float() - base[n][0].float() for n, m in linears.items()}
    scale = ALPHA / RANK
    assert_same_deltas({n: d / scale for n, d in merged.items()}, forward, rtol=1e-3,
                       what=f"{case} merge_to / (alpha/dim)")  # merge_to computes in float32
