"""The pack's SDXL module map against the host's own: comfy.utils.unet_to_diffusers and the LoRA key map ComfyUI
builds for a real (tiny) SDXL-architecture model."""
import pytest

from blora.arch import sdxl as unet_map
from blora.formats.keys import resolve_module

FULL_SDXL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}


def _modules(weight_keys):
    return {k[: -len(".weight")] for k in weight_keys if k.endswith(".weight")}


@pytest.fixture(scope="module")
def tiny_weights(comfy_host):
    from blora_testkit.tiny_sdxl import tiny_sdxl_model

    model = tiny_sdxl_model(seed=0).model
    return model, {k[len("diffusion_model."):]: v.shape for k, v in model.state_dict().items()
                   if k.startswith("diffusion_model.")}


def test_every_module_of_the_real_model_is_in_the_map(tiny_weights):
    _, weights = tiny_weights
    modules = _modules(weights)
    assert modules and all(unet_map.is_sdxl_module(m) for m in modules), sorted(
        m for m in modules if not unet_map.is_sdxl_module(m))[:5]
    # and the map has nothing the model lacks, beyond the deeper transformer stacks of full SDXL
    extra = {m for _, m in unet_map.UNET_MODULES} - modules
    assert all(".transformer_blocks." in m and ".transformer_blocks.0." not in m for m in extra)


def test_map_equals_comfy_unet_to_diffusers_on_existing_modules(comfy_host, tiny_weights):
    import comfy.utils

    from blora_testkit.tiny_sdxl import TINY_UNET_CONFIG

    _, weights = tiny_weights
    present = _modules(weights)
    mine = {ldm for _, ldm in unet_map.UNET_MODULES}
    for config, expected in ((FULL_SDXL, mine), (TINY_UNET_CONFIG, present)):
        host = {d[: -len(".weight")]: ldm[: -len(".weight")]
                for d, ldm in comfy.utils.unet_to_diffusers(config).items() if d.endswith(".weight")}
        checked = set()
        for diffusers, ldm in host.items():
            if not unet_map.is_sdxl_module(ldm):
                # the host's map also names modules SDXL does not have (skip convs, a third downsampler)
                assert ldm not in present
                continue
            assert unet_map.diffusers_to_ldm(diffusers) == ldm, diffusers
            checked.add(ldm)
        assert expected <= checked


def test_kohya_names_resolve_like_the_host_key_map(comfy_host, tiny_weights):
    import comfy.lora

    model, _ = tiny_weights
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    present = set(model.state_dict())  # the host's map also points at weights the model does not have
    kohya = {k: v for k, v in key_map.items() if k.startswith("lora_unet_") and v in present}
    assert len(kohya) > 500
    for name, weight_key in kohya.items():
        target = weight_key[len("diffusion_model."):-len(".weight")]
        assert resolve_module(name) == ("unet", target), name


def test_text_encoder_kohya_names_resolve_like_the_host(comfy_host):
    import comfy.lora

    for te, layers in (("te1", 12), ("te2", 32)):
        for b in range(layers):
            for dotted, kohya in comfy.lora.LORA_CLIP_MAP.items():
                name = f"lora_{te}_text_model_encoder_layers_{b}_{kohya}"
                assert resolve_module(name) == (te, f"text_model.encoder.layers.{b}.{dotted}"), name
    assert resolve_module("lora_te1_text_model_encoder_layers_12_mlp_fc1") is None  # CLIP-L has 12 layers
