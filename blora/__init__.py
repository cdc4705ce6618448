"""B-LoRA core: architectures as data (SDXL, FLUX.1: blocks, roles, module maps), adapter files in every LoRA
dialect, and pure tensor operations on them.

Imports only torch and safetensors (never the ComfyUI host, except the ``blora.host`` subpackage, which is not
imported here). Importing this package has no side effects.
"""
from .adapters.adapter import Adapter, ModuleAdapter, check_fits, delta_weight, merge, select
from .arch import ARCHITECTURES, Architecture
from .arch.sdxl import ROLES, SDXL_BLOCKS, Block, resolve_block
from .errors import (AdapterFileError, ArchitectureError, BLoRAError, BlockNameError, ScheduleError,
                     UnsafePathError)
from .formats.files import read_adapter, safe_path, write_adapter
from .formats.report import AdapterReport, inspect_adapter
from .formats.keys import detect_dialect, from_canonical, to_canonical

__all__ = [
    "Adapter", "ModuleAdapter", "Block", "SDXL_BLOCKS", "ROLES", "resolve_block", "Architecture", "ARCHITECTURES",
    "read_adapter", "write_adapter", "safe_path", "inspect_adapter", "AdapterReport",
    "to_canonical", "from_canonical", "detect_dialect",
    "delta_weight", "select", "merge", "check_fits",
    "BLoRAError", "AdapterFileError", "BlockNameError", "ArchitectureError", "ScheduleError", "UnsafePathError",
]
