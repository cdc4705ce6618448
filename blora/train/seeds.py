"""Several B-LoRA seeds trained as one: N LoRA adapters of one Linear layer stacked, each row of the batch going
through its own seed's adapter. Pure torch; the host side is ``blora.host.train_seeds``.

Rows are seed-major: a batch of N·B rows holds seed 0's B rows, then seed 1's, and so on. For seed n and its rows
x_n: ``delta = scale · (x_n A_nᵀ) B_nᵀ``, the same ΔW x a single-seed ``TrainableLoRA`` applies (there merged into
the weight). Seeds never share a parameter, so summing the seeds' losses gives each seed exactly the gradient of its
own single-seed run; gradient clipping is done per seed (``clip_per_seed``), and AdamW/SGD act elementwise.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from einops import einsum, rearrange

from ..errors import BLoRAError
from ..adapters.kinds.lora import TrainableLoRA


def seeds_of(seed: int, count: int) -> list[int]:
    """The initialisation seed of each of ``count`` seeds: seed, seed + 1, …"""
    return [seed + n for n in range(count)]


class SeedsLoRA(torch.nn.Module):
    """N LoRA adapters of one weight (out, in): down (N, r, in), up (N, out, r), float32, one scale."""

    plus = TrainableLoRA.plus  # LoRA+ trains the up matrices faster (``blora.train.recipe.param_groups``)

    def __init__(self, singles: Sequence[TrainableLoRA]):
        super().__init__()
        if not singles or any(s.magnitude is not None for s in singles):
            raise BLoRAError("seeds train plain LoRA factors: DoRA and other kinds are not batched per seed")
        self.down = torch.nn.Parameter(torch.stack([s.down.detach() for s in singles]).clone())
        self.up = torch.nn.Parameter(torch.stack([s.up.detach() for s in singles]).clone())
        self.scale = float(singles[0].scale)
        self.multiplier = 1.0

    on_activations = True  # always added on the layer's output (``output_delta``)

    @property
    def seeds(self) -> int:
        return int(self.down.shape[0])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Output deltas of seed-major rows x (N·B, ..., in) -> (N·B, ..., out), in x's dtype."""
        n = self.seeds
        if x.shape[0] % n:
            raise BLoRAError(f"seed batch: {x.shape[0]} rows are not {n} seeds of equal size")
        rows = rearrange(x, "(n b) ... i -> n b ... i", n=n)
        hidden = einsum(rows, self.down.to(x.dtype), "n b ... i, n r i -> n b ... r")
        out = einsum(hidden, self.up.to(x.dtype), "n b ... r, n o r -> n b ... o") * self.scale
        return rearrange(out, "n b ... o -> (n b) ... o")

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``delta(x)`` times ``multiplier`` (what training adds to the layer's output)."""
        return self.delta(x) * self.multiplier if self.multiplier != 1.0 else self.delta(x)

    def seed_delta(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """Seed n's output delta for every row of x (..., in) -> (..., out), times ``multiplier``, in x's dtype
        (validation previews sample one seed at a time)."""
        hidden = einsum(x, self.down[n].to(x.dtype), "... i, r i -> ... r")
        return einsum(hidden, self.up[n].to(x.dtype), "... r, o r -> ... o") * (self.scale * self.multiplier)

    def single(self, n: int) -> TrainableLoRA:
        """Seed n as a single-seed adapter (detached copies), e.g. to export or save it."""
        return TrainableLoRA(self.down[n].detach(), self.up[n].detach(), self.scale)


def clip_per_seed(adapters: Iterable[SeedsLoRA], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to each seed's gradients on their own (L2 norm over all of the
    seed's parameters, coefficient max_norm / (norm + 1e-6) capped at 1). Returns the seeds' norms (N,)."""
    grads = [p.grad for a in adapters for p in (a.down, a.up) if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([g.float().flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (N,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).reshape(-1, *([1] * (g.ndim - 1))))
    return norms
