"""The pack's measures for the host's dynamic VRAM loader (blora/host/compat.py), on CPU.

On CPU the host hands back a plain ModelPatcher (ModelPatcherDynamic needs a GPU: bench/gpu_check.py runs the real
thing). Here each measure is checked against the host state it reacts to, made the way the dynamic loader leaves
it: a module whose ``weight_function`` list the loader did not set, a VRAM copy marked resident, a weight tagged
with the loader's tags. That the loader really leaves that state (the attribute names, the 16 KiB force-load, the
tags) is checked in the host's own source by tests/host/test_host_compat.py, on both hosts."""
from __future__ import annotations

import importlib

import pytest
import torch
from blora_testkit.dynamic import make_lora, sample

CONTENT, STYLE = "output_blocks.0.1", "output_blocks.1.1"


@pytest.fixture(autouse=True)
def host(comfy_host):
    """The host modules and the pack's module under test, imported once the host runs on CPU."""
    global comfy, dv, fused_clone, frozen_aliases, DynamicFlagged
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension

    dv = importlib.import_module("blora.host.compat")
    fused_clone = importlib.import_module("blora.host.realise").fused_clone
    frozen_aliases = importlib.import_module("blora.host.train_wrappers").frozen_aliases

    class DynamicFlagged(comfy.model_patcher.ModelPatcher):
        """The host's ModelPatcher reporting itself dynamic: the pack's callbacks act only on dynamic patchers."""

        def is_dynamic(self):
            return True


def _callbacks(patcher, kind):
    return patcher.get_all_callbacks(kind)


def test_feature_checks():
    assert not dv.is_dynamic(object())  # hosts before 0.33 have no is_dynamic
    assert hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic") == hasattr(comfy.model_patcher,
                                                                              "ModelPatcherDynamic")


def test_weight_functions_reach_modules_the_loader_skipped_and_leave_on_detach(tiny_model):
    subject = make_lora(tiny_model, [CONTENT, STYLE], seed=1)
    style = make_lora(tiny_model, [CONTENT, STYLE], seed=2)
    fused, _ = fused_clone(tiny_model, subject, style, 1.0, 1.0)
    assert fused.weight_wrapper_patches, "no layer switches: the test would check nothing"
    on_load = [c for c in _callbacks(fused, comfy.patcher_extension.CallbacksMP.ON_LOAD)]
    on_detach = [c for c in _callbacks(fused, comfy.patcher_extension.CallbacksMP.ON_DETACH)]
    assert len(on_load) == 1 and len(on_detach) >= 1
    dynamic = DynamicFlagged(fused.model, fused.load_device, fused.offload_device)
    for key, functions in dv.weight_functions(fused).items():  # through the host's own API
        for function in functions:
            dynamic.add_weight_wrapper(key, function)
    key = sorted(fused.weight_wrapper_patches)[0]
    module = fused.model.get_submodule(key.rsplit(".", 1)[0])
    other = object()
    module.weight_function = [other]  # what a previous patcher left on a force-loaded module
    on_load[0](dynamic, "cpu", 0, False, False)
    assert module.weight_function[0] is other and module.weight_function[1:] == fused.weight_wrapper_patches[key]
    on_load[0](dynamic, "cpu", 0, False, False)  # a second load adds nothing twice
    assert len(module.weight_function) == 1 + len(fused.weight_wrapper_patches[key])
    for callback in on_detach:
        callback(dynamic, False)
    assert module.weight_function == [other]  # ours gone, the other patcher's untouched
    module.weight_function = []
    on_load[0](fused, "cpu", 0, False, False)  # a classic patcher: its loader sets the lists itself
    assert module.weight_function == []


def test_bias_functions_reach_modules_the_loader_skipped_too(tiny_model):
    from dataclasses import replace

    from blora.compose.strength_schedule import parse_schedule

    style = make_lora(tiny_model, [STYLE], seed=3)
    path = next(p for p in style.modules if p.endswith("to_out.0"))  # a Linear with a bias
    module = tiny_model.model.get_submodule(f"diffusion_model.{path}")
    m = style.modules[path]
    with_bias = replace(m, tensors={**m.tensors, "diff_b": torch.randn(module.bias.shape[0])})
    style = replace(style, modules={**style.modules, path: with_bias})
    scheduled = importlib.import_module("blora.host.realise").scheduled_clone(
        tiny_model, {"style": (style, parse_schedule("0:0, 1:1"))})
    key = f"diffusion_model.{path}.bias"
    assert key in dv.weight_functions(scheduled)
    dynamic = DynamicFlagged(scheduled.model, scheduled.load_device, scheduled.offload_device)
    for k, functions in dv.weight_functions(scheduled).items():
        for function in functions:
            dynamic.add_weight_wrapper(k, function)
    module.bias_function = []
    try:
        for callback in scheduled.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_LOAD):
            callback(dynamic, "cpu", 0, False, False)
        assert module.bias_function == dv.weight_functions(scheduled)[key]
        for callback in scheduled.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_DETACH):
            callback(dynamic, False)
        assert module.bias_function == []
    finally:
        module.bias_function = []


def test_keep_weight_functions_changes_nothing_on_a_classic_patcher(tiny_model):
    subject = make_lora(tiny_model, [CONTENT, STYLE], seed=1)
    style = make_lora(tiny_model, [CONTENT, STYLE], seed=2)
    fused, _ = fused_clone(tiny_model, subject, style, 1.0, 1.0)
    stripped = fused.clone()
    for kind in (comfy.patcher_extension.CallbacksMP.ON_LOAD, comfy.patcher_extension.CallbacksMP.ON_DETACH):
        stripped.callbacks.get(kind, {}).pop(dv.CALLBACK_KEY, None)
    assert torch.equal(sample(fused), sample(stripped))
    assert dv.keep_weight_functions(stripped) is stripped


def test_restream_marks_resident_copies_stale(tiny_model):
    unet = tiny_model.model.diffusion_model
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)][:3]
    for m in linears:
        m._v_signature = ("resident", 1)
    try:
        assert dv.restream_weights(unet) == 3
        assert all(m._v_signature is None for m in linears)
        assert dv.restream_weights(unet) == 0
    finally:
        for m in linears:
            del m._v_signature


def test_frozen_aliases_keep_the_host_tags(tiny_model):
    unet = tiny_model.model.diffusion_model
    name, param = next(iter(unet.named_parameters()))
    for tag in dv.HOST_TENSOR_TAGS:  # the dynamic loader's tags (_model_dtype: the dtype its VRAM copy is cast to)
        setattr(param, tag, torch.bfloat16)
    try:
        with frozen_aliases(unet):
            alias = unet.get_parameter(name)
            assert alias is not param and alias.data_ptr() == param.data_ptr() and not alias.requires_grad
            assert all(getattr(alias, tag) is torch.bfloat16 for tag in dv.HOST_TENSOR_TAGS)
        assert unet.get_parameter(name) is param
    finally:
        for tag in dv.HOST_TENSOR_TAGS:
            delattr(param, tag)


def test_training_flag_is_raised_only_inside():
    if not hasattr(comfy.model_management, "in_training"):  # 0.3.64: no such flag, and none is made
        with dv.training_flag():
            assert not hasattr(comfy.model_management, "in_training")
        return
    assert comfy.model_management.in_training is False
    with dv.training_flag():
        assert comfy.model_management.in_training is True
    assert comfy.model_management.in_training is False
