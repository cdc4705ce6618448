"""LoRA (and LoCon with a Tucker ``mid`` core): ΔW = up @ down, rank = down's first dim.

Tensors: down (r, in[, kh, kw]), up (out, r[, 1, 1]), optional mid (r, r, kh, kw) (LoCon Tucker: down and up are
then 1×1). Trainable form: ``TrainableLoRA`` (plain LoRA or DoRA, see its doc).
"""
from __future__ import annotations

import torch

from ...errors import BLoRAError
from .base import Kind, LowRank, ModuleAdapter, Tensors, register
from ..trainable import DORA_EPS, Trainable, column_norm, initial_magnitude  # noqa: F401

# How a fresh adapter's down matrix is drawn (up always starts at zero, so W' = W at step 0):
#   gaussian: normal, std 1/rank (the original B-LoRA training: diffusers LoRALinearLayer, PEFT
#             init_lora_weights="gaussian");
#   kaiming_uniform: uniform in +-1/sqrt(in) (kaiming-uniform with a=sqrt(5), PEFT's default).
INITIALISATIONS = ("gaussian", "kaiming_uniform")


def initial_down(rank: int, in_features: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """A fresh (rank, in) down matrix, float32 on the CPU, drawn from ``generator`` as ``init`` says."""
    if init == "gaussian":
        return torch.randn(rank, in_features, generator=generator) / rank
    if init == "kaiming_uniform":
        return (torch.rand(rank, in_features, generator=generator) * 2 - 1) / in_features ** 0.5
    raise BLoRAError(f"unknown initialisation {init!r}: expected one of {', '.join(INITIALISATIONS)}")


@register
class LoRA(Kind):
    name, label = "lora", "LoRA"
    required, optional = ("down", "up"), ("mid",)
    plain = ("down", "up")
    read_suffixes = {
        ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
        ".lora.down.weight": "down", ".lora.up.weight": "up",
        "_lora.down.weight": "down", "_lora.up.weight": "up",  # old attention processors
        ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
        ".lora_A.weight": "down", ".lora_B.weight": "up",
        ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
        ".down.weight": "down", ".up.weight": "up",  # XLabs FLUX: processor.qkv_lora1.down.weight
    }
    kohya_suffixes = {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight"}

    def suffixes(self, down_up: tuple[str, str]) -> dict[str, str]:
        return {**super().suffixes(down_up), "down": down_up[0], "up": down_up[1]}

    def rank(self, t: Tensors) -> int:
        return int(t["down"].shape[0])

    def check(self, t: Tensors) -> str | None:
        down, up = t["down"], t["up"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim:
            return (f"lora down {tuple(down.shape)} and up {tuple(up.shape)} are not 2-D (linear) or 4-D (conv) "
                    f"alike")
        if down.shape[0] != up.shape[1]:
            return f"rank mismatch: down {tuple(down.shape)}, up {tuple(up.shape)}"
        if "mid" in t and (t["mid"].ndim != 4 or tuple(t["mid"].shape[:2]) != (down.shape[0], down.shape[0])):
            return f"lora mid {tuple(t['mid'].shape)} is not a (r, r, kh, kw) core for rank {down.shape[0]}"
        return None

    def out_in(self, t: Tensors) -> tuple[int, int]:
        return int(t["up"].shape[0]), int(t["down"].shape[1])

    def delta(self, t: Tensors) -> torch.Tensor:
        down, up = t["down"].float(), t["up"].float()
        if "mid" in t:  # LoCon Tucker, as ComfyUI's lora adapter computes it
            mid = t["mid"].float()
            shape = (down.shape[1], down.shape[0], mid.shape[2], mid.shape[3])
            down = (down.transpose(0, 1).flatten(1) @ mid.transpose(0, 1).flatten(1)).reshape(shape).transpose(0, 1)
        if down.ndim == 2:
            return up @ down
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    def low_rank(self, t: Tensors) -> LowRank | None:
        if "mid" in t or t["down"].ndim != 2:
            return None
        return LowRank(up=t["up"], down=t["down"])

    def fold_scale(self, t: Tensors, scale: float) -> dict[str, torch.Tensor]:
        up = t["up"]
        return {**t, "up": (up.float() * scale).to(up.dtype)} if scale != 1.0 else dict(t)

    def delta_bound(self, t: Tensors, scale: float) -> float | None:
        """A cheap bound on max|ΔW| (no matmul): |scale| · r · max|up| · max|down| (None with a mid core)."""
        if "mid" in t:
            return None
        return abs(scale) * self.rank(t) * float(t["up"].abs().amax()) * float(t["down"].abs().amax())


class TrainableLoRA(Trainable):
    """LoRA (or DoRA with a magnitude) of one Linear weight, as a weight function W -> W' (``Trainable``):
    W' = W + scale · up @ down. down: (r, in) as ``initial_down`` draws it; up: (out, r) zeros; magnitude: (1, in)
    for DoRA (the column norm of W plus eps, so W' = W at the start)."""

    kind = LoRA.name
    plus = ("up",)
    factored = True

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None):
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise BLoRAError(f"trainable LoRA needs down (r, in) and up (out, r), got {tuple(down.shape)} and "
                             f"{tuple(up.shape)}")
        super().__init__({"down": down, "up": up}, scale, magnitude)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, scale: float, dora: bool,
               generator: torch.Generator, init: str = "gaussian") -> "TrainableLoRA":
        """A fresh adapter for ``weight`` (out, in), drawn from ``generator`` (CPU), on weight's device."""
        out_features, in_features = weight.shape
        down = initial_down(rank, in_features, init, generator)
        up = torch.zeros(out_features, rank)
        magnitude = initial_magnitude(weight) if dora else None
        dev = weight.device
        return cls(down.to(dev), up.to(dev), scale, None if magnitude is None else magnitude.to(dev))

    @classmethod
    def from_module(cls, module: ModuleAdapter) -> "TrainableLoRA":
        """Continue training a saved ``lora`` module: scale as the file renders it (stored alpha / rank)."""
        if module.kind != cls.kind or "mid" in module.tensors:
            raise BLoRAError(f"only plain LoRA modules can be trained further, got {module.kind}")
        return super().from_module(module)

    @classmethod
    def build(cls, tensors, scale: float, magnitude: torch.Tensor | None = None) -> "TrainableLoRA":
        return cls(tensors["down"], tensors["up"], scale, magnitude)

    def delta(self) -> torch.Tensor:
        """scale * up @ down, (out, in), float32."""
        return self.scale * (self.up @ self.down)

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(x downᵀ) upᵀ: rank-r work per row, no (out, in) matrix."""
        linear = torch.nn.functional.linear
        return linear(linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
