"""FLUX.1 on a real server: the tiny FLUX.1 dev single-file checkpoint (tests/blora_testkit/tiny_flux_checkpoint.py)
loads through the stock loaders, Train B-LoRA trains on it and the stock LoraLoaderModelOnly renders the file it
writes exactly as the trained MODEL, and an adapter of the other architecture fails the prompt with a clear error
while the server keeps serving and the loaded model stays as it was. The shipped FLUX example runs in
test_examples.py (compared with stock loaders there)."""
from __future__ import annotations

import re

import pytest
import torch

from blora_testkit.loras import (FLUX_ROLE_BLOCKS, ROLE_BLOCKS, attention_shapes, make_pairs, write_comfy,
                                 write_original)
from blora_testkit.workflows import (execution_error, read_image, read_latent, stock_flux_graph, stock_graph,
                                     with_blora_apply)

np = pytest.importorskip("numpy")

LATENT_ATOL = 1e-4
TRAIN = {"blocks": "content+style", "layer_filter": "", "rank": 4, "alpha": 4.0, "algorithm": "LoRA",
         "rslora": False, "learning_rate": 1e-2, "loraplus_ratio": 1.0, "optimizer": "AdamW", "weight_decay": 0.0,
         "steps": 3, "resolution": 64, "batch_size": 1, "grad_accumulation": 1, "flip": False, "seed": 0,
         "save_every": 0, "gradient_checkpointing": False, "training_dtype": "fp32"}


def _outputs(server, graph, timeout=120):
    """(latent, image) the graph's SaveLatent and SaveImage wrote."""
    pid, _ = server.run(graph, timeout=timeout)
    files = server.output_files(pid)
    return (read_latent(next(f for f in files if f.suffix == ".latent")),
            read_image(next(f for f in files if f.suffix == ".png")))


@pytest.fixture(scope="module")
def reference(server):
    """The tiny FLUX checkpoint's latent and image for the default prompt, before any test patches anything."""
    return _outputs(server, stock_flux_graph(server.flux_ckpt_name, prefix="flux_ref"))


def test_the_tiny_flux_checkpoint_loads_through_the_stock_checkpoint_loader(server, reference):
    from safetensors import safe_open

    latent, image = reference
    assert latent.shape == (1, 16, 8, 8) and torch.isfinite(latent).all()  # FLUX.1's 16 latent channels
    assert image.shape == (64, 64, 3) and image.std() > 5.0
    log = server.log_text()
    assert not re.search(r"(clip|unet) missing|Could not detect model type", log), server.log_tail()
    with safe_open(str(server.models_dir / "checkpoints" / server.flux_ckpt_name), framework="pt") as f:
        keys = list(f.keys())
    roots = {next((r for r in ("model.diffusion_model.", "text_encoders.clip_l.", "text_encoders.t5xxl.", "vae.")
                   if k.startswith(r)), k) for k in keys}
    assert roots == {"model.diffusion_model.", "text_encoders.clip_l.", "text_encoders.t5xxl.", "vae."}, roots
    assert any(k.startswith("text_encoders.t5xxl.transformer.encoder.block.1.") for k in keys)
    assert "model.diffusion_model.guidance_in.in_layer.weight" in keys  # FLUX.1 dev: a guidance embedding
    assert sum(k.startswith("model.diffusion_model.single_blocks.") and k.endswith("linear1.weight")
               for k in keys) == 12


def test_the_served_checkpoint_is_the_seeded_build_and_holds_the_host_tests_tiny_flux(server, comfy_host, tmp_path):
    """Rebuilt in-process with the same seed: the same tensors as the cached subprocess build the server got; its
    diffusion model is tiny_flux_model(0), the model the host-layer FLUX tests use."""
    from safetensors import safe_open

    from blora_testkit.tiny_checkpoint import write_tiny_checkpoint
    from blora_testkit.tiny_flux import tiny_flux_model

    served = server.models_dir / "checkpoints" / server.flux_ckpt_name
    rebuilt = write_tiny_checkpoint(tmp_path / "again.safetensors", seed=0, kind="flux")
    model = {k: v for k, v in tiny_flux_model(0).model.diffusion_model.state_dict().items()}
    with safe_open(str(rebuilt), framework="pt") as a, safe_open(str(served), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in b.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
        unet = {k[len("model.diffusion_model."):]: b.get_tensor(k) for k in b.keys()
                if k.startswith("model.diffusion_model.")}
    assert unet.keys() == model.keys()
    assert all(torch.equal(unet[k], model[k]) for k in model)


def test_prompt_guidance_and_seed_condition_the_tiny_flux(server, reference):
    base, _ = reference
    prompt, _ = _outputs(server, stock_flux_graph(server.flux_ckpt_name, positive="an oil painting of a dog",
                                                  prefix="flux_prompt"))
    guidance, _ = _outputs(server, stock_flux_graph(server.flux_ckpt_name, guidance=1.0, prefix="flux_guidance"))
    seed, _ = _outputs(server, stock_flux_graph(server.flux_ckpt_name, seed=1, prefix="flux_seed"))
    assert (base - prompt).abs().max() > 1e-2  # T5 context and CLIP-L pooled reach the model
    assert (base - guidance).abs().max() > 1e-3  # FluxGuidance reaches dev's guidance embedding
    assert (base - seed).abs().max() > 1e-1


def test_split_files_load_through_the_diffusion_model_and_vae_loaders(server, reference):
    """The same weights as flux1-dev.safetensors (bare keys, Load Diffusion Model) and ae.safetensors (Load VAE),
    cut from the checkpoint: the same latent and image as Load Checkpoint gives."""
    from blora_testkit.tiny_flux_checkpoint import split_files

    for folder in ("diffusion_models", "vae"):
        (server.models_dir / folder).mkdir(exist_ok=True)
    split_files(server.models_dir / "checkpoints" / server.flux_ckpt_name,
                server.models_dir / "diffusion_models" / "tiny_flux_dit.safetensors",
                server.models_dir / "vae" / "tiny_flux_ae.safetensors")
    graph = stock_flux_graph(server.flux_ckpt_name, prefix="flux_split")
    graph["40"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_dit.safetensors",
                                                         "weight_dtype": "default"}}
    graph["41"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_flux_ae.safetensors"}}
    graph["5"]["inputs"]["model"] = ["40", 0]
    graph["6"]["inputs"]["vae"] = ["41", 0]
    latent, image = _outputs(server, graph)
    assert (latent - reference[0]).abs().max() <= LATENT_ATOL
    assert np.abs(image.astype(int) - reference[1].astype(int)).max() <= 1


def _write_png(path, seed, size=64):
    from PIL import Image

    gen = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), gen.uniform(0, 255, (size, size))],
                      -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def test_train_on_flux_and_the_stock_lora_loader_renders_the_file_as_the_trained_model(server):
    """Train B-LoRA on the tiny FLUX.1 dev: the file holds SplitFlux's single blocks (linear1, linear2) and says
    flux1; sampling the trained MODEL equals sampling the checkpoint through stock LoraLoaderModelOnly on that
    file, and differs from the untrained model."""
    from safetensors import safe_open

    _write_png(server.input_dir / "flux_subject.png", seed=3)
    graph = stock_flux_graph(server.flux_ckpt_name, positive="A [v]", prefix="flux_trained")
    graph["30"] = {"class_type": "LoadImage", "inputs": {"image": "flux_subject.png"}}
    graph["31"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "A [v]", "clip": ["1", 1]}}
    graph["32"] = {"class_type": "BLoRATrain", "inputs": dict(
        TRAIN, model=["1", 0], vae=["1", 2], images=["30", 0], positive=["31", 0], filename_prefix="flux_train/blora")}
    graph["5"]["inputs"]["model"] = ["32", 0]
    trained, _ = _outputs(server, graph, timeout=300)

    files = sorted((server.output_dir / "loras" / "flux_train").glob("*.safetensors"))
    assert len(files) == 1, files
    with safe_open(str(files[0]), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    layers = {re.sub(r"\.(lora_down|lora_up)\.weight$|\.alpha$", "", k) for k in keys}
    assert layers == {f"lora_unet_single_blocks_{n}_{lin}" for n in range(12) for lin in ("linear1", "linear2")}, \
        sorted(layers)[:6]
    assert metadata.get("ss_base_model_version") == "flux1", metadata

    lora = f"flux_train/{files[0].name}"
    stock, _ = _outputs(server, stock_flux_graph(server.flux_ckpt_name, positive="A [v]", loras=((lora, 1.0),),
                                                 prefix="flux_stock"))
    base, _ = _outputs(server, stock_flux_graph(server.flux_ckpt_name, positive="A [v]", loras=((lora, 0.0),),
                                                prefix="flux_base"))
    assert (trained - stock).abs().max() <= LATENT_ATOL
    assert (trained - base).abs().max() > 100 * LATENT_ATOL  # the training moved the weights


def test_an_adapter_of_the_other_architecture_fails_clearly_and_the_server_keeps_serving(server, reference):
    loras = server.models_dir / "loras"
    sdxl_ckpt = server.models_dir / "checkpoints" / server.ckpt_name
    flux_ckpt = server.models_dir / "checkpoints" / server.flux_ckpt_name
    write_original(loras / "sdxl_blora.safetensors", make_pairs(attention_shapes(sdxl_ckpt), ROLE_BLOCKS.values()))
    write_comfy(loras / "flux_blora.safetensors", make_pairs(attention_shapes(flux_ckpt), FLUX_ROLE_BLOCKS.values()))

    cases = ((with_blora_apply(stock_flux_graph(server.flux_ckpt_name, prefix="flux_wrong"), "sdxl_blora.safetensors"),
              r"sdxl_blora\.safetensors: is a SDXL adapter, the model is FLUX\.1"),
             (with_blora_apply(stock_graph(server.ckpt_name, prefix="sdxl_wrong"), "flux_blora.safetensors"),
              r"flux_blora\.safetensors: is a FLUX\.1 adapter, the model is SDXL"))
    for graph, message in cases:
        _, messages = server.run(graph, timeout=120, expect_success=False)
        error = execution_error(messages)
        assert error is not None and error["node_type"] == "BLoRAApply", messages
        assert re.search(message, error["exception_message"]), error["exception_message"]
        assert "Traceback" not in error["exception_message"]
    assert server.proc.poll() is None
    latent, image = _outputs(server, stock_flux_graph(server.flux_ckpt_name, prefix="flux_after"))
    assert torch.equal(latent, reference[0]) and np.array_equal(image, reference[1])  # nothing was patched
    # and the right adapter still applies on the same server
    right, _ = _outputs(server, with_blora_apply(stock_flux_graph(server.flux_ckpt_name, prefix="flux_right"),
                                             "flux_blora.safetensors"))
    assert (right - reference[0]).abs().max() > 1e-2
