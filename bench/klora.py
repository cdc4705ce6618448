"""K-LoRA Fuse against the direct merge of the same two LoRAs, measured side by side in one run.

Two LoRAs (subject and style, rank 8 like the K-LoRA paper's, on every attention Linear of every SDXL attention
block: to_q/k/v/out.0 of attn1 and attn2) are applied to the same model two ways:

- direct merge: ``patched_clone(model, [(subject, 1), (style, 1)])``, ordinary static patches;
- K-LoRA: ``fused_clone(model, subject, style, 1, 1, "s")``, per-layer weight functions that pick ΔW_c or ΔW_s
  at every model call.

Reported: the setup (K-LoRA's precompute of both deltas, top-K sums and thresholds, against the merge's patched
clone + first patch_model), and the median seconds per sampling step once loaded (euler, cfg 2 so cond and uncond
run as one batch), for the tiny SDXL test model (fp32) and a full-width SDXL UNet with random weights (bf16, the
real unet_config) when memory allows. Times are CPU seconds of this process (steadier than wall time on a shared
machine); one torch thread by default.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/klora.py [--repeats N] [--steps N] [--tiny-only]``.
Writes the table to bench/RESULTS-klora.txt. About 6 minutes on 2 CPU cores (the full-width part needs 9 GiB free).
"""
from __future__ import annotations

import statistics
import sys

from benchkit import (ROOT, clock, enough_memory, full_sdxl_model, progress, run_stamp, sampling_parser, setup_host,
                      step_times, tiny_model)

RESULTS = ROOT / "bench" / "RESULTS-klora.txt"
BLOCKS = ("input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1",
          "output_blocks.0.1", "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1", "output_blocks.4.1",
          "output_blocks.5.1")
FULL_MEMORY_GB = 9


def lora(model, rank: int, seed: int, up_std: float):
    """An Adapter with a LoRA on every attention Linear of every attention block of ``model``."""
    import torch

    from blora.adapters.adapter import Adapter, ModuleAdapter
    from blora.host import model_weight_shapes

    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, shape in sorted(model_weight_shapes(model).items()):
        if path.startswith(BLOCKS) and ".attn" in path and len(shape) == 2:
            down = torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5
            modules[path] = ModuleAdapter("lora", {"down": down, "up": torch.randn(shape[0], rank, generator=gen)
                                                   * up_std}, alpha=float(rank))
    return Adapter(modules=modules, source=f"lora{seed}")


def bench_model(label: str, model, context_dim: int, runs: list[tuple[int, int]], repeats: int) -> list[dict]:
    """One row per (latent size, steps) in ``runs``; the clones are built once."""
    from blora.host import patched_clone
    from blora.host.realise import fused_clone

    subject, style = lora(model, 8, 1, 0.02), lora(model, 8, 2, 0.03)
    progress(f"{label}: {len(subject.modules)} layers in each LoRA; building the clones")
    t0 = clock()
    merged = patched_clone(model, [(subject, 1.0), (style, 1.0)])
    merged.patch_model()
    t1 = clock()
    merged.unpatch_model()
    t2 = clock()
    fused, plan = fused_clone(model, subject, style, 1.0, 1.0, "s")
    t3 = clock()
    switches = sum(0 < at <= 1 for at in plan.switch_points().values())
    rows = []
    for latent_hw, steps in runs:
        times: dict[str, list[float]] = {"merge": [], "klora": []}
        for i in range(repeats):
            for name, clone in (("merge", merged), ("klora", fused)):
                progress(f"{label}: latent {latent_hw}, sampling {name}, round {i + 1}/{repeats}")
                times[name] += step_times(clone, latent_hw, context_dim, steps, cfg=2.0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"label": f"{label}, latent {latent_hw}x{latent_hw}, {steps} steps", "layers": len(plan.fused),
                     "switches": switches, "setup_merge": t1 - t0, "setup_klora": t3 - t2,
                     "step_merge": med["merge"], "step_klora": med["klora"], "ratio": med["klora"] / med["merge"]})
    return rows


def table(rows: list[dict], args) -> str:
    import torch

    head = (f"{run_stamp('klora.py')}, {torch.get_num_threads()} thread(s); euler cfg 2, repeats {args.repeats}; "
            f"LoRAs rank 8 on every attention Linear")
    lines = [head, "", f"{'model':52} {'fused':>6} {'switch':>6} {'setup merge':>12} {'setup K-LoRA':>13} "
                       f"{'step merge':>11} {'step K-LoRA':>12} {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['label']:52} {r['layers']:6d} {r['switches']:6d} {r['setup_merge']:11.2f}s "
                     f"{r['setup_klora']:12.2f}s {r['step_merge']:10.3f}s {r['step_klora']:11.3f}s "
                     f"{r['ratio']:6.2f}")
    lines += ["", "fused: layers in both LoRAs (per-step selection); switch: layers that switch subject -> style "
                  "inside the run;",
              "setup merge: patched clone + first patch_model; setup K-LoRA: both deltas via the host's "
              "calculate_weight, top-K sums, gamma, thresholds;",
              "step: median CPU seconds per sampling step once loaded; ratio = K-LoRA / direct merge "
              "(goal <= 1.3)."]
    return "\n".join(lines)


def main() -> None:
    args = sampling_parser(__doc__).parse_args()
    setup_host(args.threads)
    rows = bench_model("tiny SDXL (fp32)", tiny_model(), 64, [(32, 2 * args.steps)], args.repeats)
    if args.tiny_only:
        pass
    elif enough_memory(FULL_MEMORY_GB):
        import torch

        rows += bench_model("full SDXL UNet (bf16)", full_sdxl_model(torch.bfloat16), 2048,
                            [(16, args.steps), (32, args.steps)], args.repeats)
    else:
        progress(f"full SDXL skipped: less than {FULL_MEMORY_GB} GiB of free memory")
    text = table(rows, args)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
