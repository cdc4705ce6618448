"""Train B-LoRA on FLUX.1 against the minimal pure-torch loop, side by side in one run, each run in its own process.

The minimal loop (``bench/minimal_train.py``, ``train_flow``): the least work the recipe needs on the same FLUX model
module, targets (linear1 and linear2 of SplitFlux's content and style single blocks), rank, dtype and latent: flow
matching on the host's FLUX sigma table against the velocity, FLUX dev's guidance input, the in-place adds of FLUX's
blocks made trainable by a copy of each norm's input (and of a checkpointed block's input). Train B-LoRA is measured
in each ``gradient_checkpointing`` mode (off, trained blocks: the default, all above), the minimal loop with its
trained blocks checkpointed and not. Goals (as for SDXL, issue 16): the default at most 1.20x the minimal loop
without checkpointing, ``off`` at most 1.05x, the default's peak RSS at most the minimal loop's.

Models: (a) the tiny FLUX-architecture test model (``blora_testkit.tiny_flux``: 2 double + 12 single blocks, hidden
64), fp32, its own init; (b) a full-width FLUX.1 layout with few blocks (``benchkit.FLUX_DEV`` widths: hidden 3072,
24 heads, T5 context 4096, pooled 768, guidance embedding; 1 double + 2 single blocks, both single blocks in the
content preset), random bf16 weights (``benchkit.flux_model``); the per-block cost of the 57 real blocks scales with
the block count. All runs of a model get the same image (latent from the test kit's 16-channel VAE), T5 context,
pooled vector and guidance 3.5; ours and the minimal loop get weights made as a loader makes them (under inference
mode; the minimal loop's are ordinary tensors, as it needs).

Step time: the median interval between consecutive step ends inside one run (ours: the host ProgressBar hook with
the host's throttle off, ``benchkit.stamp_every_step``; minimal: its step callback), wall and process CPU time (one
torch thread by default; CPU time is the steadier figure on a shared machine), median over repeats. Peak memory: the
process's peak RSS during training (reset through /proc/self/clear_refs just before) minus the RSS before it, and the
absolute peak.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/flux_train.py [--repeats N] [--no-full]``; prints a table and
writes it to bench/RESULTS-flux_train.txt.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchkit import FLUX_DEV, ROOT, measure_worker, run_stamp, spawn_worker, train_ours
from train import _ratio, summarize

RESULTS = ROOT / "bench" / "RESULTS-flux_train.txt"
FULL_1_2 = dict(FLUX_DEV, depth=1, depth_single_blocks=2)  # full widths, 1 double + 2 single blocks
GUIDANCE = 3.5
DEFAULT, OFF, ALL = "ours/trained blocks", "ours/off", "ours/all above"
MINIMAL_GC, MINIMAL = "minimal/trained blocks", "minimal/off"
VARIANTS = (DEFAULT, MINIMAL_GC, OFF, MINIMAL, ALL)


def build(args):
    """(model patcher, vae, image, conditioning) for the worker's model; weights made under inference mode as a
    loader node gives them (the minimal loop: ordinary tensors)."""
    import torch

    from benchkit import flux_model
    from blora_testkit import tiny_flux
    from blora_testkit.tiny_vae import tiny_vae

    with torch.inference_mode(args.worker != "minimal"):
        if args.model == "tiny":
            model, width, pooled = tiny_flux.tiny_flux_model(0), tiny_flux.CONTEXT_DIM, tiny_flux.POOLED_DIM
        else:
            model = flux_model(FULL_1_2, torch.bfloat16, torch.device("cpu"))
            width, pooled = FLUX_DEV["context_in_dim"], FLUX_DEV["vec_in_dim"]
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, args.res, args.res, 3, generator=gen)
    cond = [[torch.randn(1, args.tokens, width, generator=gen),
             {"pooled_output": torch.randn(1, pooled, generator=gen), "guidance": GUIDANCE}]]
    return model, tiny_vae(0, latent_channels=tiny_flux.LATENT_CHANNELS), image, cond


def run_ours(args, model, vae, image, cond, stamp) -> list[float]:
    return train_ours(args, model, vae, image, cond, stamp, "bench/flux")


def run_minimal(args, model, vae, image, cond, stamp) -> list[float]:
    """bench/minimal_train.py's ``train_flow`` on the same FLUX module, targets, rank, dtype and latent, with the
    host's training flag up (FLUX's rope in differentiable torch ops, as the host's own trainer runs it)."""
    import comfy.model_management as mm
    import torch

    import minimal_train
    from blora.host.train import linear_paths
    from blora.train.recipe import TRAINING_DTYPES, TrainConfig, select_targets

    dtype = TRAINING_DTYPES[args.dtype]
    flux = model.model.diffusion_model.to(dtype)
    targets = select_targets(linear_paths(model), TrainConfig(), "flux")
    with torch.no_grad():
        x0 = (vae.encode(image).float() - minimal_train.FLUX_LATENT_SHIFT) * minimal_train.FLUX_LATENT_SCALE
    context, extras = cond[0]
    params = minimal_train.attach(flux, targets, args.rank, float(args.rank), args.gc != "off")
    before = getattr(mm, "in_training", None)
    if before is not None:
        mm.in_training = True
    try:
        return minimal_train.train_flow(flux, x0, context, extras["pooled_output"], torch.tensor([GUIDANCE]), params,
                                        args.steps, 1e-4, dtype, stamp)
    finally:
        if before is not None:
            mm.in_training = before


def worker(args) -> None:
    measure_worker(args, build, {"ours": run_ours, "minimal": run_minimal})


def model_args(model: str, args) -> list[str]:
    if model == "tiny":
        return ["--res", str(args.tiny_res), "--tokens", str(args.tiny_tokens), "--rank", str(args.rank),
                "--dtype", "fp32", "--mem-cap-gb", "0"]
    return ["--res", str(args.full_res), "--tokens", str(args.full_tokens), "--rank", str(args.full_rank),
            "--dtype", args.full_dtype, "--mem-cap-gb", str(args.full_mem_cap_gb)]


def spawn(variant: str, model: str, steps: int, args) -> dict:
    who, _, gc = variant.partition("/")
    cmd = [sys.executable, __file__, "--worker", who, "--model", model, "--steps", str(steps), "--gc", gc,
           "--threads", str(args.threads), *model_args(model, args)]
    return spawn_worker(cmd, args.timeout)


def measure(model: str, steps: int, repeats: int, args) -> dict:
    """Per variant, runs interleaved: median step time (wall, CPU) and training peak memory."""
    runs = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in runs:
            runs[variant].append(spawn(variant, model, steps, args))
    return {v: summarize(rs) for v, rs in runs.items()}


def _line(name: str, r: dict) -> str:
    if "error" in r:
        return f"  {name}: {r['error']}"
    return (f"  {name}: {r['wall']:8.3f} s/step wall {r['cpu']:8.3f} s/step cpu   training adds "
            f"{r['peak_add_mb']:8.1f} MB (peak RSS {r['peak_mb']:.0f} MB), loss {r['loss_first']:.3f} -> "
            f"{r['loss_last']:.3f}")


def row(label: str, result: dict) -> list[str]:
    lines = [label] + [_line(f"{v:22s}", r) for v, r in result.items()]
    lines += _ratio("default (trained blocks) / minimal without checkpointing [goal <= 1.20, RSS <= 1]",
                    result[DEFAULT], result[MINIMAL])
    lines += _ratio("off / minimal without checkpointing [goal <= 1.05]", result[OFF], result[MINIMAL])
    lines += _ratio("default (trained blocks) / minimal with checkpointing (same recomputation)", result[DEFAULT],
                    result[MINIMAL_GC])
    lines += _ratio("all above / minimal with checkpointing", result[ALL], result[MINIMAL_GC])
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=("ours", "minimal"))
    p.add_argument("--gc", default="trained blocks", help="gradient_checkpointing mode (ours; minimal: off or on)")
    p.add_argument("--model", choices=("tiny", "full"), default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--tokens", type=int, default=8, help="T5 context tokens")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant on the tiny model (full: 1)")
    p.add_argument("--tiny-res", type=int, default=256)
    p.add_argument("--tiny-tokens", type=int, default=16)
    p.add_argument("--tiny-steps", type=int, default=20)
    p.add_argument("--full-res", type=int, default=256)
    p.add_argument("--full-tokens", type=int, default=64)
    p.add_argument("--full-rank", type=int, default=64)
    p.add_argument("--full-dtype", default="bf16")
    p.add_argument("--full-steps", type=int, default=5)
    p.add_argument("--no-full", action="store_true")
    p.add_argument("--no-tiny", action="store_true")
    p.add_argument("--out", default=str(RESULTS), help="where the table is written")
    p.add_argument("--mem-cap-gb", type=float, default=0.0)
    p.add_argument("--full-mem-cap-gb", type=float, default=12.0,
                   help="data-segment limit of each full-width run (an allocation error, reported, instead of OOM)")
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    lines = [f"{run_stamp('flux_train.py')}, {os.cpu_count()} cores, torch threads {args.threads}, load average "
             f"{os.getloadavg()[0]:.1f} at the start; CPU time is the steadier figure on a shared machine",
             "ours = Train B-LoRA; minimal = bench/minimal_train.py train_flow (plain torch, the least work the recipe "
             "needs: same FLUX module, the same single blocks' linear1/linear2, rank, dtype, latent, flow matching)"]
    if not args.no_tiny:
        tiny = measure("tiny", args.tiny_steps, args.repeats, args)
        lines += row(f"(a) tiny FLUX-arch model (2 double + 12 single blocks, hidden 64; 24 trained layers), fp32, "
                     f"{args.tiny_res} px, {args.tiny_tokens} T5 tokens, rank {args.rank}, {args.tiny_steps} steps "
                     f"(median of {args.repeats} runs)", tiny)
    if not args.no_full:
        full = measure("full", args.full_steps, 1, args)
        lines += row(f"(b) full-width FLUX.1 layout, 1 double + 2 single blocks (hidden 3072, context 4096, pooled "
                     f"768, guidance; 4 trained layers), random weights, {args.full_dtype}, {args.full_res} px "
                     f"({(args.full_res // 16) ** 2} image tokens), {args.full_tokens} T5 tokens, rank "
                     f"{args.full_rank}, {args.full_steps} steps (1 run each), each run capped at "
                     f"{args.full_mem_cap_gb:g} GB", full)
    lines.append(f"load average at the end {os.getloadavg()[0]:.1f}")
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
