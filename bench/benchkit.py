"""Shared pieces of the benchmarks in bench/: host set-up, progress and clock, the full-width SDXL UNet.

Imported by the scripts as a sibling module (``python bench/x.py`` puts bench/ on ``sys.path``). Torch and the
host are imported inside the functions, after ``setup_host`` has put the host on the path.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SDXL_EXTRA = {"image_size": 32, "use_checkpoint": False, "in_channels": 4, "out_channels": 4,
                   "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "use_spatial_transformer": True,
                   "legacy": False, "num_classes": "sequential", "num_head_channels": 64,
                   "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                   "use_temporal_attention": False, "use_temporal_resblock": False}
# FLUX.1 dev as the host detects it from the checkpoint (comfy/model_detection.py): 19 double + 38 single blocks,
# hidden 3072 (24 heads of 128), T5 context 4096, pooled CLIP-L 768, guidance embedding
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
_T0 = time.perf_counter()


def progress(message: str) -> None:
    """Where the run is (stderr, so the table on stdout stays clean)."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def clock() -> float:
    """CPU seconds of this process (all threads): steadier than wall time on a shared machine."""
    return time.process_time()


def setup_host(threads: int) -> None:
    """The host in-process on CPU, the pack's core importable as ``blora`` and the test kit as ``blora_testkit``;
    torch on ``threads`` threads."""
    host = os.environ.get("COMFYUI_PATH")
    if not host or not (Path(host) / "comfy").is_dir():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path[:0] = [host]
    sys.path += [str(ROOT), str(ROOT / "tests")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import torch

    torch.set_num_threads(threads)


def stamp_every_step(stamp) -> None:
    """Call ``stamp()`` at every ProgressBar update of the host: the global hook, with the host's throttling off
    where it has it (0.33 drops updates closer than 0.1 s apart, so faster steps were timed in pairs)."""
    import comfy.utils

    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            setattr(comfy.utils, name, 0.0)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: stamp())


def run_stamp(script: str) -> str:
    """``bench/<script>  <date time>  torch <version>  <machine> CPU``: the start of a results table's first line."""
    import torch

    return f"bench/{script}  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  {platform.machine()} CPU"


def sampling_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the sampling benchmarks: --repeats, --steps, --threads, --tiny-only."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny-only", action="store_true")
    return parser


def enough_memory(gib: float) -> bool:
    """At least ``gib`` GiB of memory available now."""
    import psutil

    return psutil.virtual_memory().available / 2 ** 30 >= gib


def tiny_model():
    """The tiny SDXL-architecture test model (fp32, seed 0)."""
    from blora_testkit.tiny_sdxl import tiny_sdxl_model

    return tiny_sdxl_model(seed=0)


def fill_random_(module, dtype, seed: int = 0) -> None:
    """Random weights, fast: one shared normal buffer, scaled by 1/sqrt(fan_in) per matrix (comfy ops skip init);
    1-d parameters: 1 for norms, 0 otherwise."""
    import torch

    params = list(module.named_parameters())
    noise = torch.randn(max(p.numel() for _, p in params), generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        for name, p in params:
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.copy_(noise[:p.numel()].view(p.shape)).mul_(1.0 / p[0].numel() ** 0.5)


def randn_like_init_(module, seed: int = 0) -> None:
    """Random weights made where the weights are (on a GPU: fast, nothing crosses the bus), each matrix its own
    draw scaled by 1/sqrt(fan_in); 1-d parameters: 1 for norms, 0 otherwise."""
    import torch

    generators = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
                continue
            g = generators.get(p.device)
            if g is None:
                g = generators[p.device] = torch.Generator(p.device).manual_seed(seed)
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)).mul_(1.0 / p[0].numel() ** 0.5)


def flux_model(config: dict, dtype, device, seed: int = 0):
    """ModelPatcher around a FLUX.1-architecture ``model_base.Flux`` of ``config`` (``FLUX_DEV`` or a narrower or
    shallower copy), made on ``device`` in ``dtype`` with random weights (``randn_like_init_``); load and offload
    device both ``device`` (nothing moves). Make it under ``torch.inference_mode()`` to get what a loader gives."""
    import dataclasses

    import comfy.model_patcher
    import comfy.supported_models
    from comfy.ldm.flux.model import FluxParams

    config = dict(config)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # 0.33+: a field without a default
        config.setdefault("txt_ids_dims", [])

    class RandomFlux(comfy.supported_models.Flux):
        unet_config = dict(config)

    model_config = RandomFlux(dict(config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    randn_like_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def full_sdxl_model(dtype):
    """ModelPatcher around a full-width SDXL UNet (comfy.supported_models.SDXL's unet_config), random weights, CPU."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    config = dict(comfy.supported_models.SDXL.unet_config, **FULL_SDXL_EXTRA)
    model_config = comfy.supported_models.SDXL(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    fill_random_(model.diffusion_model, dtype)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def step_times(model, latent_hw: int, context_dim: int, steps: int, cfg: float) -> list[float]:
    """CPU seconds of each sampling step after the first (euler, normal; the first includes loading and patching)."""
    import comfy.sample
    import torch

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, latent_hw, latent_hw, generator=gen)
    cond = [[torch.randn(1, 77, context_dim, generator=gen),
             {"pooled_output": torch.randn(1, 1280, generator=gen), "width": 8 * latent_hw,
              "height": 8 * latent_hw}]]
    stamps = []
    with torch.inference_mode():
        comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", cond, cond, torch.zeros_like(noise),
                            callback=lambda *a: stamps.append(clock()), disable_pbar=True, seed=0)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _remade(factory, disable_dynamic=False):
    return factory()  # in the grad mode the node is in (it makes its copy outside inference mode)


def host_train_lora(model, latent, cond, steps: int, rank: int, dtype: str, stamp, gradient_checkpointing=True,
                    checkpoint_depth: int = 1, offloading: bool = False, bypass: bool = False,
                    learning_rate: float = 1e-4, factory=None) -> list[float]:
    """The host's own TrainLoraNode (``comfy_extras/nodes_train.py``) on ``model``: a LoRA on every layer, as
    stock trains; ``stamp()`` after every step (its loss callback). Feature checks: the V3 node of 0.33+ (inputs
    as lists; ``checkpoint_depth``, ``offloading`` and ``bypass_mode`` where the schema has them) or the older
    ``train`` method (0.3.64: none of the three). 0.33's node trains on a fresh copy of the model that it makes
    through the patcher's ``cached_patcher_init`` (a core loader sets it): ``factory()`` makes the model again for
    a patcher built here. Returns the losses."""
    import inspect

    import torch
    from comfy_extras import nodes_train

    init = nodes_train.TrainSampler.__init__

    def timed_init(self, loss_fn, optimizer, loss_callback=None, **kwargs):
        init(self, loss_fn, optimizer, loss_callback=lambda loss: (stamp(), loss_callback(loss)), **kwargs)

    nodes_train.TrainSampler.__init__ = timed_init
    if factory is not None and getattr(model, "cached_patcher_init", False) is None:
        model.cached_patcher_init = (_remade, (factory,))
    node = nodes_train.TrainLoraNode
    settings = dict(batch_size=1, steps=steps, grad_accumulation_steps=1, learning_rate=learning_rate, rank=rank,
                    optimizer="AdamW", loss_function="MSE", seed=0, training_dtype=dtype, lora_dtype="fp32",
                    algorithm="LoRA", gradient_checkpointing=gradient_checkpointing, existing_lora="[None]")
    try:
        with torch.inference_mode():
            if hasattr(node, "train"):  # 0.3.64
                if bypass or offloading:
                    raise RuntimeError("this host's TrainLoraNode has no bypass mode or offloading")
                out = node().train(model, {"samples": latent}, cond, **settings)
                return out[2]["loss"]
            params = inspect.signature(node.execute).parameters
            extra = {"checkpoint_depth": checkpoint_depth, "offloading": offloading, "bypass_mode": bypass,
                     "bucket_mode": False, "quantized_backward": False}
            missing = [k for k, v in extra.items() if v and k not in params]
            if missing:
                raise RuntimeError(f"this host's TrainLoraNode has no {', '.join(missing)}")
            settings.update({k: v for k, v in extra.items() if k in params})
            inputs = {k: [v] for k, v in settings.items()}
            out = node.execute(model=[model], latents=[{"samples": latent}], positive=[cond], **inputs)
            result = out.result if hasattr(out, "result") else out
            return [float(v) for v in result[1]["loss"]]
    finally:
        nodes_train.TrainSampler.__init__ = init


def train_ours(args, model, vae, image, cond, stamp, prefix: str) -> list[float]:
    """Train B-LoRA (``train_blora``) at the worker's rank, steps, resolution, dtype and checkpointing mode, every
    step stamped (``stamp_every_step``); the losses."""
    import torch

    from blora.host.train import train_blora
    from blora.train.recipe import TrainConfig

    config = TrainConfig(rank=args.rank, alpha=float(args.rank), steps=args.steps, learning_rate=1e-4,
                         resolution=args.res, training_dtype=args.dtype, gradient_checkpointing=args.gc)
    stamp_every_step(stamp)
    with torch.inference_mode():
        return train_blora(model, vae, image, cond, config, filename_prefix=prefix).losses


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_worker(args, build, runners: dict) -> None:
    """One training worker process: the memory cap, the host on CPU, a fresh output folder, the model ``build(args)``
    gives, then ``runners[args.worker]`` timed at every step; prints one JSON line (median wall and CPU seconds per
    step, RSS before and the peak, the losses)."""
    if args.mem_cap_gb:  # an allocation error instead of the OOM killer on a shared machine
        cap = int(args.mem_cap_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    setup_host(args.threads)
    import folder_paths

    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="blora-bench-"))
    model, vae, image, cond = build(args)
    stamps: list[tuple[float, float]] = []
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS back to the current RSS
    rss0 = status_kb("VmRSS")
    losses = runners[args.worker](args, model, vae, image, cond,
                                  lambda: stamps.append((time.perf_counter(), time.process_time())))
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"wall": statistics.median(s[0] for s in steps), "cpu": statistics.median(s[1] for s in steps),
                      "rss0_kb": rss0, "hwm_kb": status_kb("VmHWM"), "losses": [float(x) for x in losses]}))


def spawn_worker(cmd: list[str], timeout: float) -> dict:
    """Run one worker process (``measure_worker``): its JSON line, or ``{"error": why}`` (timed out, killed, the last
    lines of its stderr)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if done.returncode != 0:
        why = "killed (out of memory?)" if done.returncode in (-9, 137) else f"exit {done.returncode}"
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip() and not ln.startswith("WARNING")]
        return {"error": why + ": " + " | ".join(lines[-3:])[:400]}
    return json.loads(done.stdout.strip().splitlines()[-1])
