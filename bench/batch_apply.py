"""B-LoRA Batch Apply: a grid of four style B-LoRAs sampled in one pass against four separate Apply + sampler runs.

Four B-LoRAs (rank 64, style block, like the original trainer's) share one content B-LoRA:

- separate: for each style, Apply B-LoRA (``patched_clone``) and a sampling run of one image;
- batched: ``batched_clone`` with the four entries (content patched into the weights once, the style block routed
  per image) and one sampling run of a batch of four.

Both sample the same steps (euler, cfg 2). Reported: CPU seconds of the whole job (building the clones, loading and
patching, sampling), the steady per-step time, their ratios, and the process's peak RSS growth during each, for the
tiny SDXL test model (fp32) and a full-width SDXL UNet with random weights (bf16) when memory allows.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/batch_apply.py [--repeats N] [--steps N] [--tiny-only]``.
Writes the table to bench/RESULTS-batch_apply.txt. About 4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import resource
import statistics
import sys

from benchkit import (ROOT, clock, enough_memory, full_sdxl_model, progress, run_stamp, sampling_parser, setup_host,
                      tiny_model)

RESULTS = ROOT / "bench" / "RESULTS-batch_apply.txt"
FULL_MEMORY_GB = 10
ENTRIES = 4


def adapter(model, role: str, rank: int = 64, seed: int = 0):
    """A rank-64 LoRA on the attention Linears of one role's block (the original B-LoRA targets)."""
    import torch

    from blora.adapters.adapter import Adapter, ModuleAdapter
    from blora.arch.sdxl import ROLES
    from blora.host import model_weight_shapes

    gen = torch.Generator().manual_seed(seed)
    prefix = ROLES[role] + ".transformer_blocks."
    modules = {}
    for path, shape in sorted(model_weight_shapes(model).items()):
        if path.startswith(prefix) and ".attn" in path and len(shape) == 2:
            down = torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5
            modules[path] = ModuleAdapter("lora", {"down": down, "up": torch.randn(shape[0], rank, generator=gen)
                                                   * 0.01}, alpha=float(rank))
    return Adapter(modules=modules, source=f"{role}{seed}")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sample(model, batch: int, latent_hw: int, context_dim: int, steps: int) -> list[float]:
    """Sampling of ``batch`` images; returns the CPU clock at each step."""
    import comfy.sample
    import torch

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 4, latent_hw, latent_hw, generator=gen)
    cond = [[torch.randn(1, 77, context_dim, generator=gen),
             {"pooled_output": torch.randn(1, 1280, generator=gen), "width": 8 * latent_hw,
              "height": 8 * latent_hw}]]
    stamps = []
    with torch.inference_mode():
        comfy.sample.sample(model, noise, steps, 2.0, "euler", "normal", cond, cond, torch.zeros_like(noise),
                            callback=lambda *a: stamps.append(clock()), disable_pbar=True, seed=0)
    return stamps


def bench_model(label: str, model, context_dim: int, latent_hw: int, steps: int, repeats: int) -> dict:
    import comfy.model_management

    from blora.host import patched_clone
    from blora.host.realise import batched_clone

    content = adapter(model, "content", seed=100)
    styles = [adapter(model, "style", seed=i) for i in range(ENTRIES)]
    entries = [[(content, 1.0), (style, 1.0)] for style in styles]
    progress(f"{label}: warm-up")
    sample(model, ENTRIES, latent_hw, context_dim, 2)  # first-call allocations out of the measured jobs
    totals: dict[str, list[float]] = {"separate": [], "batched": []}
    steps_: dict[str, list[float]] = {"separate": [], "batched": []}
    rss: dict[str, int] = {}
    for i in range(repeats):
        for name in ("separate", "batched"):
            progress(f"{label}: {name}, round {i + 1}/{repeats}")
            comfy.model_management.unload_all_models()
            before, t0 = peak_rss(), clock()
            if name == "separate":
                step = []
                for parts in entries:
                    stamps = sample(patched_clone(model, parts), 1, latent_hw, context_dim, steps)
                    step += [b - a for a, b in zip(stamps, stamps[1:])]
                steps_[name].append(statistics.median(step) * ENTRIES)  # four images' worth of steps
            else:
                stamps = sample(batched_clone(model, entries), ENTRIES, latent_hw, context_dim, steps)
                steps_[name].append(statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
            totals[name].append(clock() - t0)
            rss[name] = max(rss.get(name, 0), peak_rss() - before)
    comfy.model_management.unload_all_models()
    med = {k: statistics.median(v) for k, v in totals.items()}
    step = {k: statistics.median(v) for k, v in steps_.items()}
    return {"label": f"{label}, {steps} steps", "separate": med["separate"], "batched": med["batched"],
            "ratio": med["batched"] / med["separate"], "step_separate": step["separate"],
            "step_batched": step["batched"], "step_ratio": step["batched"] / step["separate"],
            "rss_separate": rss["separate"], "rss_batched": rss["batched"]}


def table(rows: list[dict], args) -> str:
    import torch

    head = (f"{run_stamp('batch_apply.py')}, {torch.get_num_threads()} thread(s); euler cfg 2, repeats "
            f"{args.repeats}; {ENTRIES} entries: one content B-LoRA + one of {ENTRIES} style B-LoRAs, rank 64")
    lines = [head, "", f"{'model':44} {'separate':>9} {'batched':>9} {'ratio':>6} {'step sep':>9} {'step bat':>9} "
                       f"{'ratio':>6} {'rss sep':>8} {'rss bat':>8}"]
    for r in rows:
        lines.append(f"{r['label']:44} {r['separate']:8.2f}s {r['batched']:8.2f}s {r['ratio']:6.2f} "
                     f"{r['step_separate']:8.3f}s {r['step_batched']:8.3f}s {r['step_ratio']:6.2f} "
                     f"{r['rss_separate'] / 2 ** 20:6.0f}MB {r['rss_batched'] / 2 ** 20:6.0f}MB")
    lines += ["", "separate: 4 x (Apply B-LoRA + sampling 1 image); batched: Batch Apply + sampling a batch of 4;",
              "columns 2-4: CPU seconds of the whole job (clones, load/patch, sampling) and batched / separate;",
              "step: median CPU seconds of one sampling step for all four images (separate: 4 x its step);",
              "rss: growth of the process's peak resident memory during the job (0: stayed under an earlier peak).",
              "CPU has no batching gain to speak of; on a GPU one batch of 4 fills the device where 4 runs of 1",
              "do not (not measured here: no GPU on this machine)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = sampling_parser(__doc__).parse_args()
    setup_host(args.threads)
    import torch

    rows = [bench_model("tiny SDXL (fp32, latent 32x32)", tiny_model(), 64, 32, args.steps, args.repeats)]
    if not args.tiny_only:
        if enough_memory(FULL_MEMORY_GB):
            rows.append(bench_model("full SDXL UNet (bf16, latent 16x16)", full_sdxl_model(torch.bfloat16), 2048,
                                    16, args.steps, args.repeats))
        else:
            progress(f"full SDXL skipped: needs {FULL_MEMORY_GB} GB free")
    text = table(rows, args)
    print(text, end="")
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
