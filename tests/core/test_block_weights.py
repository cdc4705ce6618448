"""Block-weights text and strength modes (blora.compose.block_weights)."""
import pytest

from blora.arch.sdxl import SDXL_BLOCKS
from blora.errors import BlockNameError, ScheduleError
from blora.compose.block_weights import STRENGTH_MODES, effective_strength, parse_block_weights

CONTENT_Q3 = "output_blocks.0.1.transformer_blocks.3.attn1.to_q"
CONTENT_K3 = "output_blocks.0.1.transformer_blocks.3.attn2.to_k"
CONTENT_Q1 = "output_blocks.0.1.transformer_blocks.1.attn1.to_q"
CONTENT_Q13 = "output_blocks.0.1.transformer_blocks.13.attn1.to_q"  # must not match transformer_blocks.1
STYLE_V0 = "output_blocks.1.1.transformer_blocks.0.attn2.to_v"
LAYOUT_O0 = "input_blocks.8.1.transformer_blocks.0.attn1.to_out.0"
MID_Q0 = "middle_block.1.transformer_blocks.0.attn1.to_q"
RESNET = "output_blocks.0.0.in_layers.2"


def test_the_issue_example():
    bw = parse_block_weights("content=1.0, OUT1=0.6, input_blocks.8.1=0.3, "
                             "output_blocks.0.1.transformer_blocks.3=0, default=0")
    assert bw.strength_for(CONTENT_Q1) == 1.0
    assert bw.strength_for(CONTENT_Q3) == 0.0       # the sub-path entry beats its block's entry
    assert bw.strength_for(CONTENT_K3) == 0.0
    assert bw.strength_for(STYLE_V0) == 0.6
    assert bw.strength_for(LAYOUT_O0) == 0.3
    assert bw.strength_for(MID_Q0) == 0.0          # unlisted block: default
    assert bw.strength_for(RESNET) == 0.0          # not in an attention block: default
    assert bw.default == 0.0
    assert len(bw.entries) == 4


def test_default_default_is_one_and_empty_text_is_all_ones():
    assert parse_block_weights("").strength_for(CONTENT_Q1) == 1.0
    assert parse_block_weights("  # only a comment\n\n").strength_for(STYLE_V0) == 1.0
    assert parse_block_weights("style=0.5").strength_for(CONTENT_Q1) == 1.0


def test_newlines_comments_and_whitespace():
    text = """
        # a B-LoRA, style a bit weaker
        content = 1.25   # content as trained
        OUT1=0.5,   mid = -0.5

        default = 0
    """
    bw = parse_block_weights(text)
    assert bw.strength_for(CONTENT_Q1) == 1.25
    assert bw.strength_for(STYLE_V0) == 0.5
    assert bw.strength_for(MID_Q0) == -0.5
    assert bw.strength_for(LAYOUT_O0) == 0.0


@pytest.mark.parametrize("name", ["content", "OUT0", "out0", "output_blocks.0.1", "up_blocks.0.attentions.0",
                                  "unet.up_blocks.0.attentions.0", "diffusion_model.output_blocks.0.1",
                                  "lora_unet_output_blocks_0_1"])
def test_every_block_name_form(name):
    bw = parse_block_weights(f"{name}=0.25")
    assert bw.strength_for(CONTENT_Q1) == 0.25
    assert bw.strength_for(STYLE_V0) == 1.0


@pytest.mark.parametrize("block", SDXL_BLOCKS, ids=lambda b: b.slot)
def test_each_slot_addresses_its_own_block_only(block):
    bw = parse_block_weights(f"{block.slot}=0.5, default=2")
    for other in SDXL_BLOCKS:
        expected = 0.5 if other == block else 2.0
        assert bw.strength_for(other.ldm + ".transformer_blocks.0.attn2.to_k") == expected


def test_most_specific_entry_wins_at_every_depth():
    bw = parse_block_weights("content=1, content.transformer_blocks.3=2, "
                             "up_blocks.0.attentions.0.transformer_blocks.3.attn2=3, "
                             "output_blocks.0.1.transformer_blocks.3.attn2.to_k=4, default=0")
    assert bw.strength_for(CONTENT_K3) == 4.0
    assert bw.strength_for("output_blocks.0.1.transformer_blocks.3.attn2.to_q") == 3.0
    assert bw.strength_for(CONTENT_Q3) == 2.0
    assert bw.strength_for(CONTENT_Q1) == 1.0
    assert bw.strength_for(CONTENT_Q13) == 1.0      # segment boundary: .3 does not cover .30/.13
    assert bw.strength_for("output_blocks.0.1.transformer_blocks.30.attn1.to_q") == 1.0
    assert bw.strength_for(STYLE_V0) == 0.0


def test_order_of_entries_does_not_matter():
    a = parse_block_weights("content.transformer_blocks.3=0, content=1")
    b = parse_block_weights("content=1, content.transformer_blocks.3=0")
    for path in (CONTENT_Q3, CONTENT_Q1):
        assert a.strength_for(path) == b.strength_for(path)


def test_unused_entries_are_reported():
    bw = parse_block_weights("content=1, OUT5=0.2, style.transformer_blocks.9=0")
    unused = bw.unused([CONTENT_Q1, STYLE_V0])
    assert [e.text for e in unused] == ["OUT5=0.2", "style.transformer_blocks.9=0"]


@pytest.mark.parametrize("text,pattern", [
    ("content=1, OUT9=0.5", r"line 1, item 2: 'OUT9=0.5'.*unknown block 'OUT9'"),
    ("content=1\nbogus.block=1", r"line 2, item 1: 'bogus.block=1'.*unknown block"),
    ("content.transformer_block.3=1", r"'content.transformer_block.3=1'.*'transformer_block.3' is not a module"),
    ("style.attn2=1", r"'style.attn2=1'.*not a module inside block output_blocks.1.1"),
])
def test_unknown_names_raise_block_name_error_naming_entry(text, pattern):
    with pytest.raises(BlockNameError, match=pattern):
        parse_block_weights(text)


@pytest.mark.parametrize("text,pattern", [
    ("content=abc", r"line 1, item 1: 'content=abc': 'abc' is not a number"),
    ("style=0.5, content", r"line 1, item 2: 'content': expected 'name=value'"),
    ("=1", r"'=1': expected 'name=value'"),
    ("style=", r"'style=': expected 'name=value'"),
    ("content=inf", r"'content=inf': the strength must be a finite number"),
    ("content=nan", r"finite"),
    ("content=1\nOUT0=2", r"line 2, item 1: 'OUT0=2': output_blocks.0.1 is already given at line 1, item 1"),
    ("default=0\ndefault=1", r"line 2, item 1: 'default=1': default given twice"),
])
def test_malformed_entries_raise_schedule_error_naming_entry(text, pattern):
    with pytest.raises(ScheduleError, match=pattern):
        parse_block_weights(text)


def test_errors_are_value_errors_for_the_host():
    with pytest.raises(ValueError):
        parse_block_weights("nonsense=1")


@pytest.mark.parametrize("s,linear,squared", [(1.0, 1.0, 1.0), (1.1, 1.1, 1.21), (0.5, 0.5, 0.25),
                                              (-0.5, -0.5, -0.25), (0.0, 0.0, 0.0), (-2.0, -2.0, -4.0)])
def test_strength_modes(s, linear, squared):
    assert effective_strength(s, "linear") == pytest.approx(linear)
    assert effective_strength(s, "alpha_squared") == pytest.approx(squared)


def test_strength_modes_table_and_unknown_mode():
    assert list(STRENGTH_MODES) == ["linear", "alpha_squared"]
    with pytest.raises(ScheduleError, match="unknown strength mode 'cubic'"):
        effective_strength(1.0, "cubic")


# --- parts: what Apply B-LoRA and B-LoRA Block Weights hand to the patcher ------------------------------------

def _adapter(paths, source="file.safetensors"):
    import torch

    from blora.adapters.adapter import Adapter, ModuleAdapter

    gen = torch.Generator().manual_seed(0)
    modules = {p: ModuleAdapter("lora", {"down": torch.randn(2, 8, generator=gen),
                                         "up": torch.randn(8, 2, generator=gen)}, alpha=2.0) for p in paths}
    return Adapter(modules=modules, source=source, dialect="kohya")


BOTH = [CONTENT_Q1, CONTENT_Q3, STYLE_V0, "te1:text_model.encoder.layers.0.self_attn.q_proj"]


def test_role_parts_take_each_block_from_its_own_file():
    from blora.compose.block_weights import role_parts

    a, b = _adapter(BOTH, "a.safetensors"), _adapter(BOTH + [LAYOUT_O0], "b.safetensors")
    parts = role_parts({"content": (a, 0.5), "style": (b, -1.5), "layout": (None, 1.0)})
    assert [(sorted(p.modules), s) for p, s in parts] == [([CONTENT_Q1, CONTENT_Q3], 0.5), ([STYLE_V0], -1.5)]
    assert parts[0][0].modules[CONTENT_Q1] is a.modules[CONTENT_Q1]
    assert parts[1][0].modules[STYLE_V0] is b.modules[STYLE_V0]


def test_role_parts_alpha_squared_mode():
    from blora.compose.block_weights import role_parts

    a = _adapter(BOTH)
    parts = role_parts({"content": (a, 1.1), "style": (a, -0.5)}, "alpha_squared")
    assert [s for _, s in parts] == [pytest.approx(1.21), pytest.approx(-0.25)]


def test_role_parts_missing_role_names_file_and_role():
    from blora.compose.block_weights import role_parts

    style_only = _adapter([STYLE_V0], "/models/blora/style_only.safetensors")
    with pytest.raises(ValueError, match=r"style_only.safetensors: no content block \(output_blocks.0.1, OUT0\).*"
                                         r"holds OUT1 \(style\)"):
        role_parts({"content": (style_only, 1.0)})


def test_block_weight_parts_group_modules_by_strength():
    from blora.compose.block_weights import block_weight_parts

    a = _adapter(BOTH + [LAYOUT_O0, MID_Q0])
    bw = parse_block_weights("content=0.5, content.transformer_blocks.3=0, style=0.5, default=2")
    parts = block_weight_parts(a, bw)
    got = {s: sorted(p.modules) for p, s in parts}
    assert got == {0.5: [CONTENT_Q1, STYLE_V0], 0.0: [CONTENT_Q3],
                   2.0: sorted([LAYOUT_O0, MID_Q0, "te1:text_model.encoder.layers.0.self_attn.q_proj"])}
    assert sum(len(p.modules) for p, _ in parts) == len(a.modules)
    assert all(p.source == a.source for p, _ in parts)
