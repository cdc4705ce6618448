"""A module's bias difference (``diff_b``, written by the host's own trainer beside each LoRA) is kept by every path
the pack patches the model through — Apply B-LoRA, Block Weights, strength schedules, K-LoRA and Batch Apply — and
gives the biases stock ``LoraLoaderModelOnly`` gives for the same kohya file (comfy/lora.py ``load_lora``: diff_b
becomes a ("diff", Δb) patch of the layer's bias, added as b + s·Δb)."""
from __future__ import annotations

import pytest
import torch

from blora_testkit.dialects import CONTENT, STYLE, TINY_ATTN_SHAPES, blora_shapes, make_state_dict
from blora_testkit.nodes import load_blora, run_node, unload_all, write_lora

RANK, ALPHA = 4, 2.0


@pytest.fixture
def nodes(pack):
    return pack.nodes


def biased(model) -> list[str]:
    """Canonical paths of the tiny model's B-LoRA attention Linears that have a bias (to_out.0)."""
    keys = model.model.state_dict()
    return [p for p in blora_shapes(TINY_ATTN_SHAPES) if f"diffusion_model.{p}.bias" in keys]


def with_diff_b(model, seed: int, blocks=(CONTENT, STYLE)) -> dict:
    """A kohya LoRA file on ``blocks`` whose every module with a bias carries a diff_b, as the host's trainer writes."""
    shapes = blora_shapes(TINY_ATTN_SHAPES, list(blocks))
    sd = make_state_dict("kohya", shapes, rank=RANK, seed=seed, alpha=ALPHA)
    gen = torch.Generator().manual_seed(seed + 100)
    for path in biased(model):
        if path in shapes:
            sd["lora_unet_" + path.replace(".", "_") + ".diff_b"] = torch.randn(shapes[path][0], generator=gen) * 0.3
    return sd


@pytest.fixture
def files(nodes, host_dirs, tiny_model):
    """name -> (file name, Adapter read by Load B-LoRA): two files with diff_b."""
    folder = host_dirs / "models" / "loras"
    out = {}
    for name, seed in (("a", 21), ("b", 22)):
        write_lora(folder, f"{name}.safetensors", with_diff_b(tiny_model, seed))
        adapter = load_blora(nodes, f"{name}.safetensors")
        assert any("diff_b" in m.tensors for m in adapter.modules.values()), "the reader dropped diff_b"
        out[name] = (f"{name}.safetensors", adapter)
    return out


def stock(model, name: str, strength: float):
    import nodes as host_nodes

    return host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def patched_tensors(patcher) -> dict:
    """Weights and biases of the diffusion model as the host patches them for ``patcher``; key -> tensor."""
    unload_all()
    with torch.inference_mode():
        patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
    finally:
        patcher.unpatch_model()


class Recorder:
    """A weight function put after the pack's on one weight or bias: what is in force at each model call."""

    def __init__(self):
        self.seen = []

    def __call__(self, tensor):
        self.seen.append(tensor.detach().clone())
        return tensor


def recorded(model, keys):
    clone = model.clone()
    recs = {k: Recorder() for k in keys}
    for k, rec in recs.items():
        clone.add_weight_wrapper(k, rec)
    return clone, recs


def sample(model, batch=1, steps=3, cfg=2.0):
    import comfy.sample
    from blora_testkit.tiny_sdxl import tiny_conditioning

    noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", tiny_conditioning(1),
                                   tiny_conditioning(2), torch.zeros_like(noise), disable_pbar=True, seed=0)


def bias_keys(model, block):
    return [f"diffusion_model.{p}.bias" for p in biased(model) if p.startswith(block + ".")]


def test_the_files_have_biased_modules(tiny_model):
    assert bias_keys(tiny_model, CONTENT) and bias_keys(tiny_model, STYLE), "no biased layer: nothing is checked"


def test_apply_keeps_diff_b_as_stock(nodes, files, tiny_model):
    name, adapter = files["a"]
    ours = run_node(nodes.apply.BLoRAApply, model=tiny_model, content=adapter, style=adapter, content_strength=0.8,
                    style_strength=0.8, strength_mode="linear")[0][0]
    got, want, base = patched_tensors(ours), patched_tensors(stock(tiny_model, name, 0.8)), patched_tensors(tiny_model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert all(not torch.equal(got[k], base[k]) for k in bias_keys(tiny_model, STYLE))


def test_block_weights_keep_diff_b_as_stock(nodes, files, tiny_model):
    name, adapter = files["a"]
    ours = run_node(nodes.apply.BLoRABlockWeights, model=tiny_model, blora=adapter, weights="default=0.6")[0][0]
    got, want = patched_tensors(ours), patched_tensors(stock(tiny_model, name, 0.6))
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_schedule_keeps_diff_b_at_the_scheduled_strength(nodes, files, tiny_model):
    name, adapter = files["a"]
    out = run_node(nodes.schedule.BLoRASchedule, model=tiny_model, style=adapter, style_schedule="0:1.0, 1:0.5")[0][0]
    keys = bias_keys(tiny_model, STYLE)
    clone, recs = recorded(out, keys)
    sample(clone, steps=3)
    full, half = patched_tensors(stock(tiny_model, name, 1.0)), patched_tensors(stock(tiny_model, name, 0.5))
    for k in keys:
        assert len(recs[k].seen) == 3
        torch.testing.assert_close(recs[k].seen[0], full[k], rtol=1e-6, atol=1e-6)  # progress 0: strength 1
        torch.testing.assert_close(recs[k].seen[-1], half[k], rtol=1e-6, atol=1e-6)  # progress 1: strength 0.5


def test_klora_keeps_each_loras_diff_b_with_its_weight(nodes, files, tiny_model):
    (name_c, subject), (name_s, style) = files["a"], files["b"]
    fused = run_node(nodes.fusion.KLoRAFuse, model=tiny_model, subject=subject, style=style, subject_strength=0.9,
                     style_strength=1.1)[0][0]
    paths = [p for p in biased(tiny_model)]
    keys = [f"diffusion_model.{p}.{t}" for p in paths for t in ("weight", "bias")]
    switching = {k[len("diffusion_model."):-len(".weight")] for k in fused.weight_wrapper_patches if k.endswith(".weight")}
    assert switching & set(paths), "no biased layer switches: the switch would not be checked"
    clone, recs = recorded(fused, keys)
    sample(clone, steps=4)
    refs = {"subject": patched_tensors(stock(tiny_model, name_c, 0.9)),
            "style": patched_tensors(stock(tiny_model, name_s, 1.1))}
    seen = set()
    for p in paths:
        wk, bk = f"diffusion_model.{p}.weight", f"diffusion_model.{p}.bias"
        for w, b in zip(recs[wk].seen, recs[bk].seen):
            which = [n for n, ref in refs.items() if torch.allclose(w, ref[wk], rtol=1e-5, atol=1e-6)]
            assert len(which) == 1, f"{p}: the weight in force is neither LoRA's"
            torch.testing.assert_close(b, refs[which[0]][bk], rtol=1e-6, atol=1e-6, msg=f"{p}: bias of {which[0]}")
            seen.add(which[0])
    assert seen == {"subject", "style"}


def test_batch_apply_keeps_each_entrys_diff_b(nodes, files, tiny_model):
    (name_a, a), (name_b, b) = files["a"], files["b"]
    batch = run_node(nodes.batch_apply.BLoRABatchEntry, content=a, style=a, content_strength=1.0, style_strength=1.0,
                     strength_mode="linear")[0][0]
    batch = run_node(nodes.batch_apply.BLoRABatchEntry, batch=batch, content=b, style=b, content_strength=0.7,
                     style_strength=0.7, strength_mode="linear")[0][0]
    batched = sample(run_node(nodes.batch_apply.BLoRABatchApply, model=tiny_model, batch=batch)[0][0], batch=2)
    alone = [sample(stock(tiny_model, name_a, 1.0), batch=2)[0:1], sample(stock(tiny_model, name_b, 0.7), batch=2)[1:2]]
    for i, ref in enumerate(alone):
        err = (batched[i:i + 1] - ref).abs().max().item()
        assert err <= 1e-4 * ref.abs().max().item(), f"image {i}: max error {err:.3g}"
