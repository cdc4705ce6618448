"""The pack meets the host's model patcher in two modules only: ``blora/host/realise.py`` installs every patch
(patches, weight functions, forward hooks, model patches, wrappers) and ``blora/host/compat.py`` names every private
host attribute. Read from the source (no host needed)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATCH_ENTRY_POINTS = {"add_patches", "add_weight_wrapper", "register_forward_hook", "register_forward_pre_hook",
                      "add_wrapper", "add_wrapper_with_key", "add_object_patch", "set_model_patch",
                      "set_model_patch_replace", "set_model_output_block_patch", "set_model_input_block_patch",
                      "set_model_compute_dtype", "set_model_unet_function_wrapper", "add_callback_with_key",
                      "add_callback"}
PRIVATE_HOST_NAMES = {"weight_wrapper_patches", "_v_signature", "_v_weight", "_model_dtype", "in_training",
                      "class_obj", "PromptServer", "calculate_weight", "weight_function", "bias_function"}
PATCHERS = {"blora/host/realise.py", "blora/host/compat.py"}
NAMERS = {"blora/host/compat.py"}
# Training installs its layers through the realiser too (``train_wrappers.training_plan``, ``realise.installed``).
TRAINING_PENDING: set[str] = set()


def sources() -> dict[str, ast.Module]:
    files = [*sorted((ROOT / "blora").rglob("*.py")), *sorted((ROOT / "nodes").rglob("*.py")), ROOT / "__init__.py"]
    return {str(f.relative_to(ROOT)): ast.parse(f.read_text(encoding="utf-8")) for f in files}


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                                         ast.Constant):
            ids.add(id(body[0].value))
    return ids


def calls(tree: ast.Module, names: set[str]) -> set[str]:
    return {n.func.attr for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in names}


def mentions(tree: ast.Module, names: set[str]) -> set[str]:
    docs = _docstrings(tree)
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr in names:
            found.add(n.attr)
        elif isinstance(n, ast.Name) and n.id in names:
            found.add(n.id)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            found |= {name for name in names if name in n.value.split('"')}
    return found


def test_only_the_realiser_and_compat_call_the_hosts_patch_entry_points():
    patching = {path for path, tree in sources().items() if calls(tree, PATCH_ENTRY_POINTS)}
    assert PATCHERS <= patching, "the realiser and compat are expected to patch"
    assert patching - PATCHERS - TRAINING_PENDING == set(), "patch through blora.host.realise"
    assert TRAINING_PENDING <= patching, "a module no longer patches: drop it from TRAINING_PENDING"


def test_only_compat_names_private_host_attributes():
    naming = {path: mentions(tree, PRIVATE_HOST_NAMES) for path, tree in sources().items()}
    naming = {path: found for path, found in naming.items() if found}
    assert set(naming) == NAMERS, f"name host internals in blora.host.compat only: {naming}"
