"""The pack in the real front end (ComfyUI's frontend package in Debian's chromium): the extensions load without
console errors, every example workflow opens with all node types and valid widget values, the FLUX.1 example
queues from the page as its API twin and finishes on the tiny FLUX checkpoint, the training example runs on the
tiny checkpoint while the loss chart follows the server's progress events, and the chart survives a
page reload. Screenshots go to tests/artifacts/; the README's to docs/ with BLORA_UPDATE_DOCS=1."""
from __future__ import annotations

import math

import pytest

from blora_testkit.workflows import load_api_example, read_image
from ui_kit import (ARTIFACTS, DOCS, EXAMPLES, OUR_EXTENSIONS, PACK_WEB, PREVIEWS_SMALL, TINY_BLORA, TINY_FLUX_BLORA,
                    example_workflows, fit_view, focus_mode, graph_clip, load_workflow, open_ui, read_workflow,
                    screenshot, set_widgets, unexplained)

TRAIN_EXAMPLE = "train_then_apply"  # preferred; else the first example with a Train B-LoRA node
APPLY_EXAMPLE = "style_transfer"  # preferred; else the first example with Load B-LoRA and no training
FLUX_EXAMPLE = "flux_style_transfer"
TRAIN_STEPS = 40
# The training example made cheap for the tiny checkpoint, by widget name (node type prefix where it matters);
# learning rate and rank high enough that the loss visibly falls within the run (README's screenshot shows it).
TRAIN_OVERRIDES = {"BLoRATrain.steps": TRAIN_STEPS, "BLoRATrain.resolution": 64, "BLoRATrain.rank": 8,
                   "BLoRATrain.alpha": 8.0, "BLoRATrain.learning_rate": 3e-2, "BLoRATrain.training_dtype": "fp32",
                   **PREVIEWS_SMALL}
PANELS = {"BLoRATrain": "chart", "BLoRALoader": "blockMap"}
QUEUE_PANEL_COMMANDS = ("Workspace.ToggleSidebarTab.queue", "Comfy.Queue.ToggleOverlay")  # 1.27; 1.4x/1.5x
# Any example graph made cheap for the tiny checkpoint.
SMALL_GRAPH = {"EmptyLatentImage.width": 64, "EmptyLatentImage.height": 64, "EmptyLatentImage.batch_size": 1,
               "KSampler.steps": 2}


def _example_with(node_type: str, prefer: str = "", without: str = ""):
    """The example named ``prefer`` if it has a ``node_type`` node, else the first that has one (and no
    ``without`` node); None when no example qualifies."""
    def types(path):
        return {n["type"] for n in read_workflow(path)["nodes"]}

    found = [p for p in example_workflows() if node_type in types(p) and without not in types(p)]
    return next((p for p in found if p.stem == prefer), found[0] if found else None)


def _describe(errors) -> str:
    return "\n".join(f"{e.kind}: {e.text} @ {e.url}\n{e.stack}" for e in errors)


def test_extensions_load_without_console_errors(ui_page, ui_server, baseline):
    page, log = ui_page
    names = page.evaluate("app.extensions.map((e) => e.name)")
    ours = [n for n in names if n.startswith("blora.")]
    assert sorted(ours) == sorted(OUR_EXTENSIONS), names
    status, listed = ui_server.request("GET", "/extensions")
    assert status == 200
    served = [p for p in listed if p.startswith(PACK_WEB)]
    assert {p.rsplit("/", 1)[-1] for p in served} >= {"train_chart.js", "block_map.js", "restore_outputs.js"}
    requests = page.evaluate("performance.getEntriesByType('resource').map((r) => r.name)")
    assert all(r.startswith(ui_server.url) or r.startswith("blob:") or r.startswith("data:") for r in requests), \
        [r for r in requests if not r.startswith(ui_server.url)]
    errors = unexplained(log.load_errors, baseline)
    assert not errors, _describe(errors)


@pytest.mark.parametrize("path", example_workflows(), ids=lambda p: p.stem)
def test_example_workflow_opens(ui_page, baseline, path):
    page, log = ui_page
    mark = log.mark()
    workflow = read_workflow(path)
    result = load_workflow(page, workflow)
    assert not result["missing"], f"{path.name}: node types not registered: {result['missing']}"
    assert not result["invalid"], f"{path.name}: invalid widget values:\n" + "\n".join(result["invalid"])
    assert not result["alerts"], f"{path.name}: the front end complained: {result['alerts']}"
    assert len(result["nodes"]) == len(workflow["nodes"])
    for node in result["nodes"]:
        if node["type"] in PANELS:
            assert node[PANELS[node["type"]]], f"{node['type']} #{node['id']} has no {PANELS[node['type']]} panel"
    fit_view(page)
    screenshot(page, ARTIFACTS / f"workflow_{path.stem}.png")
    errors = unexplained(log.since(mark), baseline)
    assert not errors, _describe(errors)


def test_every_example_has_a_thumbnail(ui_server):
    """The host's template browser lists each example and loads <name>.jpg next to it; the README uses the
    PNG of the same name."""
    names = sorted(p.stem for p in example_workflows())
    if not names:
        pytest.skip("no example workflows yet")
    status, templates = ui_server.request("GET", "/workflow_templates")
    assert status == 200 and sorted(templates.get("comfyui-blora", [])) == names, templates
    for name in names:
        status, _ = ui_server.request("GET", f"/api/workflow_templates/comfyui-blora/{name}.jpg")
        assert status == 200, f"thumbnail {name}.jpg is not served (run tests/browser/make_thumbnails.py)"
        png = EXAMPLES / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} missing or not a PNG"


_RECORD_EVENTS = """() => {
  window.__bloraEvents = [];
  window.comfyAPI.api.api.addEventListener("blora.train.progress", (e) => window.__bloraEvents.push(e.detail));
}"""

_RECORD_EXECUTED = """() => {
  window.__executed = [];
  window.comfyAPI.api.api.addEventListener("executed", (e) => window.__executed.push(
    { node: e.detail.node, display: e.detail.display_node, keys: Object.keys(e.detail.output ?? {}) }));
}"""

_CHART_STATE = """() => app.graph.nodes.filter((n) => n.comfyClass === "BLoRATrain").map((n) => ({
  id: String(n.id), points: n.bloraChart.points.map((p) => p.loss), steps: n.bloraChart.steps,
  running: n.bloraChart.running, summary: n.bloraChart.summary(),
  preview: n.bloraChart.preview, elapsed: n.bloraChart.elapsed }))"""


def _wait_chart_done(page, steps: int, timeout_ms: int = 150_000):
    page.wait_for_function("(steps) => app.graph.nodes.some((n) => n.comfyClass === 'BLoRATrain'"
                           " && n.bloraChart.points.length === steps && !n.bloraChart.running)",
                           arg=steps, timeout=timeout_ms)
    return page.evaluate(_CHART_STATE)[0]


def test_train_chart_follows_the_run_and_survives_reload(ui_page, ui_server, baseline):
    path = _example_with("BLoRATrain", prefer=TRAIN_EXAMPLE)
    if path is None:
        pytest.skip("no example workflow with Train B-LoRA yet")
    page, log = ui_page
    result = load_workflow(page, read_workflow(path))
    assert not (result["missing"] or result["invalid"] or result["alerts"]), result
    set_widgets(page, {"ckpt_name": ui_server.ckpt_name, "BLoRALoader.lora_name": TINY_BLORA, **SMALL_GRAPH,
                       **TRAIN_OVERRIDES})
    steps = page.evaluate("app.graph.nodes.find((n) => n.comfyClass === 'BLoRATrain')"
                          ".widgets.find((w) => w.name === 'steps').value")
    assert steps == TRAIN_STEPS
    page.evaluate(_RECORD_EVENTS)
    mark = log.mark()
    page.evaluate("app.queuePrompt(0)")
    chart = _wait_chart_done(page, steps)
    events = page.evaluate("window.__bloraEvents")
    run = _wait_queue_empty(ui_server)
    assert run["status"]["status_str"] == "success", run["status"]
    output = run["outputs"][chart["id"]]

    # Live: one progress event per step reached this page and named this node; the chart shows the same losses.
    assert [e["step"] for e in events] == list(range(1, steps + 1)), events
    assert {e["node"] for e in events} == {chart["id"]} and {e["steps"] for e in events} == {steps}
    assert all(isinstance(e["elapsed"], (int, float)) and e["elapsed"] >= 0 for e in events)
    assert [e["loss"] for e in events] == pytest.approx(output["loss"], rel=1e-6)
    assert chart["points"] == pytest.approx(output["loss"], rel=1e-6)
    assert all(math.isfinite(v) for v in chart["points"])
    first, last = sum(chart["points"][:10]) / 10, sum(chart["points"][-10:]) / 10
    assert last < 0.95 * first, f"the chart shows no learning: first 10 steps {first:.3f}, last 10 {last:.3f}"
    assert f"step {steps}/{steps}" in chart["summary"] and "it/s" in chart["summary"]
    previews = [e["preview"] for e in events if e.get("preview")]
    if previews:
        assert chart["preview"] == previews[-1]
        assert page.evaluate("app.graph.nodes.find((n) => n.comfyClass === 'BLoRATrain')"
                             ".bloraChartView.image.naturalWidth") > 0
    fit_view(page)
    screenshot(page, ARTIFACTS / "train_run.png")
    focus_mode(page)
    fit_view(page, 0.9, node_ids=[int(chart["id"])])
    screenshot(page, DOCS / "train_chart.png", clip=graph_clip(page, 8, node_ids=[int(chart["id"])]))
    focus_mode(page, False)
    # The finished run in the queue panel (it lists every UI output, the loss list included): the queue side bar
    # tab in 1.27, the queue overlay in the 1.4x/1.5x front ends (which have no queue tab).
    toggled = page.evaluate("""async (ids) => {
      for (const id of ids) { try { await app.extensionManager.command.execute(id); return id; } catch (e) {} }
      return null; }""", list(QUEUE_PANEL_COMMANDS))
    assert toggled, f"none of {QUEUE_PANEL_COMMANDS} exists in this front end"
    page.wait_for_timeout(1000)
    screenshot(page, ARTIFACTS / "train_queue_panel.png")
    page.evaluate("(id) => app.extensionManager.command.execute(id)", toggled)
    errors = unexplained(log.since(mark), baseline)
    assert not errors, _describe(errors)

    # Reload: the front end restores the graph; our extension rebuilds the chart from /history.
    mark = log.mark()
    open_ui(page, ui_server.url)
    restored = _wait_chart_done(page, steps, timeout_ms=30_000)
    assert restored["id"] == chart["id"] and restored["points"] == pytest.approx(output["loss"], rel=1e-6)
    screenshot(page, ARTIFACTS / "train_after_reload.png")
    errors = unexplained(log.since(mark), baseline)
    assert not errors, _describe(errors)


def _wait_queue_empty(ui_server, timeout_s: float = 120.0) -> dict:
    """Poll /queue until nothing runs or waits; the newest /history entry."""
    import time

    deadline = time.monotonic() + timeout_s
    time.sleep(0.5)  # the page's POST /prompt may still be in flight
    while time.monotonic() < deadline:
        status, queue = ui_server.request("GET", "/queue")
        if status == 200 and not queue["queue_running"] and not queue["queue_pending"]:
            _, history = ui_server.request("GET", "/history?max_items=1")
            return next(iter(history.values()))
        time.sleep(0.25)
    raise AssertionError(f"queue not empty after {timeout_s} s{ui_server._tail(40)}")


def test_block_map_after_apply_run(ui_page, ui_server, baseline):
    """An example with Load B-LoRA, pointed at a tiny content + style B-LoRA, runs from the page; each loader
    then shows the file's blocks (OUT0 content, OUT1 style), rank and dialect; also when the loaders were cached
    (no `executed` message)."""
    path = _example_with("BLoRALoader", prefer=APPLY_EXAMPLE, without="BLoRATrain")
    if path is None:
        pytest.skip("no example workflow with Load B-LoRA yet")
    page, log = ui_page
    result = load_workflow(page, read_workflow(path))
    assert not (result["missing"] or result["invalid"] or result["alerts"]), result
    set_widgets(page, {"ckpt_name": ui_server.ckpt_name, "BLoRALoader.lora_name": TINY_BLORA, **SMALL_GRAPH})
    mark = log.mark()
    page.evaluate(_RECORD_EXECUTED)
    page.evaluate("app.queuePrompt(0)")
    run = _wait_queue_empty(ui_server)
    assert run["status"]["status_str"] == "success", run["status"]
    try:
        page.wait_for_function("() => app.graph.nodes.filter((n) => n.comfyClass === 'BLoRALoader')"
                               ".every((n) => n.bloraBlockMap)", timeout=10_000)
    except Exception as exc:
        raise AssertionError(f"block maps not drawn; executed messages: {page.evaluate('window.__executed')}; "
                             f"history outputs: {run['outputs']}") from exc
    maps = page.evaluate("""() => app.graph.nodes.filter((n) => n.comfyClass === "BLoRALoader").map((n) => ({
      present: n.bloraBlockMap.present, line: n.bloraBlockMapView.line.textContent,
      filled: [...n.bloraBlockMapView.cells].filter(([, c]) => c.style.fontWeight === "bold").map(([s]) => s) }))""")
    for m in maps:
        assert m["present"] == ["OUT0", "OUT1"] and m["filled"] == ["OUT0", "OUT1"], m
        assert m["line"].startswith("rank 4 ·") and "no alpha" in m["line"], m
    fit_view(page)
    screenshot(page, ARTIFACTS / f"apply_run_{path.stem}.png")

    focus_mode(page)
    fit_view(page, 0.96)
    screenshot(page, DOCS / "apply_graph.png", clip=graph_clip(page))
    focus_mode(page, False)

    # Same workflow opened again and queued: every node is cached, the server sends no `executed` for the
    # loaders; the maps come from the prompt's /history entry. (Without a graph id the copy gets a new one, so
    # the maps cannot come from the reload path.)
    load_workflow(page, {k: v for k, v in read_workflow(path).items() if k != "id"})
    set_widgets(page, {"ckpt_name": ui_server.ckpt_name, "BLoRALoader.lora_name": TINY_BLORA, **SMALL_GRAPH})
    assert not page.evaluate("app.graph.nodes.some((n) => n.bloraBlockMap)")
    page.evaluate(_RECORD_EXECUTED)
    page.evaluate("app.queuePrompt(0)")
    assert _wait_queue_empty(ui_server)["status"]["status_str"] == "success"
    page.wait_for_function("() => app.graph.nodes.filter((n) => n.comfyClass === 'BLoRALoader')"
                           ".every((n) => n.bloraBlockMap?.present.length === 2)", timeout=10_000)
    # 0.3.64 sends no `executed` for cached nodes (the maps come from /history); 0.33 sends the loaders' UI
    # output again (they declare has_intermediate_output): either way each loader shows its map once.
    loader_ids = page.evaluate("app.graph.nodes.filter((n) => n.comfyClass === 'BLoRALoader').map((n) => String(n.id))")
    assert all(e["node"] in loader_ids for e in page.evaluate("window.__executed") if "blora" in e["keys"])
    errors = unexplained(log.since(mark), baseline)
    assert not errors, _describe(errors)


def test_flux_example_queues_from_the_page_as_its_api_twin_and_finishes(ui_page, ui_server, baseline):
    """flux_style_transfer opened in the front end, pointed at the tiny FLUX.1 checkpoint and a tiny FLUX B-LoRA,
    queues from the page: the prompt the page posts is the API twin (example_workflows/api/) with the same
    substitutions, the run succeeds and saves a 64 px image."""
    path = EXAMPLES / f"{FLUX_EXAMPLE}.json"
    page, log = ui_page
    result = load_workflow(page, read_workflow(path))
    assert not (result["missing"] or result["invalid"] or result["alerts"]), result
    small = {"EmptySD3LatentImage.width": 64, "EmptySD3LatentImage.height": 64, "KSampler.steps": 3}
    changed = set_widgets(page, {"ckpt_name": ui_server.flux_ckpt_name, "BLoRALoader.lora_name": TINY_FLUX_BLORA,
                                 **small})
    assert len(changed) == 6, changed
    mark = log.mark()
    page.evaluate("app.queuePrompt(0)")
    run = _wait_queue_empty(ui_server)
    assert run["status"]["status_str"] == "success", run["status"]
    posted = run["prompt"][2]
    twin = load_api_example(FLUX_EXAMPLE, ui_server.ckpt_name, ui_server.flux_ckpt_name, lora_name=TINY_FLUX_BLORA)
    assert {k: (n["class_type"], n["inputs"]) for k, n in posted.items()} == \
        {k: (n["class_type"], n["inputs"]) for k, n in twin.items()}
    apply = next(n["inputs"] for n in posted.values() if n["class_type"] == "BLoRAApply")
    assert (apply["content_strength"], apply["style_strength"]) == (1.0, 0.8)  # separate strengths
    save_id = next(k for k, n in posted.items() if n["class_type"] == "SaveImage")
    images = run["outputs"][save_id]["images"]
    assert len(images) == 1
    image = read_image(ui_server.output_dir / images[0]["subfolder"] / images[0]["filename"])
    assert image.shape == (64, 64, 3) and image.std() > 5.0
    # each loader's block map shows FLUX's blocks, the file's content block and style block filled
    page.wait_for_function("() => app.graph.nodes.filter((n) => n.comfyClass === 'BLoRALoader')"
                           ".every((n) => n.bloraBlockMap)", timeout=10_000)
    maps = page.evaluate("""() => app.graph.nodes.filter((n) => n.comfyClass === "BLoRALoader").map((n) => ({
      present: n.bloraBlockMap.present, cells: n.bloraBlockMapView.cells.size,
      filled: [...n.bloraBlockMapView.cells].filter(([, c]) => c.style.fontWeight === "bold").map(([s]) => s) }))""")
    assert maps == [{"present": ["S02", "S11"], "cells": 57, "filled": ["S02", "S11"]}] * 2, maps
    fit_view(page)
    screenshot(page, ARTIFACTS / f"apply_run_{FLUX_EXAMPLE}.png")
    errors = unexplained(log.since(mark), baseline)
    assert not errors, _describe(errors)


def test_chart_and_map_helpers_in_page(ui_page):
    """The modules' pure helpers, imported in the page as the front end serves them, against Python references:
    the debiased EMA, durations, and how the block map reads a loader's UI output."""
    page, _ = ui_page
    losses = [0.5, 0.25, float("nan"), 0.125, 1.0]
    got = page.evaluate("""async (losses) => {
      const chart = await import("/extensions/comfyui-blora/js/loss_chart.js");
      const map = await import("/extensions/comfyui-blora/js/block_map.js");
      const c = new chart.LossChart();
      c.update({ step: 1, steps: 10, loss: 0.5, elapsed: 2 });
      c.update({ step: 2, steps: 10, loss: 0.4, elapsed: 4 });
      const running = [c.rate, c.eta, c.summary()];
      c.update({ step: 1, steps: 5, loss: 0.3, elapsed: 1 });  // a new run whose start was missed
      const restarted = [c.points.length, c.steps];
      c.stop();  // the prompt failed or was cancelled
      const stopped = [c.running, c.summary()];
      c.finish([0.3, 0.2], 1.0);
      return {
        ema: chart.smooth(losses.map((v) => (v === null ? NaN : v)), 0.9),
        durations: [5, 65, 3723, -1].map(chart.formatDuration),
        running, restarted, stopped, finished: [c.running, c.stopped, c.summary()],
        slots: map.presentSlots(["OUT0", "output_blocks.1.1", "input_blocks.8.1", "bogus"]),
        flux: [map.slotsFor({ architecture: "FLUX.1" }).length, map.slotsFor({ architecture: "SDXL" }).length,
               map.slotsFor({}).length,
               map.presentSlots(["S02", "single_blocks.11", "double_blocks.0", "content", "OUT0"],
                                map.slotsFor({ architecture: "FLUX.1" }))],
        ranks: [map.rankText([64, 4, 64]), map.rankText({ a: 8 }), map.rankText(16)],
        line: map.summaryText({ ranks: [64], alpha: [64], dialect: "kohya_ldm", kinds: ["lora"], dora: true,
                                num_params: 28_200_000 }),
      };
    }""", [None if math.isnan(v) else v for v in losses])
    acc, n, ema = 0.0, 0, []
    for v in losses:
        if math.isfinite(v):
            acc, n = 0.9 * acc + 0.1 * v, n + 1
        ema.append(acc / (1 - 0.9 ** n))
    assert got["ema"] == pytest.approx(ema, rel=1e-12)
    assert got["durations"] == ["0:05", "1:05", "1:02:03", "–"]
    assert got["running"] == [0.5, 16.0, "step 2/10 · 0.50 it/s · ETA 0:16 · loss 0.400 · ema 0.447"]
    assert got["restarted"] == [1, 5]
    assert got["stopped"] == [False, "step 1/5 · 1.00 it/s · stopped · loss 0.300 · ema 0.300"]
    assert got["finished"] == [False, False, "step 2/2 · 2.00 it/s · took 0:01 · loss 0.200 · ema 0.247"]
    assert got["slots"] == ["IN08", "OUT0", "OUT1"]
    assert got["flux"] == [57, 11, 11, ["D00", "S02", "S11"]]  # a role name is many FLUX blocks: not one cell
    assert got["ranks"] == ["4/64", "8", "16"]
    assert got["line"] == "rank 64 · alpha 64 · kohya_ldm · DoRA · 28.2M params"


def test_chart_draws_one_curve_per_seed(ui_page):
    """Train B-LoRA with seeds > 1: progress events carry one loss per seed, the node's output `seed_losses`; the
    chart keeps and draws one curve per seed (in its seed colour), and a plain run goes back to one curve."""
    page, _ = ui_page
    got = page.evaluate("""async () => {
      const chart = await import("/extensions/comfyui-blora/js/loss_chart.js");
      const c = new chart.LossChart();
      c.update({ step: 1, steps: 3, loss: 0.5, losses: [0.4, 0.6], seeds: [7, 8], elapsed: 1 });
      c.update({ step: 2, steps: 3, loss: 0.3, losses: [0.2, 0.4], seeds: [7, 8], elapsed: 2 });
      const live = JSON.parse(JSON.stringify([c.seedLosses, c.seeds]));
      const canvas = document.createElement("canvas");
      Object.assign(canvas.style, { width: "300px", height: "150px" });
      document.body.append(canvas);
      chart.drawLossChart(canvas, c);
      const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      const count = ([r, g, b]) => {
        let n = 0;
        for (let i = 0; i < px.length; i += 4) n += Math.abs(px[i] - r) + Math.abs(px[i + 1] - g) + Math.abs(px[i + 2] - b) < 30;
        return n;
      };
      const colours = [count([0x4f, 0xc3, 0xf7]), count([0xff, 0xb7, 0x4d])];
      canvas.remove();
      c.finish([0.4, 0.2, 0.1], 3, [[0.4, 0.2, 0.1], [0.6, 0.4, 0.3], [0.5, 0.5, 0.5]], [7, 8, 9]);
      const finished = [c.seedLosses.length, c.seeds];
      c.finish([0.4, 0.2, 0.1], 3);
      return { live, colours, finished, plain: c.seedLosses.length };
    }""")
    assert got["live"] == [[[0.4, 0.2], [0.6, 0.4]], [7, 8]]
    assert all(n > 20 for n in got["colours"]), got["colours"]  # both seeds' curves are on the canvas
    assert got["finished"] == [3, [7, 8, 9]] and got["plain"] == 0


def test_progress_event_with_preview_draws_it(ui_page, ui_server, baseline):
    """A progress message that carries a preview ({filename, subfolder, type}) shows that image on the node,
    loaded through this server's /view; a message for another node changes nothing."""
    from ui_kit import sample_image

    page, log = ui_page
    sample_image(ui_server.input_dir / "blora_preview_probe.png", seed=7, size=64)
    mark = log.mark()
    state = page.evaluate("""async () => {
      const api = window.comfyAPI.api.api;
      const node = LiteGraph.createNode("BLoRATrain");
      app.graph.add(node);
      const preview = { filename: "blora_preview_probe.png", subfolder: "", type: "input" };
      api.dispatchCustomEvent("executing", String(node.id));
      for (let step = 1; step <= 3; step++)
        api.dispatchCustomEvent("blora.train.progress", { node: String(node.id), step, steps: 10, loss: 1 / step,
                                                          elapsed: step * 0.5, ...(step === 3 ? { preview } : {}) });
      api.dispatchCustomEvent("blora.train.progress", { node: "999999", step: 1, steps: 1, loss: 5, elapsed: 1 });
      const img = node.bloraChartView.image;
      await new Promise((resolve) => { if (img.complete && img.naturalWidth) resolve(); else img.onload = resolve;
                                      setTimeout(resolve, 5000); });
      const out = { points: node.bloraChart.points.length, running: node.bloraChart.running,
                    summary: node.bloraChart.summary(), width: img.naturalWidth, src: img.src,
                    shown: img.style.display };
      app.graph.remove(node);
      return out;
    }""")
    assert state["points"] == 3 and state["running"], state
    assert state["summary"].startswith("step 3/10 · 2.00 it/s · ETA 0:04"), state
    assert state["width"] == 64 and state["shown"] == "block", state
    assert state["src"].startswith(ui_server.url + "/api/view?") and "blora_preview_probe.png" in state["src"]
    errors = unexplained(log.since(mark), baseline)
    assert not errors, _describe(errors)
