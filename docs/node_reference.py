"""Print the node reference (markdown) from the nodes' own schemas, so README cannot drift from the code.

Usage: COMFYUI_PATH=/path/to/ComfyUI python docs/node_reference.py > /tmp/nodes.md
A host test (tests/host/test_readme.py) checks that README.md contains exactly this text.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- node-reference:begin -->", "<!-- node-reference:end -->"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(inp) -> str:
    if getattr(inp, "optional", False) and getattr(inp, "default", None) is None:
        return "optional"
    default = getattr(inp, "default", None)
    if default is None:
        return ""
    text = repr(default) if isinstance(default, str) else str(default)
    return text if len(text) <= 40 else text[:37] + "…"


def node_reference(nodes) -> str:
    """Markdown: one section per node with its inputs (type, default, tooltip) and outputs."""
    lines = [BEGIN]
    for cls in nodes:
        s = cls.define_schema()
        lines += ["", f"### {s.display_name} (`{s.node_id}`, category `{s.category}`)", "", _cell(s.description), "",
                  "| input | type | default | what it does |", "|---|---|---|---|"]
        for inp in s.inputs:
            kind = inp.get_io_type()
            options = getattr(inp, "options", None)
            if options and len(options) <= 8:
                kind = " / ".join(str(o) for o in options)
            elif options:
                kind = "COMBO"
            lines.append(f"| `{inp.id}` | {_cell(kind)} | {_cell(_default(inp))} | {_cell(inp.tooltip or '')} |")
        lines += ["", "| output | type | what it is |", "|---|---|---|"]
        for out in s.outputs:
            name = out.display_name or out.id or out.get_io_type()
            lines.append(f"| {_cell(name)} | {out.get_io_type()} | {_cell(out.tooltip or '')} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _load_pack_nodes():
    host = os.environ.get("COMFYUI_PATH")
    if not host:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, host)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("comfyui_blora", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_blora"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("comfyui_blora.nodes").NODES


if __name__ == "__main__":
    sys.stdout.write(node_reference(_load_pack_nodes()))
