"""The example workflows in the host's template browser: the front ends (1.27.10 to 1.58.1) list custom-node
templates from ``GET /api/workflow_templates`` ({pack folder: [names]}) and load ``<name>.json`` and the thumbnail
``<name>.jpg`` from ``/api/workflow_templates/<pack folder>/``, which the host serves from the pack's
example_workflows/ (app/custom_node_manager.py, the same in 0.3.64 and 0.33)."""
from __future__ import annotations

import io
import json
import urllib.request

from blora_testkit.server import PACK_DIR_NAME, ROOT

EXAMPLES = ROOT / "example_workflows"


def _get(server, path: str) -> tuple[int, str, bytes]:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(server.url + path, timeout=30) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def test_every_example_is_listed_as_a_template(server):
    names = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    assert names
    for route in ("/api/workflow_templates", "/workflow_templates"):
        status, listed = server.request("GET", route)
        assert status == 200 and sorted(listed.get(PACK_DIR_NAME, [])) == names, (route, listed)


def test_each_template_and_its_thumbnail_are_served(server):
    from PIL import Image

    for path in sorted(EXAMPLES.glob("*.json")):
        status, kind, body = _get(server, f"/api/workflow_templates/{PACK_DIR_NAME}/{path.stem}.json")
        assert status == 200 and json.loads(body) == json.loads(path.read_text()), path.name
        assert json.loads(body)["nodes"], f"{path.name}: not a UI-format workflow"
        status, kind, body = _get(server, f"/api/workflow_templates/{PACK_DIR_NAME}/{path.stem}.jpg")
        assert status == 200 and kind == "image/jpeg" and body[:3] == b"\xff\xd8\xff", (path.stem, kind)
        with Image.open(io.BytesIO(body)) as image:
            assert image.format == "JPEG" and min(image.size) >= 64, (path.stem, image.size)
