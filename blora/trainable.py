"""The trainable adapter of one Linear weight: LoRA (optionally rsLoRA-scaled) or DoRA, as a weight function.

``TrainableLoRA(W) -> W'`` with W: (out, in):
    LoRA: W' = W + scale * up @ down
    DoRA: W' = m * (W + scale * up @ down) / (||W + scale * up @ down||_col + eps), m: (1, in)
The DoRA form is the input-axis one stock ComfyUI renders from a ``dora_scale`` of shape (1, in)
(``comfy.weight_adapter.base.weight_decompose``): column norms over the output axis, eps = float32 eps, all in
float32. As in the DoRA paper (and PEFT) the norm is treated as a constant in backward.
"""
from __future__ import annotations

import torch

from .adapter import ModuleAdapter
from .errors import BLoRAError

DORA_EPS = torch.finfo(torch.float32).eps


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_col: the norm over the output axis of each input column, (out, in) -> (1, in), float32."""
    return weight.float().norm(dim=0, keepdim=True)


class TrainableLoRA(torch.nn.Module):
    """down: (r, in) uniform(+-1/sqrt(in)) (kaiming-uniform, a=sqrt(5)); up: (out, r) zeros; magnitude: (1, in)
    for DoRA (the column norm of W plus eps, so W' = W at the start). Parameters are float32."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None):
        super().__init__()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise BLoRAError(f"trainable LoRA needs down (r, in) and up (out, r), got {tuple(down.shape)} and "
                             f"{tuple(up.shape)}")
        self.down = torch.nn.Parameter(down.detach().float().clone())
        self.up = torch.nn.Parameter(up.detach().float().clone())
        self.magnitude = None if magnitude is None else torch.nn.Parameter(magnitude.detach().float().clone())
        self.scale = float(scale)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, scale: float, dora: bool,
               generator: torch.Generator) -> "TrainableLoRA":
        """A fresh adapter for ``weight`` (out, in), drawn from ``generator`` (CPU), on weight's device."""
        out_features, in_features = weight.shape
        bound = 1.0 / in_features ** 0.5
        down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        up = torch.zeros(out_features, rank)
        magnitude = column_norm(weight) + DORA_EPS if dora else None
        dev = weight.device
        return cls(down.to(dev), up.to(dev), scale, None if magnitude is None else magnitude.to(dev))

    @classmethod
    def from_module(cls, module: ModuleAdapter) -> "TrainableLoRA":
        """Continue training a saved module: scale as the file renders it (stored alpha / rank)."""
        if module.kind != "lora" or "mid" in module.tensors:
            raise BLoRAError(f"only plain LoRA modules can be trained further, got {module.kind}")
        ds = module.dora_scale
        if ds is not None and (ds.ndim != 2 or ds.shape[0] != 1):
            raise BLoRAError(f"DoRA magnitude of shape {tuple(ds.shape)} cannot be trained further: expected the "
                             f"input-axis form (1, in)")
        return cls(module.tensors["down"], module.tensors["up"], module.scale, ds)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """scale * up @ down, (out, in), float32."""
        return self.scale * (self.up @ self.down)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        merged = weight.float() + self.delta()
        if self.magnitude is not None:
            merged = merged * (self.magnitude / (column_norm(merged).detach() + DORA_EPS))
        return merged.to(weight.dtype)

    def export(self, alpha: float, dtype: torch.dtype = torch.float32) -> ModuleAdapter:
        """The trained module as a ``lora`` ModuleAdapter (detached copies in ``dtype``); ``alpha`` is the stored
        alpha (scale * rank)."""
        tensors = {"down": self.down.detach().to(dtype).clone(), "up": self.up.detach().to(dtype).clone()}
        ds = None if self.magnitude is None else self.magnitude.detach().to(dtype).clone()
        return ModuleAdapter("lora", tensors, alpha=float(alpha), dora_scale=ds)

    # The host's weight-function protocol (ModelPatcher moves weight functions with the model).
    def move_to(self, device: torch.device) -> int:
        self.to(device)
        return self.passive_memory_usage()

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
