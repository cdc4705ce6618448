"""The shipped API-format examples run on a real server (tiny checkpoint), and each output is compared: a sampled
one with the same graph made of stock nodes (LoraLoaderModelOnly on kohya files holding the same blocks at the
same strengths; one stock sampler per step for a strength schedule; the trained file for a trained MODEL), a saved
adapter with the deltas the test wrote."""
from __future__ import annotations

import copy
import time
import zlib
from pathlib import Path

import pytest
import torch

from blora_testkit.loras import (FLUX_ROLE_BLOCKS, ROLE_BLOCKS, attention_shapes, make_pairs, only_blocks, write_comfy,
                                 write_kohya, write_original)
from blora_testkit.workflows import (api_example_names, load_api_example, message_types, read_image, read_latent,
                                     stock_graph)
from blora_testkit.ws_listener import WsListener

np = pytest.importorskip("numpy")  # a host dependency; this layer is skipped without a host anyway

EXTRA_BLOCK = "output_blocks.2.1"  # in every test B-LoRA: a block no role may apply
# per architecture: the block of each role, the extra block, the dialect Load B-LoRA's test files are written in
ARCHITECTURES = {"sdxl": (ROLE_BLOCKS, EXTRA_BLOCK, write_original),
                 "flux": (FLUX_ROLE_BLOCKS, "double_blocks.1", write_comfy)}
BLOCK_WEIGHTS = {"content": 0.7, "style": -0.4}  # the weights text the block-weights examples get (default 0)
TRAIN_CHEAP = {"steps": 2, "resolution": 64, "rank": 4, "save_every": 0, "batch_size": 1, "grad_accumulation": 1,
               "training_dtype": "fp32"}
VALIDATION_CHEAP = {"width": 64, "height": 64, "steps": 2, "every": 1}
LATENT_ATOL = 1e-4  # saved latents are ~1e2 in size: 1e-6 relative
DYNAMIC_ATOL = 1e-2  # per-call weights or per-row deltas against the host's patches: float32 rounding


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


def architecture(server, graph: dict) -> str:
    """"flux" when the (prepared) graph loads the tiny FLUX.1 checkpoint, else "sdxl"."""
    names = {n["inputs"].get("ckpt_name") for n in graph.values() if n["class_type"] == "CheckpointLoaderSimple"}
    return "flux" if server.flux_ckpt_name in names else "sdxl"


def prepare(server, name: str):
    """The example on the tiny checkpoint (FLUX.1 examples on the tiny FLUX one), with test files behind every
    loader; {loader id: pairs}."""
    graph = load_api_example(name, server.ckpt_name, server.flux_ckpt_name)
    arch = architecture(server, graph)
    role_blocks, extra_block, blora_writer = ARCHITECTURES[arch]
    ckpt = server.flux_ckpt_name if arch == "flux" else server.ckpt_name
    shapes = attention_shapes(server.models_dir / "checkpoints" / ckpt)
    loras, pairs = server.models_dir / "loras", {}
    # K-LoRA's two LoRAs share no layer here, so its result has a stock twin (their sum); the rule itself is
    # pinned in tests/host/test_fusion.py
    fused = {n["inputs"][r][0]: r for n in graph.values() if n["class_type"] == "KLoRAFuse"
             for r in ("subject", "style")}
    klora_blocks = {"subject": [b for r, b in role_blocks.items() if r != "style"] + [extra_block],
                    "style": [role_blocks["style"]]}
    for nid, node in sorted(graph.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in ("BLoRALoader", "LoraLoader", "LoraLoaderModelOnly") and isinstance(inputs.get("lora_name"), str):
            blocks = klora_blocks[fused[nid]] if nid in fused else [*role_blocks.values(), extra_block]
            pairs[nid] = make_pairs(shapes, blocks, seed=_seed(name, nid))
            assert pairs[nid], f"{name}: no target layers in {blocks}"
            writer = blora_writer if kind == "BLoRALoader" else write_kohya
            inputs["lora_name"] = writer(loras / f"{name}_{nid}.safetensors", pairs[nid]).name
        elif kind == "LoadImage":
            _write_png(server.input_dir / f"{name}_{nid}.png", _seed(name, nid))
            inputs["image"] = f"{name}_{nid}.png"
        elif kind == "BLoRATrainingFolder":
            _write_training_folder(server.input_dir / f"{name}_{nid}", _seed(name, nid))
            inputs["folder"] = f"{name}_{nid}"
        elif kind == "BLoRATrain":
            inputs.update({k: v for k, v in TRAIN_CHEAP.items() if k in inputs})
            inputs["filename_prefix"] = f"examples/{name}/blora"
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


def _source(graph: dict, link, role: str):
    """Where the adapter behind ``link`` gets ``role``'s block: ("pairs", loader id), ("trained", Train id), or
    None when that role is not in it (Merge without that input)."""
    node = graph[link[0]]
    if node["class_type"] == "BLoRALoader":
        return "pairs", link[0]
    if node["class_type"] == "BLoRAMerge":
        return _source(graph, node["inputs"][role], role) if node["inputs"].get(role) else None
    if node["class_type"] == "BLoRATrain" and link[1] == 1:
        return "trained", link[0]
    raise AssertionError(f"no stock twin for an adapter from {node['class_type']}")


def _trained_file(server, name: str) -> Path:
    files = sorted((server.output_dir / "loras" / "examples" / name).glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def _block_file(server, name: str, graph: dict, pairs: dict, source, blocks) -> str:
    """A kohya file with ``source``'s modules in ``blocks`` (all its modules for None), for stock loaders."""
    loras = server.models_dir / "loras"
    tag = "all" if blocks is None else "+".join(b.replace(".", "_") for b in blocks)
    kind, nid = source
    if kind == "pairs":
        chosen = pairs[nid] if blocks is None else only_blocks(pairs[nid], blocks)
        return write_kohya(loras / f"twin_{name}_{nid}_{tag}.safetensors", chosen).name
    from safetensors import safe_open  # the trained file, cut to the blocks by its kohya key names
    from safetensors.torch import save_file

    prefixes = tuple("lora_unet_" + b.replace(".", "_") + "_" for b in blocks or ())
    with safe_open(str(_trained_file(server, name)), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if blocks is None or k.startswith(prefixes)}
    assert tensors, f"{name}: the trained file holds none of {blocks}"
    save_file(tensors, str(loras / f"twin_{name}_{nid}_{tag}.safetensors"))
    return f"twin_{name}_{nid}_{tag}.safetensors"


def _step_strengths(schedule: str, steps: int) -> list[float]:
    """A strength schedule at each sampling step (progress i / (steps - 1)), interpolated by numpy."""
    frames = [tuple(float(x) for x in kf.split(":")) for kf in schedule.replace(";", ",").split(",") if kf.strip()]
    if len(frames) == 1:
        return [frames[0][0]] * steps
    xs, ys = zip(*frames)
    return [float(np.interp(i / max(1, steps - 1), xs, ys)) for i in range(steps)]


def _split_sampler(graph: dict, sampler_id: str, models: list) -> None:
    """Replace KSampler ``sampler_id`` by one KSamplerAdvanced per step, step i sampled by ``models[i]`` (euler
    steps need nothing from the steps before but the latent; the last keeps the id)."""
    inputs = graph[sampler_id]["inputs"]
    steps, latent = inputs["steps"], inputs["latent_image"]
    assert inputs["sampler_name"] == "euler" and len(models) == steps
    for i, model in enumerate(models):
        nid = sampler_id if i == steps - 1 else f"{sampler_id}_step{i}"
        graph[nid] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model, "positive": inputs["positive"], "negative": inputs["negative"], "latent_image": latent,
            "add_noise": "enable" if i == 0 else "disable", "noise_seed": inputs["seed"], "steps": steps,
            "cfg": inputs["cfg"], "sampler_name": "euler", "scheduler": inputs["scheduler"], "start_at_step": i,
            "end_at_step": i + 1, "return_with_leftover_noise": "disable" if i == steps - 1 else "enable"}}
        latent = [nid, 0]


def _prune(graph: dict) -> None:
    """Drop nodes whose inputs link to nodes no longer in the graph (and so on)."""
    while True:
        dangling = [nid for nid, node in graph.items()
                    if any(isinstance(v, list) and len(v) == 2 and isinstance(v[1], int) and v[0] not in graph
                           for v in node["inputs"].values())]
        if not dangling:
            return
        for nid in dangling:
            del graph[nid]


def stock_twin(server, name: str, graph: dict, pairs: dict):
    """(twin, base, exact): the graph with every pack node that changes the MODEL replaced by stock LoRA loaders
    on kohya files holding the same blocks at the same strengths, and the same with strength 0. A strength
    schedule becomes one stock sampler per step at that step's strengths; a trained MODEL, the trained file in a
    stock loader. ``exact`` is False where ours computes per-step weights (schedules) instead of patches."""
    twin, base, exact = copy.deepcopy(graph), copy.deepcopy(graph), True
    roles = ARCHITECTURES[architecture(server, graph)][0]

    def parts_of(inputs, roles, strength):
        links = {r: inputs.get(r) for r in roles if inputs.get(r) is not None}
        found = [(_source(graph, link, r), r, strength(r)) for r, link in links.items()]
        return [(src, r, s) for src, r, s in found if src is not None]

    def replace_model(nid, inputs, parts):
        files = [(_block_file(server, name, graph, pairs, src, blocks), s) for src, blocks, s in parts]
        _chain(twin, nid, inputs["model"], files)
        _chain(base, nid, inputs["model"], [(f, 0.0) for f, _ in files])

    for nid, node in graph.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "BLoRAApply":
            square = inputs.get("strength_mode", "linear") == "alpha_squared"
            parts = parts_of(inputs, roles, lambda r: inputs[f"{r}_strength"] * (
                abs(inputs[f"{r}_strength"]) if square else 1.0))
            replace_model(nid, inputs, [(src, [roles[r]], s) for src, r, s in parts])
        elif kind == "BLoRABlockWeights":
            parts = [(_source(graph, inputs["blora"], r), [roles[r]], s) for r, s in BLOCK_WEIGHTS.items()]
            replace_model(nid, inputs, parts)
        elif kind == "KLoRAFuse":  # prepare() gives the two LoRAs no layer in common: K-LoRA is then their sum
            subject, style = (_source(graph, inputs[r], r) for r in ("subject", "style"))
            assert not set(pairs[subject[1]]) & set(pairs[style[1]])
            replace_model(nid, inputs, [(subject, None, inputs["subject_strength"]),
                                        (style, None, inputs["style_strength"])])
        elif kind == "BLoRATrain":
            consumers = [k for k, n in graph.items() for v in n["inputs"].values() if v == [nid, 0]]
            for g, strength in ((twin, 1.0), (base, 0.0)):
                g.pop(nid)
                if not consumers:
                    continue
                loader = f"{nid}_stock"
                g[loader] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                    "model": inputs["model"], "lora_name": f"examples/{name}/{_trained_file(server, name).name}",
                    "strength_model": strength}}
                for k in consumers:
                    g[k]["inputs"] = {a: [loader, 0] if v == [nid, 0] else v for a, v in g[k]["inputs"].items()}
        elif kind == "BLoRABatchApply":  # the examples sample one image: it takes the first entry
            exact = False
            first = graph[inputs["batch"][0]]
            while first["inputs"].get("batch"):
                first = graph[first["inputs"]["batch"][0]]
            entry = first["inputs"]
            assert entry.get("strength_mode", "linear") == "linear"
            parts = parts_of(entry, roles, lambda r: entry[f"{r}_strength"])
            replace_model(nid, inputs, [(src, [roles[r]], s) for src, r, s in parts])
        elif kind == "BLoRASchedule":
            exact = False
            samplers = [k for k, n in graph.items()
                        if n["class_type"] == "KSampler" and n["inputs"]["model"] == [nid, 0]]
            assert len(samplers) == 1, samplers
            steps = graph[samplers[0]]["inputs"]["steps"]
            parts = parts_of(inputs, roles, lambda r: _step_strengths(inputs[f"{r}_schedule"], steps))
            files = [(_block_file(server, name, graph, pairs, src, [roles[r]]), s) for src, r, s in parts]
            models = []
            for i in range(steps):
                _chain(twin, f"{nid}_at{i}", inputs["model"], [(f, s[i]) for f, s in files])
                models.append([f"{nid}_at{i}", 0])
            twin.pop(nid)
            _split_sampler(twin, samplers[0], models)
            _chain(base, nid, inputs["model"], [(f, 0.0) for f, _ in files])
    if twin == graph:
        return None  # nothing here changes the MODEL (a Save-only graph)
    fallback = write_kohya(server.models_dir / "loras" / "twin_empty.safetensors", {}).name
    for g in (twin, base):
        _prune(g)
        for node in g.values():
            if node["class_type"] == "LoraLoaderModelOnly" and node["inputs"]["lora_name"] is None:
                node["inputs"]["lora_name"] = fallback
    return twin, base, exact


def _results(server, pid: str) -> dict:
    out = {}
    for nid, files in server.outputs_by_node(pid).items():
        for i, f in enumerate(sorted(files)):
            if f.suffix == ".safetensors":  # Save B-LoRA: the adapter file, read back by the pack's reader
                from blora.adapters.adapter import delta_weight
                from blora.formats.files import read_adapter

                out[(nid, i)] = {p: delta_weight(m).float() for p, m in read_adapter(f).modules.items()}
                continue
            out[(nid, i)] = read_latent(f) if f.suffix == ".latent" else read_image(f)
    return out


def _expected_save(graph: dict, pairs: dict, nid: str, role_blocks: dict = ROLE_BLOCKS) -> dict:
    """The deltas (up @ down of the test's own pairs) a Save B-LoRA node writes: every module of a loaded file
    for roles "all", else each asked role's block from where that role comes (a loader, or a Merge's input)."""
    inputs = graph[nid]["inputs"]
    roles, link = inputs.get("roles", "all").strip(), inputs["blora"]
    if roles == "all" and graph[link[0]]["class_type"] == "BLoRALoader":
        chosen = pairs[link[0]]
    else:
        wanted = list(role_blocks) if roles == "all" else [r.strip() for r in roles.split(",")]
        assert set(wanted) <= set(role_blocks), f"no expected deltas for roles {roles!r}"
        chosen = {}
        for role in wanted:
            src = _source(graph, link, role)
            if src is not None:
                assert src[0] == "pairs", src
                chosen.update(only_blocks(pairs[src[1]], [role_blocks[role]]))
    return {p: up @ down for p, (down, up) in chosen.items()}


@pytest.mark.parametrize("name", api_example_names())
def test_example(server, name):
    """Every shipped example runs, and its outputs equal those of a graph of stock nodes doing the same (see
    stock_twin) and differ from the same graph at strength 0; files it saves hold the expected deltas."""
    graph, pairs = prepare(server, name)
    pid, msgs = server.run(graph, timeout=240)
    ours = _results(server, pid)
    assert ours, f"{name}: no output files{server.log_context(30)}"
    saved = {key: value for key, value in ours.items() if isinstance(value, dict)}
    for key, deltas in saved.items():  # a saved adapter: the deltas the test's own pairs give
        expected = _expected_save(graph, pairs, key[0], ARCHITECTURES[architecture(server, graph)][0])
        assert deltas.keys() == expected.keys(), f"{name} {key}: modules {sorted(deltas)[:3]}…"
        for path, delta in expected.items():
            torch.testing.assert_close(deltas[path], delta, rtol=2e-3, atol=2e-3)  # saved as fp16
    twins = stock_twin(server, name, graph, pairs)
    if twins is None:
        assert saved, f"{name}: neither a sampled nor a saved output is compared"
        return
    twin, base_graph, exact = twins
    stock = _results(server, server.run(twin, timeout=240)[0])
    base = _results(server, server.run(base_graph, timeout=240)[0])
    sampled = [key for key, value in stock.items() if not isinstance(value, dict)]
    assert sampled and set(sampled) <= ours.keys(), (sampled, list(ours))
    atol, pixels = (LATENT_ATOL, 0) if exact else (DYNAMIC_ATOL, 1)
    for key in sampled:
        if isinstance(stock[key], torch.Tensor):
            diff = (ours[key] - stock[key]).abs().max().item()
            assert diff <= atol, f"{name} {key}: latent differs from the stock path by {diff}"
            effect = (ours[key] - base[key]).abs().max().item()
            assert effect > 100 * atol, f"{name} {key}: the B-LoRA changed the latent by only {effect}"
        else:
            worst = np.abs(ours[key].astype(int) - stock[key].astype(int)).max()
            assert worst <= pixels, f"{name} {key}: image differs from the stock path by {worst}"


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
