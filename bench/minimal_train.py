"""The least work the B-LoRA recipe needs, in plain torch: the reference Train B-LoRA is measured against.

Same denoiser module (the host's own SDXL or FLUX.1 ``diffusion_model``), same targets
(``blora.train.recipe.select_targets``: SDXL: q/k/v/out of both attentions in the content and style blocks; FLUX.1:
linear1/linear2 of SplitFlux's single blocks), rank, dtype and latent. Nothing else: the base weights are ordinary
frozen tensors (made outside inference mode, so no copies or aliases are needed), each target Linear gets
``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` (A ~ normal std 1/rank, B = 0, float32), optional gradient checkpointing per
trained block, AdamW, grad-norm clip 1. SDXL (``train``): ε-prediction MSE on the SDXL discrete schedule with
uniform integer timesteps. FLUX.1 (``train_flow``): flow matching as the host samples FLUX (x = σ·noise + (1-σ)·x0
with σ uniform over ModelSamplingFlux's 10000-entry table, shift 1.15; the model's timestep is σ), MSE against the
velocity noise - x0, FLUX dev's guidance input. FLUX's blocks add into their input in place, which autograd
refuses where backward needs it: the least that makes them trainable is a copy of the input of each norm that
precedes such an add (from the first trained block on) and, in a checkpointed block, of the block's input. No host
patcher, no progress, no previews, no saving.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SDXL_LATENT_SCALE = 0.13025
FLUX_LATENT_SCALE, FLUX_LATENT_SHIFT = 0.3611, 0.1159  # the host's latent_formats.Flux
FLUX_SHIFT = 1.15  # ModelSamplingFlux's default shift (FLUX.1's model config sets none)
FLUX_BLOCK = re.compile(r"^(double|single)_blocks\.\d+")
FLUX_IN_PLACE_NORMS = ("pre_norm", "img_norm1", "img_norm2", "txt_norm1", "txt_norm2")


def sdxl_sigmas(steps: int = 1000) -> torch.Tensor:
    """SDXL's discrete schedule (scaled-linear betas 0.00085 → 0.012): sigma per integer timestep."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def flux_sigmas(shift: float = FLUX_SHIFT, steps: int = 10000) -> torch.Tensor:
    """ModelSamplingFlux's table: sigma(t) = e^shift / (e^shift + 1/t - 1) for t = 1/steps ... 1."""
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return (math.exp(shift) / (math.exp(shift) + (1 / t - 1))).float()


class LoRALinear(torch.nn.Module):
    """A frozen Linear plus a trainable low-rank path, computed on the activations (no merged weight)."""

    def __init__(self, base: torch.nn.Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.down = torch.nn.Parameter((torch.randn(rank, base.in_features, generator=generator) / rank).to(device))
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        return F.linear(x, self.base.weight, self.base.bias) + self.scale * low


class Checkpointed(torch.nn.Module):
    """Recompute a module's activations in backward (``copy_input``: the module gets a copy of its first input,
    which it may then change in place without changing what the recomputation starts from)."""

    def __init__(self, inner: torch.nn.Module, copy_input: bool = False):
        super().__init__()
        self.inner, self.copy_input = inner, copy_input

    def _run(self, x, *args, **kwargs):
        return self.inner(x.clone() if self.copy_input else x, *args, **kwargs)

    def forward(self, *args, **kwargs):
        return checkpoint(self._run, *args, use_reentrant=False, **kwargs)


class CopiedInput(torch.nn.Module):
    """A module run on a copy of its input (a norm whose saved input the block then adds into in place)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.clone())


def _flux_region(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """FLUX.1's blocks in execution order from the first one holding a target (those backward runs through)."""
    blocks = [f"double_blocks.{i}" for i in range(len(model.double_blocks))]
    blocks += [f"single_blocks.{i}" for i in range(len(model.single_blocks))]
    trained = {FLUX_BLOCK.match(t).group(0) for t in targets}
    first = min(i for i, b in enumerate(blocks) if b in trained)
    return blocks[first:]


def attach(unet: torch.nn.Module, targets: list[str], rank: int, alpha: float, gradient_checkpointing: bool,
           seed: int = 0) -> list[torch.nn.Parameter]:
    """Replace each target Linear by a LoRALinear (in place); wrap each block holding targets (SDXL: transformer
    block; FLUX.1: double or single block) in a checkpoint when asked; FLUX.1: the in-place copies (module doc).
    Returns the trainable parameters."""
    flux = hasattr(unet, "single_blocks")
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for path in targets:
        parent_path, _, name = path.rpartition(".")
        parent = unet.get_submodule(parent_path)
        lora = LoRALinear(getattr(parent, name), rank, alpha / rank, generator)
        setattr(parent, name, lora)
        params += [lora.down, lora.up]
    if flux:
        for path in _flux_region(unet, targets):
            block = unet.get_submodule(path)
            for name in FLUX_IN_PLACE_NORMS:
                if hasattr(block, name):
                    setattr(block, name, CopiedInput(getattr(block, name)))
    if gradient_checkpointing:
        if flux:
            blocks = sorted({FLUX_BLOCK.match(p).group(0) for p in targets})  # double_blocks.N / single_blocks.N
        else:
            blocks = sorted({p.split(".attn")[0] for p in targets})  # ...transformer_blocks.N
        for path in blocks:
            parent_path, _, name = path.rpartition(".")
            parent = unet.get_submodule(parent_path)
            parent[int(name)] = Checkpointed(parent[int(name)], copy_input=flux)
    return params


def train(unet: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, y: torch.Tensor, params, steps: int,
          lr: float, dtype: torch.dtype, on_step: Callable[[], None], seed: int = 0) -> list[float]:
    """``steps`` AdamW steps of ε-MSE on ``x0`` (1, 4, h, w) (already scaled to the model's latent space), on
    x0's device (CUDA: fused AdamW; the losses stay on the device until the end, so no step waits for it)."""
    device = x0.device
    sigmas = sdxl_sigmas().to(device)
    context, y = context.to(device, dtype), y.to(device, dtype)

    def loss_of(generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, len(sigmas), (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigma = sigmas[t.to(device)].view(-1, 1, 1, 1)
        x = (x0 + sigma * noise) / torch.sqrt(sigma ** 2 + 1)
        out = unet(x.to(dtype), t.float().to(device), context=context, y=y)
        return F.mse_loss(out.float(), noise)

    return _optimise(loss_of, params, steps, lr, device, on_step, seed)


def train_flow(model: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
               guidance: torch.Tensor | None, params, steps: int, lr: float, dtype: torch.dtype,
               on_step: Callable[[], None], seed: int = 0) -> list[float]:
    """``steps`` AdamW steps of flow matching (module doc) on ``x0`` (1, 16, h, w) in FLUX's latent space
    (``(latent - FLUX_LATENT_SHIFT) * FLUX_LATENT_SCALE``); context (1, T, 4096) T5, y (1, 768) pooled CLIP-L,
    guidance (1,) or None (schnell)."""
    device = x0.device
    sigmas = flux_sigmas().to(device)
    context, y = context.to(device, dtype), y.to(device, dtype)
    extra = {} if guidance is None else {"guidance": guidance.to(device, torch.float32)}

    def loss_of(generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, len(sigmas), (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigma = sigmas[t.to(device)]
        s = sigma.view(-1, 1, 1, 1)
        out = model((s * noise + (1 - s) * x0).to(dtype), sigma, context=context, y=y, **extra)
        return F.mse_loss(out.float(), noise - x0)

    return _optimise(loss_of, params, steps, lr, device, on_step, seed)


def _optimise(loss_of: Callable[[torch.Generator], torch.Tensor], params, steps: int, lr: float, device,
              on_step: Callable[[], None], seed: int) -> list[float]:
    """AdamW (CUDA: fused), grad-norm clip 1; every draw from one CPU generator; the losses stay on the device
    until the end, so no step waits for it."""
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, **fused)
    generator = torch.Generator().manual_seed(seed)
    pending = []
    for _ in range(steps):
        loss = loss_of(generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        on_step()
    losses = torch.stack(pending).cpu().tolist()
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError("the minimal loop's loss is not finite")
    return losses
