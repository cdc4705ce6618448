"""The pack's panels in the front ends people run: the host's pinned one (1.27.10 on 0.3.64, 1.49.6 on 0.33;
test_ui.py covers its classic canvas in depth), the newest the registry serves (1.58.1, served with
``--front-end-root``), each in the classic canvas and in "Nodes 2.0" (Vue nodes, ``Comfy.VueNodes.Enabled``) where
the front end has it. One compact run per combination: the loss chart follows a training run, the block maps are
drawn after an Apply run, again when every node is cached, and for the FLUX.1 example (FLUX's blocks), and both
come back after a page reload; the panels are
in the page and visible; nothing our JavaScript does raises an error."""
from __future__ import annotations

import importlib.metadata

import pytest
from ui_kit import (EXAMPLES, NEWEST_FRONTEND, PREVIEWS_SMALL, TINY_BLORA, TINY_FLUX_BLORA, example_workflows,
                    frontend_root, load_workflow, new_page, open_ui, prepare_ui_server, read_workflow, set_widgets)

TRAIN_STEPS = 4
TRAIN = {"BLoRATrain.steps": TRAIN_STEPS, "BLoRATrain.resolution": 64, "BLoRATrain.rank": 4, "BLoRATrain.alpha": 4.0,
         "BLoRATrain.learning_rate": 1e-3, "BLoRATrain.training_dtype": "fp32",
         **PREVIEWS_SMALL}
SMALL = {"EmptyLatentImage.width": 64, "EmptyLatentImage.height": 64, "EmptyLatentImage.batch_size": 1,
         "KSampler.steps": 2}
VUE_NODES_SINCE = (1, 30)  # "Nodes 2.0": experimental in 1.27, a user-facing mode in the 1.4x/1.5x front ends


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def _pinned_version() -> str:
    try:
        return importlib.metadata.version("comfyui-frontend-package")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _combinations() -> list[tuple[str, str]]:
    combos = [("pinned", "nodes2")] if _version(_pinned_version()) >= VUE_NODES_SINCE else []
    return combos + [(NEWEST_FRONTEND, "classic"), (NEWEST_FRONTEND, "nodes2")]


def _example(node_type: str, prefer: str, without: str = ""):
    found = [p for p in example_workflows() if node_type in {n["type"] for n in read_workflow(p)["nodes"]}
             and without not in {n["type"] for n in read_workflow(p)["nodes"]}]
    return next((p for p in found if p.stem == prefer), found[0])


@pytest.fixture(scope="module")
def servers(ui_server):
    """front end -> a running server serving it: the session's server for the pinned one, one more per other
    front end (started on first use)."""
    from blora_testkit.server import ComfyServer

    started, made = {"pinned": ui_server}, []

    def get(front_end: str):
        if front_end not in started:
            root = frontend_root(front_end)
            if root is None:
                pytest.skip(f"front end {front_end} not installed (.ci/run installs it; or pip install --target "
                            f"~/.cache/blora-ci/frontends/{front_end} comfyui-frontend-package=={front_end})")
            server = ComfyServer(extra_args=("--front-end-root", str(root))).start()
            made.append(server)
            prepare_ui_server(server)
            started[front_end] = server
        return started[front_end]

    yield get
    for server in made:
        server.stop()


def _queue_and_wait(page, server, timeout_s: float = 120.0) -> dict:
    import time

    before = set(server.request("GET", "/history")[1])
    page.evaluate("app.queuePrompt(0)")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, history = server.request("GET", "/history")
        new = [v for k, v in history.items() if k not in before and (v.get("status") or {}).get("status_str")]
        if new:
            return new[0]
        time.sleep(0.25)
    raise AssertionError(f"the prompt did not finish in {timeout_s} s{server.log_context(40)}")


_PANELS = """(kind) => app.graph.nodes.filter((n) => n.comfyClass === kind).map((n) => {
  const view = kind === "BLoRATrain" ? n.bloraChartView : n.bloraBlockMapView;
  const r = view?.root?.getBoundingClientRect();
  return { id: String(n.id), attached: !!view?.root?.isConnected, width: r?.width ?? 0, height: r?.height ?? 0,
           points: n.bloraChart?.points?.length ?? null, running: n.bloraChart?.running ?? null,
           present: n.bloraBlockMap?.present ?? null };
})"""


def _panels(page, kind):
    return page.evaluate(_PANELS, kind)


def _visible(panels):
    return all(p["attached"] and p["width"] > 20 and p["height"] > 20 for p in panels)


@pytest.mark.parametrize("front_end, mode", _combinations(), ids=lambda v: str(v))
def test_chart_block_map_and_cached_replay(servers, browser, front_end, mode):
    server = servers(front_end)
    status, body = server.request("POST", "/settings", {"Comfy.VueNodes.Enabled": mode == "nodes2"})
    assert status == 200, body
    context, page, log = new_page(browser)
    try:
        open_ui(page, server.url)
        version = page.evaluate("window.__COMFYUI_FRONTEND_VERSION__")
        expected = _pinned_version() if front_end == "pinned" else front_end
        assert version == expected, (version, expected)
        assert page.evaluate("app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") == (mode == "nodes2")

        # Training: the chart follows the run and ends with one point per step.
        train = read_workflow(_example("BLoRATrain", "train_then_apply"))
        result = load_workflow(page, train)
        assert not (result["missing"] or result["invalid"]), result
        set_widgets(page, {"ckpt_name": server.ckpt_name, "BLoRALoader.lora_name": TINY_BLORA, **SMALL, **TRAIN})
        run = _queue_and_wait(page, server)
        assert run["status"]["status_str"] == "success", (run["status"], server.log_context(40))
        page.wait_for_function(f"() => app.graph.nodes.some((n) => n.comfyClass === 'BLoRATrain' && "
                               f"n.bloraChart.points.length === {TRAIN_STEPS} && !n.bloraChart.running)",
                               timeout=30_000)
        page.wait_for_timeout(300)
        charts = _panels(page, "BLoRATrain")
        assert charts and _visible(charts), charts

        # Apply: a block map per loader; then the same graph again (a copy without the graph id), all cached.
        apply = read_workflow(_example("BLoRALoader", "style_transfer", without="BLoRATrain"))
        for attempt, workflow in enumerate((apply, {k: v for k, v in apply.items() if k != "id"})):
            load_workflow(page, workflow)
            set_widgets(page, {"ckpt_name": server.ckpt_name, "BLoRALoader.lora_name": TINY_BLORA, **SMALL})
            assert not page.evaluate("app.graph.nodes.some((n) => n.bloraBlockMap)")
            run = _queue_and_wait(page, server)
            assert run["status"]["status_str"] == "success", run["status"]
            page.wait_for_function("() => app.graph.nodes.filter((n) => n.comfyClass === 'BLoRALoader')"
                                   ".every((n) => n.bloraBlockMap?.present.length === 2)", timeout=15_000)
            page.wait_for_timeout(300)
            maps = _panels(page, "BLoRALoader")
            assert maps and all(m["present"] == ["OUT0", "OUT1"] for m in maps) and _visible(maps), (attempt, maps)

        # FLUX.1: the FLUX example on the tiny FLUX checkpoint; its loaders' maps show FLUX's blocks.
        load_workflow(page, read_workflow(EXAMPLES / "flux_style_transfer.json"))
        set_widgets(page, {"ckpt_name": server.flux_ckpt_name, "BLoRALoader.lora_name": TINY_FLUX_BLORA,
                           "EmptySD3LatentImage.width": 64, "EmptySD3LatentImage.height": 64, "KSampler.steps": 2})
        run = _queue_and_wait(page, server)
        assert run["status"]["status_str"] == "success", (run["status"], server.log_context(40))
        page.wait_for_function("() => app.graph.nodes.filter((n) => n.comfyClass === 'BLoRALoader')"
                               ".every((n) => n.bloraBlockMap?.present.length === 2)", timeout=15_000)
        page.wait_for_timeout(300)
        maps = _panels(page, "BLoRALoader")
        assert maps and all(m["present"] == ["S02", "S11"] for m in maps) and _visible(maps), maps

        # Reload: the (FLUX) graph comes back and our extension restores the maps from /history.
        open_ui(page, server.url)
        page.wait_for_function("() => app.graph.nodes.filter((n) => n.comfyClass === 'BLoRALoader').length > 0 && "
                               "app.graph.nodes.filter((n) => n.comfyClass === 'BLoRALoader')"
                               ".every((n) => n.bloraBlockMap?.present.length === 2)", timeout=30_000)
        assert all(m["present"] == ["S02", "S11"] for m in _panels(page, "BLoRALoader"))
        ours = [e for e in log.entries if e.ours]
        assert not ours, "\n".join(f"{e.kind}: {e.text} @ {e.url}\n{e.stack}" for e in ours)
    finally:
        context.close()
        server.request("POST", "/settings", {"Comfy.VueNodes.Enabled": False})
