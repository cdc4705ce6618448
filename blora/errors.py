"""One error hierarchy for the pack. Every error names the file or entry and the problem."""
from __future__ import annotations


class BLoRAError(ValueError):
    """Base class: a problem with user input (a file, a block name, a setting). Never a bug in the pack."""


class AdapterFileError(BLoRAError):
    """A file that cannot be read as an adapter: not safetensors, truncated, NaN/Inf, unknown keys, bad shapes."""

    def __init__(self, path: str, problem: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}" + (f" (key {key!r})" if key else "")
        super().__init__(f"{where}: {problem}")


class BlockNameError(BLoRAError):
    """A block, role or slot name the registry does not know."""


class ArchitectureError(BLoRAError):
    """An adapter that does not fit the model (another architecture, wrong shapes, not SDXL)."""


class ScheduleError(BLoRAError):
    """A malformed strength schedule or block-weight text; the message names the bad entry."""


class UnsafePathError(BLoRAError):
    """A file name that would escape the folder it belongs to."""
