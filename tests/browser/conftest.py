"""Browser layer: the real ComfyUI server (tests/blora_testkit/server.py: tiny checkpoint, this pack) and its
front-end package, driven by Debian's chromium through Playwright. Skips, saying why, without a host, without the
`playwright` package or without a chromium binary."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))  # `ui_kit`, shared with make_thumbnails.py

from ui_kit import (example_workflows, launch, load_workflow, missing_browser_reason, new_page, open_ui,
                    prepare_ui_server, read_workflow, stub_our_extensions)

BROWSER_REASON = missing_browser_reason()


@pytest.fixture(scope="session")
def ui_server():
    """A ComfyServer with the example workflows' input images in input/ (small synthetic PNGs)."""
    from blora_testkit.server import ComfyServer, find_host

    if find_host() is None:
        pytest.skip("no ComfyUI host: set COMFYUI_PATH to run the browser tests")
    if BROWSER_REASON:
        pytest.skip(BROWSER_REASON)
    with ComfyServer() as server:
        prepare_ui_server(server)
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


@pytest.fixture(scope="session")
def ui_page(browser, ui_server, baseline):
    """(page, console log) of one browser context with the UI loaded, shared by the tests (a UI load costs
    ~10 s on 2 cores); ``log.load_errors`` are the errors of the first load. Tests check the errors they caused
    from ``log.mark()`` on."""
    context, page, log = new_page(browser)
    open_ui(page, ui_server.url)
    page.wait_for_timeout(500)
    log.load_errors = log.since(0)
    yield page, log
    context.close()
