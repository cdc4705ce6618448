"""Apply B-LoRA and B-LoRA Block Weights in the real host: patched weights against the textbook formula for every
dialect, samples against stock LoraLoaderModelOnly, and the base model left untouched."""
from __future__ import annotations

import pytest
import torch

from blora_testkit.dialects import (CONTENT, LAYOUT, STYLE, TINY_ATTN_SHAPES, blora_shapes, factors,
                                    make_state_dict, reference_deltas)
from blora_testkit.nodes import load_blora, model_state, patched_weights, run_node, tiny_sample, write_lora

RANK, ALPHA = 4, 2.0


def assert_rel_close(actual, expected, rtol=1e-6, what=""):
    """max |actual - expected| <= rtol · max |expected| (fp32 compute, the host's order of operations)."""
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def in_block(path, block):
    return path.startswith(block + ".")


@pytest.fixture
def nodes(pack):
    return pack.nodes


def apply(nodes, model, content=None, style=None, layout=None, c=1.0, s=1.0, lay=1.0, mode="linear"):
    inputs = dict(model=model, content_strength=c, style_strength=s, layout_strength=lay, strength_mode=mode)
    inputs.update({k: v for k, v in (("content", content), ("style", style), ("layout", layout)) if v is not None})
    (patched,), _ui = run_node(nodes.apply.BLoRAApply, **inputs)
    return patched


def check_weights(base, patched, deltas_by_block):
    """Weights in each listed block = base + its delta; every other weight bit-identical to the base."""
    touched = 0
    for path, w in patched.items():
        for block, (deltas, strength) in deltas_by_block.items():
            if in_block(path, block) and path in deltas:
                assert_rel_close(w, base[path] + strength * deltas[path], what=path)
                touched += 1
                break
        else:
            assert torch.equal(w, base[path]), f"{path} changed"
    assert touched == sum(1 for p in TINY_ATTN_SHAPES for b in deltas_by_block if in_block(p, b))


def base_weights(model):
    return {k[len("diffusion_model."):-len(".weight")]: v.clone() for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.") and k.endswith(".weight")}


PLAIN_CASES = [  # (file dialect, kind): every dialect the reader knows, each with all 11 blocks in the file
    ("diffusers", "lora"), ("diffusers_doubled", "lora"), ("peft", "lora"), ("peft_base_model", "lora"),
    ("kohya", "lora"), ("kohya_diffusers", "lora"), ("comfy", "lora"), ("lycoris", "lokr"), ("lycoris", "loha"),
]


@pytest.mark.parametrize("dialect,kind", PLAIN_CASES, ids=[f"{d}-{k}" for d, k in PLAIN_CASES])
def test_every_dialect_patches_exactly_content_and_style(nodes, host_dirs, tiny_model, dialect, kind):
    sd = make_state_dict(dialect, TINY_ATTN_SHAPES, rank=RANK, seed=3, alpha=ALPHA, kind=kind)
    write_lora(host_dirs / "models" / "loras", "all_blocks.safetensors", sd)
    deltas = reference_deltas(TINY_ATTN_SHAPES, rank=RANK, seed=3, alpha=ALPHA, kind=kind)
    base = base_weights(tiny_model)
    adapter = load_blora(nodes, "all_blocks.safetensors")
    patched = apply(nodes, tiny_model, content=adapter, style=adapter, c=0.8, s=-0.6)
    check_weights(base, patched_weights(patched), {CONTENT: (deltas, 0.8), STYLE: (deltas, -0.6)})
    assert torch.equal(base_weights(tiny_model)[f"{CONTENT}.transformer_blocks.0.attn1.to_q"],
                       base[f"{CONTENT}.transformer_blocks.0.attn1.to_q"])


def dora_reference(weight, delta, scale_tensor, strength):
    """DoRA as ComfyUI renders an input-axis (1, in) dora_scale (comfy/weight_adapter/base.py weight_decompose):
    the adapted weight normalised per column, plus the host's eps; strength interpolates."""
    w, adapted = weight.float(), weight.float() + delta
    norm = adapted.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps
    target = adapted * (scale_tensor.float() / norm)
    return w + strength * (target - w)


def test_dora_files_render_as_the_host_renders_dora(nodes, host_dirs, tiny_model):
    shapes = blora_shapes(TINY_ATTN_SHAPES)
    sd = make_state_dict("kohya", shapes, rank=RANK, seed=5, alpha=ALPHA, dora=True)
    write_lora(host_dirs / "models" / "loras", "dora.safetensors", sd)
    deltas = reference_deltas(shapes, rank=RANK, seed=5, alpha=ALPHA)
    f = factors(shapes, RANK, 5, dora=True)
    base = base_weights(tiny_model)
    adapter = load_blora(nodes, "dora.safetensors")
    got = patched_weights(apply(nodes, tiny_model, content=adapter, style=adapter, c=0.7, s=1.0))
    for path in shapes:
        strength = 0.7 if in_block(path, CONTENT) else 1.0
        scale = f[path]["dora_in"].reshape(1, -1)
        assert_rel_close(got[path], dora_reference(base[path], deltas[path], scale, strength), rtol=2e-6, what=path)


def peft_dora_reference(weight, delta, magnitude, strength):
    """PEFT / paper DoRA (Liu et al. 2024, eq. 5), in float64: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with the norm of the
    adapted weight per output row; strength s gives W + s·(W' − W) (ComfyUI's DoRA strength)."""
    w = weight.double()
    adapted = w + delta.double()
    row_norm = adapted.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
    target = adapted * magnitude.double().reshape(row_norm.shape) / row_norm
    return w + strength * (target - w)


def host_output_axis_reference(weight, delta, magnitude):
    """What stock ComfyUI's output-axis branch gives at strength 1: normalised by the un-adapted weight's rows."""
    w = weight.double()
    return (w + delta.double()) * magnitude.double().reshape(-1, 1) / w.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_peft_dora_renders_with_peft_formula(nodes, host_dirs, tiny_model, strength):
    shapes = blora_shapes(TINY_ATTN_SHAPES)
    write_lora(host_dirs / "models" / "loras", "peft_dora.safetensors",
               make_state_dict("peft", shapes, rank=RANK, seed=5, alpha=ALPHA, dora=True))
    deltas = reference_deltas(shapes, rank=RANK, seed=5, alpha=ALPHA)
    f = factors(shapes, RANK, 5, dora=True)
    base = base_weights(tiny_model)
    adapter = load_blora(nodes, "peft_dora.safetensors")
    got = patched_weights(apply(nodes, tiny_model, content=adapter, style=adapter, c=strength, s=strength))
    apart = 0.0
    for path in shapes:
        expected = peft_dora_reference(base[path], deltas[path], f[path]["dora_out"], strength)
        assert_rel_close(got[path], expected, rtol=2e-6, what=path)
        host = host_output_axis_reference(base[path], deltas[path], f[path]["dora_out"])
        apart = max(apart, (host - peft_dora_reference(base[path], deltas[path], f[path]["dora_out"], 1.0)).abs().max())
    assert apart > 1e-3  # the two formulas differ measurably on these weights, so the check above can tell them apart
    assert all(torch.equal(w, base[p]) for p, w in base_weights(tiny_model).items())


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_output_axis_dora_scale_renders_as_lycoris_and_peft_do(nodes, host_dirs, tiny_model, kind):
    """A LyCORIS (3.2+) DoRA file: (out, 1) dora_scale. LyCORIS and PEFT normalise W + ΔW per row; stock ComfyUI's
    output-axis branch normalises W. The pack renders the home tools' way, and the Load node's summary says that
    stock LoraLoader renders the file differently."""
    shapes = blora_shapes(TINY_ATTN_SHAPES)
    sd = make_state_dict("lycoris", shapes, rank=RANK, seed=5, alpha=ALPHA, kind=kind, dora=True)
    f = factors(shapes, RANK, 5, kind=kind, dora=True)
    for path in shapes:
        sd["lora_unet_" + path.replace(".", "_") + ".dora_scale"] = f[path]["dora_out"].reshape(-1, 1)
    write_lora(host_dirs / "models" / "loras", "lyco_dora.safetensors", sd)
    deltas = reference_deltas(shapes, rank=RANK, seed=5, alpha=ALPHA, kind=kind)
    base = base_weights(tiny_model)
    (adapter, _, summary, _), _ = run_node(nodes.load.BLoRALoader, lora_name="lyco_dora.safetensors")
    got = patched_weights(apply(nodes, tiny_model, content=adapter, style=adapter, c=1.0, s=0.5))
    for path in shapes:
        strength = 1.0 if in_block(path, CONTENT) else 0.5
        expected = peft_dora_reference(base[path], deltas[path], f[path]["dora_out"], strength)
        assert_rel_close(got[path], expected, rtol=2e-6, what=path)
    assert f"stock LoraLoader renders {len(shapes)} DoRA modules differently" in summary


def test_peft_dora_normalises_the_weight_the_input_model_renders(nodes, host_dirs, tiny_model):
    """A model already carrying a LoRA (stock loader) on the same modules: PEFT DoRA normalises W + ΔW_prev."""
    loras = host_dirs / "models" / "loras"
    content = {p: s for p, s in TINY_ATTN_SHAPES.items() if in_block(p, CONTENT)}
    write_lora(loras, "prev.safetensors", make_state_dict("kohya", content, RANK, 13, ALPHA))
    write_lora(loras, "peft_dora.safetensors", make_state_dict("peft", content, RANK, 5, dora=True))
    prev, deltas = reference_deltas(content, RANK, 13, ALPHA), reference_deltas(content, RANK, 5)
    f = factors(content, RANK, 5, dora=True)
    base = base_weights(tiny_model)
    got = patched_weights(apply(nodes, stock_patched(tiny_model, ("prev.safetensors", 1.0)),
                                content=load_blora(nodes, "peft_dora.safetensors"), c=0.5))
    for path in content:
        current = base[path].double() + prev[path].double()
        expected = peft_dora_reference(current, deltas[path], f[path]["dora_out"], 0.5)
        assert_rel_close(got[path], expected, rtol=2e-6, what=path)


def stock_patched(model, *files_and_strengths):
    """LoraLoaderModelOnly from the host's own nodes.py, chained once per (kohya file name, strength)."""
    import nodes as host_nodes

    for name, strength in files_and_strengths:
        model = host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
    return model


def test_original_dialect_samples_identical_to_stock_lora_loader(nodes, host_dirs, tiny_model):
    """Headline: an original B-LoRA file (content + style) applied with two strengths gives bit-identical weights
    and samples to stock LoraLoaderModelOnly on kohya files holding the same blocks, at the same strengths."""
    loras = host_dirs / "models" / "loras"
    write_lora(loras, "original.safetensors", make_state_dict("diffusers", blora_shapes(TINY_ATTN_SHAPES), RANK, 7))
    for name, block in (("content_kohya.safetensors", CONTENT), ("style_kohya.safetensors", STYLE)):
        shapes = {p: s for p, s in TINY_ATTN_SHAPES.items() if in_block(p, block)}
        part = {k: v for k, v in make_state_dict("kohya", blora_shapes(TINY_ATTN_SHAPES), RANK, 7).items()
                if k.startswith(tuple("lora_unet_" + p.replace(".", "_") + "." for p in shapes))}
        write_lora(loras, name, part)
    before, base_sample = model_state(tiny_model), tiny_sample(tiny_model)
    adapter = load_blora(nodes, "original.safetensors")
    ours = apply(nodes, tiny_model, content=adapter, style=adapter, c=0.7, s=1.3)
    stock = stock_patched(tiny_model, ("content_kohya.safetensors", 0.7), ("style_kohya.safetensors", 1.3))
    w_ours, w_stock = patched_weights(ours), patched_weights(stock)
    assert w_ours.keys() == w_stock.keys()
    assert all(torch.equal(w_ours[k], w_stock[k]) for k in w_ours)
    sample_ours, sample_stock = tiny_sample(ours), tiny_sample(stock)
    assert torch.equal(sample_ours, sample_stock)
    assert not torch.equal(sample_ours, base_sample)  # the B-LoRA does change the image
    after = model_state(tiny_model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(tiny_sample(tiny_model), base_sample)


def test_dora_samples_identical_to_stock_on_the_same_kohya_file(nodes, host_dirs, tiny_model):
    loras = host_dirs / "models" / "loras"
    content_only = {p: s for p, s in TINY_ATTN_SHAPES.items() if in_block(p, CONTENT)}
    write_lora(loras, "dora_content.safetensors", make_state_dict("kohya", content_only, RANK, 9, ALPHA, dora=True))
    adapter = load_blora(nodes, "dora_content.safetensors")
    ours = apply(nodes, tiny_model, content=adapter, c=0.9)
    stock = stock_patched(tiny_model, ("dora_content.safetensors", 0.9))
    w_ours, w_stock = patched_weights(ours), patched_weights(stock)
    assert all(torch.equal(w_ours[k], w_stock[k]) for k in w_ours)
    assert torch.equal(tiny_sample(ours), tiny_sample(stock))


def test_content_from_one_file_style_from_another(nodes, host_dirs, tiny_model):
    loras = host_dirs / "models" / "loras"
    write_lora(loras, "a.safetensors", make_state_dict("diffusers", TINY_ATTN_SHAPES, RANK, 11))
    write_lora(loras, "b.safetensors", make_state_dict("kohya", TINY_ATTN_SHAPES, RANK, 12, ALPHA))
    da = reference_deltas(TINY_ATTN_SHAPES, RANK, 11)
    db = reference_deltas(TINY_ATTN_SHAPES, RANK, 12, ALPHA)
    base = base_weights(tiny_model)
    patched = apply(nodes, tiny_model, content=load_blora(nodes, "a.safetensors"),
                    style=load_blora(nodes, "b.safetensors"),
                    layout=load_blora(nodes, "a.safetensors"), c=1.0, s=0.5, lay=-0.25)
    check_weights(base, patched_weights(patched), {CONTENT: (da, 1.0), STYLE: (db, 0.5), LAYOUT: (da, -0.25)})


def test_alpha_squared_mode_squares_the_strength_keeping_its_sign(nodes, host_dirs, tiny_model):
    write_lora(host_dirs / "models" / "loras", "k.safetensors", make_state_dict("kohya", TINY_ATTN_SHAPES, RANK, 4))
    deltas = reference_deltas(TINY_ATTN_SHAPES, RANK, 4)
    base = base_weights(tiny_model)
    adapter = load_blora(nodes, "k.safetensors")
    patched = apply(nodes, tiny_model, content=adapter, style=adapter, c=1.1, s=-0.5, mode="alpha_squared")
    check_weights(base, patched_weights(patched), {CONTENT: (deltas, 1.21), STYLE: (deltas, -0.25)})


def test_zero_strength_and_no_input_leave_weights_alone(nodes, host_dirs, tiny_model):
    write_lora(host_dirs / "models" / "loras", "k.safetensors", make_state_dict("kohya", TINY_ATTN_SHAPES, RANK, 4))
    deltas = reference_deltas(TINY_ATTN_SHAPES, RANK, 4)
    base = base_weights(tiny_model)
    adapter = load_blora(nodes, "k.safetensors")
    patched = apply(nodes, tiny_model, content=adapter, style=adapter, c=0.0, s=2.0)
    check_weights(base, patched_weights(patched), {STYLE: (deltas, 2.0)})
    untouched = apply(nodes, tiny_model)
    assert untouched is not tiny_model and not untouched.patches
    assert all(torch.equal(w, base[p]) for p, w in patched_weights(untouched).items())


def test_apply_stacks_on_an_already_patched_model(nodes, host_dirs, tiny_model):
    write_lora(host_dirs / "models" / "loras", "k.safetensors", make_state_dict("kohya", TINY_ATTN_SHAPES, RANK, 4))
    deltas = reference_deltas(TINY_ATTN_SHAPES, RANK, 4)
    base = base_weights(tiny_model)
    adapter = load_blora(nodes, "k.safetensors")
    once = apply(nodes, tiny_model, content=adapter, c=0.5)
    twice = apply(nodes, once, style=adapter, s=0.25)
    check_weights(base, patched_weights(twice), {CONTENT: (deltas, 0.5), STYLE: (deltas, 0.25)})
    check_weights(base, patched_weights(once), {CONTENT: (deltas, 0.5)})


def test_block_weights_node_applies_the_most_specific_strength(nodes, host_dirs, tiny_model):
    write_lora(host_dirs / "models" / "loras", "all.safetensors",
               make_state_dict("comfy", TINY_ATTN_SHAPES, RANK, 13, ALPHA))
    deltas = reference_deltas(TINY_ATTN_SHAPES, RANK, 13, ALPHA)
    base = base_weights(tiny_model)
    text = ("content=0.5\n"
            "style=2, OUT1.transformer_blocks.0.attn2=-1   # style's cross-attention reversed\n"
            "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k=0\n"
            "IN08=0.25, default=0")
    (patched,), _ = run_node(nodes.apply.BLoRABlockWeights, model=tiny_model,
                             blora=load_blora(nodes, "all.safetensors"),
                             weights=text)
    got = patched_weights(patched)
    expected_strength = {CONTENT: 0.5, LAYOUT: 0.25}
    for path, w in got.items():
        block = next((b for b in (CONTENT, STYLE, LAYOUT) if in_block(path, b)), None)
        if path not in deltas or block is None:
            assert torch.equal(w, base[path]), path
            continue
        if block == STYLE:
            s = 0.0 if path.endswith("attn2.to_k") else -1.0 if ".attn2." in path else 2.0
        else:
            s = expected_strength[block]
        if s == 0.0:
            assert torch.equal(w, base[path]), path
        else:
            assert_rel_close(w, base[path] + s * deltas[path], what=path)
    assert sum(1 for v in patched.patches.values() for _ in v) == 3 * 8 - 1  # default=0 blocks not patched


def test_block_weights_default_is_one_for_every_module(nodes, host_dirs, tiny_model):
    write_lora(host_dirs / "models" / "loras", "all.safetensors",
               make_state_dict("kohya", TINY_ATTN_SHAPES, RANK, 14, ALPHA))
    deltas = reference_deltas(TINY_ATTN_SHAPES, RANK, 14, ALPHA)
    base = base_weights(tiny_model)
    (patched,), _ = run_node(nodes.apply.BLoRABlockWeights, model=tiny_model,
                             blora=load_blora(nodes, "all.safetensors"),
                             weights="# everything at 1\n")
    got = patched_weights(patched)
    for path in TINY_ATTN_SHAPES:
        assert_rel_close(got[path], base[path] + deltas[path], what=path)


def test_text_encoder_modules_are_ignored_with_a_log_line(nodes, host_dirs, tiny_model, caplog):
    shapes = dict(blora_shapes(TINY_ATTN_SHAPES))
    shapes["te1:text_model.encoder.layers.0.self_attn.q_proj"] = (768, 768)
    write_lora(host_dirs / "models" / "loras", "te.safetensors", make_state_dict("kohya", shapes, RANK, 2, ALPHA))
    adapter = load_blora(nodes, "te.safetensors")
    caplog.set_level("INFO")
    (patched,), _ = run_node(nodes.apply.BLoRABlockWeights, model=tiny_model, blora=adapter, weights="")
    assert len(patched.patches) == len(blora_shapes(TINY_ATTN_SHAPES))
    assert "1 text-encoder modules ignored" in caplog.text and "te.safetensors" in caplog.text


def test_apply_returns_a_clone_and_never_patches_its_input(nodes, host_dirs, tiny_model):
    write_lora(host_dirs / "models" / "loras", "k.safetensors", make_state_dict("kohya", TINY_ATTN_SHAPES, RANK, 4))
    adapter = load_blora(nodes, "k.safetensors")
    patched = apply(nodes, tiny_model, content=adapter, style=adapter, layout=adapter)
    assert patched is not tiny_model and patched.model is tiny_model.model
    assert not tiny_model.patches and len(patched.patches) == 3 * 8
    assert patched.patches_uuid != tiny_model.patches_uuid


# --- example workflows: UI format and API twin say the same thing, in the front-end's widget order -----------

def _widget_names(input_types: dict) -> list[str]:
    """Widget inputs in the order the front-end assigns widgets_values (required, then optional), with the
    extra control_after_generate value after a seed (an INT that asks for it, or one named seed or noise_seed,
    which the front end gives one unasked)."""
    names = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                if opts.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                    names.append("control_after_generate")
            if opts.get("image_upload"):  # LoadImage: the upload button keeps a value too
                names.append("upload")
    return names


def _input_types(nodes, node_type):
    import nodes as host_nodes

    ours = {cls.GET_SCHEMA().node_id: cls for cls in nodes.NODES}
    cls = ours.get(node_type) or host_nodes.NODE_CLASS_MAPPINGS.get(node_type)
    if cls is None and node_type in EXTRAS:
        import importlib

        cls = getattr(importlib.import_module(EXTRAS[node_type]), node_type)
    return None if cls is None else cls.INPUT_TYPES()  # None: a comfy_extras node, not loaded in-process


EXAMPLES = ["style_transfer", "text_stylization", "consistent_style", "block_weights", "train_then_apply",
            "train_from_folder", "flux_style_transfer"]
CHECKPOINTS = {"flux_style_transfer": "flux1-dev-fp8.safetensors"}  # the others: SDXL base
EXTRAS = {"FluxGuidance": "comfy_extras.nodes_flux", "EmptySD3LatentImage": "comfy_extras.nodes_sd3"}  # host nodes
# outside nodes.py: imported here for their inputs


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_workflow_ui_and_api_twins_agree(nodes, name):
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "example_workflows"
    ui = json.loads((root / f"{name}.json").read_text())
    api = json.loads((root / "api" / f"{name}.json").read_text())
    assert ui["version"] == 0.4 and set(api) == {str(n["id"]) for n in ui["nodes"]}
    assert all(k.isdigit() for k in api)
    checkpoints = [n for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert [c["inputs"]["ckpt_name"] for c in checkpoints] == [CHECKPOINTS.get(name, "sd_xl_base_1.0.safetensors")]
    by_id = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        twin = api[str(node["id"])]
        assert twin["class_type"] == node["type"]
        types = _input_types(nodes, node["type"])
        if types is None:
            assert node["type"] == "LossGraphNode"
            continue
        names = _widget_names(types)
        assert len(names) == len(node.get("widgets_values") or []), node["type"]
        for widget, value in zip(names, node.get("widgets_values") or []):
            if widget not in ("control_after_generate", "upload"):
                assert twin["inputs"][widget] == value, (node["type"], widget)
                spec = {**types.get("required", {}), **types.get("optional", {})}[widget]
                options = spec[0] if isinstance(spec[0], list) else spec[1].get("options")
                if options and widget not in ("ckpt_name", "lora_name", "image"):
                    assert value in options, (node["type"], widget, value)
        linked = {i["name"] for i in node["inputs"] if i.get("link") is not None}
        required = set(types.get("required", {})) - set(names)
        assert required <= linked, (node["type"], required - linked)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        name = by_id[dst]["inputs"][dst_slot]["name"]
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[src]["outputs"][src_slot]["type"] == kind
        assert api[str(dst)]["inputs"][name] == [str(src), src_slot]
    api_links = sum(1 for n in api.values() for v in n["inputs"].values() if isinstance(v, list))
    assert api_links == len(ui["links"])
