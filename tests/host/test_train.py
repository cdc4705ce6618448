"""Train B-LoRA in the real host on the tiny SDXL-architecture model: what changes (only the targeted modules) and
what never does (the base model), that training learns, that saved files render in stock ComfyUI exactly as the
trained MODEL (LoRA, DoRA, rsLoRA), resume and determinism, interrupt, progress, and bad input."""
from __future__ import annotations

import importlib
import math
import re
import statistics
import sys
import types

import pytest
import torch
from blora_testkit.dynamic import assert_renders_as, base_weight, sample
from blora_testkit.nodes import run_node
from blora_testkit.train_fixtures import model, node, one_thread, vae  # noqa: F401
from blora_testkit.tiny_sdxl import tiny_conditioning

from blora.errors import ArchitectureError, BLoRAError, UnsafePathError
from blora.formats.files import read_adapter
from blora.adapters.trainable import Trainable
from blora.adapters.kinds.lora import TrainableLoRA

INPUTS = ["model", "vae", "images", "positive", "training_set", "blocks", "layer_filter", "rank", "alpha", "algorithm",
          "learning_rate", "steps", "resolution", "seed", "training_dtype", "filename_prefix", "seeds", "seed_draws",
          "algorithm_options", "augmentation", "checkpoints", "memory", "validation"]
TARGET_KEY = re.compile(r"^diffusion_model\.output_blocks\.[01]\.1\.transformer_blocks\.\d+\.attn[12]\."
                        r"(to_q|to_k|to_v|to_out\.0)\.weight$")
FAST = dict(blocks="content+style", layer_filter="", rank=4, alpha=4.0, algorithm="LoRA", rslora=False,
            learning_rate=1e-2, loraplus_ratio=1.0, optimizer="AdamW", weight_decay=1e-4, steps=3, batch_size=1,
            grad_accumulation=1, resolution=64, flip=False, seed=0, training_dtype="fp32",
            gradient_checkpointing=True, save_every=0, filename_prefix="t/blora", save_precision="fp32")


def image(h=64, w=64, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def train(node, model, vae, images=None, positive=None, node_id="5", **settings):
    """(MODEL, BLORA, ui) from the node run as the executor runs it (inference mode); the LOSS_MAP output is
    checked against the ui's losses here."""
    inputs = dict(FAST, **settings)
    (out_model, blora, losses, _previews), ui = run_node(node, hidden={"UNIQUE_ID": node_id}, model=model, vae=vae,
                                      images=image() if images is None else images,
                                      positive=tiny_conditioning(0) if positive is None else positive, **inputs)
    assert losses == {"loss": ui["loss"]}
    return out_model, blora, ui


def written(host_dirs) -> list[str]:
    folder = host_dirs / "output" / "loras"
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def snapshot(model):
    unet = model.model.diffusion_model
    params = {n: (p, p.requires_grad) for n, p in unet.named_parameters()}
    return params, {k: v.clone() for k, v in model.model.state_dict().items()}


def assert_untouched(model, before, sample_before):
    params, state = before
    unet = model.model.diffusion_model
    now = dict(unet.named_parameters())
    assert all(now[n] is p and p.requires_grad == flag and p.grad is None for n, (p, flag) in params.items())
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
    for m in unet.modules():
        assert "forward" not in m.__dict__, "a training forward override was left on the UNet"
        assert not any(isinstance(f, Trainable) for f in getattr(m, "weight_function", []))
    assert torch.equal(sample(model), sample_before)


def test_schema_is_the_public_interface(node):
    schema = node.define_schema()
    assert (schema.node_id, schema.display_name, schema.category) == ("BLoRATrain", "Train B-LoRA", "B-LoRA/train")
    assert [i.id for i in schema.inputs] == INPUTS
    assert all(i.tooltip for i in schema.inputs + schema.outputs) and schema.description
    assert [o.io_type for o in schema.outputs] == ["MODEL", "BLORA", "LOSS_MAP", "IMAGE"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_only_targets_train_and_the_base_model_never_changes(node, model, vae, host_dirs, dtype):
    before, sample_before = snapshot(model), sample(model)
    out_model, blora, ui = train(node, model, vae, training_dtype=dtype)
    expected = sorted(k for k in model.model.state_dict() if TARGET_KEY.match(k))
    assert len(expected) == 2 * 8
    assert sorted(f"diffusion_model.{p}.weight" for p in blora.modules) == expected
    assert sorted(out_model.patches) == expected  # nothing else is patched in the output MODEL
    assert all(float(m.tensors["up"].abs().sum()) > 0 for m in blora.modules.values())
    assert len(ui["loss"]) == 3 and all(isinstance(x, float) for x in ui["loss"]) and ui["elapsed"][0] > 0
    assert written(host_dirs) == ["t/blora_00001_.safetensors"]
    meta = read_adapter(host_dirs / "output" / "loras" / "t" / "blora_00001_.safetensors").metadata
    assert {k: meta[k] for k in ("blora.roles", "blora.blocks", "blora.rank", "blora.alpha", "blora.algorithm",
                                 "blora.steps", "blora.learning_rate", "blora.seed", "blora.resolution",
                                 "blora.base_model", "blora.dialect")} == {
        "blora.roles": "content,style", "blora.blocks": "OUT0,OUT1", "blora.rank": "4", "blora.alpha": "4",
        "blora.algorithm": "LoRA", "blora.steps": "3", "blora.learning_rate": "0.01", "blora.seed": "0",
        "blora.resolution": "64", "blora.base_model": "TinySDXL", "blora.dialect": "kohya"}
    assert re.fullmatch(r"[0-9a-f]{16}", meta["blora.base_model_hash"]) and meta["blora.version"] != "unknown"
    assert_untouched(model, before, sample_before)
    assert not torch.equal(sample(out_model), sample_before)


def test_one_image_at_a_high_learning_rate_lowers_the_loss(node, model, vae, host_dirs):
    _, _, ui = train(node, model, vae, steps=50, rank=8, alpha=8.0, learning_rate=4e-2,
                     gradient_checkpointing=False)
    losses = ui["loss"]
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    assert last < 0.92 * first, f"loss did not fall: first 10 {first:.4f}, last 10 {last:.4f}"


@pytest.mark.parametrize("algorithm, rslora", [("LoRA", False), ("DoRA", False), ("LoRA", True)])
def test_saved_file_renders_in_stock_comfyui_as_the_trained_model(node, model, vae, host_dirs, algorithm, rslora):
    import comfy.lora
    import nodes as host_nodes

    out_model, blora, _ = train(node, model, vae, rank=4, alpha=2.0, algorithm=algorithm, rslora=rslora)
    name = "t/blora_00001_.safetensors"
    stock = host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    assert torch.equal(sample(stock), sample(out_model))
    saved = read_adapter(host_dirs / "output" / "loras" / name)
    assert saved.modules.keys() == blora.modules.keys()
    for path, module in saved.modules.items():
        assert module.alpha == pytest.approx(2.0 * (4 ** 0.5 if rslora else 1.0))
        assert (module.dora_scale is not None) == (algorithm == "DoRA")
        if module.dora_scale is not None:
            assert tuple(module.dora_scale.shape) == (1, module.out_in[1])
    path = min(blora.modules)
    key = f"diffusion_model.{path}.weight"
    weight = base_weight(model, path).float()  # unpatched (the last sampled clone's patches may be in place)
    rendered = comfy.lora.calculate_weight(out_model.patches[key], weight.clone(), key)
    assert torch.allclose(rendered, TrainableLoRA.from_module(saved.modules[path])(weight), atol=1e-6)
    # independent render: every trained weight set to the trainer's own math on the unpatched weight
    assert_renders_as(out_model, {p: TrainableLoRA.from_module(m)(base_weight(model, p).float())
                                  for p, m in saved.modules.items()}, model)


def test_same_seed_same_weights_and_resume_adds_steps(node, model, vae, host_dirs):
    _, a, _ = train(node, model, vae, seed=5)
    _, b, _ = train(node, model, vae, seed=5)
    _, c, _ = train(node, model, vae, seed=6)
    same = lambda x, y: all(torch.equal(x.modules[p].tensors[t], y.modules[p].tensors[t])  # noqa: E731
                            for p in x.modules for t in ("down", "up"))
    assert same(a, b) and not same(a, c)
    _, resumed, ui = train(node, model, vae, seed=5, steps=2, resume_from="t/blora_00001_.safetensors")
    assert len(ui["loss"]) == 2 and not same(resumed, a)
    meta = read_adapter(resumed.source).metadata
    assert meta["blora.steps"] == "5" and meta["ss_steps"] == "5" and meta["blora.train.steps"] == "2"
    with pytest.raises(BLoRAError, match="rank 4.*asks for LoRA rank 8"):
        train(node, model, vae, rank=8, alpha=8.0, resume_from="t/blora_00001_.safetensors")
    assert len(written(host_dirs)) == 4


def test_interrupt_stops_within_a_step_and_keeps_the_last_checkpoint(node, model, vae, host_dirs, monkeypatch):
    import comfy.model_management
    import comfy.utils

    if hasattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL"):  # newer hosts drop updates closer than 0.1 s apart
        monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0)
    before, sample_before = snapshot(model), sample(model)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 3:
            comfy.model_management.interrupt_current_processing()

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(node, model, vae, steps=8, save_every=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert seen == [1, 2, 3]
    assert written(host_dirs) == ["t/blora_00001_step000002_.safetensors"]  # no final file, no temporary file
    assert read_adapter(host_dirs / "output" / "loras" / written(host_dirs)[0]).metadata["blora.steps"] == "2"
    assert_untouched(model, before, sample_before)


def test_progress_goes_to_the_ui_and_the_front_end(node, model, vae, host_dirs, monkeypatch):
    import comfy.utils

    sent, bars = [], []

    class Instance:
        client_id = "client-1"

        def send_sync(self, event, data, sid):
            sent.append((event, data, sid))

    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(
        PromptServer=types.SimpleNamespace(instance=Instance())))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, t, p, node_id=None: bars.append((v, t, node_id)))
    _, _, ui = train(node, model, vae, steps=2, node_id="17")
    assert bars == [(1, 2, "17"), (2, 2, "17")]
    assert [(e, sid) for e, _, sid in sent] == [("blora.train.progress", "client-1")] * 2
    assert [set(d) for _, d, _ in sent] == [{"node", "step", "steps", "loss", "elapsed"}] * 2
    assert [(d["node"], d["step"], d["steps"], d["loss"]) for _, d, _ in sent] == \
        [("17", 1, 2, ui["loss"][0]), ("17", 2, 2, ui["loss"][1])]


def test_previews_follow_the_hosts_preview_setting(node, model, vae, host_dirs, monkeypatch):
    """With previews on (--preview-method), the node shows the x0 estimate of the step as KSampler does (host
    progress hook, JPEG); with previews off (the default) no preview is decoded; the losses are the same."""
    import comfy.cli_args
    import comfy.utils
    import latent_preview

    previews = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda v, t, p, node_id=None: previews.append((v, p)))
    _, _, ui_off = train(node, model, vae, steps=2)
    assert [p for _, p in previews] == [None, None]
    previews.clear()
    monkeypatch.setattr(comfy.cli_args.args, "preview_method", latent_preview.LatentPreviewMethod.Latent2RGB)
    _, _, ui_on = train(node, model, vae, steps=2)
    last_step, last = previews[-1]
    assert last_step == 2 and last is not None and last[0] == "JPEG"
    assert last[1].size == (8, 8)  # the 64 px image's 8x8 latent, decoded by latent2rgb
    assert ui_on["loss"] == ui_off["loss"]


@pytest.mark.parametrize("blocks, first", [("content+style", "output_blocks.0.1"), ("style", "output_blocks.1.1"),
                                           ("content+style+layout", "input_blocks.8.1")])
def test_no_backward_work_before_the_first_trained_block(node, model, vae, host_dirs, blocks, first):
    from blora.host.train_wrappers import unet_layers

    layers = unet_layers(model.model.diffusion_model)
    grads: dict[str, set] = {name: set() for name, _ in layers}
    handles = [layer.register_forward_hook(lambda m, i, o, name=name: grads[name].add(o.requires_grad))
               for name, layer in layers]
    try:
        train(node, model, vae, steps=1, blocks=blocks)
    finally:
        for h in handles:
            h.remove()
    names = [name for name, _ in layers]
    cut = names.index(first)
    assert all(grads[n] == {False} for n in names[:cut]), "a layer before the first trained block recorded a graph"
    assert all(grads[n] == {True} for n in names[cut:])


def test_samples_encode_once_with_sdxl_size_conditioning_from_the_image(model, vae):
    from blora.host.train_inputs import prepare_samples

    positive = tiny_conditioning(3)
    small, exact = image(48, 96), image(64, 128, seed=1)
    s, t = prepare_samples(model, vae, [small, exact], positive, 64, True)
    assert s.latent_size == (8, 16) and t.latent_size == (8, 16)
    expected = model.model.encode_adm(pooled_output=positive[0][1]["pooled_output"], width=96, height=48, crop_w=0,
                                      crop_h=0, target_width=128, target_height=64)
    assert torch.equal(s.y, expected) and torch.equal(s.context, positive[0][0])
    with torch.inference_mode():
        flipped = model.model.process_latent_in(vae.encode(torch.flip(exact, dims=[2])))
    assert torch.equal(t.x0_flipped, flipped) and not torch.equal(t.x0_flipped, t.x0)
    assert not any(x.is_inference() for x in (s.x0, s.x0_flipped, s.context, s.y))


def test_odd_images_train_rgba_grayscale_16_bit_and_mixed_sizes(model, vae, host_dirs):
    from blora.host.train import train_blora
    from blora.train.recipe import TrainConfig

    images = [torch.rand(1, 40, 56, 4), torch.rand(1, 64, 48, 1), torch.randint(0, 65536, (1, 48, 48, 3))]
    with torch.inference_mode():
        out = train_blora(model, vae, images, tiny_conditioning(0), TrainConfig(rank=2, alpha=2.0, steps=3,
                          resolution=64, training_dtype="fp32"), filename_prefix="odd")
    assert len(out.losses) == 3 and written(host_dirs) == ["odd_00001_.safetensors"]


def test_v_prediction_trains_and_other_predictions_are_refused(node, model, vae, host_dirs):
    import comfy.model_sampling

    def with_sampling(kind):
        class Sampling(comfy.model_sampling.ModelSamplingDiscrete, kind):
            pass
        clone = model.clone()
        clone.add_object_patch("model_sampling", Sampling(model.model.model_config))
        return clone

    _, _, ui = train(node, with_sampling(comfy.model_sampling.V_PREDICTION), vae, steps=1)
    assert len(ui["loss"]) == 1 and math.isfinite(ui["loss"][0])
    with pytest.raises(ArchitectureError, match="cannot train a X0-prediction model"):
        train(node, with_sampling(comfy.model_sampling.X0), vae, steps=1)


def sd15_like():
    """A tiny SD1.5-architecture model: no output_blocks.0.1 / 1.1 attention, no vector conditioning."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
           "num_res_blocks": [1, 1, 1, 1], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
           "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64,
           "num_head_channels": 16, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
           "use_temporal_attention": False, "use_temporal_resblock": False}
    base = comfy.supported_models.SD15(cfg).get_model({})
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


BAD_INPUTS = {  # case: (node inputs, error, message)
    "no images": ({"images": torch.zeros(0, 64, 64, 3)}, BLoRAError, "no training images"),
    "filter matches nothing": ({"layer_filter": "to_nothing"}, BLoRAError, "matches no Linear layer"),
    "custom without filter": ({"blocks": "custom"}, BLoRAError, "`layer_filter` is required"),
    "non-SDXL model": ({"model": "sd15"}, ArchitectureError, "needs an SDXL-architecture model"),
    "escaping name": ({"filename_prefix": "../../evil"}, UnsafePathError, "would escape its folder"),
    "conditioning count": ({"images": torch.rand(3, 64, 64, 3), "positive": tiny_conditioning(0) * 2}, BLoRAError,
                           "2 conditionings for 3 images"),
    "not SDXL conditioning": ({"positive": [[torch.randn(1, 77, 64), {}]]}, ArchitectureError, "no pooled_output"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_and_writes_nothing(node, model, vae, host_dirs, case):
    inputs, error, message = BAD_INPUTS[case]
    if inputs.get("model") == "sd15":
        inputs = dict(inputs, model=sd15_like())
    with pytest.raises(error, match=message):
        train(node, **{"model": model, "vae": vae, **inputs})
    assert written(host_dirs) == []


def test_augmentations_encode_four_views_per_image_with_their_crop_in_the_size_conditioning(model, vae, host_dirs):
    from blora.host.train_inputs import prepare_samples

    with torch.inference_mode():
        plain = prepare_samples(model, vae, image(64, 96), tiny_conditioning(0), 64, False)
        cropped = prepare_samples(model, vae, image(64, 96), tiny_conditioning(0), 64, False, random_crop=True,
                                  color_jitter=0.2, seed=1)
    assert len(plain) == 1 and len(cropped) == 4
    assert all(s.latent_size == plain[0].latent_size for s in cropped)
    assert len({tuple(s.y[0, -6 * 256:].tolist()) for s in cropped}) > 1  # crop corners differ per view
    assert all(not torch.equal(s.x0, plain[0].x0) for s in cropped)


def plot_loss_graph(loss_map) -> "PIL.Image.Image":
    """The image the host's own Plot Loss Graph node (LossGraphNode: V1 in 0.3.64, V3 in 0.33) draws."""
    import folder_paths
    from comfy_extras import nodes_train
    from PIL import Image

    graph = nodes_train.LossGraphNode
    if hasattr(graph, "define_schema"):
        _, ui = run_node(graph, loss=loss_map, filename_prefix="loss_graph")
    else:
        ui = graph().plot_loss(loss_map, "loss_graph")["ui"]
    entry = ui["images"][0]
    return Image.open(f"{folder_paths.get_temp_directory()}/{entry['subfolder']}/{entry['filename']}").convert("RGB")


def blue_rows(img, x0, x1) -> list[int]:
    """Rows of the plotted (pure blue) line between columns x0 and x1."""
    px = img.load()
    return [y for x in range(x0, x1) for y in range(img.height) if px[x, y] == (0, 0, 255)]


def test_losses_go_to_the_loss_map_the_file_the_load_summary_and_plot_loss_graph(node, model, vae, host_dirs, pack):
    from blora.train.loss_history import LOSS_KEY, losses_in

    loader = importlib.import_module(pack.__name__ + ".nodes.load").BLoRALoader
    _, _, ui = train(node, model, vae, steps=3, save_every=2)
    first = ui["loss"]
    folder = host_dirs / "output" / "loras" / "t"
    checkpoint = read_adapter(folder / "blora_00001_step000002_.safetensors").metadata
    assert losses_in(checkpoint) == pytest.approx(first[:2], rel=5e-4)
    _, _, ui = train(node, model, vae, steps=2, seed=1, resume_from="t/blora_00001_.safetensors")
    meta = read_adapter(folder / "blora_00002_.safetensors").metadata
    history = losses_in(meta)
    assert history == pytest.approx(first + ui["loss"], rel=5e-4) and len(meta[LOSS_KEY]) < 8 * 5 + 2
    (_, _, summary, loss_map), _ = run_node(loader, lora_name="t/blora_00002_.safetensors")
    assert loss_map == {"loss": history}
    assert summary.endswith(f"trained 5 steps, final loss {statistics.mean(history):.4g} (mean of last 5)")

    # The host's plot draws the curve: a falling loss starts high (small row index) and ends low.
    falling = {"loss": [1.0, 0.8, 0.5, 0.4, 0.3, 0.2]}
    img = plot_loss_graph(falling)
    start, end = blue_rows(img, 41, 60), blue_rows(img, img.width - 200, img.width - 150)
    assert start and end and max(start) < min(end)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                              ("fp32", torch.float32)])
def test_save_precision_sets_the_file_dtype(node, model, vae, host_dirs, precision, dtype):
    _, blora, _ = train(node, model, vae, steps=1, training_dtype="fp32", save_precision=precision)
    saved = read_adapter(host_dirs / "output" / "loras" / "t" / "blora_00001_.safetensors")
    assert {t.dtype for m in saved.modules.values() for t in m.tensors.values()} == {dtype}
    assert saved.metadata["blora.train.save_precision"] == precision


@pytest.mark.parametrize("init", ["gaussian", "kaiming_uniform"])
def test_a_fresh_run_draws_down_as_init_says(node, model, vae, host_dirs, init):
    """One SGD step at a negligible learning rate leaves the drawn down matrices as they were initialised."""
    _, blora, _ = train(node, model, vae, steps=1, rank=4, optimizer="SGD", learning_rate=1e-7, weight_decay=0.0,
                        init=init)
    downs = [m.tensors["down"].float() for m in blora.modules.values()]
    if init == "gaussian":
        flat = torch.cat([d.flatten() for d in downs])
        assert float(flat.std()) == pytest.approx(1 / 4, rel=0.05)
        assert float(flat.abs().max()) > 2.5 / 4  # tails a uniform draw never has
    else:
        assert all(float(d.abs().max()) <= 1.0001 / d.shape[1] ** 0.5 for d in downs)


def test_a_training_set_of_mixed_sizes_trains_in_aspect_buckets(node, model, vae, host_dirs, pack):
    """Images of three sizes and a caption each, through B-LoRA Training Set (as the host's list loaders feed
    it): every micro-batch of 2 holds one bucket's size, and each image is trained with its own conditioning."""
    training_set_node = importlib.import_module(pack.__name__ + ".nodes.dataset").BLoRATrainingSet
    sizes = [(64, 96), (96, 64), (64, 100), (64, 64)]
    images = [image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    conds = [tiny_conditioning(i) for i in range(len(sizes))]
    (training_set, summary), _ = run_node(training_set_node, images=images, positive=conds)
    assert summary == "4 images, 0 distinct captions, sizes 64x64, 96x64, 100x64, 64x96"
    seen = []
    unet = model.model.diffusion_model
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (tuple(args[0].shape), kwargs["context"][:, 0, 0].tolist())), with_kwargs=True)
    try:
        _, blora, ui = train(node, model, vae, images=None, positive=None, training_set=training_set, steps=6,
                             batch_size=2)
    finally:
        hook.remove()
    assert len(ui["loss"]) == 6 and all(math.isfinite(x) for x in ui["loss"])
    buckets = {(1 * 64 // 8, 2 * 64 // 8), (2 * 64 // 8, 1 * 64 // 8), (8, 8)}  # 64x96 and 64x100 share 64x128
    assert {shape[0] for shape, _ in seen} == {2} and {shape[2:] for shape, _ in seen} <= buckets
    first_token = {round(float(c[0][0][0, 0, 0]), 5): size for c, size in zip(conds, sizes)}
    for shape, tokens in seen:  # each row's context is its own image's, and its image is of that bucket
        for t in tokens:
            h, w = first_token[round(t, 5)]
            assert shape[2:] == ((8, 8) if h == w else (8, 16) if h < w else (16, 8))


def test_a_graph_needs_a_training_set_or_images_and_positive(node, model, vae, host_dirs):
    with pytest.raises(BLoRAError, match="connect a training_set, or images and positive"):
        run_node(node, hidden={"UNIQUE_ID": "5"}, model=model, vae=vae, **FAST)
    assert written(host_dirs) == []
