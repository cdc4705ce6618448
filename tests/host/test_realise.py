"""The realiser's trainable layers in the real host: a layer installed as a weight function (W -> layer(W)) and the
same layer on the activations (output += layer.output_delta(x)) give the same model, sampled through the host or
called directly inside ``installed``; nothing stays on the shared UNet afterwards; Widen widens the batch."""
from __future__ import annotations

import pytest
import torch
from blora_testkit.dynamic import sample
from blora_testkit.nodes import unload_all
from blora_testkit.tiny_sdxl import tiny_conditioning

PATHS = ["output_blocks.1.1.transformer_blocks.0.attn1.to_q", "output_blocks.1.1.transformer_blocks.0.attn1.to_out.0"]


@pytest.fixture(autouse=True)
def host(comfy_host):
    global plan_mod, realise_mod
    import blora.compose.plan as plan_mod
    import blora.host.realise as realise_mod


class Layer(torch.nn.Module):
    """A trainable LoRA speaking both protocols of the plan: weight function and activation delta."""

    def __init__(self, out_f, in_f, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.down = torch.nn.Parameter(torch.randn(2, in_f, generator=g) / in_f ** 0.5)
        self.up = torch.nn.Parameter(torch.randn(out_f, 2, generator=g) * 0.3)
        self.multiplier = 1.0

    def forward(self, weight):
        return (weight.float() + self.multiplier * self.up @ self.down).to(weight.dtype)

    def output_delta(self, x):
        return torch.nn.functional.linear(x, (self.multiplier * self.up @ self.down).to(x.dtype))

    def move_to(self, device):
        self.to(device)
        return 0


def layers(model):
    unet = model.model.diffusion_model
    return {p: Layer(*unet.get_submodule(p).weight.shape, seed=i) for i, p in enumerate(PATHS)}


def hooks_left(model):
    unet = model.model.diffusion_model
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def unet_call(model, options, batch=1, grad=False):
    unet = model.model.diffusion_model
    context = tiny_conditioning(1)[0][0].repeat(batch, 1, 1)
    y = torch.zeros(batch, model.model.model_config.unet_config["adm_in_channels"])
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.set_grad_enabled(grad):
        return unet(x, torch.full((batch,), 500.0), context=context, y=y, control=None, transformer_options=options)


def test_weight_and_activation_modes_sample_the_same(tiny_model):
    trained = layers(tiny_model)
    by_weight = realise_mod.realise(tiny_model, plan_mod.trained_plan(trained, "weight"))
    by_activation = realise_mod.realise(tiny_model, plan_mod.trained_plan(trained, "activation"))
    assert set(by_weight.weight_wrapper_patches) == {f"diffusion_model.{p}.weight" for p in PATHS}
    assert not by_activation.weight_wrapper_patches
    a, b, base = sample(by_weight), sample(by_activation), sample(tiny_model)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the layers do change the model
    assert hooks_left(tiny_model) == 0  # per-call hooks are gone after sampling
    unload_all()


def test_installed_holds_the_hooks_once_and_cleans_up(tiny_model):
    trained = layers(tiny_model)
    by_weight = realise_mod.realise(tiny_model, plan_mod.trained_plan(trained, "weight"))
    mixed = plan_mod.Plan()
    mixed.add(PATHS[0], plan_mod.Trained(trained[PATHS[0]], "weight"))
    mixed.add(PATHS[1], plan_mod.Trained(trained[PATHS[1]], "activation"))
    clone = realise_mod.realise(tiny_model, mixed)
    unload_all()
    import comfy.model_management

    comfy.model_management.load_models_gpu([by_weight])
    want = unet_call(by_weight, realise_mod.compat.call_options(by_weight))
    unload_all()
    comfy.model_management.load_models_gpu([clone])
    unet = clone.model.diffusion_model
    with realise_mod.installed(clone) as options:
        assert hooks_left(tiny_model) == 1
        got = unet_call(clone, dict(options))  # the clone's per-call wrapper runs too, and adds nothing twice
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert hooks_left(tiny_model) == 0
    assert all(trained[PATHS[0]] is not f for m in unet.modules() for f in getattr(m, "weight_function", []))
    unload_all()


def test_widen_repeats_the_batch_from_the_first_widened_layer(tiny_model):
    from blora.host.train_wrappers import unet_layers

    names = [name for name, _ in unet_layers(tiny_model.model.diffusion_model)]
    region = tuple(names[names.index("output_blocks.0.0"):])  # every layer from the first widened one to the end
    plan = plan_mod.trained_plan({}, widen=plan_mod.Widen(seeds=3, rows=1, layers=region))
    clone = realise_mod.realise(tiny_model, plan)
    with realise_mod.installed(clone) as options:
        out = unet_call(clone, dict(options))
    assert out.shape[0] == 3 and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    torch.testing.assert_close(out[:1], unet_call(tiny_model, {}), rtol=1e-5, atol=1e-6)
    assert hooks_left(tiny_model) == 0


def test_both_modes_train_the_same_gradients(tiny_model):
    """What training needs from the realiser: the loss and the layers' gradients agree between the modes, with the
    activation hooks held by ``installed`` across a direct UNet call and its backward."""
    import comfy.model_management

    grads = {}
    for mode in ("weight", "activation"):
        trained = layers(tiny_model)
        clone = realise_mod.realise(tiny_model, plan_mod.trained_plan(trained, mode))
        unload_all()
        comfy.model_management.load_models_gpu([clone])
        with torch.inference_mode(False), realise_mod.installed(clone) as options:
            loss = unet_call(clone, dict(options), grad=True).square().mean()
            loss.backward()
        grads[mode] = (loss.item(), [t.grad.clone() for a in trained.values() for t in (a.down, a.up)])
        unload_all()
    (loss_w, g_w), (loss_a, g_a) = grads["weight"], grads["activation"]
    assert loss_w == pytest.approx(loss_a, rel=1e-5)
    assert all(g.abs().max() > 0 for g in g_w)
    for a, b in zip(g_w, g_a):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
