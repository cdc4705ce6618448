"""The pack loads on every Python ComfyUI supports (3.10-3.13): its sources parse as Python 3.10, and no module
imports a standard module that one of those versions lacks (``tomllib`` is 3.11+; ``imp``, ``distutils`` and
others were removed in 3.12 and 3.13), unless the import is guarded by ``except ImportError``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from blora_testkit.python_versions import NOT_ON_EVERY_SUPPORTED_PYTHON, OLDEST

ROOT = Path(__file__).resolve().parents[2]
PACK_SOURCES = sorted([ROOT / "__init__.py", *(ROOT / "blora").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")])


def _guarded(node: ast.AST, parents: dict) -> bool:
    """Inside a ``try`` whose handlers catch ImportError/ModuleNotFoundError (or everything)."""
    while node in parents:
        child, node = node, parents[node]
        if isinstance(node, ast.Try) and child in node.body:
            for h in node.handlers:
                names = {n.id for n in ast.walk(h.type) if isinstance(n, ast.Name)} if h.type else {"*"}
                if names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException", "*"}:
                    return True
    return False


def unguarded_imports(tree: ast.AST) -> list[tuple[int, str]]:
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if (name in NOT_ON_EVERY_SUPPORTED_PYTHON or name.split(".")[0] in NOT_ON_EVERY_SUPPORTED_PYTHON) \
                    and not _guarded(node, parents):
                found.append((node.lineno, name))
    return found


def test_the_check_sees_an_unguarded_import_and_accepts_a_guarded_one():
    assert unguarded_imports(ast.parse("import tomllib\nfrom distutils import util\n")) == [
        (1, "tomllib"), (2, "distutils"), (2, "distutils.util")]
    assert unguarded_imports(ast.parse("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    tomllib = None\n")) == []
    assert unguarded_imports(ast.parse("def f():\n    import tomllib\n")) == [(2, "tomllib")]  # lazy still counts


@pytest.mark.parametrize("path", PACK_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_parses_as_python_3_10_and_imports_only_modules_every_supported_python_has(path):
    tree = ast.parse(path.read_text(), filename=str(path), feature_version=OLDEST)
    assert unguarded_imports(tree) == [], f"{path.relative_to(ROOT)} imports modules missing on some Python 3.10-3.13"


def test_feature_version_check_rejects_newer_syntax():
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=OLDEST)
