"""Strength schedules, K-LoRA and Batch Apply on the tiny FLUX.1-architecture model in the real host: SplitFlux's
style blocks follow a schedule with the real sampling progress, constant schedules are exactly Apply B-LoRA,
K-LoRA switches each fused layer between the two deltas (at most once, subject to style), and each image of a
batch equals its own Apply B-LoRA run."""
from __future__ import annotations

import pytest
import torch

from blora.formats.keys import to_canonical
from blora_testkit.dynamic import Recorder, base_weight, run
from blora_testkit.flux_dialects import flux_shapes, make_flux_state_dict
from blora_testkit.nodes import model_state, run_node
from blora_testkit.tiny_flux import DOUBLE, HIDDEN, LATENT_CHANNELS, SINGLE, tiny_flux_conditioning, tiny_flux_model

SHAPES = flux_shapes(hidden=HIDDEN, double=DOUBLE, single=SINGLE)
STYLE_LAYER = "single_blocks.10.linear1"
CONTENT_LAYER = "single_blocks.2.linear2"


@pytest.fixture
def flux_model(comfy_host):
    return tiny_flux_model(seed=0)


@pytest.fixture
def nodes(pack):
    return pack.nodes


def adapter(seed, dialect="kohya", alpha=4.0, source=None):
    sd, deltas = make_flux_state_dict(dialect, SHAPES, rank=4, seed=seed, alpha=alpha)
    return to_canonical(sd, source or f"flux{seed}.safetensors"), deltas


def sample(model, steps=4, batch=1, seed=0):
    import comfy.sample

    noise = torch.randn(batch, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(seed))
    cond = tiny_flux_conditioning(1)
    cond = [[cond[0][0].expand(batch, -1, -1), {**cond[0][1], "pooled_output": cond[0][1]["pooled_output"].expand(
        batch, -1)}]]
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, tiny_flux_conditioning(2),
                                   torch.zeros_like(noise), disable_pbar=True, seed=seed)


def recorded(model, path):
    rec = Recorder()
    clone = model.clone()
    clone.add_weight_wrapper(f"diffusion_model.{path}.weight", rec)
    return clone, rec


def test_style_blocks_follow_the_schedule_with_the_sampling_progress(nodes, flux_model):
    content, dc = adapter(1)
    style, ds = adapter(2)
    out = run(nodes.schedule.BLoRASchedule, model=flux_model, content=content, style=style, content_schedule="0.5",
              style_schedule="0:0, 1:1")
    assert {k.split(".")[1] + "." + k.split(".")[2] for k in out.weight_wrapper_patches} == {
        f"single_blocks.{n}" for n in range(10, SINGLE)}  # SplitFlux's style blocks, and only they
    clone, rec_s = recorded(out, STYLE_LAYER)
    clone, rec_c = recorded(clone, CONTENT_LAYER)
    steps = 4
    sample(clone, steps=steps)
    assert len(rec_s.weights) == steps
    w_s, w_c = base_weight(flux_model, STYLE_LAYER), base_weight(flux_model, CONTENT_LAYER)
    for i, (ws, wc) in enumerate(zip(rec_s.weights, rec_c.weights)):
        torch.testing.assert_close(ws, w_s + i / (steps - 1) * ds[STYLE_LAYER], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wc, w_c + 0.5 * dc[CONTENT_LAYER], atol=1e-5, rtol=1e-5)


def test_constant_schedules_are_exactly_apply_blora(nodes, flux_model):
    content, _ = adapter(3, "peft", None)
    style, _ = adapter(4)
    scheduled = run(nodes.schedule.BLoRASchedule, model=flux_model, content=content, style=style,
                    content_schedule="0.7", style_schedule="0:1.3, 1:1.3")
    applied = run(nodes.apply.BLoRAApply, model=flux_model, content=content, style=style, content_strength=0.7,
                  style_strength=1.3, layout_strength=1.0, strength_mode="linear")
    assert not scheduled.weight_wrapper_patches
    assert torch.equal(sample(scheduled), sample(applied))


def test_klora_switches_each_fused_layer_between_the_two_deltas(nodes, flux_model):
    subject, d_subject = adapter(5, source="subject.safetensors")
    style, d_style = adapter(6, source="style.safetensors")
    before = model_state(flux_model)
    fused = run(nodes.fusion.KLoRAFuse, model=flux_model, subject=subject, style=style, subject_strength=1.0,
                style_strength=0.8, pattern="s")
    layers = ["double_blocks.0.img_attn.qkv", "single_blocks.3.linear1", STYLE_LAYER, "single_blocks.11.linear2"]
    clone, recs = fused, {}
    for path in layers:
        clone, recs[path] = recorded(clone, path)
    out = sample(clone, steps=6)
    assert not torch.equal(out, sample(flux_model, steps=6))
    seen = set()
    for path, rec in recs.items():
        w = base_weight(flux_model, path)
        choice = []
        for weight in rec.weights:
            if torch.allclose(weight, w + d_subject[path], atol=1e-5, rtol=1e-5):
                choice.append("subject")
            else:
                torch.testing.assert_close(weight, w + 0.8 * d_style[path], atol=1e-5, rtol=1e-5)
                choice.append("style")
        assert choice == sorted(choice, key=lambda c: c == "style"), (path, choice)  # subject first, then style
        seen.update(choice)
    assert seen == {"subject", "style"}  # these random LoRAs do switch during the run
    after = model_state(flux_model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_each_image_of_a_batch_equals_its_own_apply(nodes, flux_model):
    content, _ = adapter(7)
    style, _ = adapter(8, "peft", None)
    entries = [dict(content=content, content_strength=1.0), dict(style=style, style_strength=0.7),
               dict(content=style, style=content, content_strength=0.5, style_strength=1.0)]
    batch = None
    for inputs in entries:
        (batch,), _ = run_node(nodes.batch_apply.BLoRABatchEntry, **({"batch": batch} if batch else {}),
                               strength_mode="linear", **inputs)
    (batched_model,), _ = run_node(nodes.batch_apply.BLoRABatchApply, model=flux_model, batch=batch)
    batched = sample(batched_model, batch=len(entries))
    for i, inputs in enumerate(entries):
        alone = run(nodes.apply.BLoRAApply, model=flux_model, layout_strength=1.0, strength_mode="linear", **{
            "content_strength": 1.0, "style_strength": 1.0, **inputs})
        single = sample(alone, batch=len(entries))[i:i + 1]
        err = (batched[i:i + 1] - single).abs().max().item()
        assert err <= 1e-5 * single.abs().max().item(), f"image {i}: {err}"
    assert (batched[0] - batched[1]).abs().max() > 1e-2
