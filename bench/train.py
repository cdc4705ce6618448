"""Train B-LoRA against (1) a minimal pure-torch B-LoRA loop and (2) stock ComfyUI ``TrainLoraNode``, side by
side in one run, each run in its own process.

(1) ``bench/minimal_train.py``: the least work the recipe needs, on the same UNet module, targets (the content and
    style blocks' attention Linears), rank, dtype and latent; measured with gradient checkpointing of the trained
    transformer blocks on and off. Train B-LoRA is measured in each of its ``gradient_checkpointing`` modes (off,
    trained blocks: the default, all above). This is the like-for-like figure; the goals (issue 16): the default
    at most 1.20x the minimal loop without checkpointing, ``off`` at most 1.05x, the default's peak RSS at most
    the minimal loop's.
(2) Stock TrainLoraNode trains a LoRA on EVERY layer of the UNet (all Linears and convs, norms and biases as
    diffs), not B-LoRA's two blocks: the ours/stock ratio compares B-LoRA's layers with stock's all-layer LoRA,
    i.e. what a user saves by training B-LoRA with this pack instead of the stock node, not like-for-like code.

Models: (a) the tiny SDXL-architecture test model, fp32 on the CPU, same steps, rank, batch, learning rate for
all; (b) a full-width SDXL UNet with random weights (the real SDXL unet_config) at 512 px, bf16, a few steps. All
get the same image (latent from the same VAE) and conditioning; for ours and stock the weights are made under
``torch.inference_mode()`` as a checkpoint loader node makes them (the minimal loop makes ordinary tensors).

Step time: the median interval between consecutive step ends inside one run (ours: the host ProgressBar hook;
stock: its loss callback), so set-up (VAE encode, model load, saving) is not counted; wall time and process CPU
time (torch on ``--threads`` threads; CPU time is the steadier figure on a shared machine); median over repeats.
Peak memory: the process's peak RSS during the run (VmHWM reset through /proc/self/clear_refs just before it)
minus the RSS before it, i.e. what training itself adds, and the absolute peak.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/train.py [--repeats N] [--no-full]``; prints a table and
writes it to bench/RESULTS-train.txt. A run of a variant that fails, is killed (memory) or passes --timeout is
reported as such.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchkit import ROOT, full_sdxl_model, host_train_lora, measure_worker, spawn_worker, train_ours

RESULTS = ROOT / "bench" / "RESULTS-train.txt"


def build(args):
    """(model, vae, image, conditioning) for the worker's model size; weights made under inference mode (the
    minimal loop: ordinary tensors)."""
    import torch

    from blora_testkit.tiny_sdxl import tiny_conditioning, tiny_sdxl_model
    from blora_testkit.tiny_vae import tiny_vae

    with torch.inference_mode(args.worker != "minimal"):
        if args.model == "tiny":
            model, context_dim = tiny_sdxl_model(0), 64
        elif args.model == "mid":
            model, context_dim = mid_sdxl_model(), 2048
        else:
            model, context_dim = full_sdxl_model(torch.bfloat16), 2048
        gen = torch.Generator().manual_seed(0)
        image = torch.rand(1, args.res, args.res, 3, generator=gen)
        cond = tiny_conditioning(0)
        cond = [[torch.randn(1, 77, context_dim, generator=gen), cond[0][1]]]
        return model, tiny_vae(0), image, cond


MID_SDXL = {"model_channels": 128, "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": 2,
            "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]}  # SDXL's layout and context, narrower, shallower


def mid_sdxl_model():
    """ModelPatcher around a mid-size SDXL-architecture UNet (MID_SDXL over SDXL's config: 128 channels, depth 2 in
    the 1280→512-channel blocks, context 2048), fp32, random weights, CPU."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    from benchkit import FULL_SDXL_EXTRA, fill_random_

    config = dict(comfy.supported_models.SDXL.unet_config, **dict(FULL_SDXL_EXTRA, **MID_SDXL))
    model_config = comfy.supported_models.SDXL(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    fill_random_(model.diffusion_model, torch.float32)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def run_ours(args, model, vae, image, cond, stamp) -> list[float]:
    return train_ours(args, model, vae, image, cond, stamp, "bench/ours")


def run_minimal(args, model, vae, image, cond, stamp) -> list[float]:
    """bench/minimal_train.py on the same UNet module, targets, rank, dtype and latent."""
    import torch

    import minimal_train
    from blora.host.train import linear_paths
    from blora.train.recipe import TrainConfig, TRAINING_DTYPES, select_targets

    dtype = TRAINING_DTYPES[args.dtype]
    unet = model.model.diffusion_model.to(dtype)
    targets = select_targets(linear_paths(model), TrainConfig())
    with torch.no_grad():
        x0 = vae.encode(image).float() * minimal_train.SDXL_LATENT_SCALE
    context = cond[0][0]
    y = torch.randn(1, model.model.model_config.unet_config["adm_in_channels"],
                    generator=torch.Generator().manual_seed(0))
    params = minimal_train.attach(unet, targets, args.rank, float(args.rank), args.gc != "off")
    return minimal_train.train(unet, x0, context, y, params, args.steps, 1e-4, dtype, stamp)


def run_stock(args, model, vae, image, cond, stamp) -> list[float]:
    import torch

    with torch.inference_mode():
        latent = vae.encode(image)
    return host_train_lora(model, latent, cond, args.steps, args.rank, args.dtype, stamp,
                           factory=lambda: build(args)[0])


def worker(args) -> None:
    measure_worker(args, build, {"ours": run_ours, "minimal": run_minimal, "stock": run_stock})


MODEL_ARGS = {  # per model size: resolution, rank, dtype, threads, memory cap of each run
    "tiny": lambda a: ["--res", str(a.tiny_res), "--rank", str(a.rank), "--dtype", "fp32", "--threads",
                       str(a.threads), "--mem-cap-gb", "0"],
    "mid": lambda a: ["--res", str(a.mid_res), "--rank", str(a.mid_rank), "--dtype", "fp32", "--threads",
                      str(a.threads), "--mem-cap-gb", str(a.full_mem_cap_gb)],
    "full": lambda a: ["--res", str(a.full_res), "--rank", str(a.full_rank), "--dtype", a.full_dtype, "--threads",
                       str(a.full_threads), "--mem-cap-gb", str(a.full_mem_cap_gb)],
}


def spawn(variant: str, model: str, steps: int, args) -> dict:
    variant, _, gc = variant.partition("/")  # "ours/trained blocks", "minimal/off", "stock/gc"
    cmd = [sys.executable, __file__, "--worker", variant, "--model", model, "--steps", str(steps), "--gc", gc,
           *MODEL_ARGS[model](args)]
    return spawn_worker(cmd, args.timeout)


DEFAULT, OFF, ALL = "ours/trained blocks", "ours/off", "ours/all above"
MINIMAL_GC, MINIMAL = "minimal/trained blocks", "minimal/off"
VARIANTS = (DEFAULT, MINIMAL_GC, OFF, MINIMAL, ALL, "stock/gc")


def measure(model: str, steps: int, args) -> dict:
    """Per variant, runs interleaved: median step time (wall, CPU) and training peak memory."""
    runs = {v: [] for v in VARIANTS if args.stock or not v.startswith("stock")}
    for _ in range(args.repeats if model == "tiny" else 1):
        for variant in runs:
            runs[variant].append(spawn(variant, model, steps, args))
    return {v: summarize(rs) for v, rs in runs.items()}


def summarize(runs: list[dict]) -> dict:
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0]}
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"wall": med("wall"), "cpu": med("cpu"),
            "peak_add_mb": statistics.median((r["hwm_kb"] - r["rss0_kb"]) / 1024 for r in runs),
            "peak_mb": statistics.median(r["hwm_kb"] / 1024 for r in runs),
            "loss_first": runs[-1]["losses"][0], "loss_last": runs[-1]["losses"][-1]}


def _line(name: str, r: dict) -> str:
    if "error" in r:
        return f"  {name}: {r['error']}"
    return (f"  {name}: {r['wall']:7.3f} s/step wall {r['cpu']:7.3f} s/step cpu   training adds "
            f"{r['peak_add_mb']:8.1f} MB (peak RSS {r['peak_mb']:.0f} MB), loss {r['loss_first']:.3f} -> "
            f"{r['loss_last']:.3f}")


def _ratio(name: str, a: dict, b: dict) -> list[str]:
    if "error" in a or "error" in b:
        return []
    return [f"  ratio {name}: step time {a['wall'] / b['wall']:.2f} (wall), {a['cpu'] / b['cpu']:.2f} (cpu); "
            f"peak memory added {a['peak_add_mb'] / b['peak_add_mb']:.2f}, peak RSS {a['peak_mb'] / b['peak_mb']:.2f}"]


def row(label: str, result: dict) -> list[str]:
    lines = [label] + [_line(f"{v:22s}", r) for v, r in result.items()]
    lines += _ratio("default (trained blocks) / minimal without checkpointing [goal <= 1.20, RSS <= 1]",
                    result[DEFAULT], result[MINIMAL])
    lines += _ratio("off / minimal without checkpointing [goal <= 1.05]", result[OFF], result[MINIMAL])
    lines += _ratio("default (trained blocks) / minimal with checkpointing (same recomputation)", result[DEFAULT],
                    result[MINIMAL_GC])
    lines += _ratio("all above / minimal with checkpointing", result[ALL], result[MINIMAL_GC])
    if "stock/gc" in result:
        lines += _ratio("default / stock (B-LoRA's 2 blocks vs stock's all-layer LoRA, checkpointing on)",
                        result[DEFAULT], result["stock/gc"])
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=("ours", "minimal", "stock"))
    p.add_argument("--gc", default="trained blocks", help="gradient_checkpointing mode (ours; minimal: off or on)")
    p.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                   help="also run stock TrainLoraNode (all layers)")
    p.add_argument("--model", choices=("tiny", "mid", "full"), default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny-res", type=int, default=256)
    p.add_argument("--tiny-steps", type=int, default=20)
    p.add_argument("--mid-res", type=int, default=256)
    p.add_argument("--mid-rank", type=int, default=32)
    p.add_argument("--mid-steps", type=int, default=6)
    p.add_argument("--no-mid", action="store_true")
    p.add_argument("--full-res", type=int, default=512)
    p.add_argument("--full-rank", type=int, default=64)
    p.add_argument("--full-dtype", default="bf16")
    p.add_argument("--full-steps", type=int, default=3)
    p.add_argument("--full-threads", type=int, default=2)
    p.add_argument("--no-full", action="store_true")
    p.add_argument("--no-tiny", action="store_true")
    p.add_argument("--out", default=str(RESULTS), help="where the table is written")
    p.add_argument("--mem-cap-gb", type=float, default=0.0)
    p.add_argument("--full-mem-cap-gb", type=float, default=20.0,
                   help="data-segment limit of each full-model run (an allocation error, reported, instead of OOM)")
    p.add_argument("--timeout", type=float, default=3600.0)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    header = (f"bench/train.py on {platform.machine()} {os.cpu_count()} CPU(s), torch threads {args.threads} (tiny, mid) / "
              f"{args.full_threads} (full), {time.strftime('%Y-%m-%d %H:%M')}; CPU time is the steadier figure on a "
              f"shared machine")
    lines = [header, "ours = Train B-LoRA; minimal = bench/minimal_train.py (plain torch, the least work the recipe needs: "
                     "same UNet, the same 2 blocks' attention Linears, rank, dtype, latent); stock = ComfyUI's "
                     "TrainLoraNode, which trains a LoRA on EVERY layer: ours/stock compares B-LoRA's 2 blocks with "
                     "stock's all-layer LoRA, not like with like."]
    if not args.no_tiny:
        tiny = measure("tiny", args.tiny_steps, args)
        lines += row(f"(a) tiny SDXL-arch model, fp32, {args.tiny_res} px, rank {args.rank}, {args.tiny_steps} steps "
                     f"(median of {args.repeats} runs)", tiny)
    if not args.no_mid:
        mid = measure("mid", args.mid_steps, args)
        lines += row(f"(m) mid-size SDXL-arch UNet (128 channels, depth 1/2, context 2048, random weights), fp32, "
                     f"{args.mid_res} px, rank {args.mid_rank}, {args.mid_steps} steps (1 run each)", mid)
    if not args.no_full:
        full = measure("full", args.full_steps, args)
        lines += row(f"(b) full-width SDXL UNet (random weights), {args.full_dtype}, {args.full_res} px, rank "
                     f"{args.full_rank}, {args.full_steps} steps, each run capped at {args.full_mem_cap_gb:g} GB", full)
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
