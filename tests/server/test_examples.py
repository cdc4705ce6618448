"""The shipped API-format examples run on a real server (tiny checkpoint); apply examples render exactly like
the stock LoraLoaderModelOnly path on kohya files holding the same blocks at the same strengths."""
from __future__ import annotations

import copy
import time
import zlib

import pytest
import torch

from blora_testkit.loras import ROLE_BLOCKS, attention_shapes, make_pairs, only_blocks, write_kohya, write_original
from blora_testkit.workflows import (api_example_names, load_api_example, message_types, read_image, read_latent,
                                     stock_graph)
from blora_testkit.ws_listener import WsListener

np = pytest.importorskip("numpy")  # a host dependency; this layer is skipped without a host anyway

EXTRA_BLOCK = "output_blocks.2.1"  # in every test B-LoRA: a block no role may apply
BLOCK_WEIGHTS = {"content": 0.7, "style": -0.4}  # the weights text the block-weights examples get (default 0)
TRAIN_CHEAP = {"steps": 2, "resolution": 64, "rank": 4, "save_every": 0, "batch_size": 1, "grad_accumulation": 1,
               "training_dtype": "fp32"}
VALIDATION_CHEAP = {"width": 64, "height": 64, "steps": 2, "every": 1}
NO_TWIN = {"KLoRAFuse", "BLoRASchedule", "BLoRATrain", "BLoRAMerge"}  # model paths not expressible by stock nodes
LATENT_ATOL = 1e-4  # saved latents are ~1e2 in size: 1e-6 relative


def _save(server, prefix, seed=0, **kw):
    pid, msgs = server.run(stock_graph(server.ckpt_name, seed=seed, prefix=prefix, **kw), timeout=120)
    files = server.output_files(pid)
    return pid, msgs, next(f for f in files if f.suffix == ".latent"), next(f for f in files if f.suffix == ".png")


def test_stock_txt2img_on_tiny_checkpoint(server):
    pid, msgs, latent_file, image_file = _save(server, "stock")
    types = message_types(msgs)
    assert types[0] == "execution_start" and "execution_success" in types and "execution_error" not in types
    progress = [m["data"]["value"] for m in msgs if m["type"] == "progress" and m["data"]["node"] == "5"]
    assert progress[-1] == 3, progress
    assert {"7", "8"} <= {m["data"]["node"] for m in msgs if m["type"] == "executed"}
    assert server.history(pid)["status"]["status_str"] == "success"
    latent, image = read_latent(latent_file), read_image(image_file)
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    assert image.shape == (64, 64, 3) and image.std() > 1.0
    log = server.log_text()
    assert "clip missing" not in log and "Could not detect model type" not in log, server.log_tail()


def test_tiny_checkpoint_prompt_and_seed_matter(server):
    base = read_latent(_save(server, "base")[2])
    other_prompt = read_latent(_save(server, "prompt", positive="an oil painting of a dog")[2])
    other_seed = read_latent(_save(server, "seed", seed=1)[2])
    assert (base - other_prompt).abs().max() > 1e-3  # the tiny text encoders load and condition the UNet
    assert (base - other_seed).abs().max() > 1e-1


def test_tiny_checkpoint_layout_and_seeded_build(server, comfy_host, tmp_path):
    from safetensors import safe_open

    from blora_testkit.tiny_checkpoint import write_tiny_checkpoint

    served = server.models_dir / "checkpoints" / server.ckpt_name
    with safe_open(str(served), framework="pt") as f:
        keys = list(f.keys())
    roots = {next(r for r in ("model.diffusion_model.", "conditioner.embedders.", "first_stage_model.", "")
                  if k.startswith(r)) for k in keys}
    assert roots == {"model.diffusion_model.", "conditioner.embedders.", "first_stage_model."}, roots
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert any(k.startswith("first_stage_model.taesd_decoder.") for k in keys)
    # In-process, same seed: the same tensors (names, dtypes, shapes, values) as the subprocess build the server
    # got. Tensors, not file bytes: the bytes safetensors writes are not part of the contract.
    rebuilt = write_tiny_checkpoint(tmp_path / "again.safetensors", seed=0)
    with safe_open(str(rebuilt), framework="pt") as a, safe_open(str(served), framework="pt") as b:
        assert sorted(a.keys()) == sorted(keys)
        for k in keys:
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
    seeded = write_tiny_checkpoint(tmp_path / "seed1.safetensors", seed=1)
    with safe_open(str(seeded), framework="pt") as a, safe_open(str(served), framework="pt") as b:
        drawn = next(k for k in keys if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight"))
        assert not torch.equal(a.get_tensor(drawn), b.get_tensor(drawn))  # the seed draws the weights


def test_interrupt_stops_a_running_prompt(server):
    pid = server.queue(stock_graph(server.ckpt_name, seed=5, steps=200, prefix="interrupted"))
    deadline = time.monotonic() + 60
    while "progress" not in message_types(server.messages(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    server.interrupt()
    types = message_types(server.wait(pid, timeout=60))
    assert "execution_interrupted" in types and "execution_success" not in types, types
    steps = [m["data"]["value"] for m in server.messages(pid) if m["type"] == "progress"]
    assert max(steps) < 200
    assert server.history(pid)["status"]["status_str"] == "error"


def test_listener_attributes_custom_events_to_the_running_prompt():
    listener = WsListener("ws://unused")
    for msg in ({"type": "status", "data": {"status": {}}}, {"type": "execution_start", "data": {"prompt_id": "a"}},
                {"type": "blora.train.progress", "data": {"step": 1}}, {"type": "executing", "data": {
                    "node": None, "prompt_id": "a"}}, {"type": "blora.train.progress", "data": {"step": 9}}):
        listener.add(msg)
    assert message_types(listener.wait("a", 1.0, alive=lambda: True)) == [
        "execution_start", "blora.train.progress", "executing"]
    with pytest.raises(TimeoutError):
        listener.wait("b", 0.2, alive=lambda: True)


# -- examples ------------------------------------------------------------------------------------------------
def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _write_png(path, seed, height=64, width=64):
    from PIL import Image

    gen = np.random.default_rng(seed)
    x, y = np.linspace(0, 255, width, dtype=np.float32), np.linspace(0, 255, height, dtype=np.float32)
    pixels = np.stack([x[None, :].repeat(height, 0), y[:, None].repeat(width, 1), gen.uniform(0, 255, (height, width))],
                      -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


TRAINING_FOLDER = {"a.png": ((64, 64), "A [v] standing"), "b.jpg": ((64, 96), "A [v] lying down"),
                   "c.webp": ((96, 64), None)}  # c has no caption file: it gets the node's default caption


def _write_training_folder(folder, seed):
    """Images of three sizes with .txt captions (one without), as users keep a training set."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, ((h, w), caption)) in enumerate(TRAINING_FOLDER.items()):
        _write_png(folder / name, seed + i, h, w)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")


def prepare(server, name: str):
    """The example on the tiny checkpoint, with test files behind every loader; {loader id: pairs}."""
    graph = load_api_example(name, server.ckpt_name)
    shapes = attention_shapes(server.models_dir / "checkpoints" / server.ckpt_name)
    loras, pairs = server.models_dir / "loras", {}
    for nid, node in sorted(graph.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in ("BLoRALoader", "LoraLoader", "LoraLoaderModelOnly") and isinstance(inputs.get("lora_name"), str):
            pairs[nid] = make_pairs(shapes, [*ROLE_BLOCKS.values(), EXTRA_BLOCK], seed=_seed(name, nid))
            writer = write_original if kind == "BLoRALoader" else write_kohya
            inputs["lora_name"] = writer(loras / f"{name}_{nid}.safetensors", pairs[nid]).name
        elif kind == "LoadImage":
            _write_png(server.input_dir / f"{name}_{nid}.png", _seed(name, nid))
            inputs["image"] = f"{name}_{nid}.png"
        elif kind == "BLoRATrainingFolder":
            _write_training_folder(server.input_dir / f"{name}_{nid}", _seed(name, nid))
            inputs["folder"] = f"{name}_{nid}"
        elif kind == "BLoRATrain":
            inputs.update({k: v for k, v in TRAIN_CHEAP.items() if k in inputs})
        elif kind == "BLoRAValidation":
            inputs.update(VALIDATION_CHEAP)
        elif kind == "BLoRABlockWeights":
            inputs["weights"] = "default=0\n" + "\n".join(f"{r}={s}" for r, s in BLOCK_WEIGHTS.items())
    for nid, node in list(graph.items()):  # every sampled latent is saved, to compare exactly
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            graph[f"testkit_latent_{nid}"] = {"class_type": "SaveLatent", "inputs": {
                "samples": [nid, 0], "filename_prefix": f"latents/{name}_{nid}"}}
    return graph, pairs


def _chain(graph: dict, node_id: str, model_link, loras: list[tuple[str, float]]) -> None:
    """Replace node ``node_id`` by a chain of stock LoraLoaderModelOnly nodes (the last keeps the id)."""
    items = loras or [(None, 0.0)]  # nothing connected: an identity (strength 0)
    for i, (lora, strength) in enumerate(items):
        nid = node_id if i == len(items) - 1 else f"{node_id}_stock{i}"
        graph[nid] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": model_link, "lora_name": lora, "strength_model": strength}}
        model_link = [nid, 0]


def stock_twin(server, name: str, graph: dict, pairs: dict):
    """(twin, base): the graph with every Apply / Block Weights node replaced by stock LoRA loaders on kohya
    files of the same blocks and strengths, and the same with strengths 0; None when not expressible."""
    if any(node["class_type"] in NO_TWIN for node in graph.values()):
        return None
    twin, base, loras, seen = copy.deepcopy(graph), copy.deepcopy(graph), server.models_dir / "loras", 0
    for nid, node in graph.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "BLoRAApply":
            links = {r: inputs.get(r) for r in ROLE_BLOCKS if inputs.get(r) is not None}
            if any(graph[link[0]]["class_type"] != "BLoRALoader" for link in links.values()):
                return None
            square = inputs.get("strength_mode", "linear") == "alpha_squared"
            parts = [(link[0], r, inputs[f"{r}_strength"]) for r, link in links.items()]
            parts = [(src, r, s * abs(s) if square else s) for src, r, s in parts]
        elif kind == "BLoRABlockWeights":
            parts = [(inputs["blora"][0], r, s) for r, s in BLOCK_WEIGHTS.items()]
        else:
            continue
        seen += 1
        files = [(write_kohya(loras / f"twin_{name}_{src}_{r}.safetensors",
                              only_blocks(pairs[src], [ROLE_BLOCKS[r]])).name, s) for src, r, s in parts]
        _chain(twin, nid, inputs["model"], files)
        _chain(base, nid, inputs["model"], [(f, 0.0) for f, _ in files])
    fallback = write_kohya(loras / "twin_empty.safetensors", {}).name
    for g in (twin, base):
        for node in g.values():
            if node["class_type"] == "LoraLoaderModelOnly" and node["inputs"]["lora_name"] is None:
                node["inputs"]["lora_name"] = fallback
    return (twin, base) if seen else None


def _results(server, pid: str) -> dict:
    out = {}
    for nid, files in server.outputs_by_node(pid).items():
        for i, f in enumerate(sorted(files)):
            if f.suffix == ".safetensors":  # Save B-LoRA: the adapter file, read back by the pack's reader
                from blora.formats.files import read_adapter

                out[(nid, i)] = sorted(read_adapter(f).modules)
                continue
            out[(nid, i)] = read_latent(f) if f.suffix == ".latent" else read_image(f)
    return out


@pytest.mark.parametrize("name", api_example_names())
def test_example(server, name):
    graph, pairs = prepare(server, name)
    pid, msgs = server.run(graph, timeout=240)
    ours = _results(server, pid)
    assert ours, f"{name}: no output files{server.log_context(30)}"
    twins = stock_twin(server, name, graph, pairs)
    if twins is None:
        return
    stock = _results(server, server.run(twins[0], timeout=240)[0])
    base = _results(server, server.run(twins[1], timeout=240)[0])
    assert stock.keys() == ours.keys()
    for key, value in ours.items():
        if isinstance(value, torch.Tensor):
            diff = (value - stock[key]).abs().max().item()
            assert diff <= LATENT_ATOL, f"{name} {key}: latent differs from the stock path by {diff}"
            effect = (value - base[key]).abs().max().item()
            assert effect > 100 * LATENT_ATOL, f"{name} {key}: the B-LoRA changed the latent by only {effect}"
        else:
            assert np.array_equal(value, stock[key]), f"{name} {key}: image differs from the stock path"


def test_a_captioned_folder_trains_in_buckets_and_its_loss_is_plotted_and_kept(server):
    """train_from_folder with batches of 2 (the folder's 3 sizes fall into 3 buckets): the trained file records
    every step's loss, Load B-LoRA's summary and loss_map give them back, and the host's Plot Loss Graph draws
    both the live LOSS_MAP and the file's."""
    from blora.formats.files import read_adapter
    from blora.train.loss_history import losses_in

    graph, _ = prepare(server, "train_from_folder")
    train_id = next(k for k, n in graph.items() if n["class_type"] == "BLoRATrain")
    graph[train_id]["inputs"].update(steps=4, batch_size=2, filename_prefix="folder_test/blora")
    pid, _ = server.run(graph, timeout=240)
    files = sorted((server.output_dir / "loras" / "folder_test").glob("*.safetensors"))
    assert len(files) == 1
    history = losses_in(read_adapter(files[0]).metadata)
    assert len(history) == 4 and all(x > 0 for x in history)
    plot_id = next(k for k, n in graph.items() if n["class_type"] == "LossGraphNode")
    plots = server.outputs_by_node(pid)[plot_id]
    assert len(plots) == 1 and (read_image(plots[0]) == (0, 0, 255)).all(-1).sum() > 50  # the blue curve

    replay = {
        "1": {"class_type": "BLoRALoader", "inputs": {"lora_name": f"folder_test/{files[0].name}"}},
        "2": {"class_type": "LossGraphNode", "inputs": {"loss": ["1", 3], "filename_prefix": "from_file"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
    }
    pid, _ = server.run(replay, timeout=60)
    outputs = server.history(pid)["outputs"]
    assert len(server.outputs_by_node(pid)["2"]) == 1
    assert "trained 4 steps, final loss" in "".join(str(t) for t in outputs["3"]["text"])


def test_the_hosts_own_dataset_loader_feeds_training_through_training_set(server):
    """The host's folder loader (0.33: Load Image-Text (from Folder) + a CLIP Text Encode per caption, a list;
    0.3.64: Load Image and Text Dataset from Folder, a batch resized to the first image + one conditioning per
    image) -> B-LoRA Training Set -> Train B-LoRA: the run trains every step on those images."""
    from blora.formats.files import read_adapter
    from blora.train.loss_history import losses_in

    folder = "host_loader_set"
    captioned = {name: (size, caption or "A [v] sitting") for name, (size, caption) in TRAINING_FOLDER.items()}
    (server.input_dir / folder).mkdir()
    for i, (name, ((h, w), caption)) in enumerate(captioned.items()):
        _write_png(server.input_dir / folder / name, 100 + i, h, w)
        (server.input_dir / folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    available = server.object_info()
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.ckpt_name}}}
    if "LoadImageTextDataSetFromFolder" in available:  # 0.33: lists of images and texts
        graph["2"] = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}}
        graph["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 1], "clip": ["1", 1]}}
        images, positive = ["2", 0], ["3", 0]
    else:  # 0.3.64: one batch (resized to the first image) and one conditioning per image
        graph["2"] = {"class_type": "LoadImageTextSetFromFolderNode", "inputs": {
            "folder": folder, "clip": ["1", 1], "resize_method": "Stretch", "width": -1, "height": -1}}
        images, positive = ["2", 0], ["2", 1]
    graph["4"] = {"class_type": "BLoRATrainingSet", "inputs": {"images": images, "positive": positive}}
    graph["5"] = {"class_type": "BLoRATrain", "inputs": dict(
        TRAIN_CHEAP, model=["1", 0], vae=["1", 2], training_set=["4", 0], blocks="content+style", layer_filter="",
        alpha=4.0, algorithm="LoRA", rslora=False, learning_rate=1e-3, loraplus_ratio=1.0, optimizer="AdamW",
        weight_decay=1e-4, steps=3, flip=False, seed=0, gradient_checkpointing=False,
        filename_prefix="host_loader/blora")}
    graph["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}
    pid, _ = server.run(graph, timeout=240)
    summary = "".join(str(t) for t in server.history(pid)["outputs"]["6"]["text"])
    assert summary.startswith("3 images"), summary
    files = sorted((server.output_dir / "loras" / "host_loader").glob("*.safetensors"))
    assert len(files) == 1 and len(losses_in(read_adapter(files[0]).metadata)) == 3
