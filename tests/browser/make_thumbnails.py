"""Write a thumbnail per example workflow: example_workflows/<name>.jpg (what ComfyUI's template browser loads for
a custom node's example, frontend 1.27: /api/workflow_templates/<pack>/<name>.jpg) and <name>.png (the README
gallery). Each is a screenshot of the graph opened in the real front end (focus mode, fitted and cropped to
the nodes).

    COMFYUI_PATH=/path/to/ComfyUI python tests/browser/make_thumbnails.py [name ...]

Starts its own test server (tests/blora_testkit/server.py) and uses the system chromium, as the browser tests do.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # ui_kit, blora_testkit

from ui_kit import (EXAMPLES, UI_SETTINGS, example_workflows, fit_view, graph_clip, input_images,  # noqa: E402
                    launch, load_workflow, missing_browser_reason, new_page, open_ui, read_workflow, sample_image)

VIEWPORT = (1280, 800)
JPEG_QUALITY = 85


def make_thumbnails(names: list[str] | None = None) -> list[Path]:
    from playwright.sync_api import sync_playwright

    from blora_testkit.server import ComfyServer

    paths = [p for p in example_workflows() if not names or p.stem in names]
    written = []
    with ComfyServer() as server, sync_playwright() as pw:
        server.request("POST", "/settings", UI_SETTINGS)
        for i, name in enumerate(input_images(paths)):
            sample_image(server.input_dir / name, seed=i)
        browser = launch(pw)
        context, page, _ = new_page(browser, VIEWPORT)
        open_ui(page, server.url)
        page.evaluate("app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        for path in paths:
            result = load_workflow(page, read_workflow(path))
            if result["missing"]:
                print(f"{path.name}: skipped, node types not registered: {result['missing']}", file=sys.stderr)
                continue
            fit_view(page, 0.96)
            clip = graph_clip(page)
            for suffix, options in ((".png", {}), (".jpg", {"type": "jpeg", "quality": JPEG_QUALITY})):
                target = EXAMPLES / f"{path.stem}{suffix}"
                page.screenshot(path=str(target), clip=clip, **options)
                written.append(target)
        context.close()
        browser.close()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="example names (default: every example_workflows/*.json)")
    args = parser.parse_args()
    reason = missing_browser_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    for path in make_thumbnails(args.names):
        print(path.relative_to(EXAMPLES.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
