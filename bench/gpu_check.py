"""GPU check: Train B-LoRA, K-LoRA Fuse, Strength Schedule and Apply on CUDA with the host's dynamic VRAM loader
(``ModelPatcherDynamic``, ComfyUI 0.33+) on and off, compared path against path.

    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_check.py [--out bench/RESULTS-gpu.txt] [--full]

Each mode runs in its own process (the loader is chosen when the host boots):
- ``static``: the classic ModelPatcher on CUDA (``--disable-dynamic-vram``);
- ``dynamic``: the dynamic loader, switched on exactly as the host's main.py does at boot (comfy_aimdo's
  ``init`` before torch is imported, ``init_devices``, then ``CoreModelPatcher = ModelPatcherDynamic``).
In each: the tiny SDXL-architecture test model (fp32; its 64-channel q/k/v layers are 16 KiB, which the dynamic
loader force-loads instead of streaming, the 128-channel ones it streams) is sampled plain, with Apply (ordinary
patches), K-LoRA (per-step weight functions) and a strength schedule, then trained 4 steps (after sampling, so
VRAM-resident weights from an inference run exist) and sampled with the result. With ``--full`` the same runs on a
full-width SDXL UNet (random fp16 weights, 512 px latents). The dynamic process also runs two diagnostics with one
of the pack's dynamic-VRAM measures switched off, to show what each one prevents.

The table compares each result of the dynamic path with the static one (max |difference|, and the size of the
effect itself: max |result - plain sample|). Exit status 1 when a path failed or the two paths disagree.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_BLOCKS = ["output_blocks.0.1", "output_blocks.1.1", "output_blocks.4.1"]  # 128, 128 and 64 channels
FULL_BLOCKS = ["output_blocks.0.1", "output_blocks.1.1"]
TRAIN_FILTER = r"^output_blocks\.(0|1|4)\.1\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
SCHEDULE = "0:0, 0.5:1.5, 1:0.5"
# The paths agree when max |dynamic - static| <= AGREE_REL[model] * max(effect, max |static|) + AGREE_ABS: fp32 on the
# tiny model; fp16/bf16 on the full UNet, where rounding differs between the loaders' cast paths. A skipped weight
# function or patch shows up as a difference of the size of the effect itself.
AGREE_REL = {"tiny": 1e-3, "full": 5e-2}
AGREE_ABS = 1e-5


# ----------------------------------------------------------------------------------------------------- worker
def boot(mode: str, device: str) -> dict:
    """The host in-process; for ``dynamic`` the same boot steps as the host's main.py (see module doc)."""
    host = os.environ.get("COMFYUI_PATH")
    if not host or not (Path(host) / "comfy").is_dir():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path[:0] = [host]
    sys.path += [str(ROOT), str(ROOT / "tests")]
    from comfy.cli_args import args

    info = {"mode": mode, "torch_imported_before_boot": "torch" in sys.modules}
    if device == "cpu":
        args.cpu = True
    if mode == "static" and hasattr(args, "disable_dynamic_vram"):
        args.disable_dynamic_vram = True
    control = None
    if mode == "dynamic":
        try:
            import comfy_aimdo.control as control
        except ImportError as e:
            info["dynamic_unavailable"] = f"comfy_aimdo: {e}"
        if control is not None:  # main.py: before torch is imported
            headroom = None if getattr(args, "reserve_vram", None) is None else int(args.reserve_vram * 1024 ** 3)
            for kwargs in ({"simple_vram_headroom": headroom, "nvml_pressure": not getattr(args, "disable_nvml_pressure", False)},
                           {"simple_vram_headroom": headroom}, {}):
                try:
                    control.init(**kwargs)
                    break
                except TypeError:
                    continue
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    import torch

    dynamic = False
    if control is not None and hasattr(mp, "ModelPatcherDynamic") and not args.cpu:
        devices = mm.get_all_torch_devices()
        try:
            ok = control.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024 ** 3)) for d in devices)
        except TypeError:
            ok = control.init_devices(d.index for d in devices)
        if ok:
            import comfy.memory_management

            mp.CoreModelPatcher = mp.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            dynamic = True
        else:
            info["dynamic_unavailable"] = "comfy_aimdo.control.init_devices failed"
    elif mode == "dynamic" and "dynamic_unavailable" not in info:
        info["dynamic_unavailable"] = "no ModelPatcherDynamic in this host" if not hasattr(mp, "ModelPatcherDynamic") \
            else "CPU device"
    dev = mm.get_torch_device()
    info.update(dynamic_enabled=dynamic, device=str(dev), torch=torch.__version__,
                device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")
    try:
        import comfyui_version

        info["comfyui"] = comfyui_version.__version__
    except ImportError:
        info["comfyui"] = "?"
    return info


def _loaded_patcher(make_model, init_):
    """A ModelPatcher built the way the host's checkpoint loader builds one (comfy/sd.py): the model made empty,
    the patcher (the dynamic one where it is on), then the weights loaded from a state dict with ``assign`` on a
    dynamic patcher. Under dynamic VRAM the host's Linear layers get their weights only from that load (they are
    None until then), so the state dict is made first, on a model built with the dynamic loader switched off;
    both modes load the same tensors. Made under inference mode, as a loader node makes it."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    import torch

    with torch.inference_mode():
        dynamic = getattr(comfy.memory_management, "aimdo_enabled", False)
        comfy.memory_management.aimdo_enabled = False
        try:
            template = make_model()
            init_(template.diffusion_model)
            state = {k: v for k, v in template.diffusion_model.state_dict().items()}
        finally:
            comfy.memory_management.aimdo_enabled = dynamic
        del template
        model = make_model()
        patcher = mp.CoreModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        is_dynamic = getattr(patcher, "is_dynamic", lambda: False)()
        model.load_model_weights(state, "", **({"assign": is_dynamic} if is_dynamic else {}))
    missing = [n for n, p in model.diffusion_model.named_parameters() if p is None]
    if missing or any(p is None for p in model.diffusion_model.parameters()):
        raise RuntimeError(f"weights not loaded: {missing[:3]}")
    return patcher


def tiny_patcher():
    import torch
    from blora_testkit.tiny_sdxl import init_weights_, tiny_model_config

    def make():
        config = tiny_model_config()
        config.set_inference_dtype(torch.float32, None)
        return config.get_model({})

    return _loaded_patcher(make, lambda unet: init_weights_(unet, 0))


def full_patcher():
    import comfy.supported_models
    import torch

    sys.path.append(str(ROOT / "bench"))
    from benchkit import FULL_SDXL_EXTRA, fill_random_

    def make():
        config = comfy.supported_models.SDXL(dict(comfy.supported_models.SDXL.unet_config, **FULL_SDXL_EXTRA))
        config.set_inference_dtype(torch.float16, None)
        return config.get_model({})

    def init(unet):
        fill_random_(unet, torch.float16)
        with torch.no_grad():  # fill_random_ knows norms by name; SDXL's resblock and output GroupNorms are
            for m in unet.modules():  # "in_layers.0", "out.0": at 0 they silence the UNet (output exactly 0)
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                    m.weight.fill_(1.0)

    return _loaded_patcher(make, init)


def host_lora(patcher, adapter):
    """The stock LoraLoaderModelOnly path (comfy.sd.load_lora_for_models) on a kohya rendering of ``adapter``: no
    pack code, to tell the host's own patch paths apart from the pack's."""
    import comfy.sd

    sd = {}
    for path, m in adapter.modules.items():
        name = "lora_unet_" + path.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = m.tensors["down"]
        sd[f"{name}.lora_up.weight"] = m.tensors["up"]
        sd[f"{name}.alpha"] = torch_tensor(m.alpha)
    return comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0)[0]


def torch_tensor(x):
    import torch

    return torch.tensor(float(x))


def conditioning(context_dim: int, seed: int, tokens: int = 77):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, context_dim, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]


def sample(model, context_dim: int, size: int, steps: int = 5, seed: int = 0):
    import comfy.sample
    import torch

    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, steps, 2.0, "euler", "normal", conditioning(context_dim, 1),
                                  conditioning(context_dim, 2), latent, seed=seed, disable_pbar=True)
    return out.float().cpu()


def module_census(patcher) -> dict:
    """After a load: how many attention Linears the dynamic loader streams (``_v``) and how many it force-loaded."""
    streamed = forced = 0
    for name, m in patcher.model.diffusion_model.named_modules():
        if ".attn" in name and hasattr(m, "comfy_cast_weights") and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0"):
            streamed += hasattr(m, "_v")
            forced += not hasattr(m, "_v")
    return {"streamed": streamed, "force_loaded": forced}


def run_model(kind: str, patcher, context_dim: int, size: int, tensors: dict, results: dict, workdir: Path,
              diagnostics: bool) -> None:
    import comfy.model_management as mm
    import folder_paths
    import torch
    from blora_testkit.dynamic import make_lora

    from blora.host.realise import fused_clone, scheduled_clone
    from blora.host.realise import patched_clone
    from blora.host.train import train_blora
    from blora.compose.strength_schedule import parse_schedule
    from blora.train.recipe import TrainConfig

    blocks = TINY_BLOCKS if kind == "tiny" else FULL_BLOCKS
    results[f"{kind}.patcher"] = type(patcher).__name__

    def stage(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
            if out is not None:
                tensors[f"{kind}.{name}"] = out
            results[f"{kind}.{name}.seconds"] = round(time.perf_counter() - t0, 2)
        except Exception as e:  # keep going: one failing stage must not hide the others
            results[f"{kind}.{name}.error"] = f"{type(e).__name__}: {e}"
            results[f"{kind}.{name}.traceback"] = traceback.format_exc()[-3000:]
            print(f"[{kind}.{name}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    subject = make_lora(patcher, blocks, seed=1, rank=4, source="subject.safetensors")
    style = make_lora(patcher, blocks, seed=2, rank=4, source="style.safetensors")
    stage("plain", lambda: sample(patcher, context_dim, size))
    results[f"{kind}.census"] = module_census(patcher)
    stage("apply", lambda: sample(patched_clone(patcher, [(subject, 1.0)]), context_dim, size))
    stage("host_lora", lambda: sample(host_lora(patcher, subject), context_dim, size))
    stage("klora", lambda: sample(fused_clone(patcher, subject, style, 1.0, 1.0)[0], context_dim, size))
    stage("schedule", lambda: sample(scheduled_clone(patcher, {"style": (style, parse_schedule(SCHEDULE))}),
                                     context_dim, size))

    folder_paths.set_output_directory(str(workdir / "output"))
    images = torch.rand(1, size * 8, size * 8, 3, generator=torch.Generator().manual_seed(0))
    from blora_testkit.tiny_vae import tiny_vae

    vae = tiny_vae(0)  # TAESD architecture, 4 latent channels at 1/8 size: serves the full UNet too
    config = TrainConfig(blocks="custom" if kind == "tiny" else "content+style",
                         layer_filter=TRAIN_FILTER if kind == "tiny" else "", rank=4, alpha=4.0, learning_rate=1e-2,
                         steps=4, resolution=size * 8, training_dtype="fp32" if kind == "tiny" else "bf16", seed=0,
                         gradient_checkpointing=True)

    def train(prefix):
        with torch.inference_mode():
            out = train_blora(patcher, vae, images, conditioning(context_dim, 3), config, filename_prefix=prefix)
        results[f"{kind}.{prefix}.losses"] = [round(x, 6) for x in out.losses]
        for block in blocks:  # two modules of each block: streamed and force-loaded layers alike
            for path, m in sorted((p, m) for p, m in out.adapter.modules.items() if p.startswith(block + "."))[:2]:
                tensors[f"{kind}.{prefix}.up.{path}"] = m.tensors["up"].float().cpu()
        results[f"{kind}.{prefix}.modules"] = len(out.adapter.modules)
        return sample(out.model, context_dim, size)

    stage("train", lambda: train("train"))
    if diagnostics and results.get("dynamic_enabled"):
        import blora.host.compat as dyn
        import blora.host.train as tr

        keep, restream = dyn.keep_weight_functions, tr.restream_weights
        try:
            dyn.keep_weight_functions = lambda model: model
            mm.unload_all_models()
            stage("klora_without_keep_weight_functions",
                  lambda: sample(fused_clone(patcher, subject, style, 1.0, 1.0)[0], context_dim, size))
        finally:
            dyn.keep_weight_functions = keep
        try:
            tr.restream_weights = lambda unet: 0
            stage("plain_again", lambda: sample(patcher, context_dim, size))
            stage("train_without_restream", lambda: train("train_without_restream"))
        finally:
            tr.restream_weights = restream
    mm.unload_all_models()
    mm.soft_empty_cache()


def worker(ns) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # the host's load logs
    info = boot(ns.worker, ns.device)
    import torch
    from safetensors.torch import save_file

    results = dict(info)
    tensors: dict = {}
    workdir = Path(ns.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save() -> None:  # after each model, so a later timeout keeps what finished
        results["seconds"] = round(time.perf_counter() - t0, 1)
        if torch.cuda.is_available():
            results["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(workdir / f"{ns.worker}.safetensors"))
        (workdir / f"{ns.worker}.json").write_text(json.dumps(results, indent=1))

    run_model("tiny", tiny_patcher(), 64, 8, tensors, results, workdir, diagnostics=True)
    save()
    if ns.full:
        try:
            run_model("full", full_patcher(), 2048, 64, tensors, results, workdir, diagnostics=False)
        except Exception as e:
            results["full.error"] = f"{type(e).__name__}: {e}"
        save()
    return 0


# ----------------------------------------------------------------------------------------------------- parent
def run_worker(mode: str, ns, workdir: Path) -> tuple[dict, dict, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--workdir", str(workdir),
           "--device", ns.device] + (["--full"] if ns.full else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ns.timeout)
        log, ended = proc.stdout + proc.stderr, f"exited {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        out = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        log, ended = "".join(out), f"timed out after {ns.timeout:.0f}s (results of the models it finished kept)"
    (workdir / f"{mode}.log").write_text(log)
    info, tensors = {}, {}
    if (workdir / f"{mode}.json").is_file():
        info = json.loads((workdir / f"{mode}.json").read_text())
        from safetensors.torch import load_file

        tensors = load_file(str(workdir / f"{mode}.safetensors"))
        if not ended.startswith("exited 0"):
            info["worker"] = ended
    else:
        info = {"mode": mode, "error": f"worker {ended} after {time.perf_counter() - t0:.0f}s"}
    return info, tensors, log


def compare(static: tuple, dynamic: tuple) -> tuple[list[str], bool]:
    (si, st), (di, dt) = static, dynamic
    lines, ok = [], True
    for kind in ("tiny", "full"):
        if f"{kind}.plain" not in st and f"{kind}.plain" not in dt:
            continue
        lines.append(f"\n{kind} model: static {si.get(kind + '.patcher', '?')}, dynamic {di.get(kind + '.patcher', '?')}; "
                     f"attention Linears under the dynamic loader: {di.get(kind + '.census')}")
        lines.append(f"{'result':<40} {'effect (max |x - plain|)':>26} {'max |dynamic - static|':>24}  verdict")
        lines.append(f"{'':<40} {'(plain: max |plain|)':>26}")
        for stage in ("plain", "host_lora", "apply", "klora", "schedule", "train"):
            key = f"{kind}.{stage}"
            err = si.get(key + ".error") or di.get(key + ".error")
            if err or key not in st or key not in dt:
                if key in st or key in dt or err:
                    lines.append(f"{stage:<40} {'':>26} {'':>24}  FAILED: {err or 'missing'}")
                    ok = False
                continue
            effect = float((dt[key] if stage == "plain" else dt[key] - dt[f"{kind}.plain"]).abs().max())
            diff = float((dt[key] - st[key]).abs().max())
            # Results that go through ordinary patches (apply, and sampling the trained model) inherit the host's
            # own difference between its two patch paths (LowVramPatch under dynamic VRAM): the stock LoRA path
            # (host_lora) measures it, and the pack may differ by no more than that.
            host = 0.0
            if stage in ("apply", "train") and f"{kind}.host_lora" in st and f"{kind}.host_lora" in dt:
                host = float((dt[f"{kind}.host_lora"] - st[f"{kind}.host_lora"]).abs().max())
            agree = diff <= AGREE_REL[kind] * effect + 1.5 * host + AGREE_ABS
            applied = stage == "plain" or effect > 1e-4
            if stage == "host_lora":  # no pack code: the host's own figure, the allowance for apply and train
                lines.append(f"{stage + ' (stock LoRA, host only)':<40} {effect:>26.4g} {diff:>24.3g}  host reference")
                ok &= applied
                continue
            verdict = "same" if agree and applied else ("DIFFERENT" if not agree else "NO EFFECT")
            ok &= agree and applied
            lines.append(f"{stage:<40} {effect:>26.4g} {diff:>24.3g}  {verdict}")
        for prefix in ("train",):
            ls, ld = si.get(f"{kind}.{prefix}.losses"), di.get(f"{kind}.{prefix}.losses")
            if ls and ld:
                lines.append(f"train losses static  {ls}")
                lines.append(f"train losses dynamic {ld}")
                ups = [k for k in st if k.startswith(f"{kind}.{prefix}.up.") and k in dt]
                if ups:
                    d = max(float((st[k] - dt[k]).abs().max()) for k in ups)
                    lines.append(f"trained up matrices ({len(ups)} modules, 2 per block): max |dynamic - static| {d:.3g}")
        for diag in ("klora_without_keep_weight_functions", "train_without_restream"):
            key = f"{kind}.{diag}"
            ref = f"{kind}.{diag.split('_without')[0]}"
            if di.get(key + ".error"):
                lines.append(f"diagnostic {diag}: {di[key + '.error']}")
            elif key in dt and ref in st:
                lines.append(f"diagnostic {diag}: max |x - static {ref.split('.')[-1]}| "
                             f"{float((dt[key] - st[ref]).abs().max()):.3g}")
    return lines, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-gpu.txt"))
    parser.add_argument("--full", action="store_true", help="also a full-width SDXL UNet (fp16, 512 px)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the script")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mode")
    parser.add_argument("--worker", choices=("static", "dynamic"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        return worker(ns)
    workdir = Path(tempfile.mkdtemp(prefix="blora-gpu-check-"))
    runs = {}
    for mode in ("static", "dynamic"):
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        runs[mode] = run_worker(mode, ns, workdir)
    si, di = runs["static"][0], runs["dynamic"][0]
    head = [f"bench/gpu_check.py  {time.strftime('%Y-%m-%d %H:%M')}  ComfyUI {di.get('comfyui', si.get('comfyui', '?'))}  "
            f"torch {di.get('torch', '?')}  {di.get('device_name', '?')}",
            f"static: dynamic VRAM {si.get('dynamic_enabled')}, {si.get('seconds', '?')} s, peak VRAM {si.get('peak_vram_mb', '?')} MB"
            f"{'; ' + si['error'] if 'error' in si else ''}",
            f"dynamic: dynamic VRAM {di.get('dynamic_enabled')}"
            f"{' (' + di['dynamic_unavailable'] + ')' if di.get('dynamic_unavailable') else ''}, "
            f"{di.get('seconds', '?')} s, peak VRAM {di.get('peak_vram_mb', '?')} MB{'; ' + di['error'] if 'error' in di else ''}"]
    head += [f"{mode} worker {info['worker']}" for mode, info in (("static", si), ("dynamic", di)) if "worker" in info]
    head += [f"{mode} full model: {info['full.error']}" for mode, info in (("static", si), ("dynamic", di))
             if "full.error" in info]
    lines, ok = compare((si, runs["static"][1]), (di, runs["dynamic"][1]))
    ok &= bool(di.get("dynamic_enabled")) and "error" not in si and "error" not in di
    verdict = ["", "verdict: " + ("the dynamic path gives the static path's results" if ok else
                                  "FAILED: see the rows above and the logs in " + str(workdir))]
    text = "\n".join(head + lines + verdict) + "\n"
    print(text)
    for mode, (info, _, log) in runs.items():
        for k, v in info.items():
            if k.endswith(".traceback"):
                print(f"--- {mode} {k}\n{v}", file=sys.stderr)
        if "error" in info:
            print(f"--- {mode} log tail\n{log[-3000:]}", file=sys.stderr)
    Path(ns.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
