"""B-LoRA Batch Apply in the real host: image i of one batched sampling pass equals a separate Apply B-LoRA +
sampler run of entry i, for every kind the pack renders (LoRA as factors, LoHa/LoKr/DoRA/PEFT DoRA as the host
renders them); modules every entry shares are patched weights; modules that cannot be routed are refused."""
from __future__ import annotations

import pytest
import torch

from blora_testkit.dialects import CONTENT, STYLE, TINY_ATTN_SHAPES, blora_shapes, make_state_dict
from blora_testkit.nodes import load_blora, model_state, patched_weights, run_node, write_lora
from blora_testkit.tiny_sdxl import tiny_conditioning

RANK, ALPHA = 4, 2.0
STYLE_FILES = {  # name: (dialect, kind, dora, rank, seed): each entry's style B-LoRA
    "lora": ("kohya", "lora", False, RANK, 11),
    "lora_r2": ("diffusers", "lora", False, 2, 12),
    "loha": ("lycoris", "loha", False, RANK, 13),
    "lokr": ("lycoris", "lokr", False, RANK, 14),
    "dora": ("kohya", "lora", True, RANK, 15),
    "peft_dora": ("peft", "lora", True, RANK, 16),
}


@pytest.fixture
def nodes(pack):
    return pack.nodes


@pytest.fixture
def files(nodes, host_dirs):
    """{name: Adapter}: a content B-LoRA and one style B-LoRA per kind, all read by Load B-LoRA."""
    folder, shapes = host_dirs / "models" / "loras", blora_shapes(TINY_ATTN_SHAPES)
    write_lora(folder, "content.safetensors", make_state_dict("kohya", shapes, rank=RANK, seed=10, alpha=ALPHA))
    out = {"content": load_blora(nodes, "content.safetensors")}
    for name, (dialect, kind, dora, rank, seed) in STYLE_FILES.items():
        alpha = None if dialect == "diffusers" else ALPHA
        write_lora(folder, f"{name}.safetensors",
                   make_state_dict(dialect, shapes, rank=rank, seed=seed, alpha=alpha, kind=kind, dora=dora))
        out[name] = load_blora(nodes, f"{name}.safetensors")
    return out


def entry(nodes, batch=None, **inputs):
    inputs.setdefault("strength_mode", "linear")
    (out,), _ui = run_node(nodes.batch_apply.BLoRABatchEntry, **({"batch": batch} if batch else {}), **inputs)
    return out


def batch_apply(nodes, model, batch):
    (out,), _ui = run_node(nodes.batch_apply.BLoRABatchApply, model=model, batch=batch)
    return out


def apply(nodes, model, **inputs):
    inputs.setdefault("strength_mode", "linear")
    (out,), _ui = run_node(nodes.apply.BLoRAApply, model=model, **inputs)
    return out


def sample(patcher, noise, cfg=2.0, steps=3):
    """The host's own sampler (euler: deterministic) on ``noise`` (B, 4, h, w) with one prompt for every image."""
    import comfy.sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", tiny_conditioning(1),
                                       tiny_conditioning(2), torch.zeros_like(noise), disable_pbar=True, seed=0)
    finally:
        torch.set_num_threads(threads)


def noise(batch, size=8):
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(7))


def assert_close(actual, expected, what, rtol=1e-4):
    err = (actual - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item(), f"{what}: max error {err:.3g}"


ENTRY_CASES = [("content", 1.0, "lora", 0.8), (None, 0.0, "lora_r2", 1.3), ("content", 0.5, "loha", 1.0),
               ("content", 1.0, "lokr", -0.7), (None, 0.0, None, 0.0), ("content", 1.0, "dora", 1.0),
               ("content", 1.0, "peft_dora", 0.6)]


@pytest.mark.parametrize("cfg", [2.0, 1.0], ids=["cfg-cond-and-uncond", "cfg1-cond-only"])
def test_each_image_equals_a_separate_apply_and_sampler_run(nodes, files, tiny_model, cfg):
    batch = None
    for content, c, style, s in ENTRY_CASES:
        batch = entry(nodes, batch, content_strength=c, style_strength=s,
                      **({"content": files[content]} if content else {}), **({"style": files[style]} if style else {}))
    assert len(batch) == len(ENTRY_CASES)
    before = model_state(tiny_model)
    batched = sample(batch_apply(nodes, tiny_model, batch), noise(len(ENTRY_CASES)), cfg=cfg)
    base = sample(tiny_model, noise(len(ENTRY_CASES)), cfg=cfg)  # no adapter, same noise per row
    for i, (content, c, style, s) in enumerate(ENTRY_CASES):
        inputs = {"content_strength": c, "style_strength": s}
        inputs.update(({"content": files[content]} if content else {}), **({"style": files[style]} if style else {}))
        alone = sample(apply(nodes, tiny_model, **inputs), noise(len(ENTRY_CASES))[i:i + 1], cfg=cfg)
        assert_close(batched[i:i + 1], alone, f"image {i} ({content} {c}, {style} {s})")
        effect = (alone - base[i:i + 1]).abs().max().item()
        assert effect > 1e-2 if (content or style) else effect <= 1e-5 * alone.abs().max().item(), f"image {i}: B-LoRA effect {effect}"
    assert (batched[0] - batched[2]).abs().max() > 1e-2  # entries differ
    after = model_state(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model changed"


def test_images_cycle_through_the_entries(nodes, files, tiny_model):
    batch = entry(nodes, style=files["lora"], style_strength=1.0)
    batch = entry(nodes, batch, style=files["lokr"], style_strength=1.0)
    batched = sample(batch_apply(nodes, tiny_model, batch), noise(3))
    third = sample(apply(nodes, tiny_model, style=files["lora"], style_strength=1.0), noise(3)[2:3])
    assert_close(batched[2:3], third, "image 2 uses entry 0")


def test_shared_blocks_are_patched_and_differing_blocks_routed(nodes, files, tiny_model):
    import comfy.patcher_extension

    batch = entry(nodes, content=files["content"], style=files["lora"])
    batch = entry(nodes, batch, content=files["content"], style=files["loha"])
    model = batch_apply(nodes, tiny_model, batch)
    patched = {k[len("diffusion_model."):-len(".weight")] for k in model.patches}
    assert patched == {p for p in blora_shapes(TINY_ATTN_SHAPES, [CONTENT])}
    routers = model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "blora.batch_apply")
    assert len(routers) == 1 and set(routers[0].routed) == set(blora_shapes(TINY_ATTN_SHAPES, [STYLE]))


def test_entries_that_agree_are_exactly_apply(nodes, files, tiny_model):
    import comfy.patcher_extension

    batch = entry(nodes, content=files["content"], style=files["dora"], style_strength=0.4)
    batch = entry(nodes, batch, content=files["content"], style=files["dora"], style_strength=0.4)
    model = batch_apply(nodes, tiny_model, batch)
    assert not model.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)
    expected = patched_weights(apply(nodes, tiny_model, content=files["content"], style=files["dora"],
                                     style_strength=0.4))
    got = patched_weights(model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_rows_map_to_images_for_joint_and_separate_cfg_calls(pack):
    from blora.host.routed import rows_to_images

    assert rows_to_images(6, {"cond_or_uncond": [0, 1]}).tolist() == [0, 1, 2, 0, 1, 2]
    assert rows_to_images(3, {"cond_or_uncond": [1]}).tolist() == [0, 1, 2]
    assert rows_to_images(8, {"cond_or_uncond": [0, 0, 1, 1]}).tolist() == [0, 1] * 4
    assert rows_to_images(2, {}).tolist() == [0, 1]


def test_a_module_that_cannot_be_routed_is_refused(nodes, files, tiny_model):
    from dataclasses import replace

    from blora.adapters.adapter import ModuleAdapter
    from blora.errors import BLoRAError

    norm = f"{STYLE}.transformer_blocks.0.norm1"
    width = patched_weights(tiny_model)[norm].shape[0]
    with_norm = replace(files["lora"], modules={**files["lora"].modules,
                                                norm: ModuleAdapter("full", {"diff": torch.ones(width)})})
    batch = entry(nodes, style=with_norm)
    batch = entry(nodes, batch, style=files["lora"])
    before = model_state(tiny_model)
    with pytest.raises(BLoRAError, match=r"norm1.*LayerNorm.*only Linear layers"):
        batch_apply(nodes, tiny_model, batch)
    after = model_state(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_image_grid_lays_the_batch_out_row_by_row(nodes):
    images = torch.arange(3, dtype=torch.float32).reshape(3, 1, 1, 1).expand(3, 2, 3, 3).contiguous()
    (grid,), _ui = run_node(nodes.batch_apply.BLoRAImageGrid, images=images, columns=2)
    assert grid.shape == (1, 4, 6, 3)
    assert grid[0, :2, :3].eq(0).all() and grid[0, :2, 3:].eq(1).all() and grid[0, 2:, :3].eq(2).all()
    assert grid[0, 2:, 3:].eq(0).all()  # the empty cell
    (square,), _ui = run_node(nodes.batch_apply.BLoRAImageGrid, images=images[:1].expand(4, 2, 3, 3), columns=0)
    assert square.shape == (1, 4, 6, 3)


def test_cond_and_uncond_in_separate_calls_stay_on_their_images_entry(nodes, files, tiny_model):
    """An area on the negative prompt makes its chunks a different shape from the positive's, so the host runs the
    full-size cond alone in one model call and the area-sized chunks in another; each image must still equal its
    separate run."""
    import comfy.patcher_extension
    import comfy.sample

    negative = tiny_conditioning(2)
    negative[0][1].update(area=(4, 4, 0, 0), strength=1.0, set_area_to_bounds=False)
    batch = entry(nodes, style=files["lora"], style_strength=1.0)
    batch = entry(nodes, batch, style=files["loha"], style_strength=1.0)
    model = batch_apply(nodes, tiny_model, batch)
    calls = []
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.calls",
                               lambda executor, x, *args, **kw: (calls.append(
                                   (x.shape[0], list(kw.get("transformer_options", args[4] if len(args) > 4 else {})
                                                     .get("cond_or_uncond", [])))), executor(x, *args, **kw))[1])

    def run(patcher, rows):
        with torch.inference_mode():
            return comfy.sample.sample(patcher, noise(2)[rows], 2, 2.0, "euler", "normal", tiny_conditioning(1),
                                       negative, torch.zeros_like(noise(2)[rows]), disable_pbar=True, seed=0)

    batched = run(model, slice(0, 2))
    assert (2, [0]) in calls and any(1 in c for _, c in calls), calls  # cond alone in a call; uncond elsewhere
    for i, style in enumerate(("lora", "loha")):
        alone = run(apply(nodes, tiny_model, style=files[style], style_strength=1.0), slice(i, i + 1))
        assert_close(batched[i:i + 1], alone, f"image {i} ({style})")
