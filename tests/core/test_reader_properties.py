"""Property tests of the reader (hypothesis): whatever bytes a file holds, ``read_adapter`` returns an adapter or
raises the pack's AdapterFileError naming the file, never anything else (no KeyError, struct.error, RecursionError,
safetensors' own errors, ...), and a valid adapter file reads whatever its header length is."""
from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from blora.adapters.adapter import delta_weight
from blora.errors import AdapterFileError
from blora.formats.files import read_adapter
from blora_testkit.dialects import TINY_ATTN_SHAPES, blora_shapes, make_state_dict, reference_deltas

SETTINGS = settings(max_examples=int(os.environ.get("BLORA_HYPOTHESIS_EXAMPLES", 60)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
PAIR = blora_shapes(TINY_ATTN_SHAPES)
SOME = dict(list(PAIR.items())[:3])  # three modules keep each example cheap
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
KEY_PARTS = st.sampled_from(["lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_q", "unet.up_blocks.0",
                             "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_k",
                             "base_model.model.", "lora_te1_text_model", "x", ""])
SUFFIXES = st.sampled_from([".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
                            ".hada_w1_a", ".lokr_w1", ".lokr_w2_b", ".dora_scale", ".lora_magnitude_vector",
                            ".diff", ".diff_b", ".weight", ""])


def _write(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def _read_or_refuse(data: bytes):
    """read_adapter on a file holding ``data``: the adapter, or None when refused with the pack's error."""
    path = _write(data)
    try:
        return read_adapter(path)
    except AdapterFileError as e:
        assert str(path) in str(e)
        return None
    finally:
        path.unlink()


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    if dtype == torch.bool:
        return t > 0
    return (t * 4).to(dtype)


@st.composite
def state_dicts(draw):
    """Any state dict safetensors writes: adapter-like keys or not, any dtype and shape, empty tensors included."""
    n = draw(st.integers(1, 6))
    keys = draw(st.lists(st.tuples(KEY_PARTS, SUFFIXES).map("".join).filter(bool), min_size=n, max_size=n,
                         unique=True))
    return {k: draw(tensors()) for k in keys}


@SETTINGS
@given(sd=state_dicts(), pad=st.integers(0, 300), meta_key=st.text(min_size=1, max_size=8))
def test_any_safetensors_state_dict_is_read_or_refused_with_the_pack_error(sd, pad, meta_key):
    _read_or_refuse(save(sd, metadata={meta_key: "m" * pad}))


@SETTINGS
@given(dialect=st.sampled_from(["kohya", "comfy", "diffusers", "peft", "kohya_diffusers", "lycoris"]),
       rank=st.integers(1, 4), pad=st.integers(0, 400), alpha=st.sampled_from([None, 1.0, 3.0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_a_valid_adapter_reads_whatever_its_header_length(dialect, rank, pad, alpha, dtype):
    """Every header length (safetensors pads it to 8: its low byte runs through all multiples of 8, 0x80 among
    them) reads, with the deltas the file holds."""
    sd = {k: v.to(dtype) if v.ndim else v for k, v in
          make_state_dict(dialect, SOME, rank=rank, seed=rank, alpha=alpha).items()}
    data = save(sd, metadata={"pad": "p" * pad})
    adapter = _read_or_refuse(data)
    assert adapter is not None, f"header length {struct.unpack('<Q', data[:8])[0]} refused"
    expected = reference_deltas(SOME, rank=rank, seed=rank, alpha=alpha)
    for path, module in adapter.modules.items():
        assert torch.allclose(delta_weight(module), expected[path], rtol=2e-2, atol=2e-2)


def test_every_header_length_residue_reads(tmp_path):
    """Deterministic companion of the property above: header lengths with each low byte a multiple of 8."""
    sd = make_state_dict("kohya", SOME, rank=2, seed=0, alpha=1.0)
    seen = set()
    for pad in range(256):
        path = tmp_path / "pad.safetensors"
        save_file(sd, str(path), metadata={"pad": "p" * pad})
        low = path.read_bytes()[0]
        if low not in seen:
            seen.add(low)
            assert set(read_adapter(path).modules) == set(SOME), f"low byte {low:#x}"
    assert 0x80 in seen and len(seen) == 32


@pytest.fixture(scope="module")
def valid_file_bytes():
    return save(make_state_dict("kohya", SOME, rank=2, seed=0, alpha=1.0), metadata={"a": "b"})


@SETTINGS
@given(data=st.data())
def test_truncated_files_are_refused(valid_file_bytes, data):
    cut = data.draw(st.integers(0, len(valid_file_bytes) - 1))
    assert _read_or_refuse(valid_file_bytes[:cut]) is None


@SETTINGS
@given(data=st.data())
def test_garbled_files_read_or_are_refused(valid_file_bytes, data):
    raw = bytearray(valid_file_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, len(raw) - 1))
        raw[where] = data.draw(st.integers(0, 255))
    _read_or_refuse(bytes(raw))


@SETTINGS
@given(header=st.binary(max_size=200), body=st.binary(max_size=200), n=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_bytes_are_refused(header, body, n):
    prefix = b"" if n is None else struct.pack("<Q", n)
    assert _read_or_refuse(prefix + header + body) is None


@SETTINGS
@given(depth=st.integers(1, 100_000))
def test_hostile_json_headers_are_refused(depth):
    """Deeply nested JSON (a RecursionError in the json module) and non-object JSON are refused by name."""
    for header in (b"[" * depth + b"]" * depth, b'{"a":' * min(depth, 5000) + b"1" + b"}" * min(depth, 5000),
                   b'"string"', b"1e999", b"null"):
        assert _read_or_refuse(struct.pack("<Q", len(header)) + header) is None
