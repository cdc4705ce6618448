"""Files written by ``blora.write_adapter`` load in the stock host (LoraLoaderModelOnly's path) with every key used
and exactly the weight delta the core computes."""
import pytest
import torch

from blora.adapters.adapter import Adapter, ModuleAdapter, delta_weight
from blora.formats.files import read_adapter, write_adapter
from blora.formats.keys import to_canonical
from blora_testkit.dialects import TINY_ATTN_SHAPES, make_state_dict

RESNET_CONV = "output_blocks.1.0.in_layers.2"  # a 3x3 conv outside the attention blocks


def _full_lokr(shapes, alpha: float) -> dict:
    """LyCORIS LoKr with both factors full (lokr_w1, lokr_w2) and a .alpha, which LyCORIS and ComfyUI ignore."""
    gen = torch.Generator().manual_seed(7)
    sd = {}
    for path, (o, i) in shapes.items():
        name = "lora_unet_" + path.replace(".", "_")
        sd[name + ".lokr_w1"] = torch.randn(4, 4, generator=gen)
        sd[name + ".lokr_w2"] = torch.randn(o // 4, i // 4, generator=gen) * 0.1
        sd[name + ".alpha"] = torch.tensor(alpha)
    return sd


def _adapter(kind):
    if kind == "lokr_full":
        a = to_canonical(_full_lokr(TINY_ATTN_SHAPES, alpha=8.0))
    else:
        a = to_canonical(make_state_dict("kohya", TINY_ATTN_SHAPES, rank=4, seed=5, alpha=2.0, kind=kind))
    gen = torch.Generator().manual_seed(1)
    conv = ModuleAdapter("lora", {"down": torch.randn(2, 256, 3, 3, generator=gen) * 0.01,
                                  "up": torch.randn(128, 2, 1, 1, generator=gen)}, alpha=1.0)
    return Adapter(modules={**a.modules, RESNET_CONV: conv}, source="test")


@pytest.mark.parametrize("dialect", ["kohya", "comfy", "kohya_diffusers"])
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "lokr_full"])
def test_stock_loader_applies_every_module_exactly(tiny_model, tmp_path, caplog, dialect, kind):
    import comfy.sd
    import comfy.utils

    adapter = _adapter(kind)
    path = write_adapter(adapter, tmp_path, "x", dialect=dialect)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    base = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    with caplog.at_level("WARNING"):
        patched, _ = comfy.sd.load_lora_for_models(tiny_model, None, lora, 0.7, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    patched.patch_model()
    try:
        weights = patched.model.state_dict()
        written = read_adapter(path)
        assert set(written.modules) == set(adapter.modules)
        for module_path, module in written.modules.items():
            key = f"diffusion_model.{module_path}.weight"
            expected = base[key] + 0.7 * delta_weight(module).reshape(base[key].shape)
            assert torch.allclose(weights[key], expected, rtol=1e-5, atol=1e-6), module_path
    finally:
        patched.unpatch_model()
    assert torch.equal(tiny_model.model.state_dict()[f"diffusion_model.{RESNET_CONV}.weight"],
                       base[f"diffusion_model.{RESNET_CONV}.weight"])
