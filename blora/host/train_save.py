"""Where a trained B-LoRA is written (``<output>/loras/``), under which name, and with which metadata.

Files: ``<prefix>_<NNNNN>_.safetensors`` (the host's counter naming, as its own savers and Save B-LoRA use) and,
with ``save_every``, checkpoints ``<prefix>_<NNNNN>_step<SSSSSS>_.safetensors``. Names that escape the folder are
refused before training starts. Writes go through ``blora.files.write_adapter`` (kohya LDM dialect, explicit
alpha, atomic).
"""
from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import folder_paths
import torch

from ..adapter import Adapter
from ..errors import BLoRAError
from ..files import safe_path, write_adapter
from ..training import TrainConfig

SUFFIX = ".safetensors"
OUTPUT_SUBFOLDER = "loras"
HASHED_WEIGHTS = 4  # weights (first and last of the sorted UNet keys) hashed to identify the base model
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


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


def pack_version() -> str:
    try:
        return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def base_model_fingerprint(model) -> tuple[str, str]:
    """(name, hash): the model config's class name and a sha256 prefix over a few UNet weights (float32 bytes)."""
    base = model.model
    unet = base.diffusion_model.state_dict()
    keys = sorted(k for k in unet if k.endswith(".weight"))
    chosen = keys[:HASHED_WEIGHTS // 2] + keys[-(HASHED_WEIGHTS // 2):]
    digest = hashlib.sha256()
    for key in chosen:
        digest.update(key.encode())
        digest.update(unet[key].detach().float().cpu().contiguous().numpy().tobytes())
    return type(base.model_config).__name__, digest.hexdigest()[:16]


def train_metadata(config: TrainConfig, steps_total: int, base: tuple[str, str], prediction: str) -> dict[str, str]:
    """The training record written beside the tensors (``blora.*``, plus the kohya ``ss_*`` keys other tools
    show). Roles, blocks, rank and stored alpha are added by ``write_adapter``."""
    meta = {
        "blora.algorithm": config.algorithm + (" (rsLoRA)" if config.rslora else ""),
        "blora.steps": str(steps_total), "blora.learning_rate": repr(config.learning_rate),
        "blora.seed": str(config.seed), "blora.resolution": str(config.resolution),
        "blora.base_model": base[0], "blora.base_model_hash": base[1], "blora.prediction": prediction,
        "blora.version": pack_version(),
        "ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
        "ss_network_alpha": repr(config.stored_alpha), "ss_base_model_version": "sdxl_base_v1-0",
        "ss_steps": str(steps_total), "ss_learning_rate": repr(config.learning_rate), "ss_seed": str(config.seed),
        "ss_resolution": str(config.resolution),
    }
    meta.update(config.as_metadata())
    return meta


def steps_in(metadata: Mapping[str, str]) -> int:
    """Steps an earlier run recorded (0 when unknown)."""
    for key in ("blora.steps", "ss_steps"):
        try:
            return max(0, int(metadata.get(key, "")))
        except ValueError:
            continue
    return 0


def write_trained(adapter: Adapter, target: SaveTarget, filename: str, metadata: Mapping[str, str]) -> Adapter:
    """Write ``adapter`` as ``filename`` in the target folder; returns it with its source and metadata set."""
    path = write_adapter(adapter, target.folder, filename, dialect="kohya", metadata=dict(metadata))
    return replace(adapter, source=str(path), dialect="kohya", metadata=dict(metadata))


def save_dtype(config: TrainConfig) -> torch.dtype:
    """float32 when training in fp32, else float16 (finer than bf16 for LoRA-sized values, read everywhere)."""
    return torch.float32 if config.training_dtype == "fp32" else torch.float16
