"""Which lines of a ComfyUI start-up log are the pack's own import failures.

A line is the pack's when it names the pack's own location: its directory under ``custom_nodes/`` (as the host
prints it in "Cannot import <path> module for custom nodes", in "IMPORT FAILED" and in traceback ``File "<path>/…"``
lines) or the repository the directory links to, each as a whole path component, or its module name
``custom_nodes.<dir>``. A substring of some other path never counts: the host's own modules may live under a
folder whose name holds the pack's (a venv cache such as ``~/.cache/comfyui-blora/hosts/…``), and their failures
(0.3.64 without torchaudio: ``comfy_extras/nodes_audio.py``) are the host's, not the pack's.
"""
from __future__ import annotations

import re
from typing import Iterable

FAILURE = re.compile(r"IMPORT FAILED|Cannot import|Error while calling comfy_entrypoint|File \"")


def _location_pattern(pack_dirs: Iterable[str], dir_name: str) -> re.Pattern:
    paths = sorted({str(p).rstrip("/") for p in pack_dirs}, key=len, reverse=True)
    alternatives = [re.escape(p) + r"(?=[/\\\"'\s:,]|$)" for p in paths]
    alternatives.append(r"custom_nodes\." + re.escape(dir_name) + r"(?![\w-])")
    return re.compile("|".join(alternatives))


def pack_failure_lines(log: str, pack_dirs: Iterable[str], dir_name: str) -> list[str]:
    """The lines of ``log`` that report an import failure and name the pack by its location.

    pack_dirs: the pack's directory as the host sees it (``<base>/custom_nodes/<dir_name>``) and the real path it
    links to; dir_name: the pack's directory name under custom_nodes (its module name there)."""
    where = _location_pattern(pack_dirs, dir_name)
    return [line for line in log.splitlines() if FAILURE.search(line) and where.search(line)]
