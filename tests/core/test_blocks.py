"""The SDXL block registry: names, index rule, roles and LBW slots (facts from the reference)."""
import pytest

from blora.arch.sdxl import LBW_SLOTS, ROLES, SDXL_BLOCKS, block_of, resolve_block, down_to_ldm, up_to_ldm
from blora.errors import BlockNameError


def test_roles_are_the_paper_blocks():
    assert resolve_block("content").ldm == "output_blocks.0.1"
    assert resolve_block("style").ldm == "output_blocks.1.1"
    assert resolve_block("layout").ldm == "input_blocks.8.1"
    assert resolve_block("content").diffusers == "up_blocks.0.attentions.0"
    assert resolve_block("style").diffusers == "up_blocks.0.attentions.1"
    assert resolve_block("layout").diffusers == "down_blocks.2.attentions.1"
    assert ROLES == {"content": "output_blocks.0.1", "style": "output_blocks.1.1", "layout": "input_blocks.8.1"}


@pytest.mark.parametrize("x,i,ldm", [(1, 0, "input_blocks.4.1"), (1, 1, "input_blocks.5.1"),
                                     (2, 0, "input_blocks.7.1"), (2, 1, "input_blocks.8.1")])
def test_down_index_rule(x, i, ldm):
    assert down_to_ldm(x, i) == ldm


@pytest.mark.parametrize("x,i,ldm", [(0, 0, "output_blocks.0.1"), (0, 2, "output_blocks.2.1"),
                                     (1, 0, "output_blocks.3.1"), (1, 2, "output_blocks.5.1")])
def test_up_index_rule(x, i, ldm):
    assert up_to_ldm(x, i) == ldm


def test_eleven_blocks_in_lbw_order_with_widths():
    assert len(SDXL_BLOCKS) == 11
    assert tuple(b.slot for b in SDXL_BLOCKS) == LBW_SLOTS[1:]
    assert {b.slot: b.width for b in SDXL_BLOCKS}["IN05"] == 640
    assert {b.slot: b.depth for b in SDXL_BLOCKS}["MID"] == 10
    assert sum(b.depth for b in SDXL_BLOCKS) == 2 * 2 + 10 * 2 + 10 + 10 * 3 + 2 * 3


@pytest.mark.parametrize("name", ["OUT1", "out1", "style", "output_blocks.1.1", "up_blocks.0.attentions.1",
                                  "unet.up_blocks.0.attentions.1", "lora_unet_output_blocks_1_1",
                                  "lora_unet_up_blocks_0_attentions_1", "diffusion_model.output_blocks.1.1"])
def test_every_naming_resolves_to_the_style_block(name):
    assert resolve_block(name).slot == "OUT1"


def test_unknown_block_names_the_input():
    with pytest.raises(BlockNameError, match="'OUT9'"):
        resolve_block("OUT9")


def test_block_of_module_paths():
    assert block_of("output_blocks.1.1.transformer_blocks.3.attn2.to_k").role == "style"
    assert block_of("middle_block.1.proj_in").slot == "MID"
    assert block_of("output_blocks.1.0.in_layers.2") is None
    assert block_of("input_blocks.8.10.x") is None
