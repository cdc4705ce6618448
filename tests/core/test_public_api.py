"""The public surface of ``blora`` is pinned: adding or removing a name is a deliberate change here."""
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


def test_every_public_name_exists_and_is_documented():
    for name in PUBLIC:
        obj = getattr(blora, name)
        if callable(obj):
            assert obj.__doc__, name


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
