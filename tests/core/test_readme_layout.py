"""README's "Code layout" names every module of the core, and every file it names exists: the map stays the tree."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def layout_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Code layout")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_every_core_module_is_in_the_code_layout_and_every_named_file_exists():
    section = layout_section()
    named = set(re.findall(r"\b([a-z_0-9]+\.py)\b", section))
    modules = {p.name for p in (ROOT / "blora").rglob("*.py") if p.name != "__init__.py"}
    assert modules - named == set(), "modules missing from README's Code layout"
    assert named - modules == set(), "README's Code layout names modules that do not exist"
    folders = {p.name for p in (ROOT / "blora").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {f for f in folders if f"{f}/" not in section} == set(), "packages missing from README's Code layout"
