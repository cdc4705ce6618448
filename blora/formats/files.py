"""Adapter files on disk: read_adapter(path) -> Adapter, write_adapter(adapter, folder, filename, ...) -> Path.

Safetensors only (pickle files can run code: never loaded). The header is checked before the library parses it
(length, JSON, every tensor's byte range against the file size), so truncated or foreign files give a clear
error naming the file. Writes are atomic (a temporary file in the same folder, then os.replace) and confined to
their folder (safe_path).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import struct
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..adapters.adapter import Adapter, delta_weight
from .dialects import BY_NAME
from ..errors import AdapterFileError, UnsafePathError
from .keys import from_canonical, to_canonical
from .metadata import written_metadata

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""Floating-point precisions by the names used everywhere (files written, the command line, training)."""
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64}
_SIGNATURES = ((b"PK\x03\x04", "a zip archive (a PyTorch .pt/.ckpt checkpoint?)"),
               (b"\x80", "a Python pickle (a .ckpt/.pt/.bin checkpoint?)"),
               (b"GGUF", "a GGUF file"))


def read_adapter(path: str | os.PathLike) -> Adapter:
    """The adapter in a safetensors file, in canonical form (see ``keys.to_canonical``).

    Raises AdapterFileError naming the file (and the key where one is at fault) for: a missing file, a file that
    is not safetensors (pickle checkpoints are refused, never loaded), a truncated file or a header that does not
    match the file size, NaN or Inf values, inconsistent shapes (rank mismatch), or no SDXL module at all."""
    path = Path(path)
    metadata = _peft_folder_metadata(path, _check_header(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterFileError(path, f"cannot be read as safetensors: {e}") from None
    for key, tensor in state.items():
        if not is_finite(tensor):
            raise AdapterFileError(path, "holds NaN or Inf values (a broken training run or a bad conversion)", key)
    return to_canonical(state, source=str(path), metadata=metadata)


PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_CONFIG_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora")


def _peft_folder_metadata(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """PEFT's ``save_pretrained`` writes ``adapter_model.safetensors`` without alpha and keeps lora_alpha, rsLoRA and
    the rank/alpha patterns in ``adapter_config.json`` beside it: hand them to the key reader as diffusers'
    ``lora_adapter_metadata`` (UNet component) when the file carries none. Other file names take no config."""
    config_path = path.with_name(PEFT_CONFIG)
    if path.name != PEFT_FILE or "lora_adapter_metadata" in metadata or not config_path.is_file():
        return metadata
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise AdapterFileError(path, f"its PEFT config {config_path.name} beside it is not readable JSON") from None
    if not isinstance(config, dict):
        raise AdapterFileError(path, f"its PEFT config {config_path.name} beside it is not a JSON object")
    peft = {f"unet.{k}": config[k] for k in PEFT_CONFIG_KEYS if config.get(k) is not None}
    return {**metadata, "lora_adapter_metadata": json.dumps(peft)}


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a tensor (non-float tensors are finite). Fast path: a finite sum proves it (NaN and Inf
    propagate through a sum); only a non-finite sum, which may also be an overflow of large finite values, gets the
    element-wise check."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no sum kernel
        tensor = tensor.float()
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor.float()).all())


def _check_header(path: Path) -> dict[str, str]:
    """Validate the safetensors framing by hand; return the file's metadata.

    Structure decides: an 8-byte little-endian header length that fits the file, a JSON object header, and entries
    whose byte ranges tile the data (``_check_entries``). File signatures (zip, pickle, GGUF) only explain a file
    that fails the structure: a header length's first byte may be anything, 0x80 (pickle's opcode) included."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            fits = n is not None and 2 <= n <= MAX_HEADER and n <= size - 8
            raw = f.read(n) if fits else b""
    except OSError as e:
        raise AdapterFileError(path, f"cannot be opened: {e.strerror or e}") from None
    header = _json_object(raw) if fits else None
    if header is None:
        _explain_foreign(path, head)
        if n is None:
            raise AdapterFileError(path, f"is not safetensors: only {size} bytes long")
        if not fits:
            raise AdapterFileError(path, f"is not safetensors or is truncated: its header length field says "
                                         f"{n} bytes, the file has {size - 8} after it")
        raise AdapterFileError(path, "is not safetensors: its header is not JSON (a JSON object of tensor entries)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(path, "has malformed metadata (safetensors metadata maps str to str)")
    _check_entries(path, header, size - 8 - n)
    return metadata


def _json_object(raw: bytes) -> dict | None:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _explain_foreign(path: Path, head: bytes) -> None:
    """Raise the error naming what a non-safetensors file is, when its first bytes tell."""
    for signature, what in _SIGNATURES:
        if head.startswith(signature):
            raise AdapterFileError(path, f"is {what}, not safetensors: only .safetensors files are read "
                                         f"(pickle files can run code); convert it first")


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    end_max = 0
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            bits = DTYPE_BITS[dtype]
            numel = math.prod(int(s) for s in shape)
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(path, f"has a malformed or unsupported header entry {entry!r}", key) from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise AdapterFileError(path, f"has bad data offsets {entry['data_offsets']!r}", key)
        if end > data_size:
            raise AdapterFileError(path, f"is truncated: this tensor ends at data byte {end}, the file holds "
                                         f"{data_size} data bytes", key)
        if (end - begin) * 8 != numel * bits:
            raise AdapterFileError(path, f"header is inconsistent: {dtype} {list(shape)} needs "
                                         f"{numel * bits // 8} bytes, offsets give {end - begin}", key)
        end_max = max(end_max, end)
    if end_max != data_size:
        raise AdapterFileError(path, f"header is inconsistent with the file: tensors cover {end_max} of "
                                     f"{data_size} data bytes")


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_path(folder: str | os.PathLike, filename: str) -> Path:
    """``folder / filename`` resolved, refusing names that escape ``folder``: absolute paths, drive letters,
    ``..`` parts, and symlinks (the file or a folder on the way) that point outside. Subfolders are allowed.
    Raises UnsafePathError naming the file name."""
    if not filename or "\x00" in filename or filename.strip() in (".", ""):
        raise UnsafePathError(f"empty or invalid file name {filename!r}")
    parts = re.split(r"[\\/]+", filename)
    if filename.startswith(("/", "\\")) or _DRIVE.match(filename) or ".." in parts:
        raise UnsafePathError(f"file name {filename!r} would escape its folder: use a plain name or a subfolder")
    if parts[-1] in ("", "."):
        raise UnsafePathError(f"file name {filename!r} names a folder, not a file")
    base = Path(folder).resolve()
    target = (base / Path(*parts)).resolve()
    if base not in target.parents:
        raise UnsafePathError(f"file name {filename!r} leads outside {str(base)!r} (through a symlink)")
    return target


def write_adapter(adapter: Adapter, folder: str | os.PathLike, filename: str, dialect: str = "kohya",
                  dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``adapter`` as ``folder/filename`` (``.safetensors`` appended if missing) in ``dialect`` and return
    the path. Atomic; confined to ``folder`` (UnsafePathError); tensors cast to ``dtype`` when given (alpha stays
    float32). Metadata: the source's, ``blora.format`` / roles / blocks / rank / alpha / dialect / trigger /
    sources, then ``metadata``. Refuses (AdapterFileError naming the target and module, nothing written) an
    adapter whose tensors or delta are not finite, e.g. after an fp16 overflow."""
    safe_path(folder, filename)  # the name as given: "..", "" or "sub/" must not pass once the suffix is added
    name = filename if filename.lower().endswith(SUFFIX) else filename + SUFFIX
    target = safe_path(folder, name)
    if dtype is not None:
        adapter = replace(adapter, modules={p: m.to(dtype) for p, m in adapter.modules.items()})
    state = from_canonical(adapter, dialect)
    _check_finite(adapter, state, target)
    meta = written_metadata(adapter, dialect, BY_NAME[dialect].alpha, metadata)
    if adapter.unmapped:
        log.warning("%s: %d unmapped keys of the source are not written", target.name, len(adapter.unmapped))
    _atomic_save(_unshared(state), target, meta)
    return target


def _check_finite(adapter: Adapter, state: Mapping[str, torch.Tensor], target: Path) -> None:
    for key, tensor in state.items():
        if not is_finite(tensor):
            raise AdapterFileError(target, "not written: NaN or Inf values (overflow in the chosen dtype?)", key)
    for path, module in adapter.modules.items():
        if not _delta_is_finite(module):
            raise AdapterFileError(target, "not written: the module's weight delta overflows (NaN or Inf)", path)


def _delta_is_finite(module) -> bool:
    """Whether ΔW (float32) is finite, given finite factors. A kind's cheap bound on max|ΔW| (LoRA's
    |scale| · r · max|up| · max|down|) settles it without the product when it can; otherwise ΔW is computed."""
    bound = module.spec.delta_bound(module.tensors, module.scale)
    if bound is not None and bound < torch.finfo(torch.float32).max:
        return True
    return is_finite(delta_weight(module))


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _atomic_save(state: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
