"""Adapter files: safetensors reading with the header checked first, atomic confined writing, metadata, triggers."""
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import blora.formats.files as files
from blora.adapters.adapter import delta_weight
from blora.errors import AdapterFileError, UnsafePathError
from blora.formats.files import read_adapter, safe_path, write_adapter
from blora.formats.keys import to_canonical
from blora.formats.report import inspect_adapter
from blora_testkit.dialects import FULL_ATTN_SHAPES, TINY_ATTN_SHAPES, blora_shapes, ldm_to_diffusers, make_state_dict

PAIR = blora_shapes(TINY_ATTN_SHAPES)
KEY = "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k"


@pytest.fixture
def kohya_file(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file(make_state_dict("kohya", PAIR, rank=4, seed=0, alpha=2.0), str(path), metadata={"ss_network_dim": "4"})
    return path


@pytest.mark.parametrize("dialect", ["kohya", "comfy", "diffusers", "peft", "kohya_diffusers", "diffusers_doubled"])
def test_write_then_read_every_dialect(tmp_path, kohya_file, dialect):
    source = read_adapter(kohya_file)
    path = write_adapter(source, tmp_path / "out", f"x_{dialect}", dialect=dialect)
    assert path == (tmp_path / "out" / f"x_{dialect}.safetensors").resolve()
    back = read_adapter(path)
    assert back.dialect == dialect and set(back.modules) == set(source.modules)
    for p, m in source.modules.items():
        assert torch.allclose(delta_weight(back.modules[p]), delta_weight(m), rtol=1e-5, atol=1e-7)


def test_metadata_written(tmp_path, kohya_file):
    source = read_adapter(kohya_file)
    path = write_adapter(source, tmp_path, "meta", metadata={"blora.trigger": "A [v]", "note": "hello"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["blora.format"] == "comfyui-blora 1"
    assert meta["blora.roles"] == "content,style" and meta["blora.blocks"] == "OUT0,OUT1"
    assert meta["blora.rank"] == "4" and meta["blora.alpha"] == "2" and meta["blora.dialect"] == "kohya"
    assert meta["blora.sources"] == "style.safetensors" and meta["note"] == "hello"
    assert meta["ss_network_dim"] == "4"  # the source's metadata travels
    assert read_adapter(path).trigger == "A [v]"
    folded = write_adapter(source, tmp_path, "folded", dialect="diffusers")
    with safe_open(str(folded), "pt") as f:
        assert f.metadata()["blora.alpha"] == "4"  # alpha/rank folded into up: the file's alpha is its rank


@pytest.mark.parametrize("meta,trigger", [
    ({"blora.trigger": "A [v]", "ss_instance_prompt": "other"}, "A [v]"),
    ({"modelspec.trigger_phrase": "sks style"}, "sks style"),
    ({"ss_instance_prompt": "ohwx"}, "ohwx"),
    ({"ss_tag_frequency": json.dumps({"10_img": {"zwx": 12, "dog": 3}, "5_reg": {"dog": 4}})}, "zwx"),
    ({"ss_tag_frequency": "not json"}, ""),
    ({}, ""),
])
def test_trigger_from_metadata(tmp_path, meta, trigger):
    path = tmp_path / "t.safetensors"
    save_file(make_state_dict("kohya", PAIR, rank=2, seed=0), str(path), metadata=meta)
    assert read_adapter(path).trigger == trigger


def test_dtype_cast_and_alpha_stays_float32(tmp_path, kohya_file):
    path = write_adapter(read_adapter(kohya_file), tmp_path, "half", dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor(KEY + ".lora_up.weight").dtype == torch.float16
        assert f.get_tensor(KEY + ".alpha").dtype == torch.float32
    assert read_adapter(path).modules["output_blocks.1.1.transformer_blocks.0.attn2.to_k"].alpha == 2.0


def test_original_blora_file_at_full_sdxl_size(tmp_path):
    """320 tensors / 160 modules, rank 64, no alpha: the published B-LoRA layout (zeros in bf16 keep it cheap)."""
    sd = {}
    for p, (o, i) in blora_shapes(FULL_ATTN_SHAPES).items():
        name = "unet." + ldm_to_diffusers(p)
        sd[name + ".lora.down.weight"] = torch.zeros(64, i, dtype=torch.bfloat16)
        sd[name + ".lora.up.weight"] = torch.zeros(o, 64, dtype=torch.bfloat16)
    path = tmp_path / "blora.safetensors"
    save_file(sd, str(path))
    adapter = read_adapter(path)
    assert len(sd) == 320 and len(adapter.modules) == 160 and adapter.dialect == "diffusers"
    assert adapter.roles() == ["content", "style"]
    assert {m.rank for m in adapter.modules.values()} == {64} and {m.scale for m in adapter.modules.values()} == {1.0}
    report = inspect_adapter(adapter)
    assert report.num_params == 28_180_480 and "28.2M params" in report.summary()
    assert report.dtypes == ("bfloat16",)


# --- bad files: each error names the file (and the key when one is at fault) ------------------------------------
def _bad(path, match, key=None):
    with pytest.raises(AdapterFileError, match=match) as e:
        read_adapter(path)
    assert str(path) in str(e.value)
    if key:
        assert key in str(e.value)
    return e.value


def test_truncated_file(tmp_path, kohya_file):
    data = kohya_file.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    _bad(bad, "truncated")


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(os.urandom(4096))
    _bad(bad, "not safetensors")


def test_torch_checkpoint_is_refused_not_loaded(tmp_path):
    bad = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, bad)
    _bad(bad, "zip archive")
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    _bad(raw, "pickle")


def test_header_length_lying(tmp_path, kohya_file):
    data = bytearray(kohya_file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    too_long = tmp_path / "long.safetensors"
    too_long.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    _bad(too_long, "header length")
    too_short = tmp_path / "short.safetensors"
    too_short.write_bytes(struct.pack("<Q", n - 10) + data[8:])
    _bad(too_short, "not JSON")


def test_header_offsets_inconsistent(tmp_path, kohya_file):
    data = kohya_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header[KEY + ".lora_up.weight"]["shape"] = [128, 5]
    raw = json.dumps(header).encode()
    bad = tmp_path / "shape.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    _bad(bad, "inconsistent", KEY + ".lora_up.weight")


def test_too_short_and_missing(tmp_path):
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    _bad(tiny, "only 3 bytes")
    _bad(tmp_path / "nope.safetensors", "cannot be opened")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_name_the_key(tmp_path, value, dtype):
    sd = {k: v.to(dtype) for k, v in make_state_dict("kohya", PAIR, rank=2, seed=0).items()}
    sd[KEY + ".lora_down.weight"][1, 5] = value
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    _bad(bad, "NaN or Inf", KEY + ".lora_down.weight")


def test_rank_mismatch_names_file_and_key(tmp_path):
    sd = make_state_dict("comfy", PAIR, rank=4, seed=0)
    sd["diffusion_model.output_blocks.0.1.transformer_blocks.0.attn1.to_q.lora_up.weight"] = torch.zeros(128, 2)
    bad = tmp_path / "rank.safetensors"
    save_file(sd, str(bad))
    _bad(bad, "rank mismatch", "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn1.to_q")


def test_sd15_file_reads_with_unmapped_keys(tmp_path):
    sd = make_state_dict("kohya", {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
                                   "input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640)}, rank=2, seed=0)
    path = tmp_path / "sd15.safetensors"
    save_file(sd, str(path))
    adapter = read_adapter(path)
    assert len(adapter.unmapped) == 2 and [b.slot for b in adapter.blocks()] == ["IN04"]


# --- confined, atomic writes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/../../x", "/abs/x", "..", "", "C:\\x", "sub/"])
def test_write_refuses_escaping_names(tmp_path, kohya_file, name):
    adapter = read_adapter(kohya_file)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafePathError):
        write_adapter(adapter, out, name)
    assert list(out.iterdir()) == [] and not (tmp_path / "x.safetensors").exists()


def test_write_refuses_symlinks_out(tmp_path, kohya_file):
    adapter = read_adapter(kohya_file)
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir(), outside.mkdir()
    (out / "link.safetensors").symlink_to(outside / "target.safetensors")
    (out / "dir").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="link.safetensors"):
        write_adapter(adapter, out, "link")
    with pytest.raises(UnsafePathError):
        write_adapter(adapter, out, "dir/x")
    assert list(outside.iterdir()) == []


def test_safe_path_allows_subfolders(tmp_path):
    assert safe_path(tmp_path, "a/b.safetensors") == (tmp_path / "a" / "b.safetensors").resolve()


def test_failed_write_leaves_no_temp_and_keeps_the_old_file(tmp_path, kohya_file, monkeypatch):
    adapter = read_adapter(kohya_file)
    target = write_adapter(adapter, tmp_path / "out", "keep")
    before = target.read_bytes()

    def broken(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_adapter(adapter, tmp_path / "out", "keep")
    assert target.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.safetensors"]


def test_write_refuses_non_finite_and_fp16_overflow(tmp_path, kohya_file):
    adapter = read_adapter(kohya_file)
    path = "output_blocks.0.1.transformer_blocks.0.attn1.to_q"
    big = dict(adapter.modules)
    m = big[path]
    big[path] = type(m)(m.kind, {**m.tensors, "up": m.tensors["up"] * 1e6}, m.alpha)
    from dataclasses import replace
    huge = replace(adapter, modules=big)
    with pytest.raises(AdapterFileError, match="NaN or Inf"):
        write_adapter(huge, tmp_path / "o", "overflow", dtype=torch.float16)
    bad = dict(adapter.modules)
    bad[path] = type(m)(m.kind, {**m.tensors, "down": m.tensors["down"].clone().fill_(float("nan"))}, m.alpha)
    with pytest.raises(AdapterFileError, match="NaN or Inf"):
        write_adapter(replace(adapter, modules=bad), tmp_path / "o", "nan")
    assert not (tmp_path / "o").exists()  # nothing written, not even the folder


def test_write_refuses_a_delta_that_overflows_float32(tmp_path, kohya_file):
    from dataclasses import replace
    adapter = read_adapter(kohya_file)
    path = "output_blocks.1.1.transformer_blocks.0.attn2.to_v"
    m = adapter.modules[path]
    huge = type(m)(m.kind, {"down": m.tensors["down"] * 1e20, "up": m.tensors["up"] * 1e20}, m.alpha)
    with pytest.raises(AdapterFileError, match="overflows") as e:
        write_adapter(replace(adapter, modules={**adapter.modules, path: huge}), tmp_path / "o", "big")
    assert path in str(e.value) and not (tmp_path / "o").exists()


def test_overwrite_is_atomic_replace(tmp_path, kohya_file):
    adapter = read_adapter(kohya_file)
    first = write_adapter(adapter, tmp_path, "same", dialect="comfy")
    second = write_adapter(adapter, tmp_path, "same.safetensors", dialect="kohya")
    assert first == second and read_adapter(second).dialect == "kohya"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.safetensors", "style.safetensors"]


def test_shared_tensors_are_written(tmp_path):
    sd = make_state_dict("kohya", PAIR, rank=2, seed=0)
    adapter = to_canonical(sd)
    shared = {p: type(m)(m.kind, {"down": sd[KEY + ".lora_down.weight"], "up": m.tensors["up"]}, m.alpha)
              for p, m in adapter.modules.items() if m.tensors["down"].shape == (2, 64)}
    from dataclasses import replace
    path = write_adapter(replace(adapter, modules={**adapter.modules, **shared}), tmp_path, "shared")
    assert len(read_adapter(path).modules) == len(PAIR)


def test_header_length_ending_in_0x80_reads(tmp_path):
    """A valid file whose 8-byte header length has the low byte 0x80 (pickle's PROTO opcode) is safetensors: the
    structure decides, signatures only explain files that are not safetensors (1 header length in 32 ends so)."""
    state = make_state_dict("kohya", PAIR, rank=2, seed=0, alpha=1.0)
    path = tmp_path / "x80.safetensors"
    for pad in range(64):
        save_file(state, str(path), metadata={"pad": "p" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    adapter = read_adapter(path)
    assert set(adapter.modules) == set(PAIR)


def test_signatures_still_explain_what_is_not_safetensors(tmp_path):
    """A zip or pickle whose bytes happen to frame a plausible header length still gets named for what it is."""
    for name, data, what in (("p.pt", pickle.dumps(list(range(50)), protocol=4), "pickle"),
                             ("g.gguf", b"GGUF" + bytes(60), "GGUF")):
        path = tmp_path / name
        path.write_bytes(data)
        _bad(path, what)


def test_peft_folder_config_supplies_alpha_rslora_and_patterns(tmp_path):
    """PEFT's save_pretrained keeps lora_alpha, use_rslora and the patterns in adapter_config.json beside
    adapter_model.safetensors (the safetensors file holds no alpha): the reader takes them from there."""
    import math
    sd = {k.replace("unet.", "base_model.model.", 1): v for k, v in make_state_dict("peft", PAIR, 4, 0).items()}
    folder = tmp_path / "peft_out"
    folder.mkdir()
    save_file(sd, str(folder / "adapter_model.safetensors"))
    assert {m.scale for m in read_adapter(folder / "adapter_model.safetensors").modules.values()} == {1.0}
    k_path = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False, "alpha_pattern": {k_path: 2},
        "rank_pattern": {}}))
    adapter = read_adapter(folder / "adapter_model.safetensors")
    assert adapter.modules["output_blocks.1.1.transformer_blocks.0.attn2.to_k"].scale == 0.5
    assert adapter.modules["output_blocks.1.1.transformer_blocks.0.attn2.to_q"].scale == 2.0
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True}))
    assert {round(m.scale, 6) for m in read_adapter(folder / "adapter_model.safetensors").modules.values()} == {
        round(8 / math.sqrt(4), 6)}
    (folder / "adapter_config.json").write_text("{not json")
    _bad(folder / "adapter_model.safetensors", "adapter_config.json")
    other = tmp_path / "peft_out" / "renamed.safetensors"  # only PEFT's own file name takes the folder's config
    save_file(sd, str(other))
    assert {m.scale for m in read_adapter(other).modules.values()} == {1.0}
