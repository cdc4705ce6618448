"""Bad adapter files in a real server: the prompt fails with an execution_error naming the file and the problem,
the server keeps serving, the base model (in memory) and the files on disk stay unchanged."""
from __future__ import annotations

import hashlib
import re

import pytest
import torch

from blora_testkit.loras import (ROLE_BLOCKS, attention_shapes, make_pairs, write_kohya, write_original,
                                 write_sd15_lora)
from blora_testkit.server import PromptRejected
from blora_testkit.workflows import execution_error, read_latent, stock_graph, with_blora_apply

PROMPT = "a photo of a cat"


def _truncated(path, pairs):
    data = write_kohya(path, pairs).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _garbage(path, pairs):
    path.write_bytes(bytes(range(256)) * 64)


def _pickle(path, pairs):
    torch.save({k: v[0] for k, v in pairs.items()}, path)  # a .pt checkpoint renamed: never unpickled


def _nan(path, pairs):
    pairs = dict(pairs)
    first = sorted(pairs)[0]
    up = pairs[first][1].clone()
    up[0, 0] = float("nan")
    pairs[first] = (pairs[first][0], up)
    write_original(path, pairs)


def _sd15(path, pairs):
    write_sd15_lora(path)


CASES = {  # name: (writer, what the message must say besides the file name)
    "truncated": (_truncated, r"truncat|not safetensors|corrupt"),
    "garbage": (_garbage, r"not safetensors|corrupt|header"),
    "pickle": (_pickle, r"pickle|not safetensors"),
    "nan": (_nan, r"\bNaN\b"),
    "sd15": (_sd15, r"SD ?1|architecture|shape|SDXL"),
}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def apply_graph(server, lora_name: str, seed: int, prefix: str) -> dict:
    """Load B-LoRA -> Apply B-LoRA (content and style from the file) -> the stock sampler graph."""
    return with_blora_apply(stock_graph(server.ckpt_name, seed=seed, prefix=prefix), lora_name)


@pytest.fixture(scope="module")
def setup(server):
    """Good pairs for the tiny checkpoint and the base model's latent before any error."""
    ckpt = server.models_dir / "checkpoints" / server.ckpt_name
    pairs = make_pairs(attention_shapes(ckpt), list(ROLE_BLOCKS.values()), seed=7)
    pid, _ = server.run(stock_graph(server.ckpt_name, positive=PROMPT, prefix="ref"), timeout=120)
    reference = read_latent(next(f for f in server.output_files(pid) if f.suffix == ".latent"))
    return {"pairs": pairs, "reference": reference, "ckpt": ckpt, "ckpt_sha": _sha(ckpt)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_fails_cleanly(server, setup, case):
    writer, problem = CASES[case]
    bad = server.models_dir / "loras" / f"bad_{case}.safetensors"
    writer(bad, setup["pairs"])
    before = _sha(bad)
    _, msgs = server.run(apply_graph(server, bad.name, seed=1, prefix=f"bad_{case}"), timeout=120,
                         expect_success=False)
    err = execution_error(msgs)
    assert err is not None, f"{case}: prompt did not fail: {[m['type'] for m in msgs]}{server.log_context(30)}"
    message = err["exception_message"]
    assert err["node_type"] in ("BLoRALoader", "BLoRAApply"), err["node_type"]
    assert bad.name in message, f"{case}: message does not name the file: {message}"
    assert re.search(problem, message, re.I), f"{case}: message does not say the problem: {message}"
    assert "Traceback" not in message
    assert _sha(bad) == before and _sha(setup["ckpt"]) == setup["ckpt_sha"]
    # still serving, and the cached base model was not touched: a fresh sample (the prompt differs only by
    # whitespace, so the sampler runs again) equals the one taken before any error
    spaces = " " * (list(CASES).index(case) + 1)
    pid, _ = server.run(stock_graph(server.ckpt_name, positive=PROMPT + spaces, prefix=f"after_{case}"), timeout=120)
    assert "5" not in _cached_nodes(server.messages(pid))
    after = read_latent(next(f for f in server.output_files(pid) if f.suffix == ".latent"))
    assert torch.equal(after, setup["reference"]), f"{case}: base model output changed after the error"


def _cached_nodes(messages) -> list:
    return [n for m in messages if m["type"] == "execution_cached" for n in m["data"]["nodes"]]


def test_good_file_applies_after_errors(server, setup):
    good = write_original(server.models_dir / "loras" / "good.safetensors", setup["pairs"])
    pid, _ = server.run(apply_graph(server, good.name, seed=0, prefix="good"), timeout=120)
    latent = read_latent(next(f for f in server.output_files(pid) if f.suffix == ".latent"))
    assert (latent - setup["reference"]).abs().max() > 1e-2  # the adapter did something


def test_non_safetensors_extension_is_not_offered(server, setup):
    ckpt = server.models_dir / "loras" / "old_style.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    before = _sha(ckpt)
    spec = server.object_info("BLoRALoader")["BLoRALoader"]["input"]["required"]["lora_name"]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert ckpt.name not in options
    # a hand-written prompt naming it anyway: refused at validation (hosts that check V3 combo values) or at
    # execution, without unpickling it (v0.3.64 does not check V3 combo values)
    try:
        _, msgs = server.run(apply_graph(server, ckpt.name, seed=0, prefix="ckpt"), expect_success=False)
    except PromptRejected as rejected:
        assert rejected.status == 400 and "30" in rejected.body.get("node_errors", {})
    else:
        err = execution_error(msgs)
        assert err and ckpt.name in err["exception_message"], msgs
        assert re.search(r"pickle|not safetensors", err["exception_message"]), err["exception_message"]
    assert _sha(ckpt) == before


def _hostile_batch(folder, pairs, seed: int = 11) -> dict:
    """File name -> whether it is a valid adapter: a valid file whose header length ends in 0x80 (pickle's opcode),
    truncations at random cuts, random bytes flipped (header or data), random bytes with and without a plausible
    header length, and a deeply nested JSON header. Seeded, so a failure names a file that can be made again."""
    import random
    import struct

    rng = random.Random(seed)
    good = write_kohya(folder / "batch_good.safetensors", pairs).read_bytes()
    files = {}
    for pad in range(300):  # the valid one: pad the metadata until the header length's low byte is 0x80
        data = write_kohya(folder / "batch_x80.safetensors", pairs, metadata={"pad": "p" * pad}).read_bytes()
        if data[0] == 0x80:
            files["batch_x80.safetensors"] = True
            break
    (folder / "batch_good.safetensors").unlink()
    for i in range(3):
        cut = rng.randrange(1, len(good))
        (folder / f"batch_cut{i}.safetensors").write_bytes(good[:cut])
        files[f"batch_cut{i}.safetensors"] = False
    for i in range(3):
        raw = bytearray(good)
        (n,) = struct.unpack("<Q", raw[:8])
        for _ in range(4):
            where = rng.randrange(0, n + 8) if i < 2 else rng.randrange(0, len(raw))
            raw[where] = rng.randrange(256)
        (folder / f"batch_flip{i}.safetensors").write_bytes(bytes(raw))
        files[f"batch_flip{i}.safetensors"] = None  # a flip in the data may still leave a valid adapter
    (folder / "batch_noise.safetensors").write_bytes(rng.randbytes(3000))
    (folder / "batch_framed_noise.safetensors").write_bytes(struct.pack("<Q", 200) + rng.randbytes(400))
    deep = b"[" * 50000 + b"]" * 50000
    (folder / "batch_deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    files.update({"batch_noise.safetensors": False, "batch_framed_noise.safetensors": False,
                  "batch_deep.safetensors": False})
    return files


def test_a_batch_of_hostile_files_leaves_the_server_answering_and_the_model_unchanged(server, setup):
    """All queued at once: each prompt ends in success (a valid file) or an execution_error from the pack's
    nodes naming the file; afterwards the server answers and the base model samples bit-identically."""
    files = _hostile_batch(server.models_dir / "loras", setup["pairs"])
    assert "batch_x80.safetensors" in files
    queued = {name: server.queue(apply_graph(server, name, seed=3, prefix=name[:-12])) for name in files}
    for name, prompt_id in queued.items():
        msgs = server.wait(prompt_id, timeout=120)
        err = execution_error(msgs)
        if files[name] is True:
            assert err is None, f"{name}: {err and err['exception_message']}"
        elif files[name] is False:
            assert err is not None, f"{name}: was not refused"
        if err is not None:
            assert err["node_type"] in ("BLoRALoader", "BLoRAApply"), (name, err["node_type"])
            assert name in err["exception_message"] and "Traceback" not in err["exception_message"], err
            assert err["exception_type"].endswith(("AdapterFileError", "BLoRAError", "ArchitectureError")), err
    status, _ = server.request("GET", "/object_info/BLoRALoader")
    assert status == 200
    pid, _ = server.run(stock_graph(server.ckpt_name, positive=PROMPT + " " * 40, prefix="after_batch"), timeout=120)
    after = read_latent(next(f for f in server.output_files(pid) if f.suffix == ".latent"))
    assert torch.equal(after, setup["reference"]), "base model output changed after the batch"
    assert _sha(setup["ckpt"]) == setup["ckpt_sha"]
