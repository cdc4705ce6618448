"""Every host internal ``blora.host.compat`` names, checked against the real host (run on both hosts): by behaviour
on CPU where the host can show it, else in the host's own source (the dynamic VRAM loader needs an NVIDIA GPU, the
server a running process). A host that changes one of these fails here, not in a feature."""
from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest
import torch
from blora_testkit.dynamic import make_lora, sample
from blora_testkit.nodes import unload_all

STYLE = "output_blocks.1.1"
PATH = f"{STYLE}.transformer_blocks.0.attn1.to_out.0"  # a Linear with a bias


@pytest.fixture(autouse=True)
def host(comfy_host):
    global comfy, compat
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import blora.host.compat as compat


def source(relative: str) -> str:
    return (Path(comfy.model_patcher.__file__).parents[1] / relative).read_text(encoding="utf-8")


class Spy:
    def __init__(self):
        self.calls = []

    def __call__(self, tensor):
        self.calls.append(tensor.shape)
        return tensor


def test_weight_wrappers_are_registered_per_key_and_run_by_the_loader_on_weight_and_bias(tiny_model):
    clone = tiny_model.clone()
    w_spy, b_spy = Spy(), Spy()
    clone.add_weight_wrapper(f"diffusion_model.{PATH}.weight", w_spy)
    clone.add_weight_wrapper(f"diffusion_model.{PATH}.bias", b_spy)
    assert compat.weight_functions(clone) == {f"diffusion_model.{PATH}.weight": [w_spy],
                                             f"diffusion_model.{PATH}.bias": [b_spy]}
    module = clone.model.diffusion_model.get_submodule(PATH)
    for key, spy in ((f"diffusion_model.{PATH}.weight", w_spy), (f"diffusion_model.{PATH}.bias", b_spy)):
        path, attr = compat.functions_attr(key)
        assert path == f"diffusion_model.{PATH}" and hasattr(module, attr)
    sample(clone, steps=1)
    assert w_spy.calls and b_spy.calls and b_spy.calls[0] == module.bias.shape
    unload_all()


def test_key_patches_hold_the_stored_weight_then_the_tuples_add_patches_makes(tiny_model):
    key = f"diffusion_model.{PATH}.bias"
    diff = torch.randn(tiny_model.model.diffusion_model.get_submodule(PATH).bias.shape)
    clone = tiny_model.clone()
    patch = ("diff", (diff,))
    assert clone.add_patches({key: patch}, 0.5) == [key]
    assert clone.patches[key] == [compat.patch_tuple(patch, 0.5)]
    key_patches = clone.get_key_patches("diffusion_model.")
    assert compat.stored_dtype(key_patches, key) == tiny_model.model.state_dict()[key].dtype
    stored, patches = compat.stored_weight(key_patches, key)
    assert torch.equal(stored, tiny_model.model.state_dict()[key].float()) and patches == clone.patches[key]
    rendered = compat.render(patches, stored.clone(), key)
    torch.testing.assert_close(rendered, stored + 0.5 * diff)
    unload_all()
    with torch.inference_mode():
        clone.patch_model()
    try:
        assert torch.equal(clone.model.state_dict()[key], rendered)  # the host's own patching agrees
    finally:
        clone.unpatch_model()


def test_diffusion_model_wrappers_get_the_unet_and_the_transformer_options(tiny_model):
    seen = []

    def wrapper(executor, x, *args, **kwargs):
        seen.append((compat.wrapped_object(executor), compat.transformer_options_of(args, kwargs)))
        return executor(x, *args, **kwargs)

    clone = tiny_model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.compat", wrapper)
    sample(clone, steps=2)
    assert len(seen) == 2
    for unet, options in seen:
        assert unet is tiny_model.model.diffusion_model
        assert "cond_or_uncond" in options and "sample_sigmas" in options and "wrappers" in options


def test_call_options_run_the_patchers_wrappers_on_a_direct_unet_call(tiny_model):
    from blora_testkit.tiny_sdxl import tiny_conditioning

    calls = []

    def wrapper(executor, x, *args, **kwargs):
        calls.append(x.shape[0])
        return executor(x, *args, **kwargs)

    clone = tiny_model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.compat", wrapper)
    unet = clone.model.diffusion_model
    context = tiny_conditioning(1)[0][0]
    y = torch.zeros(1, clone.model.model_config.unet_config["adm_in_channels"])
    with torch.inference_mode():
        unet(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), context=context, y=y, control=None,
             transformer_options=dict(clone.model_options.get("transformer_options", {})))
        assert calls == []  # the patcher's own options carry no wrappers
        unet(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), context=context, y=y, control=None,
             transformer_options=compat.call_options(clone))
    assert calls == [1]


def test_load_and_detach_callbacks_take_the_arguments_the_host_passes(tiny_model):
    style = make_lora(tiny_model, [STYLE], seed=1)
    from blora.host.realise import scheduled_clone
    from blora.compose.strength_schedule import parse_schedule

    clone = scheduled_clone(tiny_model, {"style": (style, parse_schedule("0:0, 1:1"))})
    calls = []
    clone.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, "test.compat",
                                lambda *args: calls.append(("load", len(args))))
    clone.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, "test.compat",
                                lambda *args: calls.append(("detach", len(args))))
    sample(clone, steps=1)
    unload_all()
    assert ("load", 5) in calls and ("detach", 2) in calls  # compat's callbacks took these without error


def test_the_dynamic_loader_is_recognised_by_feature():
    has_dynamic = hasattr(comfy.model_patcher, "ModelPatcherDynamic")
    assert hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic") == has_dynamic
    assert not compat.is_dynamic(object())
    if has_dynamic:
        assert "return True" in inspect.getsource(comfy.model_patcher.ModelPatcherDynamic.is_dynamic)


def test_the_dynamic_loaders_internals_are_as_compat_names_them():
    """What keep_weight_functions, restream_weights and copy_host_tags react to, in the loader's own source."""
    patcher = source("comfy/model_patcher.py")
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        assert "_v_signature" not in patcher and "_model_dtype =" not in patcher  # nothing to react to
        return
    dynamic = inspect.getsource(comfy.model_patcher.ModelPatcherDynamic)
    ops = source("comfy/ops.py")
    assert "item._v_signature = None" in dynamic and "s._v_signature" in ops  # restream_weights: set_dirty
    assert "s._v_weight = weight" in ops  # the resident copy the signature guards
    assert "weight._model_dtype = " in dynamic  # copy_host_tags: HOST_TENSOR_TAGS
    assert all(f"t.{tag}" in source("comfy/memory_management.py") for tag in compat.HOST_TENSOR_TAGS)
    assert "if module_mem > 16 * 1024:" in dynamic  # small modules are force-loaded ...
    assert "weight_function.extend(self.weight_wrapper_patches[key])" in dynamic  # ... only streamed ones get these
    assert 'setattr(m, param_key + "_function", weight_function)' in dynamic  # functions_attr


def test_restream_and_host_tags_on_real_modules(tiny_model):
    unet = tiny_model.model.diffusion_model
    assert compat.restream_weights(unet) == 0  # never streamed on CPU: nothing resident
    weight = unet.get_submodule(PATH).weight
    alias = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    weight._model_dtype = torch.bfloat16
    try:
        assert compat.copy_host_tags(weight, alias)._model_dtype is torch.bfloat16
    finally:
        del weight._model_dtype


def test_training_flag_is_the_hosts_own():
    has_flag = hasattr(comfy.model_management, "in_training")
    trainer = source("comfy_extras/nodes_train.py")
    assert has_flag == ("comfy.model_management.in_training = True" in trainer)
    if has_flag:
        assert comfy.model_management.in_training is False
        with compat.training_flag():
            assert comfy.model_management.in_training is True
        assert comfy.model_management.in_training is False
        assert "comfy.model_management.in_training" in source("comfy/ops.py")
    else:
        with compat.training_flag():
            assert not hasattr(comfy.model_management, "in_training")


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_the_server_instance_and_send_sync_are_as_compat_uses_them(monkeypatch):
    tree = ast.parse(source("server.py"))
    server = _class(tree, "PromptServer")
    methods = {n.name: n for n in server.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    init = ast.unparse(methods["__init__"])
    assert "PromptServer.instance = self" in init and "self.client_id = None" in init
    assert [a.arg for a in methods["send_sync"].args.args] == ["self", "event", "data", "sid"]
    assert compat.prompt_server() is None or "server" in sys.modules  # no server in this process: None
    sent = []

    class Instance:
        client_id = "c1"

        def send_sync(self, event, data, sid=None):
            sent.append((event, data, sid))

    import types
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=Instance())))
    compat.client_sender("blora.test")({"a": 1})
    assert sent == [("blora.test", {"a": 1}, "c1")]
