"""Apply B-LoRA against stock LoraLoaderModelOnly, measured side by side in one run.

For the tiny SDXL-architecture test model and a full-width SDXL UNet with random weights (the real SDXL
unet_config, fp16 weights by default), with a B-LoRA in the original diffusers dialect (content and style blocks;
at full width rank 64, 320 tensors, 28.2 M parameters):

- patch: Load B-LoRA (read the original file) + Apply B-LoRA (patched clone), and the first ``patch_model``
  (where the host computes the patched weights), against stock ``LoraLoaderModelOnly`` on the same adapter
  converted to the kohya dialect (which stock ComfyUI reads), + its first ``patch_model``;
- sampling: seconds per step after Apply against the base model (same seed, latent and conditioning).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/apply.py [--repeats N] [--full-dtype fp16|fp32] [--tiny-only]``.
Prints a table and writes it to bench/RESULTS-apply.txt. About 2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchkit import ROOT, clock, full_sdxl_model, progress, run_stamp, setup_host, step_times

RESULTS = ROOT / "bench" / "RESULTS-apply.txt"
ATTN_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def write_original_blora(path: Path, shapes: dict, rank: int, seed: int = 1) -> int:
    """Content + style blocks in the original B-LoRA dialect (``unet.up_blocks.0.attentions.{0,1}.…lora.down``)."""
    import torch
    from safetensors.torch import save_file

    from blora.arch.sdxl import role_block

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for role in ("content", "style"):
        block = role_block(role)
        for path_ in sorted(p for p in shapes if p.startswith(block.ldm + ".transformer_blocks.")
                            and p.endswith(ATTN_LINEARS)):
            out_f, in_f = shapes[path_][:2]
            key = "unet." + block.diffusers + path_[len(block.ldm):]
            sd[key + ".lora.down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
            sd[key + ".lora.up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    save_file(sd, str(path))
    return len(sd)


def write_kohya_twin(original: Path, kohya: Path) -> None:
    from safetensors.torch import save_file

    from blora.formats.files import read_adapter
    from blora.formats.keys import from_canonical

    save_file({k: v.contiguous() for k, v in from_canonical(read_adapter(str(original)), "kohya").items()},
              str(kohya))


def time_ours(model, path: Path) -> tuple[dict, object]:
    """Load B-LoRA (read) + Apply B-LoRA (patched clone) + the clone's first patch_model."""
    from blora.formats.files import read_adapter
    from blora.host import patched_clone
    from blora.compose.block_weights import role_parts

    t0 = clock()
    adapter = read_adapter(str(path))
    t1 = clock()
    clone = patched_clone(model, role_parts({"content": (adapter, 1.0), "style": (adapter, 1.0)}))
    t2 = clock()
    clone.patch_model()
    t3 = clock()
    return {"read": t1 - t0, "apply": t2 - t1, "patch": t3 - t2}, clone


def time_stock(model, name: str) -> tuple[dict, object]:
    """Stock LoraLoaderModelOnly (reads the file and adds the patches) + the clone's first patch_model."""
    import nodes as host_nodes

    t0 = clock()
    clone = host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    t1 = clock()
    clone.patch_model()
    t2 = clock()
    return {"read": 0.0, "apply": t1 - t0, "patch": t2 - t1}, clone


def patched_weights(clone, keys) -> dict:
    sd = clone.model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


def bench_model(label, model, rank, latent_hw, context_dim, repeats, sample_repeats, steps, workdir: Path) -> dict:
    import folder_paths

    from blora.host import model_weight_shapes

    original, kohya = workdir / f"{label}_original.safetensors", workdir / "loras" / f"{label}_kohya.safetensors"
    n_tensors = write_original_blora(original, model_weight_shapes(model), rank)
    write_kohya_twin(original, kohya)
    progress(f"{label}: files written ({n_tensors} tensors); timing patching")
    folder_paths.folder_names_and_paths["loras"] = ([str(kohya.parent)], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    ours, stock, check = [], [], None
    for _ in range(repeats):
        for runner, arg, acc in ((time_ours, original, ours), (time_stock, kohya.name, stock)):
            times, clone = runner(model, arg)
            acc.append(times)
            keys = sorted(clone.patches)
            weights = patched_weights(clone, keys)
            check = weights if check is None else check
            same = all(weights[k].equal(check[k]) for k in keys) and len(keys) == len(check)
            clone.unpatch_model()
            if not same:
                raise SystemExit(f"{label}: patched weights differ between Apply B-LoRA and LoraLoaderModelOnly")
    _, patched = time_ours(model, original)
    patched.unpatch_model()
    base_steps, patched_steps = [], []
    for i in range(sample_repeats):
        progress(f"{label}: sampling, repeat {i + 1}/{sample_repeats}")
        base_steps += step_times(model, latent_hw, context_dim, steps, cfg=1.0)
        patched_steps += step_times(patched, latent_hw, context_dim, steps, cfg=1.0)
    med = statistics.median
    row = {"label": label, "tensors": n_tensors, "modules": len(check), "latent": latent_hw,
           "base_step": med(base_steps), "patched_step": med(patched_steps)}
    for who, runs in (("ours", ours), ("stock", stock)):
        row.update({f"{who}_{k}": med(r[k] for r in runs) for k in ("read", "apply", "patch")})
    return row


def report(rows: list[dict], header: str) -> str:
    cols = (f"{'model':<24}{'read':>8}{'apply':>8}{'stock':>8}{'apply/':>8}{'r+a/':>7}{'1st patch':>10}"
            f"{'stock':>8}{'ratio':>7}{'step base':>10}{'after':>8}{'ratio':>7}")
    lines = [header, "", cols, f"{'':<24}{'':>8}{'':>8}{'':>8}{'stock':>8}{'stock':>7}"]
    for r in rows:
        lines.append(f"{r['label']:<24}{r['ours_read']:>7.3f}s{r['ours_apply']:>7.3f}s{r['stock_apply']:>7.3f}s"
                     f"{r['ours_apply'] / r['stock_apply']:>8.2f}"
                     f"{(r['ours_read'] + r['ours_apply']) / r['stock_apply']:>7.2f}"
                     f"{r['ours_patch']:>9.3f}s{r['stock_patch']:>7.3f}s{r['ours_patch'] / r['stock_patch']:>7.2f}"
                     f"{r['base_step']:>9.3f}s{r['patched_step']:>7.3f}s{r['patched_step'] / r['base_step']:>7.2f}")
    lines += ["", "CPU seconds of the process (all threads), medians over repeats, ours and stock alternating.",
              "read: Load B-LoRA reading the original-dialect file (header check, NaN/Inf scan, dialect mapping);",
              "apply: Apply B-LoRA (content 1.0, style 1.0) giving the patched clone; stock: LoraLoaderModelOnly",
              "on the same adapter in the kohya dialect (file read + patches); r+a/stock: read + apply vs stock;",
              "1st patch: the clone's first patch_model (the host computes W + s·dW), ours vs stock's;",
              "step: seconds per sampling step (euler, cfg 1) after Apply vs the base model. Ratio < 1: ours cheaper.",
              "Patched weights were checked bit-identical to stock's in every repeat."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sample-repeats", type=int, default=3, help="sampling runs per model (full SDXL)")
    ap.add_argument("--full-dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--full-latent", type=int, default=16, help="latent side for the full model (16 = 128 px)")
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: CPU time is not inflated by spinning threads on a shared machine)")
    args = ap.parse_args()
    setup_host(args.threads)
    import torch

    from blora_testkit.tiny_sdxl import CONTEXT_DIM, tiny_sdxl_model

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.full_dtype]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        work = Path(tmp)
        (work / "loras").mkdir()
        rows.append(bench_model("tiny SDXL (fp32)", tiny_sdxl_model(0), 16, 32, CONTEXT_DIM, 2 * args.repeats,
                                2 * args.repeats, args.steps, work))
        if not args.tiny_only:
            progress(f"building the full SDXL UNet ({args.full_dtype})")
            rows.append(bench_model(f"full SDXL UNet ({args.full_dtype})", full_sdxl_model(dtype), 64,
                                    args.full_latent, 2048, args.repeats, args.sample_repeats, args.steps, work))
    header = (f"{run_stamp('apply.py')}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
              f"load average {os.getloadavg()[0]:.1f}; "
              f"full model latent {args.full_latent}x{args.full_latent}, {args.steps} steps, "
              f"repeats {args.repeats}; tensors in the original files: "
              + ", ".join(f"{r['label']}: {r['tensors']}" for r in rows))
    text = report(rows, header)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
