"""diffusers on a tiny SDXL-layout UNet: files from ``save_lora_weights`` (with and without the adapter metadata that
holds lora_alpha; the original B-LoRA training script's ``lora.down``/``lora.up`` keys) read in the pack with the
deltas diffusers' forward gives; the pack's files load back through diffusers' own SDXL LoRA loader
(``StableDiffusionXLPipeline.lora_state_dict`` + ``load_lora_into_unet``, the two steps of ``load_lora_weights``)
with the same deltas."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from blora.formats.files import read_adapter, write_adapter  # noqa: E402
from blora_testkit.interop import (TARGETS, assert_same_deltas, library_deltas, pack_deltas, randomize_,  # noqa: E402
                                   snapshot, tiny_unet)

RANK = 4
WEIGHTS = "pytorch_lora_weights.safetensors"


def _trained(alpha: float, seed: int, dora: bool = False):
    """A tiny UNet with a PEFT LoRA added the way diffusers' training scripts add it, filled with seeded noise."""
    from peft import LoraConfig

    unet = tiny_unet(seed=0)
    base = snapshot(unet)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(TARGETS),
                                use_dora=dora))
    randomize_(unet, seed)
    return unet, base


def _forward(unet, base):
    return library_deltas({n: unet.get_submodule(n) for n in base}, base)


def _save(unet, folder, form: str):
    """save_lora_weights as the training scripts call it. form: "metadata" (diffusers >= 0.34 scripts: PEFT keys
    and the adapter config), "plain" (PEFT keys, no config), "original" (the B-LoRA script: keys converted to
    diffusers' lora.down/lora.up, no config)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(unet)
    extra = {}
    if form == "original":
        layers = convert_state_dict_to_diffusers(layers)
    if form == "metadata":
        extra["unet_lora_adapter_metadata"] = unet.peft_config["default"].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True,
                                                **extra)
    return folder / WEIGHTS


def _load_in_diffusers(path):
    """A fresh tiny UNet with the file loaded by diffusers' SDXL loader (what load_lora_weights runs for the UNet)."""
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_unet(seed=0)
    base = snapshot(unet)
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet.config,
                                                                        return_lora_metadata=True)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="pack", metadata=metadata)
    return unet, base


@pytest.mark.parametrize("form,alpha", [("metadata", 8.0), ("original", float(RANK)), ("plain", float(RANK))])
def test_save_lora_weights_reads_with_diffusers_forward_deltas(tmp_path, form, alpha):
    unet, base = _trained(alpha, seed=1)
    path = _save(unet, tmp_path, form)
    adapter = read_adapter(path)
    assert adapter.dialect == ("diffusers" if form == "original" else "peft") and adapter.unmapped == ()
    assert_same_deltas(pack_deltas(adapter, base), _forward(unet, base), what=form)


def test_without_metadata_alpha_is_lost_in_diffusers_too_and_the_pack_reads_what_diffusers_loads(tmp_path):
    """Trained at lora_alpha 8, rank 4, saved without the adapter config: the file holds no alpha. diffusers then
    loads it at scale 1 (alpha = r), and so does the pack; neither can know the trained scale 2."""
    unet, base = _trained(8.0, seed=1)
    path = _save(unet, tmp_path, "plain")
    loaded, base2 = _load_in_diffusers(path)
    diffusers_view = _forward(loaded, base2)
    assert_same_deltas(pack_deltas(read_adapter(path), base), diffusers_view, what="no metadata")
    trained = _forward(unet, base)
    assert_same_deltas({n: 2 * d for n, d in diffusers_view.items()}, trained, what="scale 2 lost")


# Dialects diffusers' SDXL loader reads (PEFT and diffusers keys; kohya keys through its kohya converter).
LOADS = ("diffusers", "peft", "kohya", "kohya_diffusers")


@pytest.mark.parametrize("target", LOADS)
@pytest.mark.parametrize("form,alpha", [("metadata", 8.0), ("original", float(RANK))])
def test_pack_writes_load_back_in_diffusers(tmp_path, target, form, alpha):
    unet, base = _trained(alpha, seed=2)
    adapter = read_adapter(_save(unet, tmp_path, form))
    written = write_adapter(adapter, tmp_path / "out", f"to_{target}", dialect=target)
    loaded, base2 = _load_in_diffusers(written)
    assert_same_deltas(_forward(loaded, base2), pack_deltas(adapter, base), what=f"{form} -> {target} -> diffusers")


def test_dora_from_diffusers_reads_and_loads_back_exactly(tmp_path):
    """A DoRA LoRA saved by diffusers (PEFT magnitudes): read with PEFT's rendering, written as peft, loaded back by
    diffusers (which takes use_dora from the lora_magnitude_vector keys): same weights."""
    unet, base = _trained(8.0, seed=4, dora=True)
    adapter = read_adapter(_save(unet, tmp_path, "metadata"))
    assert {m.dora_norm for m in adapter.modules.values()} == {"adapted"}
    assert_same_deltas(pack_deltas(adapter, base), _forward(unet, base), what="dora", base=base)
    loaded, base2 = _load_in_diffusers(write_adapter(adapter, tmp_path / "out", "to_peft", dialect="peft"))
    assert_same_deltas(_forward(loaded, base2), pack_deltas(adapter, base), what="dora -> peft -> diffusers", base=base)
