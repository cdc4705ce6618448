"""Inspection report: fields, one-line summary, JSON form, multi-line form."""
import json

import torch

from blora.formats.report import AdapterReport, inspect_adapter
from blora.formats.keys import to_canonical
from blora_testkit.dialects import TINY_ATTN_SHAPES, blora_shapes, make_state_dict

PAIR = blora_shapes(TINY_ATTN_SHAPES)


def _report(sd, meta=None, source="b.safetensors") -> AdapterReport:
    return inspect_adapter(to_canonical(sd, source, meta))


def test_report_of_a_blora():
    r = _report(make_state_dict("diffusers", PAIR, rank=4, seed=0), {"blora.trigger": "A [v]"})
    assert r.dialect == "diffusers" and r.roles == ("content", "style") and r.blocks == ("OUT0", "OUT1")
    assert r.kinds == ("lora",) and r.ranks == {4} and r.alphas == {None} and r.dtypes == ("float32",)
    assert r.num_modules == 16 and r.num_params == sum(4 * (o + i) for o, i in PAIR.values())
    assert r.unmapped == () and r.dora is False and r.trigger == "A [v]"
    assert r.unet_other == 0 and r.te_modules == 0


def test_summary_is_one_line_with_the_essentials():
    sd = make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES, ("input_blocks.8.1",)), rank=8, seed=0, alpha=8.0,
                         dora=True)
    sd["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = torch.zeros(8, 4)
    line = _report(sd, {"ss_instance_prompt": "zwx"}).summary()
    assert "\n" not in line
    for part in ("kohya", "layout", "IN08", "LoRA DoRA rank 8", "8 modules", "1 keys unmapped", "'zwx'"):
        assert part in line, (part, line)


def test_to_dict_is_json_and_format_is_multiline():
    sd = make_state_dict("lycoris", PAIR, rank=2, seed=0, alpha=1.0, kind="loha")
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 8)
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 2)
    sd["lora_unet_output_blocks_1_0_in_layers_2.lora_down.weight"] = torch.zeros(2, 8, 3, 3)
    sd["lora_unet_output_blocks_1_0_in_layers_2.lora_up.weight"] = torch.zeros(8, 2, 1, 1)
    r = _report(sd)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["kinds"] == ["loha", "lora"] and d["ranks"] == [2] and d["alphas"] == [None, 1.0]
    assert d["te_modules"] == 1 and d["unet_other"] == 1 and d["dialect"] == "lycoris"
    text = r.format()
    assert len(text.splitlines()) >= 10 and "LoHa+LoRA" in text and "1 text encoder" in text


def test_summary_says_when_stock_loraloader_renders_the_file_differently():
    """Per-output-row DoRA (PEFT magnitude, LyCORIS (out, 1) dora_scale) renders with ‖W + ΔW‖ here and in the home
    tools, with ‖W‖ (or not at all) in stock LoraLoader: the summary says so; input-axis DoRA and plain LoRA, which
    stock renders the same, do not get the note."""
    peft = _report(make_state_dict("peft", PAIR, rank=4, seed=0, dora=True))
    assert peft.stock_differs == len(PAIR)
    assert f"stock LoraLoader renders {len(PAIR)} DoRA modules differently" in peft.summary()
    assert "stock LoraLoader" in peft.format() and peft.to_dict()["stock_differs"] == len(PAIR)
    for sd in (make_state_dict("kohya", PAIR, rank=4, seed=0, dora=True), make_state_dict("kohya", PAIR, 4, 0)):
        r = _report(sd)
        assert r.stock_differs == 0 and "stock" not in r.summary()
