"""Validation previews: what sampling content only, style only and both during training adds to a run.

One process, the tiny SDXL test model (fp32), one image, the same settings; variants one after the other:

- off: ``train_blora`` without previews;
- on: the same run with a ``PreviewSampler`` as its ``on_step`` (rows at step 0, every ``--every`` steps and at
  the end; three views per row, each ``--sample-steps`` sampler steps at cfg 5 and the VAE decode);
- seeds=2 off / on: ``train_blora_seeds`` with two seeds (one row per seed).

The runs are short (100 steps, a row every 25, 20 sampler steps per view), so rows weigh far more here than at the
node's defaults (1000 steps, a row every 250). Reported: CPU seconds of the whole job (this process, all threads),
the ratio on/off, the seconds the previews themselves measured (``PreviewSampler.seconds``, wall time), what one row
costs in training steps ((CPU on - CPU off) / rows, against CPU off / steps; that step cost includes loading and
saving, so a row's cost in steps is if anything understated) and the share that gives at the node's defaults (5
rows in 1000 steps). The trained weights are checked equal with previews on and off.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python bench/previews.py [--steps N] [--every N] [--sample-steps N]``;
prints a table and writes it to bench/RESULTS-previews.txt.
"""
from __future__ import annotations

import argparse
import tempfile

from benchkit import ROOT, clock, progress, run_stamp, setup_host

RESULTS = ROOT / "bench" / "RESULTS-previews.txt"
DEFAULT_STEPS, DEFAULT_ROWS = 1000, 5  # the node's defaults: 1000 steps, a row at 0, 250, 500, 750, 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup_host(args.threads)
    import comfy.model_management
    import folder_paths
    import torch

    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="blora-bench-previews-"))
    from blora.formats.files import read_adapter
    from blora.host.train import train_blora
    from blora.host.train_previews import PreviewSampler, Validation
    from blora.host.train_seeds import train_blora_seeds
    from blora.train.previews import ValidationSettings
    from blora.train.recipe import TrainConfig
    from blora_testkit.tiny_sdxl import tiny_conditioning, tiny_sdxl_model
    from blora_testkit.tiny_vae import tiny_vae

    with torch.inference_mode():
        model = tiny_sdxl_model(0)
    vae = tiny_vae(0)
    image = torch.rand(1, args.res, args.res, 3, generator=torch.Generator().manual_seed(0))
    cond = tiny_conditioning(0)
    settings = ValidationSettings(every=args.every, steps=args.sample_steps, cfg=5.0, width=args.res, height=args.res)
    views = ("content", "style", "both")
    validation = Validation(settings, {v: tiny_conditioning(10 + i) for i, v in enumerate(views)},
                            tiny_conditioning(20))

    def config(**kw):
        return TrainConfig(rank=4, alpha=4.0, steps=args.steps, learning_rate=1e-4, resolution=args.res,
                           training_dtype="fp32", save_precision="fp32", **kw)

    def single(previews):
        return [train_blora(model, vae, image, cond, config(), filename_prefix="bench/single", on_step=previews)]

    def seeds(previews):
        return train_blora_seeds(model, vae, image, cond, config(seeds=2), filename_prefix="bench/seeds",
                                 on_step=previews)

    rows, costs = [], []
    with torch.inference_mode():
        single(None)  # first-call costs
        for label, job, seed_list in (("seeds=1", single, [0]), ("seeds=2", seeds, [0, 1])):
            files = {}
            for state in ("off", "on"):
                progress(f"{label}: previews {state}")
                comfy.model_management.unload_all_models()
                previews = PreviewSampler(validation, vae, seed_list) if state == "on" else None
                t0 = clock()
                outs = job(previews)
                seconds = clock() - t0
                files[state] = [read_adapter(o.path) for o in outs]
                rows.append({"run": label, "previews": state, "cpu": seconds,
                             "rows": len(previews.rows) if previews else 0,
                             "preview_s": previews.seconds if previews else 0.0})
            same = all(torch.equal(t, b.modules[p].tensors[n]) for a, b in zip(files["off"], files["on"])
                       for p, m in a.modules.items() for n, t in m.tensors.items())
            rows[-1]["same"] = rows[-2]["same"] = same
            rows[-1]["ratio"], rows[-2]["ratio"] = rows[-1]["cpu"] / rows[-2]["cpu"], 1.0
            per_row = (rows[-1]["cpu"] - rows[-2]["cpu"]) / rows[-1]["rows"] * len(seed_list)  # one row per seed
            per_step = rows[-2]["cpu"] / args.steps
            costs.append((label, per_row / per_step, DEFAULT_ROWS * per_row / (DEFAULT_STEPS * per_step)))
    head = (f"{run_stamp('previews.py')}, {torch.get_num_threads()} thread(s); tiny SDXL fp32, rank 4, {args.res} px, "
            f"{args.steps} steps; previews every {args.every} steps, {args.sample_steps} sampler steps, cfg 5, "
            f"{args.res} px, 3 views")
    lines = [head, "", f"{'run':8} {'previews':8} {'rows':>4} {'CPU s':>8} {'ratio':>6} {'preview s':>10} "
                       f"{'weights on = off':>17}"]
    for r in rows:
        lines.append(f"{r['run']:8} {r['previews']:8} {r['rows']:4d} {r['cpu']:8.2f} {r['ratio']:6.2f} "
                     f"{r['preview_s']:10.2f} {str(r['same']):>17}")
    lines += [""] + [f"{label}: one preview step (a row per seed) costs {steps:.0f} training steps; at the node's "
                     f"defaults ({DEFAULT_STEPS} steps, {DEFAULT_ROWS} rows) previews add {share:.0%}"
                     for label, steps, share in costs]
    lines += ["", "CPU s: process CPU seconds of the whole job (VAE encode, load, training, previews, saving);",
              "ratio: against the same run without previews; preview s: wall seconds the previews took, as the",
              "node's summary reports them; weights on = off: every saved tensor bit-identical with previews on."]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
