"""blora.train.recipe, blora.adapters.trainable, blora.train.images: the recipe, targets, draws, loss, optimizer
groups, the trainable LoRA / rsLoRA / DoRA math and training-image preparation (torch only)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from blora.adapters.adapter import ModuleAdapter
from blora.errors import BLoRAError
from blora.train.dataset import training_views
from blora.train.images import training_size
from blora.adapters.trainable import DORA_EPS
from blora.adapters.kinds.lora import TrainableLoRA
from blora.train.recipe import (CHECKPOINTING, TrainConfig, diffusion_loss, make_optimizer, param_groups, sample_batch,
                                sample_flips, sample_noise, sample_timesteps, select_targets, step_generator,
                                training_target)

ATTNS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
         "attn2.to_out.0")
OTHERS = ("ff.net.0.proj", "ff.net.2", "attn1.to_out", "norm1")


def sdxl_like_paths(depth: int = 2) -> list[str]:
    """Linear-layer paths as the SDXL UNet names them, for every attention block, plus non-targets."""
    blocks = ["input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1"] + \
             [f"output_blocks.{i}.1" for i in range(6)]
    paths = ["time_embed.0", "label_emb.0.0"]
    for b in blocks:
        paths += [f"{b}.proj_in", f"{b}.proj_out"]
        for t in range(depth):
            paths += [f"{b}.transformer_blocks.{t}.{n}" for n in ATTNS + OTHERS]
    return paths


# ---------------------------------------------------------------- TrainConfig

def test_defaults_are_the_paper_recipe():
    c = TrainConfig()
    assert (c.blocks, c.rank, c.alpha, c.algorithm, c.rslora) == ("content+style", 64, 64.0, "LoRA", False)
    assert (c.learning_rate, c.optimizer, c.weight_decay, c.betas, c.eps) == (5e-5, "AdamW", 1e-4, (0.9, 0.999), 1e-8)
    assert (c.steps, c.batch_size, c.grad_accumulation, c.resolution, c.seed) == (1000, 1, 1, 1024, 0)
    assert (c.max_grad_norm, c.loraplus_ratio, c.flip, c.save_every) == (1.0, 1.0, False, 0)
    assert (c.gradient_checkpointing, c.offload) == ("trained blocks", False)
    assert c.scale == 1.0 and c.stored_alpha == 64.0 and c.roles == ("content", "style")


@pytest.mark.parametrize("old, new", [(True, "trained blocks"), (False, "off"), ("all above", "all above")])
def test_gradient_checkpointing_takes_a_mode_or_the_old_boolean(old, new):
    assert TrainConfig(gradient_checkpointing=old).gradient_checkpointing == new


@pytest.mark.parametrize("field, value", [
    ("gradient_checkpointing", "everything"), ("blocks", "everything"), ("rank", 0), ("alpha", 0.0), ("alpha", float("nan")), ("algorithm", "IA3"),
    ("learning_rate", -1e-4), ("loraplus_ratio", 0.0), ("optimizer", "Adam"), ("weight_decay", -0.1),
    ("steps", 0), ("batch_size", 0), ("grad_accumulation", 0), ("resolution", 32), ("seed", -1),
    ("training_dtype", "fp8"), ("save_every", -5), ("layer_filter", "attn[12"), ("eps", 0.0),
    ("adalora_interval", 0), ("adalora_orth_reg", -0.5), ("lokr_factor", 0), ("adalora_target_rank", -1),
    ("gradient_checkpointing", "sometimes"),
])
def test_config_refuses_naming_field_and_value(field, value):
    with pytest.raises(BLoRAError) as e:
        TrainConfig(**{field: value})
    assert f"`{field}`" in str(e.value) and repr(value) in str(e.value)


def test_gradient_checkpointing_is_a_mode_and_the_old_switch_still_works():
    assert [TrainConfig(gradient_checkpointing=v).gradient_checkpointing for v in (True, False)] == \
        ["trained blocks", "off"]
    assert [TrainConfig(gradient_checkpointing=m).gradient_checkpointing for m in CHECKPOINTING] == \
        ["off", "trained blocks", "all above"]
    assert TrainConfig(gradient_checkpointing=False).as_metadata()["blora.train.gradient_checkpointing"] == "off"


def test_custom_needs_a_filter_and_betas_are_checked():
    with pytest.raises(BLoRAError, match="`layer_filter` is required"):
        TrainConfig(blocks="custom")
    with pytest.raises(BLoRAError, match="`betas`"):
        TrainConfig(betas=(0.9, 1.0))


def test_rslora_scale_and_stored_alpha():
    c = TrainConfig(rank=16, alpha=8.0, rslora=True)
    assert c.scale == pytest.approx(8.0 / 4.0) and c.stored_alpha == pytest.approx(8.0 * 4.0)
    assert c.stored_alpha / c.rank == pytest.approx(c.scale)  # what alpha/rank loaders apply
    assert TrainConfig(rank=16, alpha=8.0).scale == pytest.approx(0.5)


def test_metadata_records_every_setting():
    meta = TrainConfig(rank=4).as_metadata()
    assert meta["blora.train.rank"] == "4" and meta["blora.train.blocks"] == "content+style"
    assert all(isinstance(v, str) for v in meta.values())
    assert sorted(meta) == sorted(f"blora.train.{f.name}" for f in dataclasses.fields(TrainConfig))


# ---------------------------------------------------------------- targets

def test_default_targets_are_the_original_trainers():
    paths = sdxl_like_paths(depth=2)
    chosen = select_targets(paths, TrainConfig())
    expected = sorted(f"{b}.transformer_blocks.{t}.{n}" for b in ("output_blocks.0.1", "output_blocks.1.1")
                      for t in range(2) for n in ATTNS)
    assert chosen == expected and len(chosen) == 2 * 2 * 8


@pytest.mark.parametrize("blocks, roots", [
    ("content", ["output_blocks.0.1"]), ("style", ["output_blocks.1.1"]),
    ("content+style+layout", ["input_blocks.8.1", "output_blocks.0.1", "output_blocks.1.1"]),
])
def test_presets_select_their_blocks_only(blocks, roots):
    chosen = select_targets(sdxl_like_paths(1), TrainConfig(blocks=blocks))
    assert sorted({p.split(".transformer_blocks")[0] for p in chosen}) == roots
    assert len(chosen) == 8 * len(roots)


def test_layer_filter_narrows_a_preset_and_selects_with_custom():
    narrowed = select_targets(sdxl_like_paths(2), TrainConfig(layer_filter=r"attn2\.to_[kv]$"))
    assert len(narrowed) == 2 * 2 * 2 and all(".attn2.to_k" in p or ".attn2.to_v" in p for p in narrowed)
    custom = select_targets(sdxl_like_paths(2), TrainConfig(blocks="custom", layer_filter=r"^middle_block\.1\..*ff"))
    assert custom == sorted(f"middle_block.1.transformer_blocks.{t}.{n}" for t in range(2)
                            for n in ("ff.net.0.proj", "ff.net.2"))


def test_a_filter_matching_nothing_is_an_error_naming_it():
    with pytest.raises(BLoRAError, match=r"layer_filter 'to_zzz' within blocks 'content\+style' matches no"):
        select_targets(sdxl_like_paths(1), TrainConfig(layer_filter="to_zzz"))
    with pytest.raises(BLoRAError, match="matches no Linear layer"):
        select_targets(["time_embed.0"], TrainConfig())


# ---------------------------------------------------------------- draws

def test_step_generator_is_a_function_of_seed_and_step():
    a = sample_noise((2, 3), step_generator(7, 11))
    assert torch.equal(a, sample_noise((2, 3), step_generator(7, 11)))
    assert not torch.equal(a, sample_noise((2, 3), step_generator(7, 12)))
    assert not torch.equal(a, sample_noise((2, 3), step_generator(8, 11)))


def test_timesteps_are_uniform_integers_over_the_schedule():
    t = sample_timesteps(200_000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 999
    counts = torch.bincount(t, minlength=1000).float()
    assert counts.min() > 120 and counts.max() < 290  # expected 200 per bin
    assert float(t.float().mean()) == pytest.approx(499.5, abs=2.0)
    assert torch.equal(t[:50], sample_timesteps(50, 1000, torch.Generator().manual_seed(0)))


def test_batches_are_permutations_and_flips_follow_the_switch():
    g = torch.Generator().manual_seed(3)
    assert sorted(sample_batch(5, 5, g)) == [0, 1, 2, 3, 4]
    assert sample_batch(1, 3, g) == [0, 0, 0]
    assert len(set(sample_batch(4, 2, g))) == 2
    assert sample_flips(64, False, torch.Generator().manual_seed(0)) == [False] * 64
    flips = sample_flips(2000, True, torch.Generator().manual_seed(0))
    assert 900 < sum(flips) < 1100


# ---------------------------------------------------------------- loss

def test_eps_target_is_the_noise_and_v_target_reconstructs_x0():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.03, 1.0, 14.6])
    assert training_target("EPS", x0, noise, sigma) is noise
    v = training_target("V_PREDICTION", x0, noise, sigma)
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * noise
    denoised = x / (s ** 2 + 1) - v * s / (s ** 2 + 1) ** 0.5  # ComfyUI's V_PREDICTION.calculate_denoised
    assert torch.allclose(denoised, x0, atol=1e-5)
    with pytest.raises(BLoRAError, match="cannot train a X0 model"):
        training_target("X0", x0, noise, sigma)


def test_loss_is_float32_mse():
    out, target = torch.ones(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4)
    loss = diffusion_loss(out * 3, target)
    assert loss.dtype == torch.float32 and float(loss) == 9.0


# ---------------------------------------------------------------- optimizer groups

def _adapters(dora: bool = False) -> dict[str, TrainableLoRA]:
    g = torch.Generator().manual_seed(0)
    return {f"m{i}": TrainableLoRA.create(torch.randn(6, 5, generator=g), 2, 1.0, dora, g) for i in range(3)}


def test_loraplus_groups_give_up_matrices_the_ratio():
    adapters = _adapters(dora=True)
    groups = param_groups(adapters, TrainConfig(learning_rate=1e-4, loraplus_ratio=16.0))
    down, up = groups
    assert down["lr"] == 1e-4 and up["lr"] == pytest.approx(1.6e-3)
    assert {id(p) for p in up["params"]} == {id(a.up) for a in adapters.values()}
    assert {id(p) for p in down["params"]} == {id(a.down) for a in adapters.values()} | \
        {id(a.magnitude) for a in adapters.values()}


def test_optimizers_carry_the_recipe():
    adam = make_optimizer(_adapters(), TrainConfig(weight_decay=1e-4))
    assert isinstance(adam, torch.optim.AdamW)
    assert adam.defaults["betas"] == (0.9, 0.999) and adam.defaults["eps"] == 1e-8
    assert adam.defaults["weight_decay"] == 1e-4
    assert isinstance(make_optimizer(_adapters(), TrainConfig(optimizer="SGD")), torch.optim.SGD)


# ---------------------------------------------------------------- trainable adapter math

def comfy_dora_input_axis(weight, up, down, alpha_over_rank, dora_scale):
    """Reference: stock ComfyUI's weight_decompose for a (1, in) dora_scale, written from its formula."""
    calc = weight + alpha_over_rank * (up @ down)
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    return calc * (dora_scale / (norm + torch.finfo(torch.float32).eps))


def test_fresh_adapter_is_identity_and_draws_from_the_generator():
    w = torch.randn(6, 5)
    for dora in (False, True):
        a = TrainableLoRA.create(w, 3, 2.0, dora, torch.Generator().manual_seed(1))
        assert torch.equal(a(w), w)
        assert a.down.shape == (3, 5) and a.up.shape == (6, 3) and float(a.up.detach().abs().sum()) == 0.0
    b = TrainableLoRA.create(w, 3, 2.0, False, torch.Generator().manual_seed(1))
    assert torch.equal(a.down, b.down)


def test_the_default_initialisation_is_the_original_normal_with_std_one_over_rank():
    """diffusers' LoRALinearLayer (the original B-LoRA trainer) and PEFT init_lora_weights="gaussian": down ~
    N(0, 1/rank), up = 0. The other choice, kaiming_uniform, is PEFT's default: uniform in +-1/sqrt(in)."""
    assert TrainConfig().init == "gaussian"
    rank, fan_in = 4, 8192
    w = torch.zeros(16, fan_in)
    down = TrainableLoRA.create(w, rank, 1.0, False, torch.Generator().manual_seed(0)).down.detach().flatten()
    n = down.numel()
    assert abs(float(down.mean())) < 4 / rank / math.sqrt(n)  # mean 0 within 4 standard errors
    assert float(down.std()) == pytest.approx(1 / rank, rel=0.02)
    # normal, not uniform: the share within one std is 68.3% (uniform: 57.7%), excess kurtosis 0 (uniform: -1.2)
    assert float((down.abs() < 1 / rank).float().mean()) == pytest.approx(0.6827, abs=0.01)
    kurtosis = float(((down - down.mean()) ** 4).mean() / down.var() ** 2) - 3
    assert abs(kurtosis) < 0.1
    uniform = TrainableLoRA.create(w, rank, 1.0, False, torch.Generator().manual_seed(0),
                                   init="kaiming_uniform").down.detach().flatten()
    bound = 1 / math.sqrt(fan_in)
    assert float(uniform.abs().max()) <= bound and float(uniform.abs().max()) > 0.99 * bound
    assert float(uniform.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    with pytest.raises(BLoRAError, match="init"):
        TrainConfig(init="xavier")


def test_lora_forward_and_export_match_the_alpha_over_rank_rule():
    g = torch.Generator().manual_seed(2)
    w, up, down = torch.randn(6, 5, generator=g), torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g)
    a = TrainableLoRA(down, up, scale=8.0 / math.sqrt(4))  # rsLoRA alpha 8, rank 4
    assert torch.allclose(a(w), w + 4.0 * up @ down, atol=1e-6)
    m = a.export(alpha=a.scale * a.rank)
    assert m.alpha == pytest.approx(16.0) and m.scale == pytest.approx(4.0)  # stored alpha * sqrt(r) semantics
    assert torch.equal(TrainableLoRA.from_module(m)(w), a(w))


def test_dora_forward_equals_comfyui_input_axis_rendering():
    g = torch.Generator().manual_seed(3)
    w, up, down = torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    magnitude = torch.rand(1, 5, generator=g) + 0.5
    a = TrainableLoRA(down, up, 0.5, magnitude)
    ref = comfy_dora_input_axis(w, up, down, 0.5, magnitude)
    assert torch.allclose(a(w), ref, atol=1e-6)
    m = a.export(alpha=1.0)
    assert m.dora_scale.shape == (1, 5) and m.scale == 0.5
    assert torch.allclose(TrainableLoRA.from_module(m)(w), ref, atol=1e-6)


def test_dora_norm_is_a_constant_in_backward_and_magnitude_learns():
    w = torch.randn(4, 3)
    a = TrainableLoRA.create(w, 2, 1.0, True, torch.Generator().manual_seed(0))
    a(w).sum().backward()
    assert a.magnitude.grad is not None and a.up.grad is not None and a.down.grad is not None
    col = w.norm(dim=0, keepdim=True) + DORA_EPS
    assert torch.allclose(a.magnitude.grad, w.sum(dim=0, keepdim=True) / col, atol=1e-5)


def test_output_dtype_follows_the_weight_and_resume_refuses_other_kinds():
    w = torch.randn(4, 3, dtype=torch.bfloat16)
    assert TrainableLoRA.create(w, 2, 1.0, False, torch.Generator())(w).dtype == torch.bfloat16
    loha = ModuleAdapter("loha", {k: torch.ones(2, 2) for k in ("w1a", "w1b", "w2a", "w2b")})
    with pytest.raises(BLoRAError, match="only plain LoRA"):
        TrainableLoRA.from_module(loha)
    out_axis = ModuleAdapter("lora", {"down": torch.ones(2, 3), "up": torch.ones(4, 2)}, 2.0, torch.ones(4, 1))
    with pytest.raises(BLoRAError, match=r"input-axis form \(1, in\)"):
        TrainableLoRA.from_module(out_axis)


# ---------------------------------------------------------------- training images

def test_training_size_keeps_aspect_on_the_latent_grid():
    assert training_size(768, 1024, 1024) == (1024, 1368)
    assert training_size(1000, 1000, 512) == (512, 512)
    assert training_size(300, 50, 64) == (384, 64)


def test_images_of_any_mode_become_rgb_in_unit_range():
    gray = torch.full((1, 40, 40, 1), 0.25)
    rgba = torch.cat([torch.full((1, 40, 40, 3), 0.5), torch.zeros(1, 40, 40, 1)], dim=-1)
    sixteen = torch.full((1, 40, 40, 3), 65535 // 4, dtype=torch.int32)
    eight = torch.full((1, 40, 40, 3), 51, dtype=torch.uint8)
    out = [v.image for v in training_views([gray, rgba, sixteen, eight], resolution=64)]
    assert [tuple(i.shape) for i in out] == [(64, 64, 3)] * 4
    for image, value in zip(out, (0.25, 0.5, 0.25, 0.2)):
        assert image.dtype == torch.float32 and torch.allclose(image, torch.full_like(image, value), atol=1e-3)


def test_mixed_sizes_are_resized_each_and_sizes_reported():
    images = [torch.rand(48, 96, 3), torch.rand(1, 80, 40, 3)]
    views = training_views(images, resolution=64)
    assert [tuple(v.image.shape) for v in views] == [(64, 128, 3), (128, 64, 3)]
    assert [v.original_size for v in views] == [(48, 96), (80, 40)]
    assert all(float(v.image.min()) >= 0.0 and float(v.image.max()) <= 1.0 for v in views)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(0, 64, 64, 3), "no training images"),
    ([], "no training images"),
    (torch.rand(1, 64, 64, 2), "image 0: 2 channels"),
    (torch.rand(2, 64, 64, 3) * 255, "image 0: values from"),
    (torch.rand(64, 64), "expected \\(B, H, W, C\\)"),
])
def test_bad_images_are_refused_clearly(images, message):
    with pytest.raises(BLoRAError, match=message):
        training_views(images, resolution=64)


# ---------------------------------------------------------------- FLUX.1
def flux_like_paths(single=38, double=19):
    double_layers = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mod.lin",
                     "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
    return ([f"double_blocks.{n}.{x}" for n in range(double) for x in double_layers]
            + [f"single_blocks.{n}.{x}" for n in range(single) for x in ("linear1", "linear2", "modulation.lin")]
            + ["img_in", "txt_in", "final_layer.linear"])


def test_flux_presets_train_linear1_linear2_of_splitflux_single_blocks():
    paths = flux_like_paths()
    content = select_targets(paths, TrainConfig(blocks="content"), "flux")
    style = select_targets(paths, TrainConfig(blocks="style"), "flux")
    assert content == sorted(f"single_blocks.{n}.{x}" for n in range(10) for x in ("linear1", "linear2"))
    assert style == sorted(f"single_blocks.{n}.{x}" for n in range(10, 38) for x in ("linear1", "linear2"))
    assert select_targets(paths, TrainConfig(), "flux") == sorted(content + style)
    assert select_targets(paths, TrainConfig(layer_filter=r"linear2$"), "flux") == sorted(
        p for p in content + style if p.endswith("linear2"))
    named = select_targets(paths, TrainConfig(blocks="custom", layer_filter=r"^double_blocks\.3\.(img|txt)_(attn|mlp)"),
                           "flux")
    assert len(named) == 8 and all(p.startswith("double_blocks.3.") and "mod" not in p for p in named)
    with pytest.raises(BLoRAError, match="FLUX.1 has no layout role"):
        select_targets(paths, TrainConfig(blocks="content+style+layout"), "flux")
    with pytest.raises(BLoRAError, match="single_blocks.12.linear1"):
        select_targets(paths, TrainConfig(layer_filter="to_zzz"), "flux")


def test_flow_target_is_the_velocity_that_consts_denoised_turns_into_x0():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    sigma = torch.tensor([0.05, 0.5, 1.0])
    v = training_target("CONST", x0, noise, sigma)
    s = sigma.view(-1, 1, 1, 1)
    x = s * noise + (1 - s) * x0  # ComfyUI's CONST.noise_scaling
    assert torch.allclose(v, noise - x0) and torch.allclose(x - v * s, x0, atol=1e-6)  # CONST.calculate_denoised
