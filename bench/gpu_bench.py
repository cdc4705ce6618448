"""GPU benchmark of Train B-LoRA (issues 16, 17): speed and VRAM at 1024 px on a full-width SDXL UNet, against the
minimal loop and the host's own trainer, with the host's dynamic VRAM loader on and off; and on the full FLUX.1 dev
model against the minimal loop.

    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_bench.py [--out bench/RESULTS-gpu-train.txt]
    COMFYUI_PATH=... python bench/gpu_bench.py --sections flux --flux-timeout 150   # the FLUX section alone
    COMFYUI_PATH=... python bench/gpu_bench.py --device cpu --toy      # a dry run of the whole script on the CPU

Model: a full-width SDXL UNet (the real unet_config) with random weights, bf16, made as a checkpoint loader makes it
(``gpu_check._loaded_patcher``: under inference mode, the dynamic patcher where it is on); one 1024 px image
(a random image through the test kit's VAE), random 2048-wide text context; rank 64, the default blocks
(content+style), AdamW, lr 1e-4. Measured after ``--warmup`` steps, over ``--steps`` steps, the device
synchronised at both ends of the window:

- ours (Train B-LoRA through ``blora.host.train.train_blora``): each ``gradient_checkpointing`` mode, offload off
  and on;
- the minimal loop (``bench/minimal_train.py``: plain torch, the same targets, rank, dtype and latent; trained
  transformer blocks checkpointed, and not);
- the host's TrainLoraNode (``benchkit.host_train_lora``; a LoRA on every layer, as stock trains), bypass mode off
  and on, at each ``--host-depths`` checkpoint depth (the best is reported);
- the VRAM table: ours, each checkpointing mode, at 512, 768 and 1024 px (``--table-steps`` steps each).

FLUX.1 (issue 17; its own process, capped by ``--flux-timeout``; static loader only): the full FLUX.1 dev config
(``benchkit.FLUX_DEV``: 19 double + 38 single blocks, hidden 3072, guidance embedding) with random bf16 weights made
on the GPU (``benchkit.flux_model``, under inference mode as a loader gives them; no checkpoint file); one 1024 px
image through the test kit's 16-channel VAE (latent 16 x 128 x 128, packed 2 x 2: 4096 image tokens), random T5
context (512 x 4096), pooled CLIP-L (768) and guidance 3.5; rank ``--rank`` (64), the default blocks (content+style:
linear1 and linear2 of all 38 single blocks, SplitFlux's presets), AdamW, lr 1e-4:

- ours (``train_blora``, as for SDXL) with checkpointing ``trained blocks`` (the default) and ``off``;
- the minimal loop (``minimal_train.train_flow``: plain torch, the same targets, rank, dtype and latent, flow
  matching against the velocity) without checkpointing and with its trained blocks checkpointed;
- each on a fresh model where the one before was the minimal loop's (it rebuilds the targets in place).

Each of the two SDXL loader modes (``static``: ``--disable-dynamic-vram``; ``dynamic``: booted as main.py boots it,
``gpu_check.boot``) runs in its own process, every job of it in turn on one model; results are appended as JSON
lines, so a process that runs out of time keeps what finished; ``--sections`` picks SDXL, FLUX or both. Figures:
s/step, the 1000-step time it implies, peak VRAM (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, the model's weights included; on the CPU dry run the peak RSS the job adds). Goals
(issue 16, SDXL): 1000 steps at 1024 px in at most 2 minutes on an H100/H200-class GPU, the default's peak VRAM at
most 10 GB and its step at most 1.1x the minimal loop's. FLUX prints the same ratios; there the default recomputes
the trained single blocks, most of the model, so its like-for-like figure is the one against the minimal loop
checkpointing the same blocks (``off``: at most 1.05x). Prints the tables and writes them to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchkit import status_kb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS-gpu-train.txt"
MODES = ("off", "trained blocks", "all above")
SDXL_JOB_GROUPS = ("ours", "offload", "host", "table", "minimal")
DEFAULT_MODE = "trained blocks"
GIB = 2 ** 30
SECTIONS = ("sdxl", "flux")
FLUX_TOY_TOKENS = 8  # T5 tokens of the toy run (the full run: 512)
FLUX_GUIDANCE = 3.5


# ------------------------------------------------------------------------------------------------- the jobs
def jobs_for(loader: str, ns) -> list[dict]:
    """What one loader process runs, in order: the main ratio's figures first (ours in the default mode and ``off``,
    the minimal loop without and with checkpointing), so a process cut short by its timeout still gives them; the
    worker rebuilds the model after each minimal-loop job (it replaces the targets in place)."""
    if loader == "flux":
        res, steps = ns.flux_res, ns.flux_steps
        return [dict(kind="ours", gc=DEFAULT_MODE, offload=False, res=res, steps=steps),
                dict(kind="minimal", gc="off", res=res, steps=steps),
                dict(kind="ours", gc="off", offload=False, res=res, steps=steps),
                dict(kind="minimal", gc=DEFAULT_MODE, res=res, steps=steps)]
    res = ns.res
    first = (DEFAULT_MODE, "off")  # the main ratio's figures first, so a process cut short by its timeout has them
    jobs = [dict(kind="ours", gc=m, offload=False, res=res, steps=ns.steps) for m in first]
    if loader == "static":
        jobs += [dict(kind="minimal", gc=g, res=res, steps=ns.steps) for g in ("off", DEFAULT_MODE)]
    jobs += [dict(kind="ours", gc=m, offload=False, res=res, steps=ns.steps) for m in MODES if m not in first]
    jobs += [dict(kind="ours", gc=m, offload=True, res=res, steps=ns.steps)
             for m in (MODES if loader == "static" else (DEFAULT_MODE,))]
    depths = ns.host_depths if loader == "static" else ns.host_depths[:1]
    jobs += [dict(kind="host", bypass=b, depth=d, res=res, steps=ns.steps) for b in (False, True) for d in depths]
    if loader == "static":
        jobs += [dict(kind="ours", gc=m, offload=False, res=r, steps=ns.table_steps, table=True)
                 for r in ns.table_res if r != res for m in MODES]
    return [j for j in jobs if job_group(j) in ns.sdxl_jobs]


def job_group(job: dict) -> str:
    """The ``--sdxl-jobs`` group a job belongs to: ours, offload, host, table or minimal."""
    if job["kind"] == "ours":
        return "table" if job.get("table") else "offload" if job["offload"] else "ours"
    return job["kind"]


def job_name(job: dict) -> str:
    if job["kind"] == "ours":
        return f"ours, {job['gc']}{', offload' if job['offload'] else ''}"
    if job["kind"] == "host":
        return f"host TrainLoraNode, bypass {'on' if job['bypass'] else 'off'}, checkpoint_depth {job['depth']}"
    return f"minimal loop, {'trained blocks checkpointed' if job['gc'] != 'off' else 'no checkpointing'}"


# ----------------------------------------------------------------------------------------------- the worker
class Window:
    """Wall time of the measured steps: device synchronised when step ``warmup`` ends and when the last ends."""

    def __init__(self, device, warmup: int, total: int):
        self.device, self.warmup, self.total = device, warmup, total
        self.done, self.start, self.end = 0, None, None

    def _now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self, done: int | None = None) -> None:
        self.done = self.done + 1 if done is None else done
        if self.done == self.warmup:
            self.start = self._now()
        elif self.done == self.total:
            self.end = self._now()

    def per_step(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return (self.end - self.start) / (self.total - self.warmup)


def _reset_memory(device) -> int:
    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    mm.soft_empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return status_kb("VmRSS")


def _peak_gib(device, rss0_kb: int) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return max(0, status_kb("VmHWM") - rss0_kb) / 2 ** 20


def _patcher(make, init):
    """A patcher as the host's checkpoint loader makes one: ``gpu_check._loaded_patcher`` where the host has the
    dynamic loader's memory management (0.33+), else the model made, filled and wrapped under inference mode with
    the host's load and offload devices (0.3.64)."""
    import importlib.util

    import comfy.model_management as mm
    import comfy.model_patcher
    import gpu_check
    import torch

    if importlib.util.find_spec("comfy.memory_management") is not None:
        return gpu_check._loaded_patcher(make, init)
    with torch.inference_mode():
        model = make()
        init(model.diffusion_model)
        return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                offload_device=mm.unet_offload_device())


def build(ns):
    """(patcher factory, vae, context dim, dtype name): the full-width SDXL UNet in bf16, or the tiny test model
    in fp32 (--toy)."""
    import comfy.supported_models
    import torch

    from blora_testkit.tiny_vae import tiny_vae

    if ns.toy:
        from blora_testkit.tiny_sdxl import init_weights_, tiny_model_config

        def make_tiny():
            config = tiny_model_config()
            config.set_inference_dtype(torch.float32, None)
            return config.get_model({})

        return (lambda: _patcher(make_tiny, lambda unet: init_weights_(unet, 0))), tiny_vae(0), 64, "fp32"

    from benchkit import FULL_SDXL_EXTRA, fill_random_

    def make():
        config = comfy.supported_models.SDXL(dict(comfy.supported_models.SDXL.unet_config, **FULL_SDXL_EXTRA))
        config.set_inference_dtype(torch.bfloat16, None)
        return config.get_model({})

    def init(unet):
        fill_random_(unet, torch.bfloat16)
        with torch.no_grad():  # the resblock and output GroupNorms at 1, not 0 (gpu_check.full_patcher)
            for m in unet.modules():
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                    m.weight.fill_(1.0)

    return (lambda: _patcher(make, init)), tiny_vae(0), 2048, "bf16"


def inputs(ns, vae, context_dim: int, res: int):
    import torch

    from blora_testkit.tiny_sdxl import tiny_conditioning

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, res, res, 3, generator=gen)
    cond = tiny_conditioning(0)
    return image, [[torch.randn(1, 77, context_dim, generator=gen), cond[0][1]]]


def run_ours(job, ns, patcher, vae, context_dim, dtype, device, image_cond=None, warmup=None) -> dict:
    """Train B-LoRA (``train_blora``) on ``image_cond`` (default: SDXL's ``inputs``)."""
    import torch

    from blora.host.train import train_blora
    from blora.train.recipe import TrainConfig

    image, cond = image_cond or inputs(ns, vae, context_dim, job["res"])
    warmup = ns.warmup if warmup is None else warmup
    window = Window(device, warmup, warmup + job["steps"])
    config = TrainConfig(rank=ns.rank, alpha=float(ns.rank), steps=warmup + job["steps"], learning_rate=1e-4,
                         resolution=job["res"], training_dtype=dtype, gradient_checkpointing=job["gc"],
                         offload=job["offload"], save_precision="bf16")
    with torch.inference_mode():
        out = train_blora(patcher, vae, image, cond, config, filename_prefix="gpu_bench/ours",
                          on_step=lambda done, state: window.step(done))
    return {"s_per_step": window.per_step(), "loss_first": out.losses[0], "loss_last": out.losses[-1]}


def ordinary(patcher):
    """``patcher`` with its weights as ordinary tensors: what the host's loader gives TrainLoraNode's copy (made
    through ``cached_patcher_init`` outside inference mode); this script's builder works under inference mode."""
    import torch

    with torch.inference_mode(False):
        for m in patcher.model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
    return patcher


def run_host(job, ns, patcher, vae, context_dim, dtype, device, factory) -> dict:
    import torch
    from benchkit import host_train_lora

    image, cond = inputs(ns, vae, context_dim, job["res"])
    with torch.inference_mode():
        latent = vae.encode(image)
    window = Window(device, ns.warmup, ns.warmup + job["steps"])
    losses = host_train_lora(patcher, latent, cond, ns.warmup + job["steps"], ns.rank, dtype, window.step,
                             checkpoint_depth=job["depth"], bypass=job["bypass"],
                             factory=lambda: ordinary(factory()))
    return {"s_per_step": window.per_step(), "loss_first": losses[0], "loss_last": losses[-1]}


def run_minimal(job, ns, patcher, vae, context_dim, dtype, device) -> dict:
    """bench/minimal_train.py on this patcher's UNet, moved to the device with its weights as ordinary frozen
    tensors (a loader's are inference tensors, which plain autograd cannot save)."""
    import minimal_train
    import torch

    from blora.host.train import linear_paths
    from blora.train.recipe import TRAINING_DTYPES, TrainConfig, select_targets

    torch_dtype = TRAINING_DTYPES[dtype]
    unet = patcher.model.diffusion_model
    with torch.inference_mode(False):
        for m in unet.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(p.detach().to(device, torch_dtype).clone(),
                                                             requires_grad=False)
        for m in unet.modules():  # comfy ops: plain forward on weights already where they compute
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = False
        targets = select_targets(linear_paths(patcher), TrainConfig())
        image, cond = inputs(ns, vae, context_dim, job["res"])
        with torch.no_grad():
            x0 = (vae.encode(image).float() * minimal_train.SDXL_LATENT_SCALE).to(device)
        y = torch.randn(1, patcher.model.model_config.unet_config["adm_in_channels"],
                        generator=torch.Generator().manual_seed(0))
        params = minimal_train.attach(unet, targets, ns.rank, float(ns.rank), job["gc"] != "off")
        window = Window(device, ns.warmup, ns.warmup + job["steps"])
        losses = minimal_train.train(unet, x0, cond[0][0], y, params, ns.warmup + job["steps"], 1e-4, torch_dtype,
                                     window.step)
    return {"s_per_step": window.per_step(), "loss_first": losses[0], "loss_last": losses[-1]}


def flux_inputs(ns, res: int):
    """One image (random, ``res`` px) and FLUX dev conditioning: T5 context (1, tokens, width), pooled CLIP-L,
    guidance; the full model's widths, or the tiny test model's (--toy)."""
    import torch

    from blora_testkit import tiny_flux
    from benchkit import FLUX_DEV

    tokens, width, pooled = ((FLUX_TOY_TOKENS, tiny_flux.CONTEXT_DIM, tiny_flux.POOLED_DIM) if ns.toy else
                             (512, FLUX_DEV["context_in_dim"], FLUX_DEV["vec_in_dim"]))
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, res, res, 3, generator=gen)
    return image, [[torch.randn(1, tokens, width, generator=gen),
                    {"pooled_output": torch.randn(1, pooled, generator=gen), "guidance": FLUX_GUIDANCE}]]


def build_flux(ns, device):
    """(patcher factory, 16-channel VAE, dtype name): the full FLUX.1 dev config in bf16 with random weights made
    on ``device``, or the tiny FLUX test model's config in fp32 (--toy); under inference mode, as a loader node
    gives a model."""
    import torch

    from benchkit import FLUX_DEV, flux_model
    from blora_testkit.tiny_flux import LATENT_CHANNELS, tiny_flux_unet_config
    from blora_testkit.tiny_vae import tiny_vae

    config, dtype = (tiny_flux_unet_config(), torch.float32) if ns.toy else (FLUX_DEV, torch.bfloat16)

    def make():
        with torch.inference_mode():
            return flux_model(config, dtype, device)

    return make, tiny_vae(0, latent_channels=LATENT_CHANNELS), "fp32" if ns.toy else "bf16"


def _ordinary_on(module, device, dtype) -> None:
    """``module``'s weights as ordinary frozen tensors on ``device`` in ``dtype`` (a loader's are inference
    tensors, which plain autograd cannot save), one at a time; the host's ops then run a plain forward."""
    import torch

    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(p.detach().to(device, dtype).clone(),
                                                             requires_grad=False)
        for m in module.modules():
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = False


@contextlib.contextmanager
def host_training_mode():
    """The host's ``model_management.in_training`` raised (0.33+; the host's own trainer does so): FLUX's rope then
    runs in torch ops autograd can differentiate, not comfy_kitchen's fused kernel, which has no backward."""
    import comfy.model_management as mm

    before = getattr(mm, "in_training", None)
    if before is not None:
        mm.in_training = True
    try:
        yield
    finally:
        if before is not None:
            mm.in_training = before


def run_minimal_flux(job, ns, patcher, vae, dtype, device) -> dict:
    """bench/minimal_train.py's flow-matching loop (``train_flow``) on this patcher's FLUX model."""
    import minimal_train
    import torch

    from blora.host.train import linear_paths
    from blora.train.recipe import TRAINING_DTYPES, TrainConfig, select_targets

    torch_dtype = TRAINING_DTYPES[dtype]
    model = patcher.model.diffusion_model
    _ordinary_on(model, device, torch_dtype)
    with torch.inference_mode(False):
        targets = select_targets(linear_paths(patcher), TrainConfig(), "flux")
        image, cond = flux_inputs(ns, job["res"])
        with torch.no_grad():
            latent = vae.encode(image).float()
        x0 = ((latent - minimal_train.FLUX_LATENT_SHIFT) * minimal_train.FLUX_LATENT_SCALE).to(device)
        context, extras = cond[0]
        params = minimal_train.attach(model, targets, ns.rank, float(ns.rank), job["gc"] != "off")
        window = Window(device, ns.flux_warmup, ns.flux_warmup + job["steps"])
        with host_training_mode():
            losses = minimal_train.train_flow(model, x0, context, extras["pooled_output"],
                                              torch.tensor([extras["guidance"]]), params,
                                              ns.flux_warmup + job["steps"], 1e-4, torch_dtype, window.step)
    return {"s_per_step": window.per_step(), "loss_first": losses[0], "loss_last": losses[-1],
            "targets": len(targets)}


def flux_worker(ns, results: Path) -> int:
    """The FLUX section's jobs in turn (``jobs_for("flux")``), each appended to ``results`` as it ends."""
    import comfy.model_management as mm

    import gc

    import torch

    device = mm.get_torch_device()
    factory, vae, dtype = build_flux(ns, device)
    patcher, previous = None, None
    for job in jobs_for("flux", ns):
        started = time.perf_counter()
        try:
            if patcher is None or job["kind"] == "minimal" or previous in ("minimal", "failed"):
                patcher = None
                _reset_memory(device)
                gc.collect()  # the last model gone before the next is made
                patcher = factory()
            rss0 = _reset_memory(device)
            resident = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
            if job["kind"] == "ours":
                out = run_ours(job, ns, patcher, vae, None, dtype, device, flux_inputs(ns, job["res"]),
                               warmup=ns.flux_warmup)
            else:
                out = run_minimal_flux(job, ns, patcher, vae, dtype, device)
            out.update(peak_gib=_peak_gib(device, rss0), resident_gib=resident)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other jobs still run
            out = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()
        previous = "failed" if "error" in out else job["kind"]
        out.update(job=job, seconds=time.perf_counter() - started)
        with results.open("a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


def worker(ns) -> int:
    sys.path[:0] = [str(HERE)]
    import gpu_check

    info = gpu_check.boot("static" if ns.worker == "flux" else ns.worker, ns.device)
    import comfy.model_management as mm
    import folder_paths
    import torch

    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="blora-gpu-bench-"))
    results = Path(ns.results)
    results.write_text(json.dumps({"info": info}) + "\n")
    if ns.worker == "flux":
        return flux_worker(ns, results)
    if ns.worker == "dynamic" and not info.get("dynamic_enabled"):
        return 0  # nothing to measure: the table says why
    device = mm.get_torch_device()
    factory, vae, context_dim, dtype = build(ns)
    patcher, fresh = factory(), True
    for job in jobs_for(ns.worker, ns):
        started = time.perf_counter()
        if not fresh:  # the minimal loop replaced the targets in place: every job after it gets a fresh model
            patcher = None
            _reset_memory(device)
            patcher, fresh = factory(), True
        rss0 = _reset_memory(device)
        try:
            if job["kind"] == "ours":
                out = run_ours(job, ns, patcher, vae, context_dim, dtype, device)
            elif job["kind"] == "host":
                out = run_host(job, ns, patcher, vae, context_dim, dtype, device, factory)
            else:
                fresh = False
                out = run_minimal(job, ns, patcher, vae, context_dim, dtype, device)
            out["peak_gib"] = _peak_gib(device, rss0)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other jobs still run
            out = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()
        out.update(job=job, seconds=time.perf_counter() - started)
        with results.open("a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------- the parent
def run_loader(loader: str, ns, workdir: Path) -> tuple[dict, list[dict], str]:
    results = workdir / f"{loader}.jsonl"
    cmd = [sys.executable, __file__, "--worker", loader, "--results", str(results), "--device", ns.device,
           "--steps", str(ns.steps), "--warmup", str(ns.warmup), "--table-steps", str(ns.table_steps),
           "--res", str(ns.res), "--rank", str(ns.rank), "--table-res", ",".join(map(str, ns.table_res)),
           "--host-depths", ",".join(map(str, ns.host_depths)), "--flux-res", str(ns.flux_res),
           "--flux-steps", str(ns.flux_steps), "--flux-warmup", str(ns.flux_warmup),
           "--sdxl-jobs", ",".join(sorted(ns.sdxl_jobs))] + (["--toy"] if ns.toy else [])
    timeout = ns.flux_timeout if loader == "flux" else ns.timeout
    note = ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            note = f"worker exit {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-3:])[:400]
        (workdir / f"{loader}.log").write_text(proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired:
        note = f"timed out after {timeout:.0f} s; the jobs that finished are shown"
    lines = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    info = lines[0]["info"] if lines and "info" in lines[0] else {}
    return info, [r for r in lines if "job" in r], note


def _fmt(r: dict, unit: str) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    step = r["s_per_step"]
    if step is None:
        return "no measured window"
    return (f"{step:8.3f} s/step  1000 steps {step * 1000 / 60:6.1f} min  peak {r['peak_gib']:6.2f} {unit}  "
            f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  (job {r['seconds']:.0f} s)")


def _best_host(rows: list[dict], bypass: bool) -> dict | None:
    ok = [r for r in rows if r["job"]["kind"] == "host" and r["job"]["bypass"] == bypass and "error" not in r
          and r["s_per_step"] is not None]
    return min(ok, key=lambda r: r["s_per_step"]) if ok else None


def _fits(peak_gib: float) -> str:
    """The smallest common card (8, 12, 16, 24 GB) whose memory holds the peak with 10 % to spare."""
    cards = [g for g in (8, 12, 16, 24) if peak_gib <= 0.9 * g * 1e9 / GIB]
    return f"{cards[0]} GB" if cards else "more than 24 GB"


def flux_table(ns, run: tuple) -> list[str]:
    """The FLUX section: its header, one line per job, the ratios against the minimal loop."""
    info, rows, note = run
    unit = "GiB VRAM" if ns.device == "cuda" else "GiB RSS added"
    model = ("tiny FLUX-architecture test model (2 double + 12 single blocks, hidden 64), fp32, "
             f"{FLUX_TOY_TOKENS} context tokens (a dry run of the script, not GPU figures)" if ns.toy else
             "full FLUX.1 dev config (19 double + 38 single blocks, hidden 3072, guidance embedding), random bf16 "
             "weights made on the GPU; T5 context 512 x 4096, pooled 768")
    latent = ns.flux_res // 8
    targets = next((r["targets"] for r in rows if "targets" in r), None)
    lines = ["", f"== FLUX.1 (issue 17): Train B-LoRA vs the minimal loop ==",
             f"{model}; {ns.flux_res} px -> latent 16 x {latent} x {latent} ({(latent // 2) ** 2} image tokens), "
             f"guidance {FLUX_GUIDANCE}; rank {ns.rank}, content+style (linear1 + linear2 of the single blocks"
             + (f": {targets} layers" if targets else "") + f"), AdamW; {ns.flux_warmup} warm-up + {ns.flux_steps} "
             f"measured steps",
             f"[flux: static loader, dynamic VRAM {'on' if info.get('dynamic_enabled') else 'off'}"
             + (f"; {note}" if note else "") + "]"]
    for r in rows:
        resident = r.get("resident_gib")
        lines.append(f"  {job_name(r['job']):58s} {_fmt(r, unit)}"
                     + (f"  [{resident:.1f} GiB resident before the job]" if resident is not None else ""))
    by = {(r["job"]["kind"], r["job"]["gc"]): r for r in rows if "error" not in r and r.get("s_per_step")}
    # SDXL's goals (issue 16); FLUX's default recomputes the trained single blocks, most of the forward, so the
    # like-for-like figure of the default is the third (bench/RESULTS-flux_train.txt)
    for (ours, minimal, goal) in ((DEFAULT_MODE, "off", " [SDXL's goal <= 1.1]"), ("off", "off", " [goal <= 1.05]"),
                                  (DEFAULT_MODE, DEFAULT_MODE, " (same recomputation)")):
        a, b = by.get(("ours", ours)), by.get(("minimal", minimal))
        if a and b:
            lines.append(f"  ratio ours ({ours}) / minimal loop {'without' if minimal == 'off' else 'with'} "
                         f"checkpointing: {a['s_per_step'] / b['s_per_step']:.2f}{goal}, peak "
                         f"{a['peak_gib'] / max(b['peak_gib'], 1e-9):.2f}")
    return lines


def table(ns, runs: dict) -> list[str]:
    unit = "GiB VRAM" if ns.device == "cuda" else "GiB RSS added"
    lines = []
    for loader, (info, rows, note) in runs.items():
        if loader == "flux":
            continue
        head = f"[{loader}: dynamic VRAM {'on' if info.get('dynamic_enabled') else 'off'}"
        if info.get("dynamic_unavailable"):
            head += f" (unavailable: {info['dynamic_unavailable']})"
        lines.append(head + (f"; {note}" if note else "") + "]")
        main = [r for r in rows if not r["job"].get("table")]
        for r in main:
            if r["job"]["kind"] == "host" and r is not _best_host(rows, r["job"]["bypass"]) and "error" not in r:
                continue
            lines.append(f"  {job_name(r['job']):58s} {_fmt(r, unit)}")
        by = {(r["job"]["kind"], r["job"].get("gc"), r["job"].get("offload")): r for r in main if "error" not in r
              and r.get("s_per_step")}
        minimal = by.get(("minimal", "off", None))
        for mode in MODES:
            ours = by.get(("ours", mode, False))
            if ours and minimal:
                goal = " [goal <= 1.1]" if mode == DEFAULT_MODE else ""
                lines.append(f"  ratio ours ({mode}) / minimal loop without checkpointing: "
                             f"{ours['s_per_step'] / minimal['s_per_step']:.2f}{goal}")
        for mode in MODES:
            on, off = by.get(("ours", mode, True)), by.get(("ours", mode, False))
            if on and off:
                lines.append(f"  offload cost ({mode}): step {on['s_per_step'] / off['s_per_step']:.2f}x, peak "
                             f"{on['peak_gib']:.2f} vs {off['peak_gib']:.2f} {unit}")
        for bypass in (False, True):
            host, ours = _best_host(rows, bypass), by.get(("ours", DEFAULT_MODE, False))
            if host and ours:
                lines.append(f"  ratio ours (default) / host TrainLoraNode bypass {'on' if bypass else 'off'} "
                             f"(all layers vs B-LoRA's 2 blocks): step {ours['s_per_step'] / host['s_per_step']:.2f}, "
                             f"peak {ours['peak_gib'] / max(host['peak_gib'], 1e-9):.2f}")
        vram = {(r["job"]["res"], r["job"]["gc"]): r for r in rows if r["job"]["kind"] == "ours"
                and not r["job"].get("offload") and "error" not in r}
        if vram:
            lines.append(f"  peak {unit} by resolution and checkpointing mode (ours, no offload):")
            lines.append("    " + "px".rjust(6) + "".join(m.rjust(16) for m in MODES))
            for res in ns.table_res:
                cells = [f"{vram[(res, m)]['peak_gib']:.2f}" if (res, m) in vram else "-" for m in MODES]
                lines.append("    " + str(res).rjust(6) + "".join(c.rjust(16) for c in cells))
            if ns.device == "cuda":
                fits = [f"{res} px: {_fits(vram[(res, DEFAULT_MODE)]['peak_gib'])}" for res in ns.table_res
                        if (res, DEFAULT_MODE) in vram]
                lines.append("    default mode fits in: " + ", ".join(fits))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run (use with --toy)")
    p.add_argument("--toy", action="store_true", help="the tiny test model, fp32, 64 px, a few steps")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 60; toy 2)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the measured window (default 5; toy 1)")
    p.add_argument("--table-steps", type=int, default=None, help="steps of each VRAM-table run (default 3; toy 1)")
    p.add_argument("--res", type=int, default=None, help="resolution of the main runs (default 1024; toy 64)")
    p.add_argument("--table-res", default=None, help="VRAM table resolutions (default 512,768,1024; toy 64,128)")
    p.add_argument("--rank", type=int, default=None, help="default 64; toy 4")
    p.add_argument("--host-depths", default="1,2", help="TrainLoraNode checkpoint_depth values tried")
    p.add_argument("--timeout", type=float, default=230.0, help="seconds per SDXL loader process")
    p.add_argument("--sections", default="sdxl,flux", help="what to run: sdxl, flux or both (comma-separated)")
    p.add_argument("--sdxl-loaders", default="static,dynamic", help="SDXL loader processes: static, dynamic or both")
    p.add_argument("--sdxl-jobs", default=",".join(SDXL_JOB_GROUPS),
                   help="SDXL job groups run, in their fixed order: " + ", ".join(SDXL_JOB_GROUPS))
    p.add_argument("--flux-timeout", type=float, default=150.0, help="seconds for the FLUX process")
    p.add_argument("--flux-res", type=int, default=None, help="FLUX image size (default 1024; toy 64)")
    p.add_argument("--flux-steps", type=int, default=None, help="FLUX measured steps (default 8; toy 2)")
    p.add_argument("--flux-warmup", type=int, default=None, help="FLUX steps before the window (default 3; toy 1)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", choices=("static", "dynamic", "flux"))
    p.add_argument("--results")
    ns = p.parse_args(argv)
    toy = ns.toy
    ns.steps = ns.steps or (2 if toy else 60)
    ns.warmup = ns.warmup if ns.warmup is not None else (1 if toy else 5)
    ns.table_steps = ns.table_steps or (1 if toy else 3)
    ns.res = ns.res or (64 if toy else 1024)
    ns.rank = ns.rank or (4 if toy else 64)
    ns.table_res = [int(v) for v in (ns.table_res or ("64,128" if toy else "512,768,1024")).split(",")]
    ns.host_depths = [int(v) for v in str(ns.host_depths).split(",")]
    ns.table_steps = max(ns.table_steps, 1)
    ns.flux_res = ns.flux_res or (64 if toy else 1024)
    ns.flux_steps = ns.flux_steps or (2 if toy else 8)
    ns.flux_warmup = ns.flux_warmup if ns.flux_warmup is not None else (1 if toy else 3)
    ns.sections = [v.strip() for v in ns.sections.split(",") if v.strip()]
    ns.sdxl_jobs = {v.strip() for v in ns.sdxl_jobs.split(",") if v.strip()}
    if set(ns.sdxl_jobs) - set(SDXL_JOB_GROUPS):
        p.error(f"--sdxl-jobs: a comma-separated choice of {', '.join(SDXL_JOB_GROUPS)}")
    ns.sdxl_loaders = [v.strip() for v in ns.sdxl_loaders.split(",") if v.strip()]
    if not ns.sdxl_loaders or set(ns.sdxl_loaders) - {"static", "dynamic"}:
        p.error("--sdxl-loaders: static, dynamic or both")
    if not ns.sections or set(ns.sections) - set(SECTIONS):
        p.error(f"--sections: a comma-separated choice of {', '.join(SECTIONS)}")
    if ns.worker:
        return worker(ns)
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    start = time.perf_counter()
    loaders = (ns.sdxl_loaders if "sdxl" in ns.sections else []) + (["flux"] if "flux" in ns.sections else [])
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="blora-gpu-bench-") as tmp:
        for loader in loaders:  # the table so far written after each process: a run cut short keeps it
            runs[loader] = run_loader(loader, ns, Path(tmp))
            text = report(ns, runs, loaders, time.perf_counter() - start)
            Path(ns.out).write_text(text + "\n")
    print(text)
    return 0


def report(ns, runs: dict, loaders: list[str], seconds: float) -> str:
    """The results of the processes in ``runs`` (those of ``loaders`` not run yet are named as missing)."""
    info = runs[loaders[0]][0]
    model = "tiny SDXL-architecture test model, fp32 (a dry run of the script, not GPU figures)" if ns.toy else \
        "full-width SDXL UNet, random weights, bf16"
    missing = [loader for loader in loaders if loader not in runs]
    lines = [f"bench/gpu_bench.py  {time.strftime('%Y-%m-%d %H:%M')}  {info.get('device_name', '?')}  torch "
             f"{info.get('torch', '?')}  ComfyUI {info.get('comfyui', '?')}  {platform.machine()}",
             f"sections: {', '.join(ns.sections)}; total {seconds:.0f} s"
             + (f"; not run yet when this was written: {', '.join(missing)}" if missing else "")]
    if ns.device != "cuda":
        lines.append("No GPU run has happened yet: this is the CPU dry run that checks the script end to end "
                     "(tests/host/test_gpu_bench.py runs it so); its seconds and memory say nothing about a GPU.")
    if "sdxl" in ns.sections:
        lines.append(f"== SDXL: {model}; {ns.res} px, rank {ns.rank}, content+style, AdamW; {ns.warmup} warm-up + "
                     f"{ns.steps} measured steps (VRAM table: {ns.table_steps}) ==")
        lines += table(ns, runs)
    if "flux" in runs:
        lines += flux_table(ns, runs["flux"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
