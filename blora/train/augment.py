"""Pixel operations on training images, on kornia: antialiased resize and the augmentations random crop and
colour jitter (the horizontal flip mirrors the encoded latent instead: ``blora.host.train_inputs``). Images here
are (H, W, 3) float32 in [0, 1] (ComfyUI's IMAGE layout); kornia works on (B, C, H, W), einops converts.
Every random draw comes from a caller's ``torch.Generator`` so a run is repeatable, and kornia is used through its
functional ops (its augmentation modules draw from the global RNG).
"""
from __future__ import annotations

from dataclasses import dataclass

import kornia
import torch
from einops import rearrange

# Colour jitter at strength s scales brightness, contrast and saturation by factors in [1 - s, 1 + s] and turns
# the hue by up to s * HUE_SHARE of a half turn (hue is the most visible change, so it moves least).
HUE_SHARE = 0.1


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) -> (h, w, 3) with bicubic interpolation, antialiased when shrinking; values kept in [0, 1]."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    bchw = rearrange(image, "h w c -> 1 c h w")
    out = kornia.geometry.transform.resize(bchw, tuple(size), interpolation="bicubic", antialias=True)
    return rearrange(out, "1 c h w -> h w c").clamp(0.0, 1.0).contiguous()


@dataclass(frozen=True)
class Crop:
    """A window of an image: top, left, height, width in pixels."""

    top: int
    left: int
    height: int
    width: int


def random_crop_box(height: int, width: int, min_scale: float, generator: torch.Generator) -> Crop:
    """A window with the image's aspect ratio covering a random share in [min_scale, 1] of its area, at a random
    place."""
    u = torch.rand(3, generator=generator)
    area = min_scale + (1.0 - min_scale) * float(u[0])
    side = area ** 0.5
    h, w = max(1, round(height * side)), max(1, round(width * side))
    return Crop(int(float(u[1]) * (height - h + 1)), int(float(u[2]) * (width - w + 1)), h, w)


def crop(image: torch.Tensor, box: Crop) -> torch.Tensor:
    return image[box.top:box.top + box.height, box.left:box.left + box.width]


def color_jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue (kornia.enhance), each drawn from ``generator``; strength 0
    returns the image unchanged."""
    if strength <= 0:
        return image
    u = torch.rand(4, generator=generator) * 2 - 1  # each in [-1, 1)
    bchw = rearrange(image, "h w c -> 1 c h w")
    bchw = kornia.enhance.adjust_brightness(bchw, float(u[0]) * strength)  # additive shift
    bchw = kornia.enhance.adjust_contrast(bchw, 1.0 + float(u[1]) * strength)
    bchw = kornia.enhance.adjust_saturation(bchw, 1.0 + float(u[2]) * strength)
    bchw = kornia.enhance.adjust_hue(bchw, float(u[3]) * strength * HUE_SHARE * torch.pi)
    return rearrange(bchw, "1 c h w -> h w c").clamp(0.0, 1.0).contiguous()
