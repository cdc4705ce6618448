"""Validation previews of Train B-LoRA in the real host (tiny SDXL model, tiny VAE): the rows (content only, style
only, both; one per seed) at step 0, every N steps and at the end, sampled with the host's sampler on the training
model; the trained weights are bit-identical with previews on or off; the rows are saved beside the file."""
from __future__ import annotations

import pytest
import torch
from blora_testkit.nodes import run_node
from blora_testkit.train_fixtures import model, node, one_thread, vae  # noqa: F401
from blora_testkit.tiny_sdxl import tiny_conditioning

from blora.formats.files import read_adapter
from blora.train.previews import ValidationSettings

FAST = dict(blocks="content+style", layer_filter="", rank=4, alpha=4.0, algorithm="LoRA", learning_rate=3e-2,
            steps=4, resolution=64, seed=0, seeds=1, seed_draws="shared", training_dtype="fp32",
            filename_prefix="p/blora")
FP32 = {"save_every": 0, "save_precision": "fp32", "resume_from": "none"}
PREVIEW = ValidationSettings(every=2, steps=3, cfg=2.0, width=64, height=64, seed=3)


def validation(settings=PREVIEW):
    from blora.host.train_previews import Validation

    return Validation(settings, {"content": tiny_conditioning(11), "style": tiny_conditioning(12),
                                 "both": tiny_conditioning(13)}, tiny_conditioning(14))


def image(seed=0):
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def train(node, model, vae, node_id="7", **settings):
    inputs = dict(FAST, checkpoints=FP32, **settings)
    return run_node(node, hidden={"UNIQUE_ID": node_id}, model=model, vae=vae, images=image(),
                    positive=tiny_conditioning(0), **inputs)


def loras(host_dirs):
    return host_dirs / "output" / "loras" / "p"


def columns(row: torch.Tensor) -> list[torch.Tensor]:
    """The three views of a row image (1, H, 3W, 3)."""
    return list(row[0].chunk(3, dim=1))


def test_rows_at_start_every_n_and_end_show_content_style_and_both(node, model, vae, host_dirs):
    (out_model, blora, _losses, grid), ui = train(node, model, vae, validation=validation())
    rows = ui["previews"]
    assert [(r["step"], r["seed"]) for r in rows] == [(0, 0), (2, 0), (4, 0)]
    saved = sorted(p.name for p in loras(host_dirs).iterdir())
    assert saved == ["blora_00001_.safetensors", "blora_00001_preview_step000000.png",
                     "blora_00001_preview_step000002.png", "blora_00001_preview_step000004.png"]
    assert {r["filename"] for r in rows} == set(saved[1:]) and {r["subfolder"] for r in rows} == {"loras/p"}
    assert ui["preview_seconds"][0] > 0
    from PIL import Image
    import numpy as np

    first, last = (torch.from_numpy(np.array(Image.open(loras(host_dirs) / saved[i]))).float()[None] / 255
                   for i in (1, 3))
    assert first.shape == (1, 64, 192, 3)
    # step 0: the up matrices are zero, so the three views differ only by their prompts
    # at the end: content only, style only and both are three different models on one prompt each
    assert grid.shape == (1, 64, 192, 3)
    assert torch.allclose(grid, last, atol=1 / 255 + 1e-6)
    c0, s0, b0 = columns(first)
    c, s, b = columns(last)
    assert (c - c0).abs().max() > 0.01 and (b - b0).abs().max() > 0.01


def test_views_switch_exactly_the_other_roles_layers_off(node, model, vae, host_dirs, monkeypatch, pack):
    """Each view samples with the content layers, the style layers or both at multiplier 1 and the rest at 0;
    every multiplier is back at 1 before the next training step."""
    import importlib

    train_previews = importlib.import_module(pack.__name__ + ".blora.host.train_previews")

    seen = []
    real = train_previews.PreviewSampler._sample

    def spy(self, model_, view):
        adapters = spy.state.adapters
        seen.append((view, sorted({(p.split(".transformer_blocks")[0], a.multiplier) for p, a in adapters.items()})))
        return real(self, model_, view)

    real_call = train_previews.PreviewSampler.__call__

    def call(self, done, state):
        spy.state = state
        assert all(a.multiplier == 1.0 for a in state.adapters.values())
        real_call(self, done, state)
        assert all(a.multiplier == 1.0 for a in state.adapters.values())

    monkeypatch.setattr(train_previews.PreviewSampler, "_sample", spy)
    monkeypatch.setattr(train_previews.PreviewSampler, "__call__", call)
    train(node, model, vae, validation=validation(ValidationSettings(every=0, steps=1, width=64, height=64)))
    assert seen[:3] == [("content", [("output_blocks.0.1", 1.0), ("output_blocks.1.1", 0.0)]),
                        ("style", [("output_blocks.0.1", 0.0), ("output_blocks.1.1", 1.0)]),
                        ("both", [("output_blocks.0.1", 1.0), ("output_blocks.1.1", 1.0)])]
    assert len(seen) == 6  # step 0 and the end


def test_both_view_at_the_end_is_the_trained_model_sampled_by_the_host(node, model, vae, host_dirs):
    import comfy.sample

    (out_model, _blora, _l, grid), _ui = train(node, model, vae, validation=validation())
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, PREVIEW.seed)
    with torch.inference_mode():
        samples = comfy.sample.sample(out_model, noise, PREVIEW.steps, PREVIEW.cfg, "euler", "normal",
                                      tiny_conditioning(13), tiny_conditioning(14), latent, disable_pbar=True,
                                      seed=PREVIEW.seed)
        expected = vae.decode(samples)
    assert torch.allclose(columns(grid)[2], expected[0], atol=2e-3)


@pytest.mark.parametrize("seeds", [1, 2])
def test_trained_weights_are_bit_identical_with_previews_on_or_off(node, model, vae, host_dirs, seeds):
    torch.manual_seed(123)
    (_m, _b, _l, no_grid), ui = train(node, model, vae, seeds=seeds)
    assert "previews" not in ui and torch.equal(no_grid, torch.zeros(1, 64, 64, 3))  # no validation: a black image
    off_state = torch.random.get_rng_state()
    torch.manual_seed(123)
    train(node, model, vae, seeds=seeds, validation=validation())
    assert torch.equal(torch.random.get_rng_state(), off_state)  # sampling left the global generator alone
    files = sorted(loras(host_dirs).glob("*.safetensors"))
    assert len(files) == 2 * seeds
    for off, on in zip(files[:seeds] if seeds == 1 else files[0::2], files[1:] if seeds == 1 else files[1::2]):
        a, b = read_adapter(off), read_adapter(on)
        assert a.modules.keys() == b.modules.keys()
        for path in a.modules:
            for name, t in a.modules[path].tensors.items():
                assert torch.equal(t, b.modules[path].tensors[name]), (off.name, on.name, path, name)


def test_seeds_get_one_row_each(node, model, vae, host_dirs):
    (_m, _b, _l, grid), ui = train(node, model, vae, seeds=2, seed=5, validation=validation())
    rows = ui["previews"]
    assert [(r["step"], r["seed"]) for r in rows] == [(0, 5), (0, 6), (2, 5), (2, 6), (4, 5), (4, 6)]
    assert {r["filename"] for r in rows} == {
        f"blora_seed{s}_00001_preview_step{t:06d}.png" for s in (5, 6) for t in (0, 2, 4)}
    assert grid.shape == (1, 128, 192, 3)
    top, bottom = grid[:, :64], grid[:, 64:]
    assert (top - bottom).abs().max() > 0.01  # two seeds, two different B-LoRAs
