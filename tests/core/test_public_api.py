"""The public surface of ``blora`` is pinned: adding or removing a name is a deliberate change here."""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import blora

PUBLIC = [
    "Adapter", "ModuleAdapter", "Block", "SDXL_BLOCKS", "ROLES", "resolve_block", "Architecture", "ARCHITECTURES",
    "read_adapter", "write_adapter", "safe_path", "inspect_adapter", "AdapterReport",
    "to_canonical", "from_canonical", "detect_dialect",
    "delta_weight", "select", "merge", "check_fits",
    "BLoRAError", "AdapterFileError", "BlockNameError", "ArchitectureError", "ScheduleError", "UnsafePathError",
]


def test_all_is_pinned():
    assert sorted(blora.__all__) == sorted(PUBLIC)
    assert len(set(blora.__all__)) == len(blora.__all__)


def own_docstring(obj) -> str | None:
    """The docstring written for ``obj`` itself: a class's own (not inherited, and not the signature dataclasses
    put there when there is none), a function's."""
    if not inspect.isclass(obj):
        return inspect.getdoc(obj) if callable(obj) else None
    doc = vars(obj).get("__doc__")
    generated = dataclasses.is_dataclass(obj) and doc == obj.__name__ + str(inspect.signature(obj)).replace(
        " -> None", "")
    return None if generated else doc


def test_every_public_name_exists_and_is_documented():
    for name in PUBLIC:
        obj = getattr(blora, name)
        if callable(obj):
            assert own_docstring(obj), name


def test_the_docstring_check_catches_undocumented_classes_and_functions():
    @dataclasses.dataclass
    class Plain:
        x: int = 0

    class Error(blora.BLoRAError):
        pass

    def function():
        pass

    assert Plain.__doc__ and Error.__doc__ is None and function.__doc__ is None  # what the check must see through
    assert [own_docstring(o) for o in (Plain, Error, function)] == [None, None, None]
    assert own_docstring(blora.Adapter).startswith("All modules") and own_docstring(blora.merge)


def test_errors_share_one_base():
    for name in ("AdapterFileError", "BlockNameError", "ArchitectureError", "ScheduleError", "UnsafePathError"):
        assert issubclass(getattr(blora, name), blora.BLoRAError)
    assert issubclass(blora.BLoRAError, ValueError)


def test_import_has_no_side_effects_and_no_host():
    code = ("import sys, logging; before = set(sys.modules); import blora; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'server')]; "
            "assert not bad, bad; assert not logging.getLogger().handlers; print('ok')")
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
