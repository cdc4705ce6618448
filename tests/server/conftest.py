"""Server layer: one real ComfyUI server per test module (``server`` fixture), with the pack and the tiny
checkpoint. A module may set ``SERVER_OPTIONS = {...}`` (keyword arguments of ``ComfyServer``)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def server(request, comfy_host):
    from blora_testkit.server import ComfyServer

    options = getattr(request.module, "SERVER_OPTIONS", {})
    with ComfyServer(comfy_host, **options) as srv:
        yield srv
