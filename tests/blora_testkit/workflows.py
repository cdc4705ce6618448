"""API-format graphs for server tests: a stock txt2img graph, the shipped examples pointed at the tiny
checkpoint, and readers for what the graphs save (TEST-ONLY; no host import)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
API_EXAMPLES = ROOT / "example_workflows" / "api"
SMALL = {"size": 64, "steps": 3}
FLUX_CHECKPOINT_PREFIX = "flux1-"  # flux1-dev-fp8.safetensors, flux1-schnell-fp8.safetensors (Comfy-Org single files)


def is_flux_checkpoint(ckpt_name: str) -> bool:
    return ckpt_name.startswith(FLUX_CHECKPOINT_PREFIX)


def example_architecture(graph: dict) -> str:
    """"flux" when the graph loads a FLUX.1 checkpoint, else "sdxl"."""
    names = [n["inputs"].get("ckpt_name") for n in graph.values() if n.get("class_type") == "CheckpointLoaderSimple"]
    return "flux" if any(isinstance(c, str) and is_flux_checkpoint(c) for c in names) else "sdxl"


def message_types(messages: list[dict]) -> list[str]:
    return [m.get("type") for m in messages]


def execution_error(messages: list[dict]) -> dict | None:
    """The data of the prompt's execution_error message (node_type, exception_message, ...), or None."""
    return next((m["data"] for m in messages if m.get("type") == "execution_error"), None)


def stock_graph(ckpt_name: str, *, seed: int = 0, steps: int = 3, size: int = 64, cfg: float = 5.0,
                positive: str = "a photo of a cat", negative: str = "", loras: tuple = (),
                prefix: str = "testkit") -> dict:
    """CheckpointLoaderSimple -> [LoraLoaderModelOnly (name, strength) ...] -> KSampler -> VAEDecode ->
    SaveImage (node "7"), and SaveLatent (node "8", under latents/). The sampler is node "5"."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    model = ["1", 0]
    for i, (name, strength) in enumerate(loras):
        node = str(20 + i)
        g[node] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": model, "lora_name": name, "strength_model": strength}}
        model = [node, 0]
    g.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    })
    return g


def stock_flux_graph(ckpt_name: str, *, seed: int = 0, steps: int = 3, size: int = 64, guidance: float = 3.5,
                     positive: str = "a photo of a cat", loras: tuple = (), prefix: str = "testkit_flux") -> dict:
    """FLUX.1 dev txt2img as ComfyUI's own FLUX examples wire it: CheckpointLoaderSimple -> [LoraLoaderModelOnly ...]
    -> KSampler (cfg 1, euler, simple; node "5") on CLIPTextEncode -> FluxGuidance and an empty negative, on
    EmptySD3LatentImage -> VAEDecode -> SaveImage (node "7"), and SaveLatent (node "8", under latents/)."""
    g = stock_graph(ckpt_name, seed=seed, steps=steps, size=size, cfg=1.0, positive=positive, negative="",
                    loras=loras, prefix=prefix)
    g["9"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": guidance}}
    g["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
    g["5"]["inputs"].update(positive=["9", 0], scheduler="simple")
    return g


def with_blora_apply(graph: dict, lora_name: str) -> dict:
    """A stock graph (``stock_graph``, ``stock_flux_graph``) with Load B-LoRA -> Apply B-LoRA (content and style from
    ``lora_name``, strength 1) between its checkpoint and its sampler."""
    graph["30"] = {"class_type": "BLoRALoader", "inputs": {"lora_name": lora_name}}
    graph["31"] = {"class_type": "BLoRAApply", "inputs": {
        "model": ["1", 0], "content": ["30", 0], "style": ["30", 0], "content_strength": 1.0,
        "style_strength": 1.0, "layout_strength": 1.0, "strength_mode": "linear"}}
    graph["5"]["inputs"]["model"] = ["31", 0]
    return graph


def api_example_names() -> list[str]:
    """Names (without .json) of the shipped API-format examples."""
    return sorted(p.stem for p in API_EXAMPLES.glob("*.json"))


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _shrink(node: dict, ckpt_name: str, flux_ckpt_name: str | None) -> None:
    kind, inputs = node.get("class_type"), node.get("inputs", {})
    if kind == "CheckpointLoaderSimple":
        if is_flux_checkpoint(inputs["ckpt_name"]):
            if flux_ckpt_name is None:
                raise ValueError(f"{inputs['ckpt_name']}: a FLUX.1 example needs flux_ckpt_name")
            inputs["ckpt_name"] = flux_ckpt_name
        else:
            inputs["ckpt_name"] = ckpt_name
    elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
        inputs.update(width=SMALL["size"], height=SMALL["size"], batch_size=1)
    if kind in ("KSampler", "KSamplerAdvanced") and isinstance(inputs.get("steps"), int):
        inputs["steps"] = min(inputs["steps"], SMALL["steps"])
        if kind == "KSamplerAdvanced" and isinstance(inputs.get("end_at_step"), int):
            inputs["end_at_step"] = min(inputs["end_at_step"], inputs["steps"])


def _override(graph: dict, key: str, value) -> None:
    node_id, _, name = key.rpartition(".") if "." in key else ("", "", key)
    for nid, node in graph.items():
        inputs = node.get("inputs", {})
        if (node_id and nid != node_id) or name not in inputs or _is_link(inputs[name]):
            continue
        if isinstance(value, dict):  # {old value: new value}
            inputs[name] = value.get(inputs[name], inputs[name])
        else:
            inputs[name] = value


def load_api_example(name: str, ckpt_name: str, flux_ckpt_name: str | None = None, **overrides) -> dict:
    """example_workflows/api/<name>.json, made cheap for the tiny checkpoint: CheckpointLoaderSimple loads
    ``ckpt_name`` (``flux_ckpt_name`` where the example loads a FLUX.1 checkpoint, flux1-*), EmptyLatentImage
    and EmptySD3LatentImage are 64x64 batch 1, KSampler steps at most 3. Then ``overrides``: ``input=value``
    sets that literal input on every node that has it (e.g. ``lora_name="a.safetensors"``); a dict value maps
    old values to new (``lora_name={"content.safetensors": "a.safetensors"}``); ``**{"12.strength": 0.5}`` sets
    one node's input."""
    path = API_EXAMPLES / (name if name.endswith(".json") else f"{name}.json")
    graph = json.loads(path.read_text())
    if isinstance(graph.get("prompt"), dict):  # {"prompt": {...}} as posted to /prompt
        graph = graph["prompt"]
    for node in graph.values():
        _shrink(node, ckpt_name, flux_ckpt_name)
    for key, value in overrides.items():
        _override(graph, key, value)
    return graph


def read_latent(path: Path | str):
    """The tensor a SaveLatent file holds (B, 4, h, w)."""
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


def read_image(path: Path | str):
    """Pixels of a saved PNG as a uint8 numpy array (H, W, C); PNG metadata (the prompt) is ignored."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()
