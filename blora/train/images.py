"""Training images: whatever a graph feeds in, made into RGB float images, and the training size of each.

IMAGE tensors in ComfyUI are (B, H, W, C) float in [0, 1]. Odd inputs are handled so:
- channels: 1 (grayscale) is repeated to RGB, 3 is kept, 4 (RGBA) drops alpha as the host's image loader does;
  any other count is refused;
- integer tensors are scaled by their range (uint8: 255; wider integers hold 16-bit data: 65535); float values a
  little outside [0, 1] are clamped, values far outside are refused (likely 0-255 data);
- size (``training_size``): each image's short side at ``resolution`` (aspect kept), each side rounded to a
  multiple of ``multiple`` (the latent grid); the training set (``blora.train.dataset``) resizes each image on its
  own to that size, antialiased (``blora.train.augment``); no crop.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import BLoRAError

INTEGER_RANGES = {torch.uint8: 255.0, torch.int16: 65535.0, torch.int32: 65535.0, torch.int64: 65535.0,
                  **({torch.uint16: 65535.0} if hasattr(torch, "uint16") else {})}
FLOAT_SLACK = 1.0 / 255.0  # float values this far outside [0, 1] are clamped; further is an error


def _rgb(image: torch.Tensor, index: int) -> torch.Tensor:
    channels = image.shape[-1]
    if channels == 1:
        return image.expand(*image.shape[:-1], 3)
    if channels in (3, 4):
        return image[..., :3]
    raise BLoRAError(f"image {index}: {channels} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)")


def _unit_range(image: torch.Tensor, index: int) -> torch.Tensor:
    if image.dtype == torch.bool:
        return image.float()
    if image.dtype in INTEGER_RANGES:
        return (image.float() / INTEGER_RANGES[image.dtype]).clamp(0.0, 1.0)
    image = image.float()
    if image.numel() and (image.min() < -FLOAT_SLACK or image.max() > 1.0 + FLOAT_SLACK):
        raise BLoRAError(f"image {index}: values from {image.min().item():.3g} to {image.max().item():.3g}; IMAGE "
                         f"tensors hold floats in [0, 1]")
    return image.clamp(0.0, 1.0)


def training_size(height: int, width: int, resolution: int, multiple: int = 8) -> tuple[int, int]:
    """(height, width) with the short side at ``resolution``, aspect kept, each rounded to ``multiple``."""
    factor = resolution / min(height, width)
    return tuple(max(multiple, int(round(s * factor / multiple)) * multiple) for s in (height, width))


def _split(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    items = [images] if isinstance(images, torch.Tensor) else list(images)
    out = []
    for item in items:
        if item.ndim == 3:
            item = item.unsqueeze(0)
        if item.ndim != 4:
            raise BLoRAError(f"images: expected (B, H, W, C) tensors, got shape {tuple(item.shape)}")
        out.extend(item[i] for i in range(item.shape[0]))
    if not out:
        raise BLoRAError("no training images: connect at least one image")
    return out


def unit_rgb(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One (H, W, 3) float32 image in [0, 1] per input image, each at its own size (the value rules above)."""
    out = []
    for index, image in enumerate(_split(images)):
        if min(image.shape[0], image.shape[1]) < 1:
            raise BLoRAError(f"image {index}: empty ({tuple(image.shape)})")
        out.append(_rgb(_unit_range(image, index), index).float())
    return out

