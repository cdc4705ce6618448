"""A tiny FLUX.1-architecture single-file checkpoint (TEST-ONLY), laid out as Comfy-Org's flux1-dev-fp8 checkpoint.

Keys: ``model.diffusion_model.*`` (the model of ``tiny_flux.tiny_flux_model(seed)``: the same weights as the host
tests' tiny FLUX), ``text_encoders.clip_l.transformer.*`` and ``text_encoders.t5xxl.transformer.*`` (tiny CLIP-L and
T5 of ``tiny_host_node.tiny_flux_models``), ``vae.*`` (a 16-channel TAESD: ``tiny_vae``'s encoder, and a decoder drawn
so the tiny model's latents decode to images with detail rather than to clipped white and black). The stock
CheckpointLoaderSimple loads it once ``tiny_host_node`` is installed (it registers TinyFlux). Written and cached by
``tiny_checkpoint`` (``kind="flux"``); ``split_files`` cuts it into the diffusion-model and VAE files of the
split-file layout (UNETLoader, VAELoader).
"""
from __future__ import annotations

from pathlib import Path

DECODER_INPUT_GAIN = 0.3  # the decoder's first conv: FLUX latents (std ~4) into its tanh clamp's linear part
DECODER_OUTPUT_STD = 0.5  # the last conv rescaled so a probe latent decodes to this spread around mid-grey
DIFFUSION_PREFIX = "model.diffusion_model."
VAE_PREFIX = "vae."
TEXT_PREFIX = "text_encoders."


def build_flux_state_dict(seed: int = 0) -> dict:
    """The checkpoint's tensors (fp32, contiguous), saved by the host's own save path."""
    import torch

    from .tiny_checkpoint import init_module_
    from .tiny_flux import tiny_flux_model
    from .tiny_host_node.tiny_flux_models import TinyFluxClipModel
    from .tiny_vae import tiny_vae_state_dict

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        patcher = tiny_flux_model(seed)
        clip = TinyFluxClipModel(device="cpu", dtype=torch.float32)
        init_module_(clip, seed + 1)
        vae = tiny_vae_state_dict(seed + 2, latent_channels=16)
        vae.update(_decoder(seed + 3))
        saver = getattr(patcher, "state_dict_for_saving", None) or patcher.model.state_dict_for_saving
        sd = saver(clip.state_dict(), vae)
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    finally:
        torch.set_num_threads(threads)


def _decoder(seed: int) -> dict:
    import comfy.taesd.taesd
    import torch

    from .tiny_checkpoint import init_module_

    decoder = comfy.taesd.taesd.TAESD(latent_channels=16).taesd_decoder
    init_module_(decoder, seed)
    last = decoder[len(decoder) - 1]  # Conv2d(64, 3): the output is linear in its weight and bias
    probe = 4.0 * torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        decoder[1].weight.mul_(DECODER_INPUT_GAIN)
        out = decoder(probe)
        k = DECODER_OUTPUT_STD / out.std().item()
        last.weight.mul_(k)
        last.bias.mul_(k).sub_(k * out.mean((0, 2, 3)) - 0.5)  # TAESD maps the output x to 2x - 1: mid-grey is 0.5
    return {f"taesd_decoder.{k}": v.detach().clone() for k, v in decoder.state_dict().items()}


def split_files(checkpoint: Path | str, diffusion_model: Path | str, vae: Path | str) -> None:
    """Write the checkpoint's diffusion model (bare ``double_blocks.*`` keys, as flux1-dev.safetensors) and VAE
    (bare TAESD keys) as files of their own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts: dict[str, dict] = {DIFFUSION_PREFIX: {}, VAE_PREFIX: {}}
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in f.keys():
            for prefix, part in parts.items():
                if key.startswith(prefix):
                    part[key[len(prefix):]] = f.get_tensor(key)
    save_file(parts[DIFFUSION_PREFIX], str(diffusion_model))
    save_file(parts[VAE_PREFIX], str(vae))
