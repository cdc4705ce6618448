"""PEFT on a tiny SDXL-layout diffusers UNet: ``save_pretrained`` folders (LoRA, DoRA, rsLoRA, rank and alpha
patterns) read in the pack with the deltas PEFT's own forward gives; the pack's ``peft`` files load back through
PEFT's ``inject_adapter_in_model`` + ``set_peft_model_state_dict`` with the same deltas."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from blora.formats.files import read_adapter, write_adapter  # noqa: E402
from blora_testkit.interop import (TARGETS, assert_same_deltas, library_deltas, pack_deltas, randomize_,  # noqa: E402
                                   snapshot, tiny_unet)

STYLE_K = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"
CONTENT_Q = "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q"
CASES = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={STYLE_K: 2, CONTENT_Q: 8}, alpha_pattern={STYLE_K: 6}),
}


def _config(**options):
    from peft import LoraConfig

    return LoraConfig(target_modules=list(TARGETS), init_lora_weights="gaussian", **options)


def _peft_modules(unet, base):
    return {n: unet.get_submodule(n) for n in base}


def _trained(case: str, seed: int):
    """get_peft_model on a fresh tiny UNet (attention projections), adapters filled with seeded noise."""
    from peft import get_peft_model

    unet = tiny_unet(seed=0)
    base = snapshot(unet)
    model = get_peft_model(unet, _config(**CASES[case]))
    randomize_(model, seed)
    return model, unet, base


@pytest.mark.parametrize("case", list(CASES))
def test_save_pretrained_reads_with_peft_forward_deltas(tmp_path, case):
    model, unet, base = _trained(case, seed=1)
    model.save_pretrained(str(tmp_path / case))
    expected = library_deltas(_peft_modules(unet, base), base)
    adapter = read_adapter(tmp_path / case / "adapter_model.safetensors")
    assert adapter.dialect == "peft" and adapter.unmapped == ()
    if case == "dora":
        assert {m.dora_norm for m in adapter.modules.values()} == {"adapted"}
    if case == "patterns":
        assert {m.rank for p, m in adapter.modules.items()} == {2, 4, 8}
    assert_same_deltas(pack_deltas(adapter, base), expected, what=case, base=base if case == "dora" else None)


def _config_for(adapter) -> dict:
    """The LoraConfig a PEFT user writes for a pack peft file: alpha is folded into lora_B (scale 1), so
    lora_alpha = r per module; ranks from the tensors; DoRA when the file holds magnitudes."""
    from blora.arch.sdxl import ldm_to_diffusers

    ranks = {ldm_to_diffusers(p): m.rank for p, m in adapter.modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {n: k for n, k in ranks.items() if k != r}
    return dict(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=pattern,
                use_dora=any(m.dora_scale is not None for m in adapter.modules.values()))


@pytest.mark.parametrize("case", list(CASES))
def test_pack_peft_files_load_back_in_peft(tmp_path, case):
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    model, unet, base = _trained(case, seed=2)
    model.save_pretrained(str(tmp_path / "src"))
    adapter = read_adapter(tmp_path / "src" / "adapter_model.safetensors")
    written = write_adapter(adapter, tmp_path, "to_peft", dialect="peft")
    state = {k.removeprefix("unet."): v for k, v in load_file(str(written)).items()}
    unet2 = tiny_unet(seed=0)
    base2 = snapshot(unet2)
    inject_adapter_in_model(_config(**_config_for(adapter)), unet2)
    result = set_peft_model_state_dict(unet2, state)
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    assert not [k for k in result.missing_keys if "lora_" in k], "PEFT left adapter weights unset"
    assert_same_deltas(library_deltas(_peft_modules(unet2, base2), base2), pack_deltas(adapter, base),
                       what=f"{case} -> peft -> PEFT", base=base if case == "dora" else None)
