"""B-LoRA Strength Schedule in the real host: the progress fed to the weights is the real sampling progress (any
sampler, step count, batched or unbatched CFG), the weights in force at each step follow the schedule, constant
schedules are exactly Apply B-LoRA, and nothing leaks into the base model."""
from __future__ import annotations

import importlib

import pytest
import torch

from blora_testkit.dynamic import base_weight, make_lora, record, run, sample

from blora.errors import ScheduleError
from blora.compose.strength_schedule import parse_schedule, strength_at

CONTENT_KEY = "output_blocks.0.1.transformer_blocks.0.attn1.to_q"
STYLE_KEY = "output_blocks.1.1.transformer_blocks.0.attn2.to_k"


def ref_delta(adapter, path):
    m = adapter.modules[path]
    return (m.tensors["up"] @ m.tensors["down"]) * m.scale


@pytest.fixture
def nodes(pack):
    schedule = importlib.import_module(pack.__name__ + ".nodes.schedule")
    apply = importlib.import_module(pack.__name__ + ".nodes.apply")
    return schedule.BLoRASchedule, apply.BLoRAApply


def recovered_strengths(rec, base, delta):
    """s such that the recorded weight is W + s·D (least squares), per model call."""
    return [float(((w - base) * delta).sum() / (delta * delta).sum()) for w in rec.weights]


@pytest.mark.parametrize("sampler, steps, cfg, per_step", [
    ("euler", 5, 2.0, 1), ("euler", 9, 1.0, 1), ("dpmpp_2m", 7, 3.0, 1), ("heun", 4, 2.0, None)])
def test_progress_is_the_real_sampling_progress(tiny_model, nodes, sampler, steps, cfg, per_step):
    schedule_node, _ = nodes
    style = make_lora(tiny_model, ["output_blocks.1.1"], seed=1)
    out = run(schedule_node, model=tiny_model, style=style, style_schedule="0:0, 1:1")  # strength = progress
    clone, rec = record(out, STYLE_KEY)
    sample(clone, steps=steps, cfg=cfg, sampler=sampler)
    got = recovered_strengths(rec, base_weight(tiny_model, STYLE_KEY), ref_delta(style, STYLE_KEY))
    want = [i / (steps - 1) for i in range(steps)]
    if per_step:
        assert got == pytest.approx(want, abs=1e-5)
    else:  # Heun evaluates at sigma_i and again at sigma_{i+1}: both are steps of the schedule
        assert got[0] == pytest.approx(0.0, abs=1e-5) and got[-1] == pytest.approx(1.0, abs=1e-5)
        assert all(any(abs(g - w) < 1e-5 for w in want) for g in got)
        assert got == sorted(got) and len(got) == 2 * steps - 1


def test_unbatched_cfg_gives_both_halves_the_same_progress(tiny_model, nodes):
    schedule_node, _ = nodes
    style = make_lora(tiny_model, ["output_blocks.1.1"], seed=1)
    out = run(schedule_node, model=tiny_model, style=style, style_schedule="0:0, 1:1")
    clone, rec = record(out, STYLE_KEY)
    sample(clone, steps=4, cfg=2.0, negative_tokens=5)  # 77 and 5 tokens cannot be batched: two calls per step
    got = recovered_strengths(rec, base_weight(tiny_model, STYLE_KEY), ref_delta(style, STYLE_KEY))
    assert got == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1], abs=1e-5)


def test_weights_in_force_follow_the_schedule_on_scheduled_layers_only(tiny_model, nodes):
    schedule_node, _ = nodes
    content = make_lora(tiny_model, ["output_blocks.0.1"], seed=2)
    style = make_lora(tiny_model, ["output_blocks.1.1"], seed=3)
    text = "0:0, 0.5:1.2, 1:0.25"
    out = run(schedule_node, model=tiny_model, content=content, style=style, content_schedule="0.8",
              style_schedule=text)
    assert set(out.weight_wrapper_patches) == {f"diffusion_model.{p}.weight" for p in style.modules}
    assert set(out.patches) == {f"diffusion_model.{p}.weight" for p in content.modules}
    clone, rec_s = record(out, STYLE_KEY)
    clone, rec_c = record(clone, CONTENT_KEY)
    steps = 6
    sample(clone, steps=steps)
    schedule = parse_schedule(text)
    w_s, d_s = base_weight(tiny_model, STYLE_KEY), ref_delta(style, STYLE_KEY)
    w_c, d_c = base_weight(tiny_model, CONTENT_KEY), ref_delta(content, CONTENT_KEY)
    assert len(rec_s.weights) == steps
    for i, (ws, wc) in enumerate(zip(rec_s.weights, rec_c.weights)):
        s = strength_at(schedule, i / (steps - 1))
        torch.testing.assert_close(ws, w_s + s * d_s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wc, w_c + 0.8 * d_c, atol=1e-5, rtol=1e-5)


def test_constant_schedules_are_exactly_apply_blora(tiny_model, nodes):
    schedule_node, apply_node = nodes
    content = make_lora(tiny_model, ["output_blocks.0.1"], seed=2)
    style = make_lora(tiny_model, ["output_blocks.1.1"], seed=3)
    scheduled = run(schedule_node, model=tiny_model, content=content, style=style, content_schedule="0.7",
                    style_schedule="0:1.3, 1:1.3")
    applied = run(apply_node, model=tiny_model, content=content, style=style, content_strength=0.7,
                  style_strength=1.3)
    assert not scheduled.weight_wrapper_patches
    assert torch.equal(sample(scheduled), sample(applied))


def test_dora_follows_the_host_interpolation(tiny_model, nodes):
    from blora.host import patched_clone

    schedule_node, _ = nodes
    style = make_lora(tiny_model, ["output_blocks.1.1"], seed=4, dora=True)
    out = run(schedule_node, model=tiny_model, style=style, style_schedule="0:0, 0.5:1, 1:0.5")
    clone, rec = record(out, STYLE_KEY)
    sample(clone, steps=5)
    for i, s in ((2, 1.0), (4, 0.5)):  # progress 0.5 and 1
        ref, rec_ref = record(patched_clone(tiny_model, [(style, s)]), STYLE_KEY)
        sample(ref, steps=1)
        torch.testing.assert_close(rec.weights[i], rec_ref.weights[0], atol=1e-5, rtol=1e-5)


def test_runs_reset_and_the_base_model_is_untouched(tiny_model, nodes):
    schedule_node, _ = nodes
    before = sample(tiny_model)
    style = make_lora(tiny_model, ["output_blocks.1.1"], seed=1)
    out = run(schedule_node, model=tiny_model, style=style, style_schedule="0:0, 1:1")
    clone, rec = record(out, STYLE_KEY)
    sample(clone, steps=3)
    sample(clone, steps=5)  # a second run with its own step count starts again at progress 0
    got = recovered_strengths(rec, base_weight(tiny_model, STYLE_KEY), ref_delta(style, STYLE_KEY))
    assert got == pytest.approx([0, 0.5, 1, 0, 0.25, 0.5, 0.75, 1], abs=1e-5)
    assert torch.equal(sample(tiny_model), before)


def test_malformed_schedule_names_the_input_and_entry(tiny_model, nodes):
    schedule_node, _ = nodes
    style = make_lora(tiny_model, ["output_blocks.1.1"], seed=1)
    with pytest.raises(ScheduleError, match=r"style_schedule: entry '0\.6:x'"):
        run(schedule_node, model=tiny_model, style=style, style_schedule="0:1, 0.6:x")
    with pytest.raises(ScheduleError, match=r"content_schedule: entry '2:1'.*between 0 and 1"):
        run(schedule_node, model=tiny_model, style=style, content_schedule="2:1")
    assert not tiny_model.patches and not tiny_model.weight_wrapper_patches
