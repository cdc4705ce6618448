"""A tiny VAE built with the host's own classes (host layers only): ``comfy.sd.VAE`` around a TAESD autoencoder
(64 channels, 8x downscale, 4 latent channels) with deterministic random weights (``tiny_checkpoint.init_module_``).

The encoder's last conv is scaled so an image in [0, 1] encodes to latents of a few units, like SDXL's raw latents
(the SDXL latent scale factor then gives training inputs near unit variance).
"""
from __future__ import annotations

import torch

from .tiny_checkpoint import init_module_

LATENT_CONV = "taesd_encoder.14.weight"  # the encoder's last conv (64 -> latent channels)
LATENT_GAIN = 0.15


def tiny_vae_state_dict(seed: int = 0, latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """A TAESD state dict (``taesd_encoder.*``, ``taesd_decoder.*``, ``vae_scale`` 1, ``vae_shift`` 0); 16 latent
    channels for FLUX.1 latents (the host reads the channels from ``taesd_decoder.1.weight``)."""
    import comfy.taesd.taesd

    module = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    init_module_(module, seed, gain=2.0 ** 0.5)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state[LATENT_CONV] *= LATENT_GAIN
    return state


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    """A ``comfy.sd.VAE`` (TAESD architecture, fp32, CPU) ready for ``encode`` / ``decode``; latent_channels 4
    (SDXL) or 16 (FLUX.1)."""
    import comfy.sd

    return comfy.sd.VAE(sd=tiny_vae_state_dict(seed, latent_channels), dtype=torch.float32)
