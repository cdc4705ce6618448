"""DoRA rendered against a base weight: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm per output row or per input column.

Two renderings, picked by ``ModuleAdapter.dora_norm``:
- "adapted" (per output row; PEFT's ``lora_magnitude_vector``, LyCORIS 3.2+'s (out, 1) ``dora_scale``): the norm of
  W + ΔW over all but the output axis, no eps, as PEFT computes it (LyCORIS adds float32 eps: 1e-7 relative).
- None with an input-axis (1, in) ``dora_scale`` (older LyCORIS, this pack's trainer): the norm of W + ΔW per input
  column plus float32 eps, as stock ComfyUI and LyCORIS (``wd_on_out=False``) compute it.
Strength is applied by the caller: the host interpolates W + s·(W' − W).
"""
from __future__ import annotations

import torch

from .adapter import ModuleAdapter, delta_weight
from ..errors import BLoRAError

ADAPTED = "adapted"


def dora_weight(module: ModuleAdapter, weight: torch.Tensor) -> torch.Tensor:
    """W' (float32) of a DoRA module over base weight ``weight`` at strength 1."""
    if module.dora_scale is None:
        raise BLoRAError("dora_weight: the module carries no DoRA magnitude")
    delta = delta_weight(module)
    adapted = weight.to(delta.device, torch.float32) + delta
    magnitude = module.dora_scale.to(delta.device, torch.float32)
    if module.dora_norm == ADAPTED:
        shape = (adapted.shape[0],) + (1,) * (adapted.ndim - 1)
        norm = adapted.reshape(adapted.shape[0], -1).norm(dim=1).reshape(shape)
        return adapted * (magnitude.reshape(shape) / norm.clamp_min(torch.finfo(torch.float32).tiny))
    if magnitude.shape[0] == 1 and magnitude.numel() == adapted.shape[1]:
        shape = (1, adapted.shape[1]) + (1,) * (adapted.ndim - 2)
        norm = adapted.transpose(0, 1).reshape(adapted.shape[1], -1).norm(dim=1).reshape(shape)
        return adapted * (magnitude.reshape(shape) / (norm + torch.finfo(torch.float32).eps))
    raise BLoRAError(f"dora_weight: a DoRA scale of shape {tuple(magnitude.shape)} is neither per output row "
                     f"(dora_norm 'adapted') nor per input column (1, {adapted.shape[1]})")
