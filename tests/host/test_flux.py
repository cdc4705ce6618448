"""FLUX.1 in the real host, on a tiny FLUX-architecture model built with the host's own classes: every dialect of
the FLUX table applies exactly as stock LoraLoaderModelOnly applies the same file, Apply B-LoRA takes SplitFlux's
content blocks from one file and style blocks from another, Block Weights names FLUX blocks, and an adapter for the
other architecture is refused before anything is patched."""
from __future__ import annotations

import pytest
import torch

from blora_testkit.flux_dialects import flux_shapes, make_flux_state_dict
from blora_testkit.nodes import load_blora, model_state, patched_weights, run_node, write_lora
from blora_testkit.tiny_flux import DOUBLE, HIDDEN, SINGLE, tiny_flux_model, tiny_flux_sample

SHAPES = flux_shapes(hidden=HIDDEN, double=DOUBLE, single=SINGLE)
DIALECTS = ("kohya", "comfy", "peft", "diffsynth", "onetrainer", "lycoris", "lycoris_loha", "simpletuner")


@pytest.fixture
def nodes(pack):
    return pack.nodes


@pytest.fixture
def flux_model(comfy_host):
    return tiny_flux_model(seed=0)


def stock(model, name, strength):
    import nodes as host_nodes

    return host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def host_key_map(model) -> dict:
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model.model, {})


def assert_rel_close(actual, expected, rtol=1e-6, what=""):
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def block_of(path: str) -> str:
    return ".".join(path.split(".")[:2])


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_flux_dialect_patches_as_stock_lora_loader(nodes, host_dirs, flux_model, dialect):
    sd, deltas = make_flux_state_dict(dialect, SHAPES, rank=4, seed=1, alpha=None if "lokr" in dialect else 2.0)
    write_lora(host_dirs / "models" / "loras", "flux.safetensors", sd)
    base = model_state(flux_model)
    adapter = load_blora(nodes, "flux.safetensors")
    (ours,), _ = run_node(nodes.apply.BLoRABlockWeights, model=flux_model, blora=adapter, weights="default=0.8")
    w_ours, w_stock = patched_weights(ours), patched_weights(stock(flux_model, "flux.safetensors", 0.8))
    assert w_ours.keys() == w_stock.keys()
    # bare diffusers names (DiffSynth) entered the host's key map after 0.3.64: there the pack reads what stock drops
    stock_reads = dialect != "diffsynth" or "transformer_blocks.0.attn.to_q" in host_key_map(flux_model)
    for path, w in w_ours.items():
        b = base["diffusion_model." + path + ".weight"]
        if path in deltas:
            assert_rel_close(w, b + 0.8 * deltas[path], what=path)
            if stock_reads:
                assert_rel_close(w, w_stock[path], rtol=1e-6, what=f"{path} vs stock")
            assert not torch.equal(w, b), path
        else:
            assert torch.equal(w, b) and torch.equal(w_stock[path], b), path
    if not stock_reads:
        assert all(torch.equal(w_stock[p], base["diffusion_model." + p + ".weight"]) for p in deltas)
    after = model_state(flux_model)
    assert all(torch.equal(after[k], base[k]) for k in base)  # the input model is never patched


def test_kohya_file_samples_identical_to_stock(nodes, host_dirs, flux_model):
    sd, _ = make_flux_state_dict("kohya", SHAPES, rank=4, seed=2, alpha=4.0)
    write_lora(host_dirs / "models" / "loras", "k.safetensors", sd)
    (ours,), _ = run_node(nodes.apply.BLoRABlockWeights, model=flux_model, blora=load_blora(nodes, "k.safetensors"),
                          weights="default=1.2")
    w_ours, w_stock = patched_weights(ours), patched_weights(stock(flux_model, "k.safetensors", 1.2))
    assert all(torch.equal(w_ours[k], w_stock[k]) for k in w_ours)
    sample = tiny_flux_sample(ours)
    assert torch.equal(sample, tiny_flux_sample(stock(flux_model, "k.safetensors", 1.2)))
    assert not torch.equal(sample, tiny_flux_sample(flux_model))


def test_content_blocks_from_one_file_style_blocks_from_another(nodes, host_dirs, flux_model):
    """SplitFlux's split: content = single_blocks.0-9 from A at 0.9, style = single_blocks.10+ from B at 0.5; the
    double-stream blocks are in neither role and stay untouched."""
    loras = host_dirs / "models" / "loras"
    sd_a, da = make_flux_state_dict("peft", SHAPES, rank=4, seed=3)
    sd_b, db = make_flux_state_dict("kohya", SHAPES, rank=4, seed=4, alpha=2.0)
    write_lora(loras, "a.safetensors", sd_a)
    write_lora(loras, "b.safetensors", sd_b)
    base = model_state(flux_model)
    (patched,), _ = run_node(nodes.apply.BLoRAApply, model=flux_model, content=load_blora(nodes, "a.safetensors"),
                             style=load_blora(nodes, "b.safetensors"), content_strength=0.9, style_strength=0.5,
                             layout_strength=1.0, strength_mode="linear")
    w = patched_weights(patched)
    touched = set()
    for path, weight in w.items():
        b = base["diffusion_model." + path + ".weight"]
        block = block_of(path)
        if block.startswith("single_blocks.") and path in da:
            n = int(block.split(".")[1])
            expected = b + (0.9 * da[path] if n < 10 else 0.5 * db[path])
            assert_rel_close(weight, expected, what=path)
            touched.add(block)
        else:
            assert torch.equal(weight, b), path
    assert touched == {f"single_blocks.{n}" for n in range(SINGLE)}


def test_block_weights_name_flux_blocks_and_the_most_specific_wins(nodes, host_dirs, flux_model):
    sd, deltas = make_flux_state_dict("kohya", SHAPES, rank=4, seed=5, alpha=4.0)
    write_lora(host_dirs / "models" / "loras", "bw.safetensors", sd)
    base = model_state(flux_model)
    weights = "default=0\ncontent=0.5, single_blocks.3=2, S04.linear1=-1\ndouble_blocks.1.img_attn=0.25"
    (patched,), _ = run_node(nodes.apply.BLoRABlockWeights, model=flux_model,
                             blora=load_blora(nodes, "bw.safetensors"), weights=weights)
    w = patched_weights(patched)

    def strength(path):
        if path.startswith("single_blocks.4.linear1"):
            return -1.0
        if path.startswith("single_blocks.3."):
            return 2.0
        if path.startswith("double_blocks.1.img_attn."):
            return 0.25
        if path.startswith("single_blocks.") and int(path.split(".")[1]) < 10:
            return 0.5
        return 0.0

    for path in deltas:
        b = base["diffusion_model." + path + ".weight"]
        s = strength(path)
        if s == 0.0:
            assert torch.equal(w[path], b), path
        else:
            assert_rel_close(w[path], b + s * deltas[path], what=path)


def test_other_architectures_are_refused_before_patching(nodes, host_dirs, flux_model, tiny_model):
    from blora.errors import ArchitectureError
    from blora_testkit.dialects import TINY_ATTN_SHAPES, make_state_dict

    loras = host_dirs / "models" / "loras"
    write_lora(loras, "sdxl.safetensors", make_state_dict("kohya", TINY_ATTN_SHAPES, 4, 0, 2.0))
    write_lora(loras, "flux.safetensors", make_flux_state_dict("kohya", SHAPES, rank=4, seed=0)[0])
    sdxl_adapter, flux_adapter = load_blora(nodes, "sdxl.safetensors"), load_blora(nodes, "flux.safetensors")
    before = model_state(flux_model)
    with pytest.raises(ArchitectureError, match=r"sdxl\.safetensors: is a SDXL adapter, the model is FLUX\.1 "
                                                r"\(Flux \(TinyFlux\)\)"):
        run_node(nodes.apply.BLoRAApply, model=flux_model, content=sdxl_adapter)
    with pytest.raises(ArchitectureError, match=r"flux\.safetensors: is a FLUX\.1 adapter, the model is SDXL"):
        run_node(nodes.apply.BLoRABlockWeights, model=tiny_model, blora=flux_adapter, weights="")
    with pytest.raises(ValueError, match=r"flux\.safetensors: given as layout, but FLUX\.1 has no layout role"):
        run_node(nodes.apply.BLoRAApply, model=flux_model, layout=flux_adapter)
    after = model_state(flux_model)
    assert all(torch.equal(after[k], before[k]) for k in before)
