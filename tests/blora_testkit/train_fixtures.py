"""Fixtures the Train B-LoRA host tests share. A test module takes them with
`from blora_testkit.train_fixtures import model, node, one_thread, vae  # noqa: F401` (FLUX: flux_model,
flux_vae) (pytest finds fixtures
imported into a module)."""
from __future__ import annotations

import importlib

import pytest
import torch

from .tiny_flux import LATENT_CHANNELS, tiny_flux_model
from .tiny_sdxl import tiny_sdxl_model
from .tiny_vae import tiny_vae


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is faster on one thread, and steadier on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def node(pack):
    return importlib.import_module(pack.__name__ + ".nodes.train").BLoRATrain


@pytest.fixture
def model(comfy_host):
    """Tiny SDXL model made under inference mode (its weights are inference tensors, as a loader node's are)."""
    with torch.inference_mode():
        return tiny_sdxl_model(0)


@pytest.fixture(scope="module")
def vae(comfy_host):
    return tiny_vae(0)


@pytest.fixture
def flux_model(comfy_host):
    """Tiny FLUX.1 model made under inference mode (its weights are inference tensors, as a loader node's are)."""
    with torch.inference_mode():
        return tiny_flux_model(seed=0)


@pytest.fixture(scope="module")
def flux_vae(comfy_host):
    """The tiny VAE with FLUX's 16 latent channels."""
    return tiny_vae(0, latent_channels=LATENT_CHANNELS)
