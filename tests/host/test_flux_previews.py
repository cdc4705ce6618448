"""Validation previews of Train B-LoRA on FLUX.1 in the real host (tiny FLUX model, 16-channel tiny VAE): the rows
(content only, style only, both) sample with the host's own sampler on the training FLUX model, its flow-matching
schedule and FLUX dev's guidance from the conditioning; the views switch exactly SplitFlux's content and style
single blocks; the trained weights are bit-identical with previews on or off."""
from __future__ import annotations

import pytest
import torch
from blora_testkit.nodes import run_node
from blora_testkit.tiny_flux import LATENT_CHANNELS, SINGLE, tiny_flux_conditioning
from blora_testkit.train_fixtures import flux_model, flux_vae, node, one_thread  # noqa: F401

from blora.formats.files import read_adapter
from blora.train.previews import ValidationSettings

FAST = dict(blocks="content+style", layer_filter="", rank=4, alpha=4.0, algorithm="LoRA", learning_rate=3e-2,
            steps=4, resolution=64, seed=0, seeds=1, seed_draws="shared", training_dtype="fp32",
            filename_prefix="fp/blora")
FP32 = {"save_every": 0, "save_precision": "fp32", "resume_from": "none"}
# FLUX dev is sampled at cfg 1 with its distilled guidance in the conditioning (FluxGuidance)
PREVIEW = ValidationSettings(every=2, steps=3, cfg=1.0, width=64, height=64, seed=3, scheduler="simple")
# SplitFlux's split in host names (single-stream blocks 20-29 of 57 content, 30-57 style): of the tiny model's 12
# single blocks, 0-9 are content and 10-11 style
CONTENT_BLOCKS = {f"single_blocks.{n}" for n in range(10)}
STYLE_BLOCKS = {"single_blocks.10", "single_blocks.11"}


def conditioning(seed: int, guidance: float | None):
    """The tiny FLUX conditioning with FluxGuidance's value, or none (what a plain CLIPTextEncode gives)."""
    [[context, extras]] = tiny_flux_conditioning(seed, guidance=3.5 if guidance is None else guidance)
    return [[context, {k: v for k, v in extras.items() if k != "guidance" or guidance is not None}]]


def validation(settings=PREVIEW, guidance: float | None = 3.5):
    from blora.host.train_previews import Validation

    return Validation(settings, {view: conditioning(seed, guidance)
                                 for view, seed in (("content", 11), ("style", 12), ("both", 13))},
                      conditioning(14, guidance))


def train(node, model, vae, node_id="7", **settings):
    inputs = dict(FAST, checkpoints=FP32, **settings)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return run_node(node, hidden={"UNIQUE_ID": node_id}, model=model, vae=vae, images=image,
                    positive=tiny_flux_conditioning(0), **inputs)


def loras(host_dirs):
    return host_dirs / "output" / "loras" / "fp"


def columns(row: torch.Tensor) -> list[torch.Tensor]:
    return list(row[0].chunk(3, dim=1))


def host_sample(model, vae, conditioning, settings=PREVIEW):
    """What KSampler would give for the preview's settings: the host's sampler on ``model``, decoded."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, 8, 8))
    assert latent.shape[1] == LATENT_CHANNELS
    noise = comfy.sample.prepare_noise(latent, settings.seed)
    with torch.inference_mode():
        samples = comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler,
                                      settings.scheduler, conditioning, tiny_flux_conditioning(14), latent,
                                      disable_pbar=True, seed=settings.seed)
        return vae.decode(samples)


def test_flux_rows_at_start_every_n_and_end_and_the_both_view_is_the_trained_model(node, flux_model, flux_vae,
                                                                                  host_dirs):
    (out_model, _blora, _losses, grid), ui = train(node, flux_model, flux_vae, validation=validation())
    rows = ui["previews"]
    assert [(r["step"], r["seed"]) for r in rows] == [(0, 0), (2, 0), (4, 0)]
    saved = sorted(p.name for p in loras(host_dirs).iterdir())
    assert saved == ["blora_00001_.safetensors", "blora_00001_preview_step000000.png",
                     "blora_00001_preview_step000002.png", "blora_00001_preview_step000004.png"]
    assert grid.shape == (1, 64, 192, 3)
    # the last row's views: content only, style only and both, each the host's sampler on that model
    assert torch.allclose(columns(grid)[2], host_sample(out_model, flux_vae, tiny_flux_conditioning(13))[0],
                          atol=2e-3)
    from PIL import Image
    import numpy as np

    first = torch.from_numpy(np.array(Image.open(loras(host_dirs) / saved[1]))).float()[None] / 255
    # step 0: the up matrices are zero, so the both view is the base model on the both prompt
    assert torch.allclose(columns(first)[2], host_sample(flux_model, flux_vae, tiny_flux_conditioning(13))[0],
                          atol=1 / 255 + 2e-3)
    c0, _s0, b0 = columns(first)
    c, _s, b = columns(grid)
    assert (c - c0).abs().max() > 0.01 and (b - b0).abs().max() > 0.01  # training moved the views


def test_flux_views_switch_exactly_splitflux_content_or_style_blocks(node, flux_model, flux_vae, host_dirs,
                                                                      monkeypatch, pack):
    import importlib

    train_previews = importlib.import_module(pack.__name__ + ".blora.host.train_previews")
    seen = []
    real_sample, real_call = train_previews.PreviewSampler._sample, train_previews.PreviewSampler.__call__

    def spy(self, model_, view):
        on = {p.rsplit(".", 1)[0] for p, a in spy.state.adapters.items() if a.multiplier == 1.0}
        off = {p.rsplit(".", 1)[0] for p, a in spy.state.adapters.items() if a.multiplier == 0.0}
        seen.append((view, on, off))
        return real_sample(self, model_, view)

    def call(self, done, state):
        spy.state = state
        real_call(self, done, state)
        assert all(a.multiplier == 1.0 for a in state.adapters.values())  # back on before the next step

    monkeypatch.setattr(train_previews.PreviewSampler, "_sample", spy)
    monkeypatch.setattr(train_previews.PreviewSampler, "__call__", call)
    train(node, flux_model, flux_vae, validation=validation(ValidationSettings(every=0, steps=1, cfg=1.0, width=64,
                                                                               height=64)))
    every = CONTENT_BLOCKS | STYLE_BLOCKS
    assert seen[:3] == [("content", CONTENT_BLOCKS, STYLE_BLOCKS), ("style", STYLE_BLOCKS, CONTENT_BLOCKS),
                        ("both", every, set())]
    assert len(seen) == 6  # step 0 and the end


def test_flux_previews_sample_with_the_conditionings_guidance(node, flux_model, flux_vae, host_dirs):
    """FLUX dev's guidance (FluxGuidance's value in the conditioning) reaches the model while previews sample: the
    rows differ between guidance 1 and 8 (the training conditioning and weights being the same); prompts without
    one (as the node's CLIPTextEncode gives them) sample at the host's default, 3.5."""
    settings = ValidationSettings(every=0, steps=2, cfg=1.0, width=64, height=64, seed=3, scheduler="simple")
    grids = {}
    for guidance in (1.0, 8.0, None, 3.5):
        (_m, _b, _l, grids[guidance]), _ = train(node, flux_model, flux_vae,
                                                 validation=validation(settings, guidance=guidance))
    assert (grids[1.0] - grids[8.0]).abs().max() > 1e-3
    assert torch.equal(grids[None], grids[3.5])
    files = sorted(loras(host_dirs).glob("*.safetensors"))
    assert len(files) == 4
    a = read_adapter(files[0])
    for other in map(read_adapter, files[1:]):
        assert all(torch.equal(t, other.modules[p].tensors[n]) for p, m in a.modules.items()
                   for n, t in m.tensors.items())


@pytest.mark.parametrize("seeds", [1, 2])
def test_flux_trained_weights_are_bit_identical_with_previews_on_or_off(node, flux_model, flux_vae, host_dirs,
                                                                        seeds):
    torch.manual_seed(123)
    (_m, _b, _l, _g), ui = train(node, flux_model, flux_vae, seeds=seeds)
    assert "previews" not in ui
    off_state = torch.random.get_rng_state()
    torch.manual_seed(123)
    (_m, _b, _l, grid), ui = train(node, flux_model, flux_vae, seeds=seeds, validation=validation())
    assert len(ui["previews"]) == 3 * seeds and grid.shape == (1, 64 * seeds, 192, 3)
    assert torch.equal(torch.random.get_rng_state(), off_state)  # sampling left the global generator alone
    files = sorted(loras(host_dirs).glob("*.safetensors"))
    assert len(files) == 2 * seeds
    pairs = [(files[0], files[1])] if seeds == 1 else list(zip(files[0::2], files[1::2]))
    for off, on in pairs:
        a, b = read_adapter(off), read_adapter(on)
        assert a.modules.keys() == b.modules.keys() and len(a.modules) == 2 * SINGLE
        for path in a.modules:
            for name, t in a.modules[path].tensors.items():
                assert torch.equal(t, b.modules[path].tensors[name]), (off.name, on.name, path, name)
