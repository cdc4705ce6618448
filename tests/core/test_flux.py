"""FLUX.1 as data (blora.arch) and its LoRA dialects (blora.formats.keys): blocks, presets, recognition, and every dialect
of the table in blora_testkit.flux_dialects read to the exact ΔW of each host layer and written back exactly."""
from __future__ import annotations

import json

import pytest
import torch

from blora import arch
from blora.adapters.adapter import ModuleAdapter, delta_weight, merge, select
from blora.arch import flux, fused
from blora.errors import AdapterFileError, ArchitectureError, BLoRAError, BlockNameError
from blora.formats.keys import detect_dialect, from_canonical, resolve_module, to_canonical
from blora_testkit.flux_dialects import ALPHA, HOST_NAMED, SPLIT, flux_shapes, make_flux_state_dict, parts_of

SHAPES = flux_shapes(hidden=32)
ALL_DIALECTS = HOST_NAMED + SPLIT


def test_flux_blocks_are_the_hosts_nineteen_double_and_thirty_eight_single():
    a = arch.FLUX
    assert [b.ldm for b in a.blocks] == [f"double_blocks.{n}" for n in range(19)] + [
        f"single_blocks.{n}" for n in range(38)]
    assert a.resolve("double_blocks.7")[0].diffusers == "transformer_blocks.7"
    assert a.resolve("single_transformer_blocks.12") == a.resolve("S12") == a.resolve("single_blocks.12")
    assert a.resolve("lora_unet_single_blocks_12")[0].ldm == "single_blocks.12"
    with pytest.raises(BlockNameError, match="unknown block 'single_blocks.38' in FLUX.1"):
        a.resolve("single_blocks.38")


def test_flux_presets_are_splitfluxs_ranges_in_host_numbering():
    """SplitFlux numbers the 57 blocks 1-57: single-stream 20-29 content, 30-57 style, 30-31 the boundary."""
    def names(preset):
        return [b.ldm for b in arch.FLUX.resolve(preset)]

    assert names("content") == [f"single_blocks.{n}" for n in range(10)]
    assert names("style") == [f"single_blocks.{n}" for n in range(10, 38)]
    assert names("boundary") == ["single_blocks.10", "single_blocks.11"]
    assert len(names("double")) == 19 and not set(names("double")) & set(names("content") + names("style"))
    assert "2511.15258" in arch.FLUX.citation


def test_sdxl_roles_are_unchanged_through_the_registry():
    assert [b.ldm for b in arch.SDXL.resolve("content")] == ["output_blocks.0.1"]
    assert [b.ldm for b in arch.SDXL.resolve("style")] == ["output_blocks.1.1"]
    assert arch.resolve_blocks("OUT1")[0].ldm == "output_blocks.1.1"
    assert arch.resolve_blocks("content")[0].ldm == "output_blocks.0.1"  # no architecture given: SDXL, as before
    assert arch.resolve_blocks("content", "flux")[0].ldm == "single_blocks.0"


def test_every_host_linear_has_its_diffusers_names_and_kohya_spelling():
    assert len(flux.FLUX_MODULES) == 9 + 19 * 10 + 38 * 3 + 1
    for path, names in flux.FLUX_MODULES.items():
        assert flux.resolve_name(path.replace(".", "_"), True) == (path, None)
        for name, piece in names:
            assert flux.resolve_name(name, False) == (path, piece)
            assert flux.resolve_name(name.replace(".", "_"), True) == (path, piece)
    assert flux.diffusers_names("single_blocks.5.linear1")[3][0] == "single_transformer_blocks.5.proj_mlp"
    assert flux.diffusers_to_host("transformer_blocks.2.ff.linear_in") == ("double_blocks.2.img_mlp.0", None)
    assert flux.diffusers_names("final_layer.adaLN_modulation.1") is None  # norm_out.linear: halves swapped


def test_piece_rows_follow_the_hosts_fused_layout():
    q, k, v, mlp = (p for _, p in flux.diffusers_names("single_blocks.0.linear1"))
    assert [x.rows(3072) for x in (q, k, v, mlp)] == [(0, 3072), (3072, 6144), (6144, 9216), (9216, 21504)]
    assert mlp.total(3072) == 21504  # FLUX.1 linear1: 3 * 3072 + 4 * 3072


def test_model_recognised_from_its_weight_paths():
    assert arch.detect_model(list(SHAPES)) is arch.FLUX
    sdxl_paths = ["output_blocks.0.1.transformer_blocks.0.attn1.to_q", "output_blocks.1.1.transformer_blocks.0.attn1.to_q",
                  "input_blocks.8.1.transformer_blocks.0.attn1.to_q"]
    assert arch.detect_model(sdxl_paths) is arch.SDXL
    assert arch.detect_model(["double_blocks.0.img_attn.qkv"]) is None  # no single blocks: not FLUX.1
    flux2 = [p for p in SHAPES if ".img_mod." not in p and ".txt_mod." not in p and ".modulation." not in p]
    assert arch.detect_model(flux2 + ["double_stream_modulation_img.lin"]) is None  # FLUX.2's global modulation
    assert arch.FLUX.missing(flux2) == "layer double_blocks.0.img_mod.lin"


def test_a_mismatch_is_refused_naming_file_model_and_both_architectures():
    flux_adapter = list(SHAPES)
    with pytest.raises(ArchitectureError, match=r"a\.safetensors: is a FLUX\.1 adapter, the model is SDXL \(Tiny\)"):
        arch.require_match(["output_blocks.0.1.transformer_blocks.0.attn1.to_q",
                            "output_blocks.1.1.transformer_blocks.0.attn1.to_q",
                            "input_blocks.8.1.transformer_blocks.0.attn1.to_q"], "Tiny", [("a.safetensors", flux_adapter)])
    with pytest.raises(ArchitectureError, match=r"needs a FLUX\.1-architecture model, got SD15: it has no layer "
                                                r"double_blocks\.0\.img_attn\.qkv"):
        arch.require_match(["input_blocks.1.1.proj_in"], "SD15", [("a.safetensors", flux_adapter)])
    with pytest.raises(ArchitectureError, match="mixes modules of SDXL and FLUX.1"):
        arch.adapter_architecture(["single_blocks.0.linear1", "output_blocks.0.1.proj_in"], "mixed.safetensors")


@pytest.mark.parametrize("dialect", ALL_DIALECTS)
def test_each_dialect_reads_to_the_exact_delta_of_every_host_layer(dialect):
    sd, deltas = make_flux_state_dict(dialect, SHAPES, rank=4, seed=1, alpha=2.0)
    adapter = to_canonical(sd, f"{dialect}.safetensors")
    assert adapter.architecture is arch.FLUX and not adapter.unmapped
    assert set(adapter.modules) == set(deltas)
    for path, expected in deltas.items():
        torch.testing.assert_close(delta_weight(adapter.modules[path]), expected, rtol=1e-5, atol=1e-6, msg=path)


@pytest.mark.parametrize("dialect", SPLIT)
def test_split_parts_a_file_leaves_out_are_zero_rows_of_the_fused_layer(dialect):
    sd, deltas = make_flux_state_dict(dialect, SHAPES, rank=4, seed=2, skip=("attn.to_v", "proj_mlp"))
    adapter = to_canonical(sd, "partial.safetensors")
    d = delta_weight(adapter.modules["single_blocks.1.linear1"])
    assert torch.count_nonzero(d[64:]) == 0 and torch.count_nonzero(d[:64]) > 0  # v and mlp rows untouched
    for path, expected in deltas.items():
        torch.testing.assert_close(delta_weight(adapter.modules[path]), expected, rtol=1e-5, atol=1e-6, msg=path)


def test_dialects_are_detected_as_the_writer_spells_them():
    expected = {"kohya": "kohya", "comfy": "comfy", "peft": "peft", "diffsynth": "peft",
                "onetrainer": "kohya_diffusers", "lycoris": "lycoris", "lycoris_loha": "lycoris",
                "simpletuner": "lycoris"}
    for dialect, name in expected.items():
        sd, _ = make_flux_state_dict(dialect, SHAPES, rank=4, seed=0)
        assert detect_dialect(sd) == name, dialect


def _state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dialect", ["kohya", "comfy", "peft", "onetrainer"])
def test_plain_dialects_write_back_to_the_same_tensors(dialect):
    """Read, write in the same dialect: the file's own tensors, split parts included (a block-diagonal fused LoRA
    is cut back into its parts)."""
    sd, _ = make_flux_state_dict(dialect, SHAPES, rank=4, seed=3, alpha=4.0)
    name = {"onetrainer": "kohya_diffusers"}.get(dialect, dialect)
    _state_equal(from_canonical(to_canonical(sd, "x"), name), sd)


def test_fused_kohya_to_peft_and_back_gives_the_original_tensors():
    """kohya -> peft splits each fused layer into parts sharing one down (rank r each, exact); peft -> kohya sees the
    shared down and fuses back to rank r: the original tensors, not a rank-3r block matrix."""
    sd, deltas = make_flux_state_dict("kohya", SHAPES, rank=4, seed=4, alpha=4.0)  # alpha = rank: scale 1
    peft = from_canonical(to_canonical(sd, "k"), "peft")
    assert peft["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"].shape == (4, 32)
    assert peft["transformer.transformer_blocks.1.attn.add_k_proj.lora_B.weight"].shape == (32, 4)
    again = to_canonical(peft, "p")
    for path, expected in deltas.items():
        torch.testing.assert_close(delta_weight(again.modules[path]), expected, rtol=1e-6, atol=1e-7)
    assert again.modules["single_blocks.0.linear1"].rank == 4
    _state_equal(from_canonical(again, "kohya"), sd)


def test_unequal_part_scales_are_folded_into_the_up_blocks():
    hidden = 8
    q = ModuleAdapter("lora", {"down": torch.randn(2, hidden), "up": torch.randn(hidden, 2)}, alpha=1.0)
    k = ModuleAdapter("lora", {"down": torch.randn(4, hidden), "up": torch.randn(hidden, 4)}, alpha=8.0)
    layout = flux.diffusers_names("double_blocks.0.img_attn.qkv")[0][1]
    one = fused.fuse({0: q, 1: k}, layout, "qkv")
    assert one.rank == 6
    expected = torch.cat([delta_weight(q), delta_weight(k), torch.zeros(hidden, hidden)])
    torch.testing.assert_close(delta_weight(one), expected)


def test_peft_alpha_metadata_of_the_transformer_applies_per_part():
    sd, deltas = make_flux_state_dict("peft", flux_shapes(hidden=32, double=1, single=0), rank=4, seed=5)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 8,
                                                  "transformer.alpha_pattern": {"attn.to_k": 2}})}
    adapter = to_canonical(sd, "meta.safetensors", meta)
    d = delta_weight(adapter.modules["double_blocks.0.img_attn.qkv"])
    torch.testing.assert_close(d[:32], deltas["double_blocks.0.img_attn.qkv"][:32] * 2.0)  # 8 / 4
    torch.testing.assert_close(d[32:64], deltas["double_blocks.0.img_attn.qkv"][32:64] * 0.5)  # 2 / 4


def test_lokr_parts_become_one_exact_full_diff_and_refuse_a_split_write():
    sd, deltas = make_flux_state_dict("simpletuner", SHAPES, rank=4, seed=6)
    adapter = to_canonical(sd, "lokr.safetensors")
    assert adapter.modules["double_blocks.0.img_attn.qkv"].kind == "full"
    assert adapter.modules["double_blocks.0.img_attn.proj"].kind == "lokr"  # not split: stays LoKr
    for path, expected in deltas.items():
        torch.testing.assert_close(delta_weight(adapter.modules[path]), expected, rtol=1e-5, atol=1e-6)
    host = to_canonical(make_flux_state_dict("lycoris", SHAPES, rank=4, seed=6)[0], "lokr_host.safetensors")
    with pytest.raises(BLoRAError, match=r"double_blocks\.0\.img_attn\.qkv.*LoKr module of a fused layer has no "
                                         r"exact split"):
        from_canonical(host, "kohya_diffusers")


def test_a_part_given_twice_or_with_the_wrong_rows_is_refused_naming_the_key():
    sd, _ = make_flux_state_dict("peft", flux_shapes(hidden=32, double=1, single=0), rank=4, seed=7)
    sd["transformer_blocks.0.attn.to_q.lora_A.weight"] = sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    sd["transformer_blocks.0.attn.to_q.lora_B.weight"] = sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    with pytest.raises(AdapterFileError, match="part 0 of double_blocks.0.img_attn.qkv is given twice"):
        to_canonical(sd, "twice.safetensors")
    sd, _ = make_flux_state_dict("peft", flux_shapes(hidden=32, double=1, single=0), rank=4, seed=7)
    sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.zeros(40, 4)
    with pytest.raises(AdapterFileError, match="part 1 has 40 output rows"):
        to_canonical(sd, "rows.safetensors")


def test_select_and_merge_use_the_adapters_architecture():
    sd, _ = make_flux_state_dict("kohya", flux_shapes(hidden=32, double=1, single=12), rank=4, seed=8)
    a = to_canonical(sd, "a.safetensors")
    content = select(a, ["content"])
    assert {p.split(".linear")[0].split(".modulation")[0] for p in content.modules} == {
        f"single_blocks.{n}" for n in range(10)}
    assert set(select(a, ["double_blocks.0"]).modules) == {p for p in a.modules if p.startswith("double_blocks.0.")}
    assert a.roles() == ["content", "style"]
    b = to_canonical(make_flux_state_dict("kohya", flux_shapes(hidden=32, double=1, single=12), rank=4, seed=9)[0],
                     "b.safetensors")
    m = merge({"content": a, "style": b})
    for path, module in m.modules.items():
        src = a if int(path.split(".")[1]) < 10 else b
        assert torch.equal(module.tensors["up"], src.modules[path].tensors["up"]), path
    assert not any(p.startswith("double_blocks") for p in m.modules)


def test_resolve_module_keeps_its_two_item_answer_for_split_names():
    assert resolve_module("transformer.single_transformer_blocks.3.proj_mlp") == ("unet", "single_blocks.3.linear1")
    assert resolve_module("lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k") == (
        "unet", "output_blocks.1.1.transformer_blocks.0.attn2.to_k")


def test_sdxl_only_dialect_refuses_a_flux_adapter():
    sd, _ = make_flux_state_dict("kohya", flux_shapes(hidden=32, double=1, single=0), rank=4, seed=0)
    with pytest.raises(BLoRAError, match="diffusers_doubled dialect is SDXL-only"):
        from_canonical(to_canonical(sd, "x"), "diffusers_doubled")


def test_parts_table_of_the_testkit_matches_the_registry():
    """The testkit's own naming and the pack's map agree (two independent statements of the same host facts)."""
    for path, shape in SHAPES.items():
        mine = [(n, a, c) for n, a, c in parts_of(path, shape)]
        theirs = flux.diffusers_names(path)
        assert [n for n, _ in theirs] == [n for n, _, _ in mine], path
        for (_, piece), (_, a, c) in zip(theirs, mine):
            assert (piece.rows(shape[1]) if piece else (0, shape[0])) == (a, a + c), path


def test_alpha_dialects_store_alpha():
    for dialect in ALPHA:
        sd, _ = make_flux_state_dict(dialect, SHAPES, rank=4, seed=0, alpha=2.0)
        assert any(k.endswith(".alpha") for k in sd)


def test_cli_splits_and_merges_flux_files_by_splitflux_roles_and_block_names(tmp_path):
    from blora.__main__ import main
    from blora.formats.files import read_adapter
    from safetensors.torch import save_file

    shapes = flux_shapes(hidden=32, double=1, single=12)
    save_file(make_flux_state_dict("peft", shapes, rank=4, seed=11)[0], str(tmp_path / "a.safetensors"))
    save_file(make_flux_state_dict("kohya", shapes, rank=4, seed=12, alpha=2.0)[0], str(tmp_path / "b.safetensors"))
    a = read_adapter(tmp_path / "a.safetensors")
    assert main(["split", str(tmp_path / "a.safetensors"), "--roles", "content,style,S03,double_blocks.0",
                 "--format", "peft", "--dtype", "fp32"]) == 0
    for part, blocks in (("content", range(10)), ("style", range(10, 12)), ("s03", (3,))):
        got = read_adapter(tmp_path / f"a_{part}.safetensors")
        assert {".".join(p.split(".")[:2]) for p in got.modules} == {f"single_blocks.{n}" for n in blocks}
        for path, module in got.modules.items():
            torch.testing.assert_close(delta_weight(module), delta_weight(a.modules[path]), rtol=0, atol=0)
    assert {".".join(p.split(".")[:2]) for p in read_adapter(tmp_path / "a_d00.safetensors").modules} == {
        "double_blocks.0"}
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--content", str(tmp_path / "a.safetensors"), "--style", str(tmp_path / "b.safetensors"),
                 "-o", str(out), "--dtype", "fp32"]) == 0
    m, b = read_adapter(out), read_adapter(tmp_path / "b.safetensors")
    for path, module in m.modules.items():
        src = a if int(path.split(".")[1]) < 10 else b
        torch.testing.assert_close(delta_weight(module), delta_weight(src.modules[path]))


def test_merge_refuses_adapters_of_two_architectures():
    from blora_testkit.dialects import TINY_ATTN_SHAPES, make_state_dict

    sdxl = to_canonical(make_state_dict("kohya", TINY_ATTN_SHAPES, 4, 0, 2.0), "sdxl.safetensors")
    fl = to_canonical(make_flux_state_dict("kohya", SHAPES, rank=4, seed=0)[0], "flux.safetensors")
    with pytest.raises(ArchitectureError, match=r"different architectures: sdxl\.safetensors \(SDXL\), "
                                                r"flux\.safetensors \(FLUX\.1\)"):
        merge({"content": sdxl, "style": fl})


def test_block_weights_text_for_flux():
    from blora.compose.block_weights import parse_block_weights

    w = parse_block_weights("default=0, content=0.5, single_blocks.3=2, S04.linear1=-1, boundary=0.3", "flux")
    assert w.strength_for("single_blocks.0.linear1") == 0.5
    assert w.strength_for("single_blocks.3.linear2") == 2.0  # a block named alone beats its role
    assert w.strength_for("single_blocks.4.linear1") == -1.0 and w.strength_for("single_blocks.4.linear2") == 0.5
    assert w.strength_for("single_blocks.11.linear1") == 0.3 and w.strength_for("single_blocks.12.linear1") == 0
    with pytest.raises(BlockNameError, match="'to_q' is not a module inside block single_blocks.3"):
        parse_block_weights("single_blocks.3.to_q=1", "flux")
    with pytest.raises(BlockNameError, match="unknown block 'OUT1' in FLUX.1"):
        parse_block_weights("OUT1=1", "flux")


def test_inspect_names_the_architecture_and_flux_slots():
    from blora.formats.report import inspect_adapter

    a = to_canonical(make_flux_state_dict("peft", flux_shapes(hidden=32, double=1, single=11), 4, 0)[0], "f")
    report = inspect_adapter(a)
    assert report.architecture == "FLUX.1" and report.roles == ("content", "style")
    assert report.blocks[0] == "D00" and report.blocks[-1] == "S10"
    assert report.summary().startswith("FLUX.1 peft · content, style (D00 S00")


def test_split_of_an_untrained_fused_lora_keeps_every_part_and_dora_is_refused():
    layout = flux.diffusers_names("single_blocks.0.linear1")
    fresh = ModuleAdapter("lora", {"down": torch.randn(4, 8), "up": torch.zeros(56, 4)}, alpha=4.0)
    parts = fused.split(fresh, layout, "single_blocks.0.linear1")
    assert [n for n, _ in parts] == [n for n, _ in layout]  # zero ups: shared down kept, no part dropped
    assert all(m.rank == 4 and m.alpha == 4.0 for _, m in parts)
    dora = ModuleAdapter("lora", {"down": torch.randn(4, 8), "up": torch.randn(56, 4)}, alpha=4.0,
                         dora_scale=torch.ones(56, 1), dora_norm="adapted")
    with pytest.raises(BLoRAError, match="DoRA module of a fused layer cannot be written as split"):
        fused.split(dora, layout, "single_blocks.0.linear1")
    q = ModuleAdapter("lora", {"down": torch.randn(2, 8), "up": torch.randn(8, 2)}, dora_scale=torch.ones(8, 1))
    with pytest.raises(BLoRAError, match="DoRA on split q/k/v layers"):
        fused.fuse({0: q}, layout[0][1], "single_blocks.0.linear1")


def xlabs_state_dict(hidden=32, double=1, single=1, rank=4, seed=0):
    """An XLabs-style FLUX LoRA (attention processors' LoRAs; no alpha: scale 1) and the ΔW of each host layer."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    layers = [(f"double_blocks.{n}.processor.{k}", f"double_blocks.{n}.{host}", rows, 0)
              for n in range(double) for k, host, rows in (
                  ("qkv_lora1", "img_attn.qkv", 3 * hidden), ("proj_lora1", "img_attn.proj", hidden),
                  ("qkv_lora2", "txt_attn.qkv", 3 * hidden), ("proj_lora2", "txt_attn.proj", hidden))]
    layers += [(f"single_blocks.{n}.processor.{k}", f"single_blocks.{n}.{host}", rows, 0)
               for n in range(single) for k, host, rows in (("qkv_lora", "linear1", 3 * hidden),
                                                              ("proj_lora", "linear2", hidden))]
    for name, host, rows, _ in layers:
        inp = hidden + 4 * hidden if host.endswith("linear2") else hidden
        down, up = torch.randn(rank, inp, generator=g), torch.randn(rows, rank, generator=g) * 0.1
        sd[name + ".down.weight"], sd[name + ".up.weight"] = down, up
        out = 7 * hidden if host.endswith("linear1") else rows
        delta = torch.zeros(out, inp)
        delta[:rows] = up @ down  # linear1: only the q, k, v rows; the MLP rows stay
        deltas[host] = delta
    return sd, deltas


def test_xlabs_processor_loras_read_onto_the_host_layers():
    sd, deltas = xlabs_state_dict()
    assert detect_dialect(sd) == "xlabs"
    adapter = to_canonical(sd, "xlabs.safetensors")
    assert adapter.unmapped == () and set(adapter.modules) == set(deltas)
    for path, expected in deltas.items():
        torch.testing.assert_close(delta_weight(adapter.modules[path]), expected, rtol=1e-5, atol=1e-6, msg=path)
    assert adapter.modules["single_blocks.0.linear1"].rank == 4  # the q, k, v rows: one LoRA, MLP rows zero
    back = to_canonical(from_canonical(adapter, "kohya"), "k")
    for path, expected in deltas.items():
        torch.testing.assert_close(delta_weight(back.modules[path]), expected, rtol=1e-5, atol=1e-6, msg=path)
