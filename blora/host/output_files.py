"""``<output>/loras/``: the folder the pack writes adapters into (Train B-LoRA, Save B-LoRA), and the host's counter
naming there: ``<prefix>_<NNNNN>_.safetensors``. Names that would leave the folder are refused."""
from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths

from ..errors import BLoRAError
from ..formats.files import safe_path

SUFFIX = ".safetensors"
OUTPUT_SUBFOLDER = "loras"


def output_loras_folder() -> str:
    """``<output>/loras``: where trained files go."""
    return os.path.join(folder_paths.get_output_directory(), OUTPUT_SUBFOLDER)


def register_output_loras() -> None:
    """List ``<output>/loras`` among the host's ``loras`` folders (after the others), so stock LoraLoader and the
    pack's loaders find trained files."""
    folder = output_loras_folder()
    if folder not in folder_paths.get_folder_paths("loras"):
        folder_paths.add_model_folder_path("loras", folder)


@dataclass(frozen=True)
class SaveTarget:
    """folder: the loras output folder; stem: the run's file name without counter suffix and extension, relative
    to folder (``sub/name_00001``)."""

    folder: str
    stem: str

    @property
    def final(self) -> str:
        return f"{self.stem}_{SUFFIX}"

    def checkpoint(self, step: int) -> str:
        return f"{self.stem}_step{step:06d}_{SUFFIX}"


def check_prefix(filename_prefix: str) -> str:
    """The prefix without a ``.safetensors`` suffix; UnsafePathError for names that would leave the folder."""
    prefix = filename_prefix.strip()
    if prefix.lower().endswith(SUFFIX):
        prefix = prefix[:-len(SUFFIX)]
    if not prefix:
        raise BLoRAError("filename_prefix is empty: give a file name prefix such as 'blora' or 'mine/style'")
    safe_path(output_loras_folder(), f"{prefix}_00001_{SUFFIX}")
    return prefix


def save_target(filename_prefix: str) -> SaveTarget:
    """The run's file names, with the host's counter (``folder_paths.get_save_image_path``, as the host's savers
    and Save B-LoRA name files): ``<prefix>_<NNNNN>_.safetensors``. Creates the (sub)folder."""
    prefix = check_prefix(filename_prefix)
    folder = os.path.abspath(output_loras_folder())
    os.makedirs(folder, exist_ok=True)
    _, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder)
    return SaveTarget(folder, os.path.join(subfolder, f"{name}_{counter:05d}"))
