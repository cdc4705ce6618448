"""Key dialects: detection, reading every dialect into one canonical form, writing every dialect back.

One table over all dialects (PEFT-style): the same underlying LoRA written in each dialect by the test kit (its own
naming code) must read back as the same modules with the same ΔW (textbook formula, alpha semantics: no alpha =
scale 1, kohya alpha/rank)."""
import math

import pytest
import torch

from blora.adapters.adapter import Adapter, ModuleAdapter, check_fits, delta_weight
from blora.errors import AdapterFileError, ArchitectureError, BLoRAError
from blora.formats.dialects import BY_NAME
from blora.formats.keys import detect_dialect, from_canonical, to_canonical
from blora_testkit.dialects import (CONTENT, FULL_ATTN_SHAPES, STYLE, TINY_ATTN_SHAPES, blora_shapes,
                                    make_state_dict, reference_deltas)

PAIR = blora_shapes(TINY_ATTN_SHAPES)
# (file dialect, detected dialect, kind, alpha, dora)
CASES = [
    ("diffusers", "diffusers", "lora", None, False),
    ("diffusers", "diffusers", "lora", 2.0, False),
    ("diffusers_doubled", "diffusers_doubled", "lora", None, False),
    ("peft", "peft", "lora", None, False),
    ("peft_base_model", "peft", "lora", 8.0, False),
    ("peft", "peft", "lora", None, True),
    ("kohya", "kohya", "lora", None, False),
    ("kohya", "kohya", "lora", 2.0, False),
    ("kohya", "kohya", "lora", 4.0, True),
    ("kohya_diffusers", "kohya_diffusers", "lora", 1.0, False),
    ("comfy", "comfy", "lora", 3.0, False),
    ("comfy", "comfy", "lora", 3.0, True),
    ("lycoris", "kohya", "lora", 2.0, False),   # LoCon files are kohya files
    ("lycoris", "lycoris", "loha", 2.0, False),
    ("lycoris", "lycoris", "lokr", 2.0, False),
    ("comfy", "lycoris", "loha", None, True),   # LyCORIS tensors under any naming
    ("kohya_diffusers", "lycoris", "lokr", 1.0, False),
]
IDS = [f"{c[0]}-{c[2]}-a{c[3]}{'-dora' if c[4] else ''}" for c in CASES]


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("file_dialect,detected,kind,alpha,dora", CASES, ids=IDS)
def test_every_dialect_reads_to_the_same_delta(file_dialect, detected, kind, alpha, dora):
    sd = make_state_dict(file_dialect, PAIR, rank=4, seed=1, alpha=alpha, kind=kind, dora=dora)
    assert detect_dialect(sd) == detected
    adapter = to_canonical(sd, "case.safetensors")
    assert adapter.dialect == detected and adapter.unmapped == ()
    assert set(adapter.modules) == set(PAIR)
    assert adapter.roles() == ["content", "style"]
    expected = reference_deltas(PAIR, rank=4, seed=1, alpha=alpha, kind=kind)  # no-alpha kits fold alpha/rank
    for path, module in adapter.modules.items():
        assert module.kind == kind
        assert module.out_in == PAIR[path]
        assert _close(delta_weight(module), expected[path]), path
        assert (module.dora_scale is not None) == dora


def test_alpha_semantics():
    sd = make_state_dict("kohya", PAIR, rank=4, seed=0, alpha=2.0)
    module = to_canonical(sd).modules[next(iter(PAIR))]
    assert module.alpha == 2.0 and module.scale == 0.5
    no_alpha = to_canonical(make_state_dict("kohya", PAIR, rank=4, seed=0)).modules[next(iter(PAIR))]
    assert no_alpha.alpha is None and no_alpha.scale == 1.0
    original = to_canonical(make_state_dict("diffusers", PAIR, rank=4, seed=0)).modules[next(iter(PAIR))]
    assert original.alpha is None and original.scale == 1.0


def test_dora_scale_kept_as_stored_and_peft_magnitude_on_the_output_axis():
    sd = make_state_dict("kohya", PAIR, rank=4, seed=0, dora=True)
    path = f"{STYLE}.transformer_blocks.0.attn2.to_k"
    key = "lora_unet_" + path.replace(".", "_") + ".dora_scale"
    module = to_canonical(sd).modules[path]
    assert module.dora_scale is sd[key] and module.dora_scale.shape == (1, 64)
    peft = make_state_dict("peft", PAIR, rank=4, seed=0, dora=True)
    module = to_canonical(peft).modules[path]
    assert module.dora_scale.shape == (128, 1)
    mag = next(v for k, v in peft.items() if k.endswith("attn2.to_k.lora_magnitude_vector") and "attentions.1" in k)
    assert torch.equal(module.dora_scale[:, 0], mag)


def test_peft_magnitude_is_marked_for_peft_rendering_and_kohya_dora_scale_is_not():
    path = f"{STYLE}.transformer_blocks.0.attn2.to_k"
    peft = to_canonical(make_state_dict("peft", PAIR, rank=4, seed=0, dora=True))
    kohya = to_canonical(make_state_dict("kohya", PAIR, rank=4, seed=0, dora=True))
    plain = to_canonical(make_state_dict("peft", PAIR, rank=4, seed=0))
    assert {m.dora_norm for m in peft.modules.values()} == {"adapted"}
    assert {m.dora_norm for m in kohya.modules.values()} == {None}
    assert {m.dora_norm for m in plain.modules.values()} == {None}
    assert peft.modules[path].to(torch.float16).dora_norm == "adapted"  # kept through copies


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_output_axis_dora_scale_is_marked_for_the_adapted_norm(kind):
    """LyCORIS (3.2+) writes DoRA per output row as an (out, 1) dora_scale and normalises by ‖W + ΔW‖, as PEFT does;
    stock ComfyUI's output-axis branch divides by ‖W‖. Such a module renders the home tools' way ("adapted"); an
    input-axis (1, in) scale (old LyCORIS, this pack's trainer) keeps the host's rendering, which is exact."""
    sd = make_state_dict("lycoris", PAIR, rank=4, seed=0, alpha=2.0, kind=kind, dora=True)
    rows = {}
    for key in [k for k in sd if k.endswith(".dora_scale")]:
        path = key[len("lora_unet_"):-len(".dora_scale")]
        out = next(s for p, s in PAIR.items() if p.replace(".", "_") == path)[0]
        rows[key] = sd[key] = torch.rand(out, 1) + 0.5
    adapter = to_canonical(sd, "lyco_dora.safetensors")
    assert {m.dora_norm for m in adapter.modules.values()} == {"adapted"}
    assert {tuple(m.dora_scale.shape)[1:] for m in adapter.modules.values()} == {(1,)}
    input_axis = to_canonical(make_state_dict("lycoris", PAIR, rank=4, seed=0, alpha=2.0, kind=kind, dora=True))
    assert {m.dora_norm for m in input_axis.modules.values()} == {None}


def test_output_axis_dora_round_trips_through_kohya_and_peft():
    peft = to_canonical(make_state_dict("peft", PAIR, rank=4, seed=0, dora=True), "peft.safetensors")
    kohya = to_canonical(from_canonical(peft, "kohya"))
    back = to_canonical(from_canonical(kohya, "peft"))
    for path, m in peft.modules.items():
        for other in (kohya.modules[path], back.modules[path]):
            assert other.dora_norm == "adapted" and torch.equal(other.dora_scale.reshape(-1), m.dora_scale.reshape(-1))
            assert _close(delta_weight(other), delta_weight(m))


def test_peft_dora_written_as_kohya_warns_and_keeps_the_output_axis_scale(caplog):
    path = f"{STYLE}.transformer_blocks.0.attn2.to_k"
    adapter = to_canonical(make_state_dict("peft", PAIR, rank=4, seed=0, dora=True), "peft.safetensors")
    with caplog.at_level("WARNING", logger="blora.formats.keys"):
        sd = from_canonical(adapter, "kohya")
    assert "per-output-row DoRA" in caplog.text and "peft.safetensors" in caplog.text
    scale = sd["lora_unet_" + path.replace(".", "_") + ".dora_scale"]
    assert torch.equal(scale, adapter.modules[path].dora_scale) and scale.shape == (128, 1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="blora.formats.keys"):
        from_canonical(to_canonical(make_state_dict("kohya", PAIR, rank=4, seed=0, dora=True)), "kohya")
    assert "per-output-row DoRA" not in caplog.text


def test_peft_magnitude_of_input_size_is_an_error():
    sd = make_state_dict("peft", PAIR, rank=4, seed=0, dora=True)
    key = next(k for k in sd if k.endswith("attn2.to_k.lora_magnitude_vector") and "attentions.1" in k)
    sd[key] = torch.ones(64)
    with pytest.raises(AdapterFileError, match="lora_magnitude_vector"):
        to_canonical(sd, "bad.safetensors")


def test_peft_metadata_alpha_and_rslora():
    sd = make_state_dict("peft", PAIR, rank=4, seed=0)
    plain = to_canonical(sd, metadata={"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 8}'})
    assert {m.scale for m in plain.modules.values()} == {2.0}
    rs = to_canonical(sd, metadata={"lora_adapter_metadata":
                                    '{"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": true}'})
    assert {round(m.scale, 9) for m in rs.modules.values()} == {round(8 / math.sqrt(4), 9)}
    pattern = to_canonical(sd, metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 4, "unet.alpha_pattern": '
                                                                   '{"up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": 12}}'})
    assert pattern.modules[f"{STYLE}.transformer_blocks.0.attn2.to_k"].scale == 3.0
    assert pattern.modules[f"{STYLE}.transformer_blocks.0.attn2.to_q"].scale == 1.0


def test_original_blora_layout_at_full_sdxl_shapes():
    pair = blora_shapes(FULL_ATTN_SHAPES)
    assert len(pair) == 160
    # 28.2 M parameters at rank 64 (blora.md §1), counted from the shapes
    assert sum(64 * (o + i) for o, i in pair.values()) == 28_180_480
    sd = make_state_dict("diffusers", pair, rank=2, seed=0)
    assert len(sd) == 320 and all(k.startswith("unet.up_blocks.0.attentions.") for k in sd)
    adapter = to_canonical(sd, "blora.safetensors")
    assert adapter.dialect == "diffusers" and len(adapter.modules) == 160
    assert adapter.roles() == ["content", "style"]
    assert {m.rank for m in adapter.modules.values()} == {2}
    assert {m.alpha for m in adapter.modules.values()} == {None}
    check_fits(adapter, {p: s for p, s in FULL_ATTN_SHAPES.items()})


def test_doubled_prefix_and_old_processor_spelling():
    down, up = torch.randn(2, 64), torch.randn(64, 2)
    old = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
           "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up}
    adapter = to_canonical(old)
    assert adapter.dialect == "diffusers"
    assert list(adapter.modules) == ["input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"]


@pytest.mark.parametrize("key,path", [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1:text_model.encoder.layers.0.self_attn.q_proj"),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc2", "te2:text_model.encoder.layers.31.mlp.fc2"),
    ("lora_te_text_model_encoder_layers_11_self_attn_out_proj", "te1:text_model.encoder.layers.11.self_attn.out_proj"),
    ("text_encoder.text_model.encoder.layers.3.self_attn.k_proj", "te1:text_model.encoder.layers.3.self_attn.k_proj"),
    ("text_encoder_2.text_model.encoder.layers.20.mlp.fc1", "te2:text_model.encoder.layers.20.mlp.fc1"),
    ("text_encoders.clip_g.transformer.text_projection", "te2:text_projection"),
])
def test_text_encoder_names_split_by_the_clip_structure(key, path):
    sfx = (".lora_down.weight", ".lora_up.weight") if key.startswith(("lora_", "text_encoders")) else (
        ".lora.down.weight", ".lora.up.weight")
    adapter = to_canonical({key + sfx[0]: torch.randn(2, 8), key + sfx[1]: torch.randn(8, 2)})
    assert list(adapter.modules) == [path]


def test_text_encoder_layer_beyond_the_encoder_is_unmapped():
    sd = make_state_dict("kohya", PAIR, rank=2, seed=0)
    sd["lora_te1_text_model_encoder_layers_12_mlp_fc1.lora_down.weight"] = torch.randn(2, 8)  # CLIP-L has 12 layers
    adapter = to_canonical(sd)
    assert adapter.unmapped == ("lora_te1_text_model_encoder_layers_12_mlp_fc1.lora_down.weight",)


# SD1.5: attention at input_blocks 1,2,4,5,7,8, middle, output_blocks 3-11; 320/640/1280 wide, context 768.
SD15 = {f"{b}.transformer_blocks.0.attn2.to_k": (w, 768) for b, w in
        [("input_blocks.1.1", 320), ("input_blocks.4.1", 640), ("input_blocks.7.1", 1280), ("middle_block.1", 1280),
         ("output_blocks.3.1", 1280), ("output_blocks.6.1", 640), ("output_blocks.9.1", 320)]}


@pytest.mark.parametrize("dialect", ["kohya", "comfy"])
def test_sd15_keys_read_with_unmapped_and_right_blocks_then_fail_the_architecture_check(dialect):
    adapter = to_canonical(make_state_dict(dialect, SD15, rank=2, seed=0, alpha=1.0), "sd15.safetensors")
    assert [b.slot for b in adapter.blocks()] == ["IN04", "IN07", "MID", "OUT3"]
    unmapped_blocks = {k.split("transformer_blocks")[0] for k in adapter.unmapped}
    assert len(adapter.unmapped) == 3 * 3 and len(unmapped_blocks) == 3  # input 1, output 6, output 9
    with pytest.raises(ArchitectureError, match="sd15.safetensors"):
        check_fits(adapter, FULL_ATTN_SHAPES)


def test_sd15_diffusers_names_are_unmapped_where_sdxl_has_no_such_block():
    sd = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.randn(2, 320),
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.randn(320, 2),
          "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.randn(2, 320),
          "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.randn(320, 2),
          "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.randn(2, 1280),
          "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.randn(1280, 2)}
    adapter = to_canonical(sd)
    assert len(adapter.unmapped) == 4
    assert [b.slot for b in adapter.blocks()] == ["OUT3"]


# --- writing ----------------------------------------------------------------------------------------------------
WRITERS = ["kohya", "comfy", "diffusers", "peft", "kohya_diffusers", "diffusers_doubled", "lycoris"]


def _adapter(kind="lora", alpha=2.0, dora=False, shapes=PAIR):
    return to_canonical(make_state_dict("kohya", shapes, rank=4, seed=3, alpha=alpha, kind=kind, dora=dora), "src")


@pytest.mark.parametrize("dialect", WRITERS)
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_round_trip_every_writer(dialect, alpha):
    a = _adapter(alpha=alpha)
    b = to_canonical(from_canonical(a, dialect))
    assert set(b.modules) == set(a.modules)
    for path in a.modules:
        assert _close(delta_weight(b.modules[path]), delta_weight(a.modules[path])), path
    if alpha is None or dialect in ("kohya", "comfy", "kohya_diffusers", "lycoris"):
        for path in a.modules:  # nothing to fold: tensors are carried bit for bit
            assert torch.equal(b.modules[path].tensors["up"], a.modules[path].tensors["up"])


@pytest.mark.parametrize("kind,dora", [("lora", False), ("lora", True), ("loha", False), ("lokr", False)])
def test_kohya_comfy_round_trip_is_bit_exact(kind, dora):
    a = _adapter(kind=kind, dora=dora)
    b = to_canonical(from_canonical(to_canonical(from_canonical(a, "comfy")), "kohya"))
    for path, m in a.modules.items():
        n = b.modules[path]
        assert n.kind == m.kind and n.alpha == m.alpha and set(n.tensors) == set(m.tensors)
        assert all(torch.equal(n.tensors[k], m.tensors[k]) for k in m.tensors)
        assert (m.dora_scale is None and n.dora_scale is None) or torch.equal(n.dora_scale, m.dora_scale)


def test_kohya_always_writes_a_0d_alpha_equal_to_rank_when_absent():
    sd = from_canonical(_adapter(alpha=None), "kohya")
    alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
    assert len(alphas) == len(PAIR)
    assert all(v.ndim == 0 and v.dtype == torch.float32 and v.item() == 4.0 for v in alphas.values())
    key = "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert {key + s for s in (".lora_down.weight", ".lora_up.weight", ".alpha")} <= set(sd)


def test_writer_key_forms():
    a = _adapter()
    path = "output_blocks.1.1.transformer_blocks.0.attn2.to_k"
    diff = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"
    assert f"diffusion_model.{path}.lora_up.weight" in from_canonical(a, "comfy")
    assert f"unet.{diff}.lora.up.weight" in from_canonical(a, "diffusers")
    assert f"unet.{diff}.lora_B.weight" in from_canonical(a, "peft")
    assert "lora_unet_" + diff.replace(".", "_") + ".alpha" in from_canonical(a, "kohya_diffusers")
    assert not any(k.endswith(".alpha") for k in from_canonical(a, "diffusers"))


@pytest.mark.parametrize("dialect", ["diffusers", "peft", "diffusers_doubled"])
@pytest.mark.parametrize("kind,dora", [("loha", False), ("lokr", False), ("lora", True)])
def test_plain_dialects_refuse_extended_adapters(dialect, kind, dora):
    with pytest.raises(BLoRAError, match="output_blocks.0.1.transformer_blocks.0.attn1"):
        from_canonical(_adapter(kind=kind, dora=dora), dialect)


def test_unknown_writer_dialect_names_the_choices():
    with pytest.raises(BLoRAError, match="kohya"):
        from_canonical(_adapter(), "a1111")


def test_non_sdxl_path_has_no_diffusers_name():
    a = Adapter(modules={"input_blocks.1.1.proj_in": ModuleAdapter("lora", {"down": torch.ones(1, 2),
                                                                           "up": torch.ones(2, 1)})})
    assert "lora_unet_input_blocks_1_1_proj_in.alpha" in from_canonical(a, "kohya")
    with pytest.raises(BLoRAError, match="input_blocks.1.1.proj_in"):
        from_canonical(a, "diffusers")


def test_comfy_trainer_file_with_bias_diffs_and_norm_diffs():
    p = "diffusion_model.output_blocks.1.1.transformer_blocks.0"
    sd = {f"{p}.attn1.to_out.0.lora_up.weight": torch.randn(128, 2),
          f"{p}.attn1.to_out.0.lora_down.weight": torch.randn(2, 128),
          f"{p}.attn1.to_out.0.alpha": torch.tensor(1.0),
          f"{p}.attn1.to_out.0.diff_b": torch.randn(128),
          f"{p}.norm1.diff": torch.randn(128), f"{p}.norm1.diff_b": torch.randn(128)}
    a = to_canonical(sd)
    out = a.modules["output_blocks.1.1.transformer_blocks.0.attn1.to_out.0"]
    assert out.kind == "lora" and "diff_b" in out.tensors and out.scale == 0.5
    norm = a.modules["output_blocks.1.1.transformer_blocks.0.norm1"]
    assert norm.kind == "full" and norm.out_in == (128,)
    back = from_canonical(a, "comfy")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# --- errors -----------------------------------------------------------------------------------------------------
def test_detect_unknown_dialect_names_keys():
    with pytest.raises(BLoRAError, match="model.layers.0.q_proj"):
        detect_dialect(["model.layers.0.q_proj.weight"])
    with pytest.raises(AdapterFileError, match="x.safetensors"):
        to_canonical({"model.layers.0.q_proj.weight": torch.zeros(1)}, "x.safetensors")


def test_rank_mismatch_names_the_key():
    sd = make_state_dict("kohya", PAIR, rank=4, seed=0)
    key = "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v.lora_up.weight"
    sd[key] = torch.randn(128, 3)
    with pytest.raises(AdapterFileError, match="rank mismatch") as e:
        to_canonical(sd, "bad.safetensors")
    assert "bad.safetensors" in str(e.value) and "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v" in str(e.value)


def test_missing_half_of_a_pair_is_an_error():
    sd = make_state_dict("kohya", PAIR, rank=4, seed=0)
    del sd["lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_q.lora_down.weight"]
    with pytest.raises(AdapterFileError, match="attn2_to_q"):
        to_canonical(sd, "half.safetensors")


def test_module_spelled_twice_is_an_error():
    sd = {**make_state_dict("kohya", PAIR, rank=2, seed=0), **make_state_dict("comfy", PAIR, rank=2, seed=0)}
    with pytest.raises(AdapterFileError, match="given twice"):
        to_canonical(sd, "dup.safetensors")


def test_one_tensor_given_twice_is_an_error():
    sd = make_state_dict("peft", PAIR, rank=2, seed=0)
    key = next(k for k in sd if k.endswith(".lora_A.weight"))
    sd[key.replace(".lora_A.weight", ".lora_A.default.weight")] = sd[key].clone()
    with pytest.raises(AdapterFileError, match="twice"):
        to_canonical(sd, "twice.safetensors")


def test_mixed_kinds_and_bad_alpha_are_errors():
    sd = make_state_dict("kohya", PAIR, rank=2, seed=0, kind="lora")
    key = "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_q"
    with pytest.raises(AdapterFileError, match="mixes"):
        to_canonical({**sd, key + ".hada_w1_a": torch.ones(1, 1)}, "m")
    with pytest.raises(AdapterFileError, match="alpha must be a single number"):
        to_canonical({**sd, key + ".alpha": torch.ones(2)}, "m")


def test_unknown_suffixes_and_orphans_are_unmapped_not_dropped():
    sd = make_state_dict("kohya", PAIR, rank=2, seed=0)
    extra = {"lora_unet_output_blocks_1_1_proj_in.alpha": torch.tensor(1.0),  # alpha without tensors
             "lora_unet_output_blocks_1_1_proj_in.reshape_weight": torch.ones(2)}
    adapter = to_canonical({**sd, **extra})
    assert set(adapter.unmapped) == set(extra) and len(adapter.modules) == len(PAIR)


def test_nothing_sdxl_at_all_is_an_error():
    sd = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(1, 2),
          "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(2, 1)}
    with pytest.raises(AdapterFileError, match="another architecture"):
        to_canonical(sd, "sd15.safetensors")


def test_wrapped_and_simpletuner_prefixes():
    down, up = torch.randn(2, 128), torch.randn(128, 2)
    path = "output_blocks.1.1.transformer_blocks.0.attn1.to_q"
    for name, dialect in (("base_model.model.unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "peft"),
                          ("lycoris_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", "kohya_diffusers")):
        sfx = (".lora_A.weight", ".lora_B.weight") if dialect == "peft" else (".lora_down.weight", ".lora_up.weight")
        adapter = to_canonical({name + sfx[0]: down, name + sfx[1]: up})
        assert adapter.dialect == dialect and list(adapter.modules) == [path]


CONV = {"output_blocks.1.0.in_layers.2": ModuleAdapter("lora", {"down": torch.randn(2, 16, 3, 3),
                                                                "up": torch.randn(8, 2, 1, 1)}, alpha=1.0),
        "te2:text_model.encoder.layers.5.self_attn.v_proj": ModuleAdapter("lora", {"down": torch.randn(2, 8),
                                                                                  "up": torch.randn(8, 2)}, 4.0),
        "te1:text_model.encoder.layers.0.mlp.fc1": ModuleAdapter("lora", {"down": torch.randn(2, 8),
                                                                          "up": torch.randn(32, 2)})}


@pytest.mark.parametrize("dialect", WRITERS)
def test_conv_resnet_and_text_encoder_modules_round_trip(dialect):
    a = Adapter(modules=CONV)
    b = to_canonical(from_canonical(a, dialect))
    assert set(b.modules) == set(CONV)
    for path, m in CONV.items():
        assert _close(delta_weight(b.modules[path]), delta_weight(m)), path


def _variant(name: str) -> ModuleAdapter:
    """One module of each shape of adapter the writers meet (64 x 48 weight)."""
    g = torch.Generator().manual_seed(len(name))
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    lora = {"down": r(4, 48), "up": r(64, 4)}
    return {
        "lora": lambda: ModuleAdapter("lora", lora, alpha=2.0),
        "lora-no-alpha": lambda: ModuleAdapter("lora", lora),
        "lora-dora-input": lambda: ModuleAdapter("lora", lora, 2.0, r(1, 48).abs() + 1),
        "lora-dora-output": lambda: ModuleAdapter("lora", lora, 2.0, r(64, 1).abs() + 1, "adapted"),
        "loha": lambda: ModuleAdapter("loha", {"w1a": r(64, 4), "w1b": r(4, 48), "w2a": r(64, 4), "w2b": r(4, 48)}, 2.0),
        "lokr-one-side": lambda: ModuleAdapter("lokr", {"w1": r(8, 8), "w2a": r(8, 4), "w2b": r(4, 6)}, 2.0),
        "lokr-both-sides": lambda: ModuleAdapter("lokr", {"w1a": r(8, 4), "w1b": r(4, 8), "w2a": r(8, 4),
                                                          "w2b": r(4, 6)}, 2.0),
        "lokr-full": lambda: ModuleAdapter("lokr", {"w1": r(8, 8), "w2": r(8, 6)}, 8.0),
        "lokr-full-dora-output": lambda: ModuleAdapter("lokr", {"w1": r(8, 8), "w2": r(8, 6)}, 8.0,
                                                       r(64, 1).abs() + 1, "adapted"),
    }[name]()


VARIANTS = ["lora", "lora-no-alpha", "lora-dora-input", "lora-dora-output", "loha", "lokr-one-side",
            "lokr-both-sides", "lokr-full", "lokr-full-dora-output"]
# What each plain dialect must hold (refusing these would lose a format's own content).
MUST_HOLD = {"peft": {"lora", "lora-no-alpha", "lora-dora-output"}}


@pytest.mark.parametrize("dialect", WRITERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_writer_keeps_what_it_writes_or_refuses_by_name(dialect, variant):
    """The class of defect behind a dropped .alpha or a refused PEFT DoRA: whatever a dialect writes reads back
    to the same rendering (delta, alpha's effect, DoRA magnitude and axis); what it cannot hold is refused naming
    the module, never written lossy. Extended dialects hold everything; peft holds plain and per-row DoRA LoRA."""
    path = f"{STYLE}.transformer_blocks.0.attn2.to_k"
    module = _variant(variant)
    adapter = Adapter(modules={path: module}, source="v")
    try:
        state = from_canonical(adapter, dialect)
    except BLoRAError as e:
        assert path in str(e)
        assert not BY_NAME[dialect].extended and variant not in MUST_HOLD.get(dialect, set()), str(e)
        return
    back = to_canonical(state).modules[path]
    assert back.kind == module.kind and back.dora_norm == module.dora_norm
    assert torch.allclose(delta_weight(back), delta_weight(module), rtol=1e-6, atol=1e-6)
    if BY_NAME[dialect].alpha:
        assert back.alpha == module.alpha or (module.alpha is None and back.alpha == module.rank)
    if module.dora_scale is None:
        assert back.dora_scale is None
    else:
        assert torch.equal(back.dora_scale.reshape(-1), module.dora_scale.reshape(-1))
        assert back.dora_scale.shape[0] == module.dora_scale.shape[0]  # same axis
