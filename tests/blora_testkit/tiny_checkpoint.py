"""A tiny SDXL-architecture checkpoint in the LDM single-file layout (TEST-ONLY).

Keys: ``model.diffusion_model.*`` (the UNet of ``tiny_sdxl.tiny_sdxl_model(seed)``: same weights as the
``tiny_model`` fixture), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, transformers layout),
``conditioner.embedders.1.model.*`` (CLIP-G, OpenCLIP layout), ``first_stage_model.taesd_*`` (TAESD). The stock
CheckpointLoaderSimple loads it once ``tiny_host_node`` is installed (it registers the tiny model config).

Build in-process with ``write_tiny_checkpoint(path)`` (needs the host importable, on CPU), or get a cached copy
built in a subprocess with ``cached_tiny_checkpoint(host)``; ``python -m blora_testkit.tiny_checkpoint OUT``.
``kind="flux"`` builds the tiny FLUX.1 checkpoint instead (``tiny_flux_checkpoint``; ``--kind flux``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTKIT = Path(__file__).resolve().parent
SOURCES = ("tiny_checkpoint.py", "tiny_sdxl.py", "tiny_host_node/tiny_models.py")
FORMAT = "blora-testkit tiny-sdxl 1"
FLUX_SOURCES = (*SOURCES, "tiny_flux_checkpoint.py", "tiny_flux.py", "tiny_vae.py",
                "tiny_host_node/tiny_flux_models.py")
KINDS = {"sdxl": ("tiny_sdxl", SOURCES, FORMAT), "flux": ("tiny_flux", FLUX_SOURCES, "blora-testkit tiny-flux 1")}
BUILD_TIMEOUT_S = 120


def init_module_(module, seed: int, gain: float = 1.0) -> None:
    """Deterministic small weights: norms ~1, biases ~0, matrices and kernels ~N(0, gain^2 / fan_in).
    0-d parameters (TAESD's scale/shift, CLIP's logit scale) keep their defaults."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 0:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.01 * noise)
            else:
                p.copy_(noise * gain / p[0].numel() ** 0.5)


def build_state_dict(seed: int = 0) -> dict:
    """The checkpoint's tensors (fp32, contiguous), built with the host's own classes and key converters."""
    import comfy.taesd.taesd
    import torch

    from .tiny_host_node.tiny_models import TinySDXLClipModel
    from .tiny_sdxl import tiny_sdxl_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same values either way; on a busy 2-core machine 1 thread is 5-10x faster
    try:
        patcher = tiny_sdxl_model(seed)
        clip = TinySDXLClipModel(device="cpu", dtype=torch.float32)
        init_module_(clip, seed + 1)
        vae = comfy.taesd.taesd.TAESD()
        init_module_(vae, seed + 2, gain=0.8)
        with torch.no_grad():  # decoded latents of a random UNet are large: keep TAESD out of its tanh clamp
            vae.vae_scale.fill_(0.02)
        # The host's own save path: ModelPatcher.state_dict_for_saving on 0.33 (BaseModel's now takes the UNet
        # state dict first), BaseModel.state_dict_for_saving on 0.3.64 (the patcher has none).
        saver = getattr(patcher, "state_dict_for_saving", None) or patcher.model.state_dict_for_saving
        sd = saver(clip.state_dict(), vae.state_dict())
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    finally:
        torch.set_num_threads(threads)


def write_tiny_checkpoint(path: Path | str, seed: int = 0, kind: str = "sdxl") -> Path:
    """Write the checkpoint (``kind`` "sdxl" or "flux") to ``path`` atomically; same seed and torch, same tensors."""
    from safetensors.torch import save_file

    if kind == "flux":
        from .tiny_flux_checkpoint import build_flux_state_dict as build
    else:
        build = build_state_dict
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(build(seed), str(tmp), metadata={"format": f"{KINDS[kind][2]} seed {seed}"})  # one key: stable bytes
    os.replace(tmp, path)
    return path


def source_key(seed: int = 0, host: Path | str | None = None, kind: str = "sdxl") -> str:
    """Hash of the builder sources, the seed, the torch that builds it and the host it is built with: a cached
    file is reused only while these are unchanged (two hosts with two torch builds share one cache folder, and
    the tensors torch draws and the bytes it writes differ between torch versions)."""
    import torch

    _, sources, fmt = KINDS[kind]
    h = hashlib.sha256(f"{fmt}|{seed}|torch {torch.__version__}|{sys.executable}".encode())
    if host is not None:
        h.update(str(Path(host).resolve()).encode())
    for rel in sources:
        h.update((TESTKIT / rel).read_bytes())
    return h.hexdigest()[:16]


def cached_tiny_checkpoint(host: Path | str, cache_dir: Path | str | None = None, seed: int = 0,
                           kind: str = "sdxl") -> Path:
    """Path of a built checkpoint (``kind`` "sdxl" or "flux") in ``cache_dir`` (default: <tmp>/blora-testkit),
    building it in a subprocess (the host on its path, on CPU) when the sources changed. Safe for concurrent
    callers."""
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "blora-testkit"
    stem = KINDS[kind][0]
    path = cache / f"{stem}-{source_key(seed, host, kind)}.safetensors"
    if path.is_file():
        return path
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": os.pathsep.join([str(host), str(TESTKIT.parent)])}
    proc = subprocess.run([sys.executable, "-m", "blora_testkit.tiny_checkpoint", str(path), "--seed", str(seed),
                           "--kind", kind],
                          cwd=str(TESTKIT.parent), env=env, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"building the tiny {kind} checkpoint failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    for old in cache.glob(f"{stem}-*.safetensors"):  # builds of older sources, untouched for an hour
        with contextlib.suppress(OSError):
            if old != path and time.time() - old.stat().st_mtime > 3600:
                old.unlink()
    return path


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny SDXL- or FLUX.1-architecture test checkpoint.")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=sorted(KINDS), default="sdxl")
    ns = parser.parse_args(argv)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    write_tiny_checkpoint(ns.out, ns.seed, ns.kind)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
