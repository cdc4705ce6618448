"""The SDXL diffusers <-> LDM module map against the facts of shared/reference/blora.md §1 (written out by hand
here, not computed with the same code)."""
import pytest

from blora.arch import sdxl as unet_map
from blora.arch.sdxl import SDXL_BLOCKS
from blora.formats.keys import resolve_module


@pytest.mark.parametrize("diffusers,ldm", [
    # the three B-LoRA blocks and the index rule
    ("up_blocks.0.attentions.0.transformer_blocks.3.attn2.to_k", "output_blocks.0.1.transformer_blocks.3.attn2.to_k"),
    ("up_blocks.0.attentions.1.transformer_blocks.9.attn1.to_out.0",
     "output_blocks.1.1.transformer_blocks.9.attn1.to_out.0"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj",
     "input_blocks.4.1.transformer_blocks.1.ff.net.0.proj"),
    ("mid_block.attentions.0.transformer_blocks.9.norm3", "middle_block.1.transformer_blocks.9.norm3"),
    ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
    # resnets with their inner renames
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.0.resnets.1.norm1", "input_blocks.2.0.in_layers.0"),
    ("down_blocks.1.resnets.0.time_emb_proj", "input_blocks.4.0.emb_layers.1"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.2.resnets.1.norm2", "input_blocks.8.0.out_layers.0"),
    ("down_blocks.2.resnets.0.conv2", "input_blocks.7.0.out_layers.3"),
    ("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.resnets.2.conv_shortcut", "output_blocks.2.0.skip_connection"),
    ("up_blocks.2.resnets.2.time_emb_proj", "output_blocks.8.0.emb_layers.1"),
    # down/up samplers
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    # the ends
    ("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"), ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
])
def test_map_matches_the_reference(diffusers, ldm):
    assert unet_map.diffusers_to_ldm(diffusers) == ldm
    assert unet_map.ldm_to_diffusers(ldm) == diffusers
    assert resolve_module("lora_unet_" + diffusers.replace(".", "_")) == ("unet", ldm)
    assert resolve_module("lora_unet_" + ldm.replace(".", "_")) == ("unet", ldm)


@pytest.mark.parametrize("diffusers", [
    "down_blocks.0.attentions.0.proj_in",           # SDXL level 0 has no attention
    "down_blocks.2.downsamplers.0.conv",            # the last level does not downsample
    "up_blocks.2.upsamplers.0.conv", "up_blocks.2.attentions.0.proj_in",
    "up_blocks.3.resnets.0.conv1",                  # SD1.5 has four levels
    "down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q",   # 640-wide blocks have depth 2
    "mid_block.attentions.0.transformer_blocks.10.attn1.to_q",
    "down_blocks.0.resnets.0.conv_shortcut",        # no width change there
])
def test_modules_sdxl_does_not_have_are_not_mapped(diffusers):
    assert unet_map.diffusers_to_ldm(diffusers) is None


def test_every_block_of_the_registry_agrees():
    for block in SDXL_BLOCKS:
        assert unet_map.diffusers_to_ldm(block.diffusers + ".proj_in") == block.ldm + ".proj_in"
        last = f"{block.diffusers}.transformer_blocks.{block.depth - 1}.attn2.to_v"
        assert unet_map.diffusers_to_ldm(last) == f"{block.ldm}.transformer_blocks.{block.depth - 1}.attn2.to_v"


def test_counts_of_the_full_unet():
    mods = [ldm for _, ldm in unet_map.UNET_MODULES]
    assert len(mods) == len(set(mods))
    # 70 transformer blocks x 13 modules + 11 x (norm, proj_in, proj_out)
    assert sum(".transformer_blocks." in m for m in mods) == 70 * 13
    assert sum(m.endswith((".proj_in", ".proj_out", ".1.norm")) for m in mods) == 33
    resnets = {m.rsplit(".", 2)[0] if "layers" in m else m.rsplit(".", 1)[0]
               for m in mods if ("_layers." in m or m.endswith("skip_connection"))}
    assert len(resnets) == 6 + 2 + 9  # input 2 per level, middle 2, output 3 per level
    assert sum(m.endswith("skip_connection") for m in mods) == 2 + 9
    attn_linear = [m for m in mods if ".attn" in m]
    assert len(attn_linear) == 70 * 8


def test_underscore_spellings_are_unambiguous():
    assert len(unet_map.KOHYA_UNET) == len(unet_map.DIFFUSERS_TO_LDM) + len(unet_map.LDM_TO_DIFFUSERS)


def test_text_encoders():
    assert len(unet_map.TE_PATHS["te1"]) == 12 * 8 + 4 and len(unet_map.TE_PATHS["te2"]) == 32 * 8 + 4
    assert unet_map.kohya_to_te("te2", "text_model_encoder_layers_31_self_attn_out_proj") == \
        "text_model.encoder.layers.31.self_attn.out_proj"
    assert unet_map.kohya_to_te("te1", "text_model_encoder_layers_12_mlp_fc1") is None
