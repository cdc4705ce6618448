"""Training sets as users keep them, and what training makes of them (torch and the standard library only).

- A folder of images with captions: ``cat.png`` + ``cat.txt``; images in the kohya layout (subfolders
  ``<repeats>_<name>``, each image counted ``repeats`` times) are read too. Images without a caption file get the
  default caption. Nothing outside the folder is read (links that lead out are refused).
- Views: what the VAE encodes, made once before the first step: one per image, or AUGMENTED_VIEWS per image
  when random crop or colour jitter is on (each view its own draw), each resized so its short side is the
  training resolution (aspect kept, no crop unless random crop is on).
- Buckets: images of mixed sizes cannot share a batch. With batch_size > 1 each size is rounded to BUCKET_STEP
  pixels, so images of about the same aspect ratio share a size (a bucket), and each micro-batch is drawn from one
  bucket (chosen with probability proportional to its size); with batch_size 1 every image keeps its own size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import BLoRAError, UnsafePathError
from .augment import Crop, color_jitter, crop, random_crop_box, resize
from .images import training_size, unit_rgb
from .recipe import sample_batch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
AUGMENTED_VIEWS = 4  # views encoded per image when an augmentation is on
MIN_CROP_AREA = 0.64  # a random crop keeps at least this share of the image's area (80% of each side)
BUCKET_STEP = 64  # pixels: sizes are rounded to this when batches must share a size
LATENT_STEP = 8  # pixels: the latent grid
AUGMENT_SEED_OFFSET = 0x5EED  # augmentation draws use their own stream, so turning them on changes no other draw


@dataclass(frozen=True)
class FolderImage:
    """One image of a training folder: its path, its caption (default when it has no .txt) and repeats."""

    path: Path
    caption: str
    repeats: int = 1


def _inside(root: Path, path: Path) -> Path:
    real = path.resolve()
    if real != root and root not in real.parents:
        raise UnsafePathError(f"{path}: leads outside the training folder {root}")
    return real


def subfolder(root: str | os.PathLike, name: str) -> Path:
    """The folder ``name`` inside ``root``, resolved. Raises UnsafePathError for the root itself and for names or
    links that lead outside it."""
    base = Path(root).resolve()
    path = _inside(base, base / name)
    if path == base:
        raise UnsafePathError(f"folder {name!r}: not a subfolder of {base}")
    return path


def _repeats(name: str) -> int | None:
    head, sep, _ = name.partition("_")
    return int(head) if sep and head.isdigit() and int(head) > 0 else None


def _caption(image: Path, default: str) -> str:
    text_file = image.with_suffix(".txt")
    if not text_file.is_file():
        return default
    try:
        text = text_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BLoRAError(f"{text_file}: cannot read the caption ({e})") from e
    return text or default


def folder_images(folder: str | os.PathLike, default_caption: str = "") -> list[FolderImage]:
    """The images of a training folder, sorted by name: its own, then those of kohya ``<repeats>_<name>``
    subfolders (other subfolders count once). Raises BLoRAError naming the folder when it holds no image."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise BLoRAError(f"{folder}: not a folder")
    found: list[FolderImage] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            sub = _inside(root, entry)
            repeats = _repeats(entry.name) or 1
            for item in sorted(sub.iterdir()):
                if item.suffix.lower() in IMAGE_EXTENSIONS and item.is_file():
                    _inside(root, item)
                    found.append(FolderImage(item, _caption(item, default_caption), repeats))
        elif entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
            _inside(root, entry)
            found.append(FolderImage(entry, _caption(entry, default_caption)))
    if not found:
        raise BLoRAError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder or its subfolders")
    return found


@dataclass
class View:
    """One encoded training view: which input image it shows, its pixels (h, w, 3), the image's size before
    resizing and the crop's top-left corner in the resized image (SDXL's size conditioning)."""

    index: int
    image: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)


def _augmented(image: torch.Tensor, size: tuple[int, int], random_crop: bool, jitter: float,
               generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = int(image.shape[0]), int(image.shape[1])
    box = random_crop_box(h, w, MIN_CROP_AREA, generator) if random_crop else Crop(0, 0, h, w)
    out = resize(crop(image, box), size)
    factor = size[0] / box.height  # the crop window as a window of the whole image resized by the same factor
    corner = (round(box.top * factor), round(box.left * factor))
    return color_jitter(out, jitter, generator), corner


def training_views(images, resolution: int, *, batch_size: int = 1, random_crop: bool = False,
                   color_jitter_strength: float = 0.0, seed: int = 0) -> list[View]:
    """The views training encodes, in image order. images: an IMAGE tensor (B, H, W, C) or a sequence of
    IMAGE tensors of any sizes (value rules: ``blora.train.images``)."""
    step = BUCKET_STEP if batch_size > 1 else LATENT_STEP
    sources = unit_rgb(images)
    sizes = [training_size(s.shape[0], s.shape[1], resolution, step) for s in sources]
    originals = [(int(s.shape[0]), int(s.shape[1])) for s in sources]
    if not (random_crop or color_jitter_strength > 0):
        return [View(i, resize(s, size), originals[i]) for i, (s, size) in enumerate(zip(sources, sizes))]
    generator = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
    views = []
    for i, (source, size) in enumerate(zip(sources, sizes)):
        for _ in range(AUGMENTED_VIEWS):
            pixels, corner = _augmented(source, size, random_crop, color_jitter_strength, generator)
            views.append(View(i, pixels, originals[i], corner))
    return views


def bucket_groups(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices grouped by equal size, groups in order of their first member."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    return list(groups.values())


def sample_bucketed_batch(groups: Sequence[Sequence[int]], batch_size: int, generator: torch.Generator) -> list[int]:
    """One micro-batch of indices from a single bucket. With one bucket this draws exactly what
    ``blora.train.recipe.sample_batch`` draws over all images; with several, the bucket is drawn first (probability
    proportional to its size), then a random permutation within it (repeated when the batch exceeds it)."""
    if len(groups) == 1:
        return [groups[0][i] for i in sample_batch(len(groups[0]), batch_size, generator)]
    weights = torch.tensor([float(len(g)) for g in groups])
    chosen = groups[int(torch.multinomial(weights, 1, generator=generator))]
    return [chosen[i] for i in sample_batch(len(chosen), batch_size, generator)]


@dataclass
class TrainingSet:
    """Images with their conditioning, for Train B-LoRA: images, one IMAGE tensor (1, H, W, C) each, any sizes;
    conditioning: one CONDITIONING entry ``[context, extras]`` per image (the host's value, opaque here);
    captions: the text of each image where known."""

    images: list[torch.Tensor]
    conditioning: list
    captions: list[str]

    def __post_init__(self) -> None:
        if not self.images:
            raise BLoRAError("the training set holds no images")
        if len(self.conditioning) != len(self.images):
            raise BLoRAError(f"the training set has {len(self.images)} images but {len(self.conditioning)} "
                             f"conditionings: give one per image")

    def summary(self) -> str:
        sizes = sorted({(int(i.shape[-3]), int(i.shape[-2])) for i in self.images})
        shown = ", ".join(f"{w}x{h}" for h, w in sizes[:4]) + (" …" if len(sizes) > 4 else "")
        captions = len({c for c in self.captions if c})
        return f"{len(self.images)} images, {captions} distinct captions, sizes {shown}"
