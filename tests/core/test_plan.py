"""The patch plan (blora.compose.plan): what each feature wants done to the model, as data."""
import pytest
import torch

from blora.adapters.adapter import Adapter, ModuleAdapter
from blora.compose.plan import (SHARED_SOURCE, Plan, Routed, Static, Timed, Trained, batched_plan, same_parts,
                                static_plan, timed_plan, trained_plan)

Q = "output_blocks.1.1.transformer_blocks.0.attn1.to_q"
K = "output_blocks.1.1.transformer_blocks.0.attn1.to_k"
TE = "te1:text_model.encoder.layers.0.self_attn.q_proj"


def lora(seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    tensors = {"down": torch.randn(2, 8, generator=g), "up": torch.randn(8, 2, generator=g)}
    if bias:
        tensors["diff_b"] = torch.randn(8, generator=g)
    return ModuleAdapter("lora", tensors, alpha=2.0)


def test_static_plan_keeps_order_strengths_and_sources_and_leaves_text_encoders_out():
    a = Adapter(modules={Q: lora(1), TE: lora(2)}, source="a.safetensors")
    b = Adapter(modules={Q: lora(3), K: lora(4)}, source="b.safetensors")
    plan = static_plan([(a, 0.5), (b, 0.0)])
    assert [(p, e.strength, e.source) for p, e in plan.entries] == [
        (Q, 0.5, "a.safetensors"), (Q, 0.0, "b.safetensors"), (K, 0.0, "b.safetensors")]
    assert plan.entries[0][1].module is a.modules[Q]  # the module itself, diff_b and all


def test_timed_plan_names_its_signal():
    a = Adapter(modules={Q: lora(1, bias=True)}, source="a")
    plan = timed_plan({"style": (a, lambda p: 1 - p)})
    (path, entry), = plan.entries
    assert path == Q and isinstance(entry, Timed) and entry.signal == "style" and entry.part.strength == 1.0
    assert plan.signals["style"](0.25) == 0.75


def test_trained_plan_picks_the_mode_per_layer():
    class Factored:
        on_activations = True

    class Dora:
        on_activations = False

    plan = trained_plan({Q: Factored(), K: Dora()}, compute_dtype=torch.bfloat16)
    assert [(p, e.mode) for p, e in plan.of(Trained)] == [(Q, "activation"), (K, "weight")]
    assert [e.mode for _, e in trained_plan({Q: Factored()}, "weight").entries] == ["weight"]
    assert plan.compute_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="mode 'merged'"):
        Trained(object(), "merged")


def test_batch_entries_that_agree_are_static_and_the_others_routed():
    shared, own = lora(1, bias=True), lora(2)
    copy = ModuleAdapter("lora", {k: v.clone() for k, v in shared.tensors.items()}, alpha=2.0)
    first = [(Adapter(modules={Q: shared, K: own}, source="a"), 1.0)]
    second = [(Adapter(modules={Q: copy}, source="b"), 1.0), (Adapter(modules={K: lora(3)}, source="c"), 0.0)]
    plan = batched_plan([first, second])
    statics, routed = list(plan.of(Static)), list(plan.of(Routed))
    assert [(p, e.source, e.strength) for p, e in statics] == [(Q, SHARED_SOURCE, 1.0)]  # equal tensors: shared
    (path, entry), = routed
    assert path == K and [len(parts) for parts in entry.entries] == [1, 0]  # strength 0 applies nothing
    assert entry.entries[0][0].module is own


def test_same_parts_compares_strengths_and_tensors():
    m = lora(1)
    assert same_parts([Static(m, 1.0)], [Static(m, 1.0, "other file")])
    assert not same_parts([Static(m, 1.0)], [Static(m, 0.5)])
    assert not same_parts([Static(m, 1.0)], [Static(lora(2), 1.0)])
    assert not same_parts([Static(m, 1.0)], [])


def test_plan_entries_apply_in_order():
    plan = Plan().add(Q, Static(lora(1), 1.0)).add(Q, Static(lora(2), 0.5))
    assert [e.strength for _, e in plan.of(Static)] == [1.0, 0.5]
