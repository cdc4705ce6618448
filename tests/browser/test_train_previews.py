"""Validation previews on Train B-LoRA in the newest front end (1.58.1), classic canvas and Nodes 2.0: a training
run shows the preview rows (content | style | both, newest on top) and the loss chart together on the node, the
rows are the images the server saved, and a page reload brings both back from /history. The classic run makes
README's screenshot of a run with its previews (docs/train_previews.png with BLORA_UPDATE_DOCS=1). A UI workflow
saved before the settings nodes opens (pinned and newest front end) with its values, the settings it changed moved
into settings nodes wired into Train B-LoRA (web/js/train_legacy.js)."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from ui_kit import (DOCS, NEWEST_FRONTEND, OLD_TRAIN_WIDGETS, TINY_BLORA, example_workflows, fit_view, focus_mode,
                    frontend_root, graph_clip, load_workflow, new_page, open_ui, prepare_ui_server, read_workflow,
                    screenshot, set_widgets)

STEPS = 12
SETTINGS = {"BLoRATrain.steps": STEPS, "BLoRATrain.resolution": 64, "BLoRATrain.rank": 8, "BLoRATrain.alpha": 8.0,
            "BLoRATrain.learning_rate": 3e-2, "BLoRATrain.training_dtype": "fp32", "BLoRAValidation.width": 64,
            "BLoRAValidation.height": 64, "BLoRAValidation.steps": 3, "BLoRAValidation.every": 4,
            "EmptyLatentImage.width": 64, "EmptyLatentImage.height": 64, "KSampler.steps": 2}
ROW_STEPS = [12, 8, 4, 0]  # newest on top

_NODE = """() => {
  const n = app.graph.nodes.find((x) => x.comfyClass === "BLoRATrain");
  if (!n?.bloraChartView) return null;
  const box = (el) => { const r = el?.getBoundingClientRect(); return r ? [r.left, r.top, r.width, r.height] : null; };
  const rows = [...n.bloraChartView.root.querySelectorAll(".blora-preview-row")];
  return { id: String(n.id), points: n.bloraChart.points.length, running: n.bloraChart.running,
           summary: n.bloraChartView.line.textContent, time: n.bloraChartView.rows.time.textContent,
           chart: box(n.bloraChartView.canvas), attached: n.bloraChartView.root.isConnected,
           rows: rows.map((r) => ({ step: Number(r.dataset.step), seed: Number(r.dataset.seed), box: box(r),
                                    src: r.querySelector("img").getAttribute("src"),
                                    loaded: r.querySelector("img").complete,
                                    width: r.querySelector("img").naturalWidth,
                                    height: r.querySelector("img").naturalHeight })) };
}"""


@pytest.fixture(scope="module")
def newest_server():
    from blora_testkit.server import ComfyServer, find_host

    if find_host() is None:
        pytest.skip("no ComfyUI host: set COMFYUI_PATH to run the browser tests")
    root = frontend_root(NEWEST_FRONTEND)
    if root is None:
        pytest.skip(f"front end {NEWEST_FRONTEND} not installed (.ci/run installs it)")
    server = ComfyServer(extra_args=("--front-end-root", str(root))).start()
    prepare_ui_server(server)
    yield server
    server.stop()


def _wait_done(page, timeout_ms: int):
    page.wait_for_function(f"""() => {{ const n = ({_NODE})();
      return n && n.points === {STEPS} && !n.running && n.rows.length === {len(ROW_STEPS)}
        && n.rows.every((r) => r.loaded && r.width > 0); }}""", timeout=timeout_ms)
    page.wait_for_timeout(300)
    return page.evaluate(_NODE)


def _check(node):
    assert node["attached"] and node["chart"][2] > 100 and node["chart"][3] > 40, node
    assert [r["step"] for r in node["rows"]] == ROW_STEPS, node["rows"]
    assert all(r["width"] == 3 * r["height"] for r in node["rows"]), node["rows"]  # content | style | both
    chart_bottom = node["chart"][1] + node["chart"][3]
    assert all(r["box"][1] >= chart_bottom and r["box"][3] > 10 for r in node["rows"]), node  # below the chart
    assert "previews +" in node["summary"], node["summary"]
    assert re.fullmatch(r"\+\d+\.\ds", node["time"]), node["time"]  # the time previews added, over the rows


@pytest.mark.parametrize("mode", ["classic", "nodes2"])
def test_a_run_shows_preview_rows_with_the_chart_and_a_reload_keeps_them(newest_server, browser, mode):
    server = newest_server
    status, body = server.request("POST", "/settings", {"Comfy.VueNodes.Enabled": mode == "nodes2"})
    assert status == 200, body
    context, page, log = new_page(browser, viewport=(1400, 1000))
    try:
        open_ui(page, server.url)
        assert page.evaluate("window.__COMFYUI_FRONTEND_VERSION__") == NEWEST_FRONTEND
        path = next(p for p in example_workflows() if p.stem == "train_then_apply")
        result = load_workflow(page, read_workflow(path))
        assert not (result["missing"] or result["invalid"]), result
        set_widgets(page, {"ckpt_name": server.ckpt_name, "BLoRALoader.lora_name": TINY_BLORA, **SETTINGS})
        before = set(server.request("GET", "/history")[1])
        page.evaluate("app.queuePrompt(0)")
        # Live: rows appear while the run goes (before the chart finishes).
        page.wait_for_function(f"() => {{ const n = ({_NODE})(); return n && n.rows.length >= 2 }}", timeout=180_000)
        node = _wait_done(page, 180_000)
        _check(node)
        deadline = time.monotonic() + 60
        run = None
        while time.monotonic() < deadline and run is None:
            history = server.request("GET", "/history")[1]
            run = next((v for k, v in history.items() if k not in before and (v.get("status") or {}).get("status_str")),
                       None)
            time.sleep(0.25)
        assert run and run["status"]["status_str"] == "success", run
        saved = run["outputs"][node["id"]]["previews"]
        assert sorted(r["step"] for r in saved) == sorted(ROW_STEPS)
        assert all(any(r["filename"] in row["src"] for r in saved) for row in node["rows"])  # the saved files
        if mode == "classic":
            focus_mode(page)
            fit_view(page, 0.9, node_ids=[int(node["id"])])
            screenshot(page, DOCS / "train_previews.png", clip=graph_clip(page, 8, node_ids=[int(node["id"])]))
            focus_mode(page, False)

        # Reload: the chart and the rows come back from /history.
        open_ui(page, server.url)
        restored = _wait_done(page, 30_000)
        _check(restored)
        assert [r["src"] for r in restored["rows"]] == [r["src"] for r in node["rows"]]
        ours = [e for e in log.entries if e.ours]
        assert not ours, "\n".join(f"{e.kind}: {e.text} @ {e.url}\n{e.stack}" for e in ours)
    finally:
        context.close()
        server.request("POST", "/settings", {"Comfy.VueNodes.Enabled": False})


OLD_UI_WORKFLOW = Path(__file__).resolve().parents[1] / "blora_testkit" / "old_workflows" / "train_then_apply.json"
CHANGED = {"weight_decay": 0.001, "flip": True, "save_precision": "fp32"}  # moved settings set off their defaults

_PROMPT = """async () => {
  const { output } = await app.graphToPrompt();
  const train = Object.entries(output).find(([, n]) => n.class_type === "BLoRATrain");
  const node = app.graph.nodes.find((n) => n.comfyClass === "BLoRATrain");
  return { train: train[1].inputs, id: train[0], nodes: output,
           sockets: node.inputs.map((i) => i.name), moved: node.bloraMovedSettings ?? null,
           toasts: [...document.querySelectorAll(".p-toast-message")].map((e) => e.innerText.trim()) };
}"""


@pytest.fixture(scope="module")
def front_end_servers(ui_server, newest_server):
    return {"pinned": ui_server, NEWEST_FRONTEND: newest_server}


@pytest.mark.parametrize("front_end", ["pinned", NEWEST_FRONTEND])
def test_an_old_ui_workflow_loads_with_its_settings_and_says_what_moved(front_end_servers, browser, front_end):
    import json

    server = front_end_servers[front_end]
    workflow = json.loads(OLD_UI_WORKFLOW.read_text())
    train = next(n for n in workflow["nodes"] if n["type"] == "BLoRATrain")
    values = dict(zip(OLD_TRAIN_WIDGETS, train["widgets_values"]))
    values.update(CHANGED, rank=16, learning_rate=1e-4, filename_prefix="old/ui")
    train["widgets_values"] = [values[n] for n in OLD_TRAIN_WIDGETS]
    context, page, log = new_page(browser)
    try:
        open_ui(page, server.url)
        result = load_workflow(page, workflow)
        assert not result["missing"], result
        prompt = page.evaluate(_PROMPT)
        inputs = prompt["train"]
        assert {k: inputs[k] for k in ("rank", "learning_rate", "steps", "seed", "filename_prefix", "blocks")} == {
            "rank": 16, "learning_rate": 1e-4, "steps": values["steps"], "seed": values["seed"],
            "filename_prefix": "old/ui", "blocks": values["blocks"]}
        assert {"algorithm_options", "augmentation", "checkpoints", "memory", "validation"} <= set(prompt["sockets"])
        wired = {k: prompt["nodes"][v[0]] for k, v in inputs.items() if isinstance(v, list)
                 and prompt["nodes"][v[0]]["class_type"].startswith("BLoRA") and k != "training_set"}
        assert sorted(wired) == ["algorithm_options", "augmentation", "checkpoints"], sorted(wired)
        assert wired["algorithm_options"]["inputs"]["weight_decay"] == 0.001
        assert wired["augmentation"]["inputs"]["flip"] is True
        assert wired["checkpoints"]["inputs"]["save_precision"] == "fp32"
        assert wired["checkpoints"]["inputs"]["save_every"] == values["save_every"]
        assert [m["input"] for m in prompt["moved"]] == ["algorithm_options", "augmentation", "checkpoints"]
        ours = [e for e in log.entries if e.ours]
        assert not ours, "\n".join(f"{e.kind}: {e.text} @ {e.url}\n{e.stack}" for e in ours)
    finally:
        context.close()
