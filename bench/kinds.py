"""Train B-LoRA with each algorithm (LoRA, DoRA, LoKr, LoHa, AdaLoRA) side by side: step time, peak memory and file
size against LoRA, same model, blocks, rank, steps, image and settings; each run in its own process.

(a) The tiny SDXL-architecture test model, fp32 on the CPU, content+style blocks, gradient checkpointing, the
    node's defaults for every algorithm option (LoKr factor -1; AdaLoRA from rank to rank/2 on average, warm-up
    10 %, final 20 %, a reallocation every 10 steps). Step time: the median interval between consecutive step ends
    (host ProgressBar hook), so set-up and saving are not counted; wall and process CPU time (the steadier figure
    on a shared machine); median over repeats, runs interleaved. Peak memory: the process's peak RSS during the run
    (VmHWM reset just before it) minus the RSS before it. File: the saved .safetensors (fp16), bytes.
(b) File sizes at full SDXL widths: the content+style blocks' 160 attention Linears at the real SDXL shapes, each
    algorithm's adapters made and written as Train B-LoRA writes them (fp16, kohya keys) at ``--full-rank``;
    AdaLoRA at its target budget (half the rank on average, spread as in (a)'s run: the sizes scale with the total
    rank, which the budget fixes).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/kinds.py [--repeats N]``; prints a table and writes it to
bench/RESULTS-kinds.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import ROOT, setup_host, stamp_every_step, status_kb

RESULTS = ROOT / "bench" / "RESULTS-kinds.txt"
ALGORITHMS = ("LoRA", "DoRA", "LoKr", "LoHa", "AdaLoRA")


def worker(args) -> None:
    setup_host(args.threads)
    import folder_paths
    import torch
    from blora_testkit.tiny_sdxl import tiny_conditioning, tiny_sdxl_model
    from blora_testkit.tiny_vae import tiny_vae

    from blora.host.train import train_blora
    from blora.train.recipe import TrainConfig

    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="blora-bench-"))
    with torch.inference_mode():
        model, vae = tiny_sdxl_model(0), tiny_vae(0)
    image = torch.rand(1, args.res, args.res, 3, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(rank=args.rank, alpha=float(args.rank), steps=args.steps, learning_rate=1e-3,
                         resolution=args.res, training_dtype="fp32", algorithm=args.worker)
    stamps: list[tuple[float, float]] = []
    stamp_every_step(lambda: stamps.append((time.perf_counter(), time.process_time())))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    rss0 = status_kb("VmRSS")
    with torch.inference_mode():
        out = train_blora(model, vae, image, tiny_conditioning(0), config, filename_prefix="bench/kinds")
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"wall": statistics.median(s[0] for s in steps), "cpu": statistics.median(s[1] for s in steps),
                      "rss0_kb": rss0, "hwm_kb": status_kb("VmHWM"), "file": os.path.getsize(out.path),
                      "params": out.adapter.num_params, "ranks": out.ranks}))


def spawn(algorithm: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", algorithm, "--steps", str(args.steps), "--res", str(args.res),
           "--rank", str(args.rank), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip() and not ln.startswith("WARNING")]
        return {"error": f"exit {done.returncode}: " + " | ".join(lines[-3:])[:400]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {a: [] for a in ALGORITHMS}
    for _ in range(args.repeats):
        for algorithm in ALGORITHMS:
            runs[algorithm].append(spawn(algorithm, args))
    out = {}
    for algorithm, rs in runs.items():
        errors = [r["error"] for r in rs if "error" in r]
        if errors:
            out[algorithm] = {"error": errors[0]}
            continue
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        out[algorithm] = {"wall": med("wall"), "cpu": med("cpu"),
                          "add_mb": statistics.median((r["hwm_kb"] - r["rss0_kb"]) / 1024 for r in rs),
                          "file": rs[-1]["file"], "params": rs[-1]["params"], "ranks": rs[-1]["ranks"]}
    return out


def tiny_table(results: dict[str, dict], args) -> list[str]:
    lines = [f"(a) tiny SDXL-arch model, fp32, {args.res} px, rank {args.rank} (AdaLoRA: {args.rank} -> "
             f"{max(1, args.rank // 2)} on average), {args.steps} steps, content+style, median of {args.repeats} runs",
             f"  {'algorithm':9} {'s/step wall':>11} {'s/step cpu':>10} {'x LoRA':>6}  {'training adds':>13} "
             f"{'x LoRA':>6}  {'file bytes':>10} {'x LoRA':>6}  {'params':>7}"]
    base = results["LoRA"]
    for algorithm, r in results.items():
        if "error" in r:
            lines.append(f"  {algorithm:9} {r['error']}")
            continue
        lines.append(f"  {algorithm:9} {r['wall']:11.3f} {r['cpu']:10.3f} {r['cpu'] / base['cpu']:6.2f}  "
                     f"{r['add_mb']:10.1f} MB {r['add_mb'] / base['add_mb']:6.2f}  {r['file']:10d} "
                     f"{r['file'] / base['file']:6.2f}  {r['params']:7d}")
    ranks = results["AdaLoRA"].get("ranks")
    if ranks:
        lines.append("  AdaLoRA final mean rank per block: " + ", ".join(f"{k} {v:.2f}" for k, v in ranks.items()))
    return lines


def full_sizes(args) -> list[str]:
    """File sizes at SDXL's real shapes (no training: sizes depend only on shapes and the budget)."""
    setup_host(1)
    import torch

    from blora.adapters.adapter import Adapter
    from blora.train.algorithms import export, new_adapters
    from blora.formats.files import write_adapter
    from blora.train.recipe import TrainConfig

    width = {"output_blocks.0.1": 1280, "output_blocks.1.1": 1280}
    shapes = {}
    for block, c in width.items():
        for t in range(10):
            for attn in ("attn1", "attn2"):
                k_in = c if attn == "attn1" else 2048
                for name, shape in (("to_q", (c, c)), ("to_k", (c, k_in)), ("to_v", (c, k_in)),
                                    ("to_out.0", (c, c))):
                    shapes[f"{block}.transformer_blocks.{t}.{attn}.{name}"] = shape
    sizes, folder, lokr_shapes = {}, Path(tempfile.mkdtemp(prefix="blora-bench-")), {}
    for algorithm in ALGORITHMS:
        config = TrainConfig(rank=args.full_rank, alpha=float(args.full_rank), algorithm=algorithm)
        adapters = new_adapters({p: torch.zeros(s) for p, s in shapes.items()}, config)
        if algorithm == "AdaLoRA":  # at the target budget: half the triplets of every module kept
            with torch.no_grad():
                for a in adapters.values():
                    a.singular.fill_(1.0)
                    a.singular[config.adalora_target:] = 0.0
        exported = export(adapters, torch.float16)
        if algorithm == "LoKr":  # the factors each weight shape gets, as written
            for p, m in exported.items():
                lokr_shapes.setdefault(shapes[p], {k: tuple(t.shape) for k, t in m.tensors.items() if k != "alpha"})
        path = write_adapter(Adapter(modules=exported), folder, algorithm, dialect="kohya")
        sizes[algorithm] = path.stat().st_size
    line = ", ".join(f"{a} {sizes[a] / 2 ** 20:.1f} MiB ({sizes[a] / sizes['LoRA']:.2f}x)" for a in ALGORITHMS)
    factors = "; ".join(f"{o}x{i}: " + ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in t.items())
                        for (o, i), t in lokr_shapes.items())
    return [f"(b) file size at full SDXL widths, content+style (160 Linears), rank {args.full_rank}, fp16: {line}",
            f"    LoKr tensors per weight shape (out x in): {factors}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=ALGORITHMS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--full-rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default=str(RESULTS), help="where the table is written")
    p.add_argument("--sizes-only", action="store_true",
                   help="recompute only the full-width file sizes (b), keeping the measured table (a) in --out")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.sizes_only:
        kept = [ln for ln in Path(args.out).read_text().splitlines() if not ln.startswith(("(b)", "    LoKr"))]
        text = "\n".join(kept + full_sizes(args))
        print(text)
        Path(args.out).write_text(text + "\n")
        return None
    lines = [f"bench/kinds.py on {platform.machine()} {os.cpu_count()} CPU(s), torch threads {args.threads}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}; CPU time is the steadier figure on a shared machine"]
    lines += tiny_table(measure(args), args)
    lines += full_sizes(args)
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
