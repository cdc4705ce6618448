"""Rewrite the node reference between the markers in README.md from the nodes' schemas.

Usage: COMFYUI_PATH=/path/to/ComfyUI python docs/update_readme.py
"""
from __future__ import annotations

import re

from node_reference import BEGIN, END, ROOT, _load_pack_nodes, node_reference


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = node_reference(_load_pack_nodes()).rstrip("\n")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.replace("NODE_REFERENCE", block)
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
