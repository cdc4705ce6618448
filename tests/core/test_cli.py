"""The command line. One test runs each command as users do (``python -m blora …`` in a subprocess from the
repository root); the others call the same ``main(argv)`` in-process (a subprocess costs a torch import)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from blora.__main__ import main
from blora.adapters.adapter import delta_weight
from blora.formats.files import read_adapter
from blora_testkit.dialects import CONTENT, LAYOUT, STYLE, TINY_ATTN_SHAPES, blora_shapes, make_state_dict

ROOT = Path(__file__).resolve().parents[2]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def subprocess_run(*args, ok=True) -> Result:
    p = subprocess.run([sys.executable, "-m", "blora", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert (p.returncode == 0) == ok, p.stderr
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def run(capsys):
    def call(*args, ok=True) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # --help and usage errors
            code = e.code
        out, err = capsys.readouterr()
        assert (code == 0) == ok, err
        return Result(code, out, err)
    return call


@pytest.fixture(scope="module")
def full_lora(tmp_path_factory):
    """An ordinary SDXL LoRA over all 11 attention blocks (diffusers-style kohya names)."""
    path = tmp_path_factory.mktemp("cli") / "full.safetensors"
    save_file(make_state_dict("kohya_diffusers", TINY_ATTN_SHAPES, rank=4, seed=0, alpha=2.0), str(path),
              metadata={"modelspec.trigger_phrase": "zwx"})
    return path


def test_every_command_as_a_subprocess(tmp_path, full_lora):
    assert "usage: python -m blora" in subprocess_run("--help").stdout
    assert "roles:     layout, content, style" in subprocess_run("inspect", full_lora).stdout
    split = subprocess_run("split", full_lora, "--roles", "content,style", "--out-dir", tmp_path).stdout.split()
    assert [Path(p).name for p in split] == ["full_content.safetensors", "full_style.safetensors"]
    merged = subprocess_run("merge", "--content", split[0], "--style", split[1], "-o", tmp_path / "m").stdout.strip()
    converted = subprocess_run("convert", merged, "--to", "diffusers", "-o", tmp_path / "d").stdout.strip()
    source, result = read_adapter(full_lora), read_adapter(converted)
    assert result.dialect == "diffusers" and result.roles() == ["content", "style"]
    for p, m in result.modules.items():
        assert torch.allclose(delta_weight(m), delta_weight(source.modules[p]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("command", [["inspect"], ["split"], ["merge"], ["convert"]])
def test_help(run, command):
    out = run(*command, "--help").stdout
    assert "usage: python -m blora" in out


def test_inspect(run, full_lora):
    out = run("inspect", full_lora).stdout
    assert "kohya_diffusers" in out and "layout, content, style" in out and "zwx" in out
    data = json.loads(run("inspect", "--json", full_lora).stdout)
    assert data["blocks"] == ["IN04", "IN05", "IN07", "IN08", "MID", "OUT0", "OUT1", "OUT2", "OUT3", "OUT4", "OUT5"]


def test_inspect_bad_file_exits_nonzero_naming_it(run, tmp_path, full_lora):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x02}q\x00.")
    p = run("inspect", full_lora, bad, ok=False)
    assert p.returncode == 1 and "bad.safetensors" in p.stderr and "pickle" in p.stderr
    assert "kohya_diffusers" in p.stdout  # the good file is still reported


def test_split_gives_one_file_per_role(run, tmp_path, full_lora):
    out = run("split", full_lora, "--roles", "content,style,IN08", "--out-dir", tmp_path).stdout.split()
    assert [Path(p).name for p in out] == ["full_content.safetensors", "full_style.safetensors",
                                           "full_layout.safetensors"]
    source = read_adapter(full_lora)
    for name, block in (("content", CONTENT), ("style", STYLE), ("layout", LAYOUT)):
        part = read_adapter(tmp_path / f"full_{name}.safetensors")
        assert part.dialect == "kohya" and set(part.modules) == set(blora_shapes(TINY_ATTN_SHAPES, (block,)))
        for p, m in part.modules.items():
            assert torch.equal(delta_weight(m), delta_weight(source.modules[p]))


def test_split_unknown_or_empty_block(run, tmp_path, full_lora):
    p = run("split", full_lora, "--roles", "OUT9", "--out-dir", tmp_path, ok=False)
    assert "OUT9" in p.stderr
    content = run("split", full_lora, "--roles", "content", "--out-dir", tmp_path).stdout.strip()
    p = run("split", content, "--roles", "style", "--out-dir", tmp_path, ok=False)
    assert "no module in block 'style'" in p.stderr


def test_merge_content_from_a_and_style_from_b(run, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shapes = blora_shapes(TINY_ATTN_SHAPES)
    save_file(make_state_dict("diffusers", shapes, rank=4, seed=1), str(a))
    save_file(make_state_dict("comfy", shapes, rank=2, seed=2, alpha=1.0), str(b))
    out = run("merge", "--content", a, "--style", b, "-o", tmp_path / "ab", "--format", "comfy").stdout.strip()
    merged = read_adapter(out)
    assert out.endswith("ab.safetensors") and merged.dialect == "comfy"
    ra, rb = read_adapter(a), read_adapter(b)
    for p, m in merged.modules.items():
        src = ra if p.startswith(CONTENT) else rb
        assert torch.allclose(delta_weight(m), delta_weight(src.modules[p]), atol=1e-7)
    assert {m.rank for p, m in merged.modules.items() if p.startswith(STYLE)} == {2}


@pytest.mark.parametrize("dialect", ["comfy", "diffusers", "peft", "kohya", "kohya_diffusers", "diffusers_doubled"])
def test_convert_round_trip(run, tmp_path, full_lora, dialect):
    there = run("convert", full_lora, "--to", dialect, "-o", tmp_path / f"x_{dialect}").stdout.strip()
    back = run("convert", there, "--to", "kohya_diffusers", "-o", tmp_path / "back").stdout.strip()
    assert read_adapter(there).dialect == dialect
    src, got = read_adapter(full_lora), read_adapter(back)
    for p, m in src.modules.items():
        assert torch.allclose(delta_weight(got.modules[p]), delta_weight(m), rtol=1e-6, atol=1e-7)


def test_convert_dtype_and_refusal(run, tmp_path):
    loha = tmp_path / "loha.safetensors"
    save_file(make_state_dict("lycoris", blora_shapes(TINY_ATTN_SHAPES), rank=2, seed=0, kind="loha"), str(loha))
    p = run("convert", loha, "--to", "diffusers", "-o", tmp_path / "no", ok=False)
    assert "holds only plain LoRA" in p.stderr and not (tmp_path / "no.safetensors").exists()
    half = run("convert", loha, "--to", "comfy", "--dtype", "fp16", "-o", tmp_path / "half").stdout.strip()
    assert read_adapter(half).modules[f"{STYLE}.transformer_blocks.0.attn1.to_q"].tensors["w1a"].dtype == torch.float16


def _full_lokr_file(path, alpha):
    """A LyCORIS LoKr with full (unfactored) w1 and w2 on every module of the B-LoRA pair, as LyCORIS writes
    when the rank is large: lokr_w1, lokr_w2 and a 0-d .alpha (which LyCORIS's loader requires)."""
    gen = torch.Generator().manual_seed(5)
    sd = {}
    for path_, (o, i) in blora_shapes(TINY_ATTN_SHAPES).items():
        name = "lora_unet_" + path_.replace(".", "_")
        sd[name + ".lokr_w1"] = torch.randn(4, 4, generator=gen)
        sd[name + ".lokr_w2"] = torch.randn(o // 4, i // 4, generator=gen) * 0.1
        sd[name + ".alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("dialect", ["lycoris", "kohya", "comfy", "kohya_diffusers"])
def test_convert_full_lokr_keeps_every_alpha(run, tmp_path, dialect):
    src = _full_lokr_file(tmp_path / "lokr_full.safetensors", alpha=8.0)
    out = run("convert", tmp_path / "lokr_full.safetensors", "--to", dialect, "-o", tmp_path / "out").stdout.strip()
    from safetensors.torch import load_file
    written = load_file(out)
    alphas = {k: v for k, v in written.items() if k.endswith(".alpha")}
    assert len(alphas) == sum(k.endswith(".alpha") for k in src) and alphas
    assert all(v.ndim == 0 and v.item() == 8.0 for v in alphas.values())
    got, want = read_adapter(out), read_adapter(tmp_path / "lokr_full.safetensors")
    for p, m in want.modules.items():
        assert torch.equal(delta_weight(got.modules[p]), delta_weight(m))


def test_convert_peft_dora_to_peft_keeps_the_magnitude(run, tmp_path):
    """PEFT's format holds DoRA (lora_magnitude_vector): a PEFT DoRA file converts to peft, and back exactly."""
    shapes = blora_shapes(TINY_ATTN_SHAPES)
    sd = make_state_dict("peft_base_model", shapes, rank=2, seed=0, dora=True)
    save_file(sd, str(tmp_path / "dora.safetensors"))
    out = run("convert", tmp_path / "dora.safetensors", "--to", "peft", "-o", tmp_path / "dora_peft").stdout.strip()
    from safetensors.torch import load_file
    written = load_file(out)
    mags = {k: v for k, v in written.items() if k.endswith(".lora_magnitude_vector")}
    assert len(mags) == len(shapes) and all(v.ndim == 1 for v in mags.values())
    got, want = read_adapter(out), read_adapter(tmp_path / "dora.safetensors")
    assert got.dialect == "peft"
    for p, m in want.modules.items():
        n = got.modules[p]
        assert n.dora_norm == m.dora_norm == "adapted"
        assert torch.equal(n.dora_scale, m.dora_scale) and torch.equal(delta_weight(n), delta_weight(m))


def test_convert_input_axis_dora_to_peft_is_refused_naming_the_module(run, tmp_path):
    """PEFT's magnitude is per output row; an input-axis (1, in) dora_scale has no PEFT form."""
    sd = make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES), rank=2, seed=0, alpha=2.0, dora=True)
    save_file(sd, str(tmp_path / "dora_in.safetensors"))
    p = run("convert", tmp_path / "dora_in.safetensors", "--to", "peft", "-o", tmp_path / "no", ok=False)
    assert "input-axis" in p.stderr and "output_blocks." in p.stderr and not (tmp_path / "no.safetensors").exists()
