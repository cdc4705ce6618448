"""Model folders: a ``blora`` folder beside ``loras``, and adapter files listed from both."""
from __future__ import annotations

import os

import folder_paths

ADAPTER_FOLDERS = ("blora", "loras")
EXTENSIONS = {".safetensors"}


def register_blora_folder() -> None:
    """Add ``models/blora`` unless a folder of that name exists already (e.g. from extra_model_paths.yaml, whose
    entries are kept; the default path is appended to them)."""
    default = os.path.join(folder_paths.models_dir, "blora")
    if "blora" in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths["blora"]
        if default not in paths:
            paths.append(default)
        exts.update(EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths["blora"] = ([default], set(EXTENSIONS))


def adapter_files() -> list[str]:
    """Safetensors files from the ``blora`` and ``loras`` folders (names as the host lists them), sorted."""
    register_blora_folder()
    names: set[str] = set()
    for folder in ADAPTER_FOLDERS:
        names.update(n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(".safetensors"))
    return sorted(names)


def adapter_path(name: str) -> str:
    """Full path of a listed adapter file (``blora`` first, then ``loras``); error naming the file otherwise."""
    register_blora_folder()
    for folder in ADAPTER_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(f"B-LoRA file {name!r} not found in the 'blora' or 'loras' model folders")
