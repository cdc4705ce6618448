"""Train B-LoRA seeds: N = 4 seeds in one run against 4 separate single-seed runs, same model, steps and settings.

Variants, one after the other in one process, on the same model, image and conditioning:

- separate: ``train_blora`` four times, seeds 0, 1, 2, 3;
- seeds (shared draws, the default): ``train_blora_seeds`` with seeds = 4 (the layers below the first trained
  block run once for the four seeds);
- seeds (own draws): ``train_blora_seeds`` with seeds = 4, each seed with its own timesteps and noise.

Reported: CPU seconds of the whole job (this process, all threads: steadier than wall time on a shared machine;
includes the VAE encode, model load and saving the files), the ratio to separate, and peak memory: the growth of
the process's peak RSS during the job (VmHWM reset through /proc/self/clear_refs just before it). Models: the tiny
SDXL test model (fp32) and, with --full and enough memory, a full-width SDXL UNet with random weights (bf16).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/seeds.py [--steps N] [--full]``; prints a table and writes it to
bench/RESULTS-seeds.txt.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchkit import ROOT, clock, enough_memory, full_sdxl_model, progress, run_stamp, setup_host, status_kb

RESULTS = ROOT / "bench" / "RESULTS-seeds.txt"
SEEDS = 4
FULL_MEMORY_GB = 14


def measure(job):
    """(CPU seconds, peak RSS growth in bytes) of job()."""
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = status_kb("VmRSS")
    t0 = clock()
    job()
    return clock() - t0, (status_kb("VmHWM") - rss0) * 1024


def bench_model(label: str, model, context_dim: int, args) -> list[dict]:
    import comfy.model_management
    import torch

    from blora.host.train import train_blora
    from blora.host.train_seeds import train_blora_seeds
    from blora.train.recipe import TrainConfig
    from blora_testkit.tiny_sdxl import tiny_conditioning
    from blora_testkit.tiny_vae import tiny_vae

    gen = torch.Generator().manual_seed(0)
    res = args.tiny_res if "tiny" in label else args.full_res
    image = torch.rand(1, res, res, 3, generator=gen)
    cond = [[torch.randn(1, 77, context_dim, generator=gen), tiny_conditioning(0)[0][1]]]
    vae = tiny_vae(0)
    dtype = "fp32" if "tiny" in label else "bf16"
    rank = 4 if "tiny" in label else 64

    def config(**kw):
        return TrainConfig(rank=rank, alpha=float(rank), steps=args.steps, learning_rate=1e-4, resolution=res,
                           training_dtype=dtype, gradient_checkpointing=True, **kw)

    def separate():
        for s in range(SEEDS):
            train_blora(model, vae, image, cond, config(seed=s), filename_prefix="bench/separate")

    jobs = {"separate (4 runs)": separate,
            "seeds=4, shared draws": lambda: train_blora_seeds(model, vae, image, cond, config(seeds=SEEDS),
                                                               filename_prefix="bench/shared"),
            "seeds=4, own draws": lambda: train_blora_seeds(model, vae, image, cond,
                                                            config(seeds=SEEDS, seed_draws="own"),
                                                            filename_prefix="bench/own")}
    rows = []
    with torch.inference_mode():
        train_blora(model, vae, image, cond, config(seed=9), filename_prefix="bench/warmup")  # first-call costs
        for name, job in jobs.items():
            progress(f"{label}: {name}")
            comfy.model_management.unload_all_models()
            seconds, rss = measure(job)
            rows.append({"model": label, "variant": name, "cpu": seconds, "rss": rss})
    for r in rows:
        r["ratio"] = r["cpu"] / rows[0]["cpu"]
    return rows


def table(rows: list[dict], args) -> str:
    import torch

    full = any("full" in r["model"] for r in rows)
    head = (f"{run_stamp('seeds.py')}, {torch.get_num_threads()} thread(s); batch 1, content+style blocks, "
            f"gradient checkpointing; tiny: fp32 rank 4 {args.tiny_res} px, {args.tiny_steps} steps"
            + (f"; full: bf16 rank 64 {args.full_res} px, {args.full_steps} steps" if full else ""))
    lines = [head, "", f"{'model':38} {'variant':24} {'CPU s':>8} {'ratio':>6} {'peak RSS growth':>16}"]
    for r in rows:
        lines.append(f"{r['model']:38} {r['variant']:24} {r['cpu']:8.2f} {r['ratio']:6.2f} "
                     f"{r['rss'] / 2 ** 20:13.0f} MB")
    lines += ["", "CPU s: process CPU seconds of the whole job (VAE encode, load, training, saving the files);",
              "ratio: against the four separate runs; peak RSS growth: VmHWM during the job minus RSS before it.",
              "shared draws: every seed trains on seed 0's timesteps and noise, the layers below the first trained",
              "block run once; own draws: seed n draws its own (each equals the run with that seed alone)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny-res", type=int, default=256)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--full-steps", type=int, default=3)
    parser.add_argument("--full-res", type=int, default=256)
    args = parser.parse_args()
    args.tiny_steps = args.steps
    setup_host(args.threads)
    import folder_paths
    import torch

    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="blora-bench-seeds-"))
    from blora_testkit.tiny_sdxl import tiny_sdxl_model

    with torch.inference_mode():
        tiny = tiny_sdxl_model(0)
    rows = bench_model("tiny SDXL (fp32)", tiny, 64, args)
    if args.full:
        if enough_memory(FULL_MEMORY_GB):
            args.tiny_steps, args.steps = args.steps, args.full_steps
            with torch.inference_mode():
                full = full_sdxl_model(torch.bfloat16)
            rows += bench_model("full SDXL UNet (bf16)", full, 2048, args)
        else:
            progress(f"full SDXL skipped: needs {FULL_MEMORY_GB} GB free")
    text = table(rows, args)
    print(text, end="")
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
