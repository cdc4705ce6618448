"""Training sets for Train B-LoRA: a folder of captioned images (the pack's loader, the same on every host), or
the images and per-image conditionings of the host's own loaders."""
from __future__ import annotations

import logging

import folder_paths
import node_helpers
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps

from ..blora.errors import BLoRAError
from ..blora.train.dataset import TrainingSet, folder_images, subfolder

log = logging.getLogger(__name__)
TrainingSetType = io.Custom("BLORA_TRAINING_SET")
DEFAULT_CAPTION = "A [v]"


def load_rgb(path) -> torch.Tensor:
    """One image file as IMAGE (1, H, W, 3) float32 in [0, 1], EXIF orientation applied (as LoadImage does)."""
    try:
        img = node_helpers.pillow(Image.open, str(path))
        img = node_helpers.pillow(ImageOps.exif_transpose, img)
        if img.mode == "I":
            img = img.point(lambda i: i * (1 / 255))
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BLoRAError(f"{path}: cannot read the image ({e})") from e
    return torch.from_numpy(pixels.copy())[None]


def encode_captions(clip, captions: list[str]) -> list:
    """One CONDITIONING entry per caption, as CLIPTextEncode makes it (each distinct caption encoded once)."""
    if clip is None:
        raise BLoRAError("clip: no text encoder connected (the checkpoint may hold none)")
    encoded: dict[str, list] = {}
    for text in dict.fromkeys(captions):
        encoded[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0]
    return [encoded[text] for text in captions]


class BLoRATrainingFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRATrainingFolder", display_name="Load B-LoRA Training Folder", category="B-LoRA/train",
            description="A folder of images with .txt captions (cat.png + cat.txt; kohya '<repeats>_<name>' "
                        "subfolders too) as a training set for Train B-LoRA: each caption encoded with the CLIP, "
                        "images kept at their own sizes (Train B-LoRA resizes and buckets them).",
            inputs=[io.Combo.Input("folder", options=folder_paths.get_input_subfolders(),
                                   tooltip="A subfolder of ComfyUI's input folder holding the images."),
                    io.Clip.Input("clip", tooltip="Text encoder for the captions (the SDXL checkpoint's CLIP)."),
                    io.String.Input("default_caption", default=DEFAULT_CAPTION,
                                    tooltip="Caption of images without a .txt file (B-LoRA's prompt: 'A [v]' with "
                                            "a rare token).")],
            outputs=[TrainingSetType.Output(display_name="training_set",
                                            tooltip="Images and per-image conditioning, for Train B-LoRA."),
                     io.String.Output(display_name="summary", tooltip="Images, captions and sizes found.")])

    @classmethod
    def execute(cls, folder: str, clip, default_caption: str) -> io.NodeOutput:
        items = folder_images(subfolder(folder_paths.get_input_directory(), folder), default_caption)
        images, captions = [], []
        for item in items:
            pixels = load_rgb(item.path)
            images += [pixels] * item.repeats
            captions += [item.caption] * item.repeats
        training_set = TrainingSet(images, encode_captions(clip, captions), captions)
        log.info("B-LoRA training folder %s: %s", folder, training_set.summary())
        return io.NodeOutput(training_set, training_set.summary())


def _entries(conditionings: list) -> list:
    """The [context, extras] entries of a list of CONDITIONING values, in order."""
    return [entry for cond in conditionings for entry in cond]


class BLoRATrainingSet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRATrainingSet", display_name="B-LoRA Training Set", category="B-LoRA/train",
            description="Images and their conditionings from the host's own nodes (e.g. 'Load Image-Text (from "
                        "Folder)' with a CLIP Text Encode per caption, or 'Load Image and Text Dataset from "
                        "Folder') as a training set for Train B-LoRA. Images may have different sizes.",
            is_input_list=True,
            inputs=[io.Image.Input("images", tooltip="Images: a list, a batch, or both."),
                    io.Conditioning.Input("positive", tooltip="One conditioning per image, in the same order, or "
                                                              "one for all.")],
            outputs=[TrainingSetType.Output(display_name="training_set",
                                            tooltip="Images and per-image conditioning, for Train B-LoRA."),
                     io.String.Output(display_name="summary", tooltip="Images, captions and sizes found.")])

    @classmethod
    def execute(cls, images: list, positive: list) -> io.NodeOutput:
        singles = [batch[i:i + 1] for batch in images for i in range(batch.shape[0])]
        entries = _entries(positive)
        if len(entries) == 1:
            entries = entries * len(singles)
        if len(entries) != len(singles):
            raise BLoRAError(f"positive: {len(entries)} conditionings for {len(singles)} images; give one per "
                             f"image (in order) or one for all")
        training_set = TrainingSet(singles, entries, [""] * len(singles))
        return io.NodeOutput(training_set, training_set.summary())


NODES = [BLoRATrainingFolder, BLoRATrainingSet]
