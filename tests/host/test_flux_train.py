"""Train B-LoRA on FLUX.1 in the real host, on a tiny FLUX-architecture model built with the host's own classes and a
16-channel tiny VAE: the trained layers are linear1/linear2 of SplitFlux's single blocks, the objective is flow
matching as the host samples FLUX (its sigma table, the velocity noise - x0 its CONST model predicts), FLUX dev's
guidance reaches the model, every algorithm's file renders in stock LoraLoaderModelOnly exactly as the trained MODEL,
the loss falls against a 1e-7 learning rate with the same draws, and checkpointing, resume and bf16 work."""
from __future__ import annotations

import statistics

import pytest
import torch
from blora_testkit.nodes import run_node
from blora_testkit.tiny_flux import LATENT_CHANNELS, SINGLE, tiny_flux_conditioning, tiny_flux_sample
from blora_testkit.train_fixtures import flux_model, flux_vae, node, one_thread  # noqa: F401

from blora.errors import BLoRAError
from blora.formats.files import read_adapter
from blora.train.algorithms import REGISTRY

FAST = dict(blocks="content+style", layer_filter="", rank=4, alpha=4.0, algorithm="LoRA", rslora=False,
            learning_rate=1e-2, loraplus_ratio=1.0, optimizer="AdamW", weight_decay=1e-4, steps=3, batch_size=1,
            grad_accumulation=1, resolution=64, flip=False, seed=0, training_dtype="fp32",
            gradient_checkpointing="trained blocks", save_every=0, filename_prefix="f/blora")
NAME = "f/blora_00001_.safetensors"
ALGORITHMS = {"LoRA": {}, "DoRA": dict(algorithm="DoRA"), "LoKr": dict(algorithm="LoKr"),
              "LoHa": dict(algorithm="LoHa"),
              "AdaLoRA": dict(algorithm="AdaLoRA", adalora_target_rank=2, adalora_warmup=0.0, adalora_final=0.3,
                              adalora_interval=1)}
SINGLE_TARGETS = {f"single_blocks.{n}.{layer}" for n in range(SINGLE) for layer in ("linear1", "linear2")}


def train(node, model, vae, guidance=3.5, **settings):
    inputs = dict(FAST, **settings)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (out_model, blora, *_), ui = run_node(node, hidden={"UNIQUE_ID": "7"}, model=model, vae=vae, images=image,
                                          positive=tiny_flux_conditioning(0, guidance=guidance), **inputs)
    return out_model, blora, ui


def render(model):
    return tiny_flux_sample(model, seed=0, steps=3, size=8)


@pytest.mark.parametrize("variant", list(ALGORITHMS))
def test_each_algorithm_trains_splitflux_single_blocks_and_stock_lora_loader_renders_it(node, flux_model, flux_vae,
                                                                                       host_dirs, variant):
    import nodes as host_nodes
    from safetensors import safe_open

    settings = ALGORITHMS[variant]
    out_model, blora, ui = train(node, flux_model, flux_vae, **settings)
    assert len(ui["loss"]) == 3 and all(v == v for v in ui["loss"])
    stock = host_nodes.LoraLoaderModelOnly().load_lora_model_only(flux_model, NAME, 1.0)[0]
    assert len(stock.patches) == len(blora.modules) > 0  # the stock loader read every module of the file
    trained, base = render(out_model), render(flux_model)
    assert torch.equal(render(stock), trained)
    assert (trained - base).abs().max() > 1e-3  # the B-LoRA changes the render, so equality could fail
    saved = read_adapter(host_dirs / "output" / "loras" / NAME)
    if variant == "AdaLoRA":  # pruned modules may be left out
        assert set(saved.modules) <= SINGLE_TARGETS
    else:
        assert set(saved.modules) == SINGLE_TARGETS
    assert {m.kind for m in saved.modules.values()} == {REGISTRY[settings.get("algorithm", "LoRA")].kind}
    with safe_open(str(host_dirs / "output" / "loras" / NAME), framework="pt") as f:
        keys = set(f.keys())
    assert {k.split(".", 1)[0] for k in keys} == {"lora_unet_" + p.replace(".", "_") for p in saved.modules}
    assert saved.metadata["ss_base_model_version"] == "flux1" and saved.metadata["blora.prediction"] == "CONST"


@pytest.mark.parametrize("variant, rate", [("LoRA", 3e-2), ("DoRA", 3e-2), ("LoKr", 1e-1), ("LoHa", 3e-2),
                                           ("AdaLoRA", 1e-1)])
def test_loss_falls_against_a_near_zero_learning_rate_with_the_same_draws(node, flux_model, flux_vae, host_dirs,
                                                                          variant, rate):
    settings = dict(ALGORITHMS[variant], steps=24, rank=8, alpha=8.0, gradient_checkpointing="off")
    if variant == "AdaLoRA":  # as on SDXL: the orthogonality term off at this rate
        settings.update(adalora_target_rank=4, adalora_interval=4, adalora_warmup=0.2, adalora_final=0.2,
                        adalora_orth_reg=0.0)
    _, _, trained = train(node, flux_model, flux_vae, learning_rate=rate, **settings)
    _, _, still = train(node, flux_model, flux_vae, learning_rate=1e-7, **settings)
    gain = [b - a for a, b in zip(trained["loss"], still["loss"])]
    assert gain[0] == pytest.approx(0.0, abs=1e-5)  # step 1: no update yet, same draws
    assert statistics.mean(gain[-8:]) > 0.04 * statistics.mean(still["loss"][-8:]), gain[-8:]


def test_flow_matching_draws_from_the_hosts_flux_schedule_and_targets_the_velocity(flux_model):
    import comfy.model_sampling

    from blora.host.train_inputs import noise_schedule
    from blora.train.recipe import training_target

    schedule = noise_schedule(flux_model)
    ms = flux_model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.ModelSamplingFlux) and schedule.prediction == "CONST"
    assert torch.equal(schedule.sigmas, ms.sigmas.float())  # the host's own table: percent_to_sigma on a grid
    assert len(schedule.sigmas) == 10000 and 0 < float(schedule.sigmas[0]) < float(schedule.sigmas[-1]) == 1.0
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    target = training_target(schedule.prediction, x0, noise, sigma)
    noisy = ms.noise_scaling(sigma, noise, x0)
    # the host's CONST model turns the target into x0 exactly: it is the output the sampler wants
    assert torch.allclose(ms.calculate_denoised(sigma, target, noisy), x0, atol=1e-5)


def test_guidance_reaches_the_model_for_dev_and_schnell_takes_none(node, flux_model, flux_vae, host_dirs):
    import comfy.model_patcher

    from blora.host.train_inputs import prepare_samples
    from blora_testkit.tiny_flux import tiny_flux_model_config
    from blora_testkit.tiny_sdxl import init_weights_

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    samples = prepare_samples(flux_model, flux_vae, image, tiny_flux_conditioning(0, guidance=2.5), 64, False)
    assert samples[0].guidance is not None and samples[0].guidance.tolist() == [2.5]
    assert samples[0].x0.shape[1] == LATENT_CHANNELS
    _, _, low = train(node, flux_model, flux_vae, guidance=1.0, steps=1)
    _, _, high = train(node, flux_model, flux_vae, guidance=6.0, steps=1)
    assert abs(low["loss"][0] - high["loss"][0]) > 1e-6  # same draws: only the guidance embedding differs

    config = tiny_flux_model_config()
    config.unet_config["guidance_embed"] = False  # schnell
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    init_weights_(base.diffusion_model, 0)
    assert isinstance(base.diffusion_model.guidance_in, torch.nn.Identity)
    schnell = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    assert prepare_samples(schnell, flux_vae, image, tiny_flux_conditioning(0), 64, False)[0].guidance is None
    _, _, ui = train(node, schnell, flux_vae, steps=2)
    assert len(ui["loss"]) == 2


def test_checkpointing_modes_give_the_same_losses_and_resume_adds_steps(node, flux_model, flux_vae, host_dirs):
    losses = {mode: train(node, flux_model, flux_vae, gradient_checkpointing=mode)[2]["loss"]
              for mode in ("off", "trained blocks", "all above")}
    assert losses["trained blocks"] == pytest.approx(losses["off"], rel=1e-5)
    assert losses["all above"] == pytest.approx(losses["off"], rel=1e-5)
    from blora.host.train import train_blora
    from blora.train.recipe import TrainConfig

    settings = {k: v for k, v in FAST.items() if k != "filename_prefix"}
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # as the executor runs a node
        offloaded = train_blora(flux_model, flux_vae, image, tiny_flux_conditioning(0),
                                TrainConfig(**dict(settings, gradient_checkpointing="off", offload=True)),
                                filename_prefix="o/blora")
    assert offloaded.losses == pytest.approx(losses["off"], rel=1e-5)
    _, first, _ = train(node, flux_model, flux_vae, steps=4, save_every=2, filename_prefix="r/blora")
    checkpoint = read_adapter(host_dirs / "output" / "loras" / "r/blora_00001_step000002_.safetensors")
    assert checkpoint.metadata["blora.steps"] == "2"
    _, resumed, ui = train(node, flux_model, flux_vae, steps=2, filename_prefix="r/blora",
                           resume_from="r/blora_00001_.safetensors")
    assert len(ui["loss"]) == 2 and read_adapter(resumed.source).metadata["blora.steps"] == "6"
    assert set(resumed.modules) == set(first.modules) == SINGLE_TARGETS


def test_bf16_trains_finite(node, flux_model, flux_vae, host_dirs):
    _, blora, ui = train(node, flux_model, flux_vae, training_dtype="bf16", steps=2)
    assert len(ui["loss"]) == 2 and all(v == v and abs(v) != float("inf") for v in ui["loss"])
    assert set(blora.modules) == SINGLE_TARGETS


def test_presets_and_filters_select_by_flux_architecture(node, flux_model, flux_vae, host_dirs):
    _, content, _ = train(node, flux_model, flux_vae, blocks="content", steps=1)
    assert set(content.modules) == {f"single_blocks.{n}.{x}" for n in range(10) for x in ("linear1", "linear2")}
    _, style, _ = train(node, flux_model, flux_vae, blocks="style", layer_filter=r"linear2$", steps=1)
    assert set(style.modules) == {f"single_blocks.{n}.linear2" for n in range(10, SINGLE)}
    _, double, _ = train(node, flux_model, flux_vae, blocks="custom", steps=1,
                         layer_filter=r"^double_blocks\.1\.(img|txt)_(attn|mlp)")
    assert set(double.modules) == {f"double_blocks.1.{s}_{x}" for s in ("img", "txt")
                                   for x in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    with pytest.raises(BLoRAError, match="FLUX.1 has no layout role"):
        train(node, flux_model, flux_vae, blocks="content+style+layout", steps=1)


@pytest.mark.parametrize("draws", ["shared", "own"])
def test_seeds_train_side_by_side_on_flux_and_each_equals_its_single_run(node, flux_model, flux_vae, host_dirs,
                                                                          draws):
    settings = dict(steps=2, optimizer="SGD", learning_rate=1e-1, weight_decay=0.0, gradient_checkpointing="off")
    train(node, flux_model, flux_vae, seeds=2, seed=0, seed_draws=draws, filename_prefix="s/blora", **settings)
    seed0 = read_adapter(host_dirs / "output" / "loras" / "s/blora_seed0_00001_.safetensors")
    _, alone, _ = train(node, flux_model, flux_vae, seed=0, filename_prefix="alone/s0", **settings)
    assert set(seed0.modules) == set(alone.modules) == SINGLE_TARGETS
    for path, module in alone.modules.items():
        for name, ref in module.tensors.items():  # fp16 files: within the file's rounding
            got = seed0.modules[path].tensors[name].float()
            assert (got - ref.float()).abs().max() <= 2e-3 * ref.float().abs().max(), f"{path}.{name}"
