"""Browser layer: the real ComfyUI server (tests/blora_testkit/server.py: tiny checkpoint, this pack) and its
front-end package, driven by Debian's chromium through Playwright. Skips, saying why, without a host, without the
`playwright` package or without a chromium binary."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))  # `ui_kit`, shared with make_thumbnails.py

from ui_kit import (EXAMPLES, UI_SETTINGS, example_workflows, launch, load_workflow, missing_browser_reason,
                    new_page, open_ui, read_workflow, stub_our_extensions)

BROWSER_REASON = missing_browser_reason()


def _input_images(workflows) -> set[str]:
    """Image names the examples' LoadImage nodes point at (written into the test server's input/)."""
    names = set()
    for path in workflows:
        for node in read_workflow(path).get("nodes", []):
            values = node.get("widgets_values")
            if node.get("type") == "LoadImage" and isinstance(values, list) and values:
                names.add(str(values[0]))
    return names


def _write_image(path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="session")
def ui_server():
    """A ComfyServer with the example workflows' input images in input/ (tiny random PNGs)."""
    from blora_testkit.server import ComfyServer, find_host

    if find_host() is None:
        pytest.skip("no ComfyUI host: set COMFYUI_PATH to run the browser tests")
    if BROWSER_REASON:
        pytest.skip(BROWSER_REASON)
    with ComfyServer() as server:
        status, body = server.request("POST", "/settings", UI_SETTINGS)
        assert status == 200, body
        for i, name in enumerate(sorted(_input_images(example_workflows()))):
            target = server.input_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_image(target, seed=i)
        yield server


@pytest.fixture(scope="session")
def browser(ui_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = launch(pw)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def baseline(browser, ui_server) -> set:
    """Signatures of the console errors the host front end raises by itself: the same steps as the tests (load
    the UI, open every example) with this pack's web files served as empty modules. Errors in this set are
    provably not caused by our JavaScript."""
    context, page, log = new_page(browser)
    stub_our_extensions(page)
    open_ui(page, ui_server.url)
    assert not page.evaluate("app.extensions.some((e) => e.name.startsWith('blora.'))"), "stub did not apply"
    for path in example_workflows():
        load_workflow(page, read_workflow(path))
    page.wait_for_timeout(500)
    context.close()
    return {e.signature for e in log.entries}


@pytest.fixture
def ui_page(browser, ui_server, baseline):
    """(page, console log) of a fresh browser context with the UI loaded (after the baseline ran)."""
    context, page, log = new_page(browser)
    open_ui(page, ui_server.url)
    yield page, log
    context.close()


@pytest.fixture(scope="session")
def examples_dir():
    return EXAMPLES
