"""README's node reference is generated from the schemas (docs/node_reference.py) and must match them."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_node_reference_matches_the_schemas(pack):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from node_reference import node_reference
    finally:
        sys.path.remove(str(ROOT / "docs"))
    expected = node_reference(pack.nodes.NODES)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert expected in readme, ("README's node reference is stale: run "
                                "`COMFYUI_PATH=… python docs/update_readme.py`")
    for cls in pack.nodes.NODES:
        schema = cls.define_schema()
        assert f"(`{schema.node_id}`" in readme
