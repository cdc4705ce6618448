"""Apply on FLUX.1 against stock LoraLoaderModelOnly, measured side by side in one run.

Models: the tiny FLUX-architecture test model (fp32; 2 double, 12 single blocks, hidden 64) and a full-width FLUX.1
layout with random weights and few blocks (hidden 3072, 24 heads, context 4096, pooled 768, mlp_ratio 4, bf16;
1 double and 2 single blocks: the per-layer cost of all 57 blocks scales with the block count). Files: a LoRA of
rank 16 on every block Linear, in
- the diffusers / PEFT / ai-toolkit dialect (``transformer.…attn.to_q.lora_A.weight``, q/k/v and proj_mlp split):
  the pack fuses the parts onto the host's qkv / linear1 when it reads the file (one block-diagonal LoRA per fused
  layer), stock ComfyUI adds one offset patch per part;
- the kohya dialect (host names, nothing to fuse).
Timed: read (Load B-LoRA) + apply (Block Weights, every block at 1.0: the patched clone) + the first patch_model,
against stock LoraLoaderModelOnly (file read + patches) + its first patch_model. Patched weights are checked against
stock's (within 1e-5 of the delta's size for fused parts, bit-identical for kohya).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/flux_apply.py [--repeats N] [--tiny-only]``; writes
bench/RESULTS-flux_apply.txt.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchkit import FLUX_DEV, ROOT, clock, fill_random_, progress, run_stamp, setup_host

RESULTS = ROOT / "bench" / "RESULTS-flux_apply.txt"
FULL = dict(FLUX_DEV, depth=1, depth_single_blocks=2)  # FLUX.1 dev's widths, 1 double + 2 single blocks


def full_flux_model(dtype):
    import dataclasses

    import comfy.model_patcher
    import comfy.supported_models
    import torch
    from comfy.ldm.flux.model import FluxParams

    config = dict(FULL)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        config["txt_ids_dims"] = []

    class FullWidthFlux(comfy.supported_models.Flux):
        unet_config = dict(config)

    model_config = FullWidthFlux(dict(config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    fill_random_(model.diffusion_model, dtype)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def block_shapes(model) -> dict:
    from blora.host import model_weight_shapes

    return {p: s for p, s in model_weight_shapes(model).items()
            if p.startswith(("double_blocks.", "single_blocks.")) and len(s) == 2
            and not p.endswith(("norm.query_norm", "norm.key_norm"))}


def time_ours(model, path: Path):
    from blora.formats.files import read_adapter
    from blora.host import patched_clone
    from blora.compose.block_weights import block_weight_parts, parse_block_weights

    t0 = clock()
    adapter = read_adapter(str(path))
    t1 = clock()
    clone = patched_clone(model, block_weight_parts(adapter, parse_block_weights("default=1", adapter.architecture)))
    t2 = clock()
    clone.patch_model()
    t3 = clock()
    return {"read": t1 - t0, "apply": t2 - t1, "patch": t3 - t2}, clone


def time_stock(model, name: str):
    import nodes as host_nodes

    t0 = clock()
    clone = host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    t1 = clock()
    clone.patch_model()
    t2 = clock()
    return {"read": 0.0, "apply": t1 - t0, "patch": t2 - t1}, clone


def bench(label, model, dialect, rank, repeats, loras: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from blora_testkit.flux_dialects import make_flux_state_dict

    shapes = block_shapes(model)
    hidden = shapes["single_blocks.0.linear1"][1]
    sd, _ = make_flux_state_dict(dialect, shapes, rank=rank, seed=1, alpha=None if dialect == "peft" else float(rank))
    name = f"{label.split()[0]}_{dialect}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(loras / name))
    progress(f"{label} {dialect}: {len(sd)} tensors (hidden {hidden}); timing")
    ours, stock = [], []
    for _ in range(repeats):
        got = {}
        for who, runner, arg, acc in (("ours", time_ours, loras / name, ours), ("stock", time_stock, name, stock)):
            times, clone = runner(model, arg)
            acc.append(times)
            state = clone.model.state_dict()
            got[who] = {k: state[k].detach().float().clone() for k in clone.patches}
            clone.unpatch_model()
        assert got["ours"].keys() == got["stock"].keys()
        base = model.model.state_dict()
        for k in got["ours"]:
            delta = (got["stock"][k] - base[k].float()).abs().max().item()
            err = (got["ours"][k] - got["stock"][k]).abs().max().item()
            limit = 0.0 if dialect == "kohya" and model.model.diffusion_model.img_in.weight.dtype == torch.float32 \
                else 1e-2 * delta + 1e-6
            if err > limit:
                raise SystemExit(f"{label} {dialect}: {k} differs from stock by {err} (delta {delta})")
    med = statistics.median
    row = {"label": f"{label} {dialect}", "tensors": len(sd), "modules": len(got["ours"])}
    for who, runs in (("ours", ours), ("stock", stock)):
        row.update({f"{who}_{k}": med(r[k] for r in runs) for k in ("read", "apply", "patch")})
    return row


def report(rows, header) -> str:
    cols = f"{'model, file':<34}{'read':>8}{'apply':>8}{'stock':>8}{'r+a/':>7}{'1st patch':>10}{'stock':>8}{'ratio':>7}"
    lines = [header, "", cols, f"{'':<34}{'':>8}{'':>8}{'':>8}{'stock':>7}"]
    for r in rows:
        lines.append(f"{r['label']:<34}{r['ours_read']:>7.3f}s{r['ours_apply']:>7.3f}s{r['stock_apply']:>7.3f}s"
                     f"{(r['ours_read'] + r['ours_apply']) / r['stock_apply']:>7.2f}"
                     f"{r['ours_patch']:>9.3f}s{r['stock_patch']:>7.3f}s{r['ours_patch'] / r['stock_patch']:>7.2f}")
    lines += ["", "CPU seconds of the process, medians over repeats, ours and stock alternating. read: Load B-LoRA",
              "(for peft: fusing the split q/k/v/proj_mlp parts onto the host's layers); apply: Block Weights at 1.0",
              "(the patched clone); stock: LoraLoaderModelOnly on the same file (read + patches); 1st patch: the",
              "clone's first patch_model (W + dW computed by the host). Ratio < 1: ours cheaper. Patched weights",
              "checked against stock's in every repeat (fp32 kohya: bit-identical; fused parts and bf16: within 1%",
              "of the delta: one matmul of the fused LoRA against stock's per-part matmuls)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup_host(args.threads)
    import folder_paths
    import torch

    from blora_testkit.tiny_flux import tiny_flux_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        loras = Path(tmp) / "loras"
        loras.mkdir()
        folder_paths.folder_names_and_paths["loras"] = ([str(loras)], {".safetensors"})
        models = [("tiny FLUX (fp32)", tiny_flux_model(0), 2 * args.repeats)]
        if not args.tiny_only:
            progress("building the full-width FLUX layout (bf16, 1 double + 2 single blocks)")
            models.append(("full-width FLUX 1+2 blocks (bf16)", full_flux_model(torch.bfloat16), args.repeats))
        for label, model, repeats in models:
            for dialect in ("peft", "kohya"):
                if hasattr(folder_paths, "filename_list_cache"):
                    folder_paths.filename_list_cache.clear()
                rows.append(bench(label, model, dialect, 16, repeats, loras))
    header = (f"{run_stamp('flux_apply.py')}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load average "
              f"{os.getloadavg()[0]:.1f}; rank 16 on every block Linear; repeats {args.repeats}; tensors: "
              + ", ".join(f"{r['label']}: {r['tensors']}" for r in rows))
    text = report(rows, header)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
