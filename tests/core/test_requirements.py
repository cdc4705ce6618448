"""requirements.txt lists exactly what the pack imports: every listed package is imported, and the core (blora/
outside blora/host) imports nothing else but the standard library. The host-side modules (blora/host, nodes/) may
also import what ComfyUI itself ships (comfy, PIL, numpy, ...)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"safetensors": "safetensors", "torch": "torch", "einops": "einops", "kornia": "kornia"}


def requirements() -> set[str]:
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line)[0].lower())
    return names


def imported(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_requirement_is_imported_and_the_core_imports_nothing_unlisted():
    listed = requirements()
    assert listed <= set(IMPORT_NAMES), f"requirements.txt names {listed - set(IMPORT_NAMES)}: add its import name"
    pack = imported([*ROOT.glob("blora/**/*.py"), *ROOT.glob("nodes/*.py"), ROOT / "__init__.py"])
    assert {IMPORT_NAMES[r] for r in listed} <= pack, f"listed but never imported: {listed - pack}"
    core = imported(p for p in ROOT.glob("blora/**/*.py") if "host" not in p.relative_to(ROOT / "blora").parts)
    third_party = core - set(sys.stdlib_module_names) - {"blora"}
    assert third_party <= {IMPORT_NAMES[r] for r in listed}, f"the core imports unlisted {third_party}"
