"""Train B-LoRA on a model whose weights are stored in float8 (Load Diffusion Model's ``weight_dtype fp8_e4m3fn``,
the fp8 FLUX.1 checkpoints most people run): the host computes in a wider dtype (manual cast) and the trainer's
adapters work on those activations. Trained on the tiny SDXL and FLUX models rebuilt with fp8 weights, on both hosts:
the losses are finite, the adapter learned (its file renders differently from the base), stock LoraLoaderModelOnly
renders the saved file exactly as the trained MODEL on the same fp8 model, and the fp8 base weights are unchanged."""
from __future__ import annotations

import pytest
import torch
from blora_testkit.nodes import run_node
from blora_testkit.tiny_flux import LATENT_CHANNELS, tiny_flux_conditioning, tiny_flux_model, tiny_flux_model_config
from blora_testkit.tiny_flux import tiny_flux_sample
from blora_testkit.tiny_sdxl import tiny_conditioning, tiny_model_config, tiny_sdxl_model
from blora_testkit.tiny_vae import tiny_vae
from blora_testkit.train_fixtures import node, one_thread  # noqa: F401

FAST = dict(blocks="content+style", layer_filter="", rank=4, alpha=4.0, algorithm="LoRA", rslora=False,
            learning_rate=1e-2, loraplus_ratio=1.0, optimizer="AdamW", weight_decay=1e-4, steps=3, batch_size=1,
            grad_accumulation=1, resolution=64, flip=False, seed=0, training_dtype="fp32",
            gradient_checkpointing="trained blocks", save_every=0, filename_prefix="f8/blora")
NAME = "f8/blora_00001_.safetensors"


def fp8_copy(make_config, patcher):
    """The model rebuilt as a loader builds it for weight_dtype fp8_e4m3fn (fp8 weights, fp32 compute), loaded
    from the fp32 model's state dict."""
    import comfy.model_management
    import comfy.model_patcher

    config = make_config()
    config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(patcher.model.diffusion_model.state_dict())
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def sdxl_sample(patcher, seed=0, steps=3, size=8):
    import comfy.sample

    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, 2.0, "euler", "normal", tiny_conditioning(seed + 1),
                                   tiny_conditioning(seed + 2), torch.zeros_like(noise), disable_pbar=True,
                                   seed=seed)


ARCHES = {
    "sdxl": dict(config=tiny_model_config, model=tiny_sdxl_model, cond=tiny_conditioning, channels=4,
                 sample=sdxl_sample),
    "flux": dict(config=tiny_flux_model_config, model=tiny_flux_model, cond=tiny_flux_conditioning,
                 channels=LATENT_CHANNELS, sample=tiny_flux_sample),
}


@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("algorithm", ["LoRA", "DoRA"])
def test_training_on_fp8_weights_saves_what_stock_renders_as_the_trained_model(node, comfy_host, host_dirs, arch,
                                                                               algorithm):
    import comfy.model_management
    import nodes as host_nodes

    spec = ARCHES[arch]
    with torch.inference_mode():  # weights are inference tensors, as a loader node's are
        model = fp8_copy(spec["config"], spec["model"](0))
    vae = tiny_vae(0, latent_channels=spec["channels"])
    weights = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float8_e4m3fn}
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (out_model, blora, *_), ui = run_node(node, hidden={"UNIQUE_ID": "7"}, model=model, vae=vae, images=image,
                                          positive=spec["cond"](0), **dict(FAST, algorithm=algorithm))
    assert len(ui["loss"]) == 3 and all(torch.isfinite(torch.tensor(ui["loss"])))
    assert unchanged(model, weights)  # training left the fp8 base weights as they were
    stock = host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, NAME, 1.0)[0]
    assert len(stock.patches) == len(blora.modules) > 0
    trained, base = spec["sample"](out_model), spec["sample"](model)
    assert torch.equal(spec["sample"](stock), trained)
    assert (trained - base).abs().max() > 1e-3  # the adapter changes the render, so equality could fail
    comfy.model_management.unload_all_models()  # the last sampled patcher's patches come off
    assert unchanged(model, weights)


def unchanged(model, weights) -> bool:
    after = model.model.diffusion_model.state_dict()
    return all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) if v.dtype == torch.float8_e4m3fn
               else torch.equal(after[k], v) for k, v in weights.items())
