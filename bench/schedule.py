"""B-LoRA Strength Schedule: a non-constant schedule against a constant apply, measured side by side in one run.

A B-LoRA (content and style blocks, rank 64 like the original trainer's) is applied to the same model two ways:

- constant: ``scheduled_clone`` with constant schedules, which is exactly Apply B-LoRA (ordinary static patches);
- scheduled: content constant, style ``0:0, 0.6:1`` (style brought in late): the style block's layers get a
  weight function W + s(t)·D; the content block stays an ordinary patch.

Reported: the median CPU seconds per sampling step once loaded (euler, cfg 2) and their ratio, for the tiny SDXL
test model (fp32) and a full-width SDXL UNet with random weights (bf16) when memory allows.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/schedule.py [--repeats N] [--steps N] [--tiny-only]``.
Writes the table to bench/RESULTS-schedule.txt. About 2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import statistics
import sys

from benchkit import (ROOT, clock, enough_memory, full_sdxl_model, progress, run_stamp, sampling_parser, setup_host,
                      step_times, tiny_model)

RESULTS = ROOT / "bench" / "RESULTS-schedule.txt"
FULL_MEMORY_GB = 9
STYLE_LATE = "0:0, 0.6:1"


def blora(model, rank: int = 64, seed: int = 3):
    """An Adapter on the content and style blocks' attention Linears (the original B-LoRA targets)."""
    import torch

    from blora.adapters.adapter import Adapter, ModuleAdapter
    from blora.arch.sdxl import ROLES
    from blora.host import model_weight_shapes

    gen = torch.Generator().manual_seed(seed)
    prefixes = tuple(ROLES[r] + ".transformer_blocks." for r in ("content", "style"))
    modules = {}
    for path, shape in sorted(model_weight_shapes(model).items()):
        if path.startswith(prefixes) and ".attn" in path and len(shape) == 2:
            down = torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5
            modules[path] = ModuleAdapter("lora", {"down": down, "up": torch.randn(shape[0], rank, generator=gen)
                                                   * 0.01}, alpha=float(rank))
    return Adapter(modules=modules, source="blora")


def bench_model(label: str, model, context_dim: int, latent_hw: int, steps: int, repeats: int) -> dict:
    from blora.host.compat import weight_functions
    from blora.host.realise import scheduled_clone
    from blora.compose.strength_schedule import parse_schedule

    adapter = blora(model)
    one = parse_schedule("1.0")
    t0 = clock()
    constant = scheduled_clone(model, {"content": (adapter, one), "style": (adapter, one)})
    t1 = clock()
    scheduled = scheduled_clone(model, {"content": (adapter, one), "style": (adapter, parse_schedule(STYLE_LATE))})
    t2 = clock()
    times: dict[str, list[float]] = {"constant": [], "scheduled": []}
    for i in range(repeats):
        for name, clone in (("constant", constant), ("scheduled", scheduled)):
            progress(f"{label}: sampling {name}, round {i + 1}/{repeats}")
            times[name] += step_times(clone, latent_hw, context_dim, steps, cfg=2.0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"label": f"{label}, {steps} steps", "layers": len(weight_functions(scheduled)),
            "setup_constant": t1 - t0, "setup_scheduled": t2 - t1, "step_constant": med["constant"],
            "step_scheduled": med["scheduled"], "ratio": med["scheduled"] / med["constant"]}


def table(rows: list[dict], args) -> str:
    import torch

    head = (f"{run_stamp('schedule.py')}, {torch.get_num_threads()} thread(s); euler cfg 2, repeats {args.repeats}; "
            f"B-LoRA rank 64 (content + style); style schedule '{STYLE_LATE}'")
    lines = [head, "", f"{'model':44} {'sched':>6} {'setup const':>12} {'setup sched':>12} {'step const':>11} "
                       f"{'step sched':>11} {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['label']:44} {r['layers']:6d} {r['setup_constant']:11.2f}s {r['setup_scheduled']:11.2f}s"
                     f" {r['step_constant']:10.3f}s {r['step_scheduled']:10.3f}s {r['ratio']:6.2f}")
    lines += ["", "sched: layers with a weight function (the style block only; content stays a static patch);",
              "setup: building the clone (scheduled: the style deltas via the host's calculate_weight);",
              "step: median CPU seconds per sampling step once loaded; ratio = scheduled / constant apply."]
    return "\n".join(lines)


def main() -> None:
    args = sampling_parser(__doc__).parse_args()
    setup_host(args.threads)
    rows = [bench_model("tiny SDXL (fp32, latent 32x32)", tiny_model(), 64, 32, args.steps * 2, args.repeats)]
    if args.tiny_only:
        pass
    elif enough_memory(FULL_MEMORY_GB):
        import torch

        rows.append(bench_model("full SDXL UNet (bf16, latent 16x16)", full_sdxl_model(torch.bfloat16), 2048, 16,
                                args.steps, args.repeats))
    else:
        progress(f"full SDXL skipped: less than {FULL_MEMORY_GB} GiB of free memory")
    text = table(rows, args)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
