"""How a trained B-LoRA is written, and with which metadata.

Files go to ``<output>/loras/`` (``blora.host.output_files``): ``<prefix>_<NNNNN>_.safetensors`` and, with
``save_every``, checkpoints ``<prefix>_<NNNNN>_step<SSSSSS>_.safetensors``. Names that escape the folder are
refused before training starts. Writes go through ``blora.formats.files.write_adapter`` (kohya LDM dialect, explicit
alpha, atomic).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..adapters.adapter import Adapter
from ..train.algorithms import kohya_metadata
from ..formats.files import write_adapter
from ..train.loss_history import LOSS_KEY, encode_losses
from ..train.recipe import SAVE_PRECISIONS, TrainConfig
from .output_files import SaveTarget

HASHED_WEIGHTS = 4  # weights (first and last of the sorted UNet keys) hashed to identify the base model
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


_PROJECT_VERSION = re.compile(r'^\[project\]\s*$(?:(?!^\[).)*?^version\s*=\s*"([^"]+)"', re.M | re.S)


def pack_version() -> str:
    """``[project] version`` of pyproject.toml. Read with a pattern, not ``tomllib``: that module is Python 3.11+
    and ComfyUI runs on 3.10 too."""
    try:
        found = _PROJECT_VERSION.search(PYPROJECT.read_text())
    except OSError:
        return "unknown"
    return found.group(1) if found else "unknown"


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


def train_metadata(config: TrainConfig, steps_total: int, base: tuple[str, str], prediction: str,
                   losses: Sequence[float] = ()) -> dict[str, str]:
    """The training record written beside the tensors (``blora.*``, plus the kohya ``ss_*`` keys other tools
    show), with the loss of every step so far (``blora.loss``, earlier runs' steps first). Roles, blocks, rank and
    stored alpha are added by ``write_adapter``."""
    meta = {
        LOSS_KEY: encode_losses(losses),
        "blora.algorithm": config.algorithm + (" (rsLoRA)" if config.rslora else ""),
        "blora.steps": str(steps_total), "blora.learning_rate": repr(config.learning_rate),
        "blora.seed": str(config.seed), "blora.resolution": str(config.resolution),
        "blora.base_model": base[0], "blora.base_model_hash": base[1], "blora.prediction": prediction,
        "blora.version": pack_version(),
        **kohya_metadata(config), "ss_network_dim": str(config.rank),
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
    """The dtype of the written tensors: ``config.save_precision``."""
    return SAVE_PRECISIONS[config.save_precision]
