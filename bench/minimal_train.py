"""The least work the B-LoRA recipe needs, in plain torch: the reference Train B-LoRA is measured against.

Same UNet module (the host's own SDXL ``diffusion_model``), same targets (q/k/v/out of both attentions in the
content and style blocks, ``blora.train.recipe.select_targets``), rank, dtype and latent. Nothing else: the base
weights are ordinary frozen tensors (made outside inference mode, so no copies or aliases are needed), each
target Linear gets ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` (A ~ normal std 1/rank, B = 0, float32), optional gradient
checkpointing per trained transformer block, ε-prediction MSE on the SDXL discrete schedule with uniform integer
timesteps, AdamW, grad-norm clip 1. No host patcher, no progress, no previews, no saving.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SDXL_LATENT_SCALE = 0.13025


def sdxl_sigmas(steps: int = 1000) -> torch.Tensor:
    """SDXL's discrete schedule (scaled-linear betas 0.00085 → 0.012): sigma per integer timestep."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


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
    """Recompute a module's activations in backward."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def attach(unet: torch.nn.Module, targets: list[str], rank: int, alpha: float, gradient_checkpointing: bool,
           seed: int = 0) -> list[torch.nn.Parameter]:
    """Replace each target Linear by a LoRALinear (in place); wrap each transformer block holding targets in a
    checkpoint when asked. Returns the trainable parameters."""
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for path in targets:
        parent_path, _, name = path.rpartition(".")
        parent = unet.get_submodule(parent_path)
        lora = LoRALinear(getattr(parent, name), rank, alpha / rank, generator)
        setattr(parent, name, lora)
        params += [lora.down, lora.up]
    if gradient_checkpointing:
        blocks = sorted({p.split(".attn")[0] for p in targets})  # ...transformer_blocks.N
        for path in blocks:
            parent_path, _, name = path.rpartition(".")
            parent = unet.get_submodule(parent_path)
            parent[int(name)] = Checkpointed(parent[int(name)])
    return params


def train(unet: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, y: torch.Tensor, params, steps: int,
          lr: float, dtype: torch.dtype, on_step: Callable[[], None], seed: int = 0) -> list[float]:
    """``steps`` AdamW steps of ε-MSE on ``x0`` (1, 4, h, w) (already scaled to the model's latent space), on
    x0's device (CUDA: fused AdamW; the losses stay on the device until the end, so no step waits for it)."""
    device = x0.device
    sigmas = sdxl_sigmas().to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, **fused)
    generator = torch.Generator().manual_seed(seed)
    context, y = context.to(device, dtype), y.to(device, dtype)
    pending = []
    for _ in range(steps):
        t = torch.randint(0, len(sigmas), (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigma = sigmas[t.to(device)].view(-1, 1, 1, 1)
        x = (x0 + sigma * noise) / torch.sqrt(sigma ** 2 + 1)
        out = unet(x.to(dtype), t.float().to(device), context=context, y=y)
        loss = F.mse_loss(out.float(), noise)
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
