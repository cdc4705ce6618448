"""Driving the real ComfyUI front end with Debian's chromium through the Python ``playwright`` package
(TEST-ONLY). Used by tests/browser/test_ui.py and tests/browser/make_thumbnails.py.

Nothing here downloads a browser (never ``playwright install``): chromium comes from the system package. The page
only talks to the loopback ComfyUI server; chromium's own background traffic is switched off by the flags below.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_workflows"
ARTIFACTS = ROOT / "tests" / "artifacts"
# README screenshots: docs/ when BLORA_UPDATE_DOCS=1 (then commit them), else tests/artifacts/docs/ so a plain
# test run leaves the tracked files alone.
DOCS = ROOT / "docs" if os.environ.get("BLORA_UPDATE_DOCS") == "1" else ROOT / "tests" / "artifacts" / "docs"
PACK_WEB = "/extensions/comfyui-blora/"
TINY_BLORA = "tiny_blora.safetensors"  # written into the test server's models/blora by conftest
TINY_FLUX_BLORA = "tiny_flux_blora.safetensors"  # the same for the tiny FLUX.1 checkpoint
OUR_EXTENSIONS = ("blora.train_chart", "blora.block_map", "blora.restore_outputs")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# File-name widgets point at files of the user's install (models, input images); a test server has other files.
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".png", ".jpg", ".jpeg", ".webp")
# User settings written to the server before any page opens: every page load then takes the same path (a fresh
# user would get the first-run template browser instead of the default graph), and screenshots stay clean (no
# minimap, no canvas statistics text or canvas menu, no node source badges, workflow tabs in the side bar which
# focus mode hides).
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
               "Comfy.Graph.CanvasMenu": False, "Comfy.NodeBadge.NodeSourceBadgeMode": "None",
               "Comfy.Workflow.WorkflowTabsPosition": "Sidebar"}


# Front ends besides the host's pinned one: `pip install --target <FRONTENDS>/<version> comfyui-frontend-package==
# <version>` (.ci/run does), served with --front-end-root <that>/comfyui_frontend_package/static.
FRONTENDS = Path(os.environ.get("BLORA_FRONTENDS", Path.home() / ".cache" / "blora-ci" / "frontends"))
# The training examples' B-LoRA Validation node made cheap for the tiny checkpoint (64 px, 2 sampler steps).
PREVIEWS_SMALL = {"BLoRAValidation.width": 64, "BLoRAValidation.height": 64, "BLoRAValidation.steps": 2,
                  "BLoRAValidation.every": 10}
# Train B-LoRA's widgets before its settings moved to their own nodes (web/js/train_legacy.js), in saved order.
OLD_TRAIN_WIDGETS = ["blocks", "layer_filter", "rank", "alpha", "algorithm", "rslora", "learning_rate",
                     "loraplus_ratio", "optimizer", "weight_decay", "steps", "batch_size", "grad_accumulation",
                     "resolution", "flip", "seed", "control_after_generate", "training_dtype",
                     "gradient_checkpointing", "save_every", "filename_prefix", "resume_from", "init", "random_crop",
                     "color_jitter", "save_precision", "seeds", "seed_draws", "dora_wd", "lokr_factor",
                     "lokr_decompose_both", "lokr_full_matrix", "adalora_target_rank", "adalora_warmup",
                     "adalora_final", "adalora_interval", "adalora_orth_reg"]
NEWEST_FRONTEND = "1.58.1"  # the newest comfyui-frontend-package the registry serves (2026-11)


def frontend_root(version: str) -> Path | None:
    """The static folder of an installed front end ``version``, or None."""
    root = FRONTENDS / version / "comfyui_frontend_package" / "static"
    return root if (root / "index.html").is_file() else None


def write_tiny_blora(server) -> None:
    """A rank-4 content + style B-LoRA for the tiny checkpoint in the original dialect, in models/blora."""
    from blora_testkit.loras import ROLE_BLOCKS, attention_shapes, make_pairs, write_original

    shapes = attention_shapes(server.models_dir / "checkpoints" / server.ckpt_name)
    pairs = make_pairs(shapes, [ROLE_BLOCKS["content"], ROLE_BLOCKS["style"]], rank=4, seed=0)
    write_original(server.models_dir / "blora" / TINY_BLORA, pairs)


def write_tiny_flux_blora(server) -> None:
    """A rank-4 content + style B-LoRA for the tiny FLUX.1 checkpoint (a content and a style single block) in
    ComfyUI's dialect, in models/blora."""
    from blora_testkit.loras import FLUX_ROLE_BLOCKS, attention_shapes, make_pairs, write_comfy

    shapes = attention_shapes(server.models_dir / "checkpoints" / server.flux_ckpt_name)
    pairs = make_pairs(shapes, list(FLUX_ROLE_BLOCKS.values()), rank=4, seed=0)
    write_comfy(server.models_dir / "blora" / TINY_FLUX_BLORA, pairs)


def prepare_ui_server(server) -> None:
    """What every browser-layer server gets: the UI settings, the examples' input images, the tiny B-LoRA."""
    status, body = server.request("POST", "/settings", UI_SETTINGS)
    assert status == 200, body
    for i, name in enumerate(input_images(example_workflows())):
        sample_image(server.input_dir / name, seed=i)
    write_tiny_blora(server)
    write_tiny_flux_blora(server)


def chromium_path() -> str | None:
    """$BLORA_CHROMIUM, else `chromium` on PATH, else /usr/bin/chromium."""
    for candidate in (os.environ.get("BLORA_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def missing_browser_reason() -> str | None:
    """Why browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "python package `playwright` not installed (pip install -r requirements-test.txt)"
    if chromium_path() is None:
        return "no chromium binary (apt-get install chromium, or set BLORA_CHROMIUM)"
    return None


def example_workflows() -> list[Path]:
    """The shipped UI-format examples (example_workflows/*.json; API twins live in example_workflows/api/)."""
    return sorted(EXAMPLES.glob("*.json"))


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


@dataclass(frozen=True)
class ConsoleError:
    kind: str  # "console" (console.error, failed resource loads) or "pageerror" (uncaught exception)
    text: str
    url: str  # where it came from: the script or the resource
    stack: str = ""

    @property
    def signature(self) -> tuple[str, str, str]:
        """Identity across page loads: kind, first line, source URL without query."""
        return self.kind, self.text.splitlines()[0] if self.text else "", self.url.split("?")[0]

    @property
    def ours(self) -> bool:
        """Mentions this pack's web files or names (then it is never excused)."""
        blob = f"{self.text}\n{self.url}\n{self.stack}"
        return PACK_WEB in blob or "blora" in blob.lower()


@dataclass
class ConsoleLog:
    """Every console error and uncaught page error of one page, in order."""
    entries: list[ConsoleError] = field(default_factory=list)
    load_errors: list[ConsoleError] = field(default_factory=list)  # set by whoever loads the page first

    def attach(self, page) -> "ConsoleLog":
        def on_console(msg):
            if msg.type == "error":
                loc = msg.location or {}
                self.entries.append(ConsoleError("console", msg.text, loc.get("url", "")))

        def on_pageerror(err):
            stack = err.stack or ""
            first_frame = next((line for line in stack.splitlines() if " at " in line), "")
            self.entries.append(ConsoleError("pageerror", str(err), first_frame.strip(), stack))

        page.on("console", on_console)
        page.on("pageerror", on_pageerror)
        return self

    def mark(self) -> int:
        return len(self.entries)

    def since(self, mark: int = 0) -> list[ConsoleError]:
        return self.entries[mark:]


def unexplained(errors: list[ConsoleError], baseline: set) -> list[ConsoleError]:
    """Errors that are ours, or that the same steps did not also raise with this pack's web files replaced by
    empty modules (the baseline): only errors provably not caused by our JavaScript are excused."""
    return [e for e in errors if e.ours or e.signature not in baseline]


def stub_our_extensions(page) -> None:
    """Serve every file under /extensions/comfyui-blora/ as an empty ES module (baseline runs)."""
    page.route(f"**{PACK_WEB}**", lambda route: route.fulfill(status=200, content_type="text/javascript",
                                                               body="export {};\n"))


def open_ui(page, url: str, *, timeout_ms: int = 60_000) -> None:
    """Load the front end and wait until the app, its graph and the extension manager exist."""
    page.goto(url)
    page.wait_for_function("() => !!(window.app && app.graph && app.canvas && app.extensionManager"
                           " && window.comfyAPI?.api?.api?.clientId)", timeout=timeout_ms)
    page.wait_for_timeout(500)


def new_page(browser, viewport=(1400, 900)):
    """(context, page, console log) in a fresh browser context. The browser asks for /favicon.ico by itself and
    ComfyUI has none: that request is answered empty here so its 404 never reaches the console."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.route("**/favicon.ico", lambda route: route.fulfill(status=204, body=""))
    return context, page, ConsoleLog().attach(page)


_LOAD_AND_CHECK = """
async ([wf, fileSuffixes]) => {
  const toasts = () => [...document.querySelectorAll(".p-toast-message")].map((e) => e.innerText.trim());
  const before = new Set(toasts());
  const types = wf.nodes.map((n) => n.type);
  const missing = [...new Set(types.filter((t) => !(t in LiteGraph.registered_node_types)))];
  if (missing.length) return { missing, invalid: [], fileRefs: [], nodes: [], alerts: [] };
  await app.loadGraphData(structuredClone(wf), true, true, null, { showMissingNodesDialog: false,
    showMissingModelsDialog: false });
  const invalid = [];
  const fileRefs = [];
  const isFile = (v) => typeof v === "string" && fileSuffixes.some((s) => v.toLowerCase().endsWith(s));
  const saved = Object.fromEntries(wf.nodes.map((n) => [String(n.id), n.widgets_values]));
  for (const node of app.graph.nodes) {
    const widgets = (node.widgets ?? []).filter((w) => w.serialize !== false);
    const values = saved[String(node.id)];
    if (Array.isArray(values) && values.length !== widgets.length)
      invalid.push(`${node.type} #${node.id}: ${values.length} saved widget values, ${widgets.length} widgets`);
    for (const w of widgets) {
      const where = `${node.type} #${node.id} ${w.name}`;
      if (w.type === "combo") {
        const opts = typeof w.options?.values === "function" ? w.options.values(w, node) : w.options?.values;
        if (Array.isArray(opts) && !opts.includes(w.value)) {
          if (isFile(w.value)) fileRefs.push(`${where} = ${w.value}`);
          else invalid.push(`${where} = ${JSON.stringify(w.value)} not in [${opts.join(", ")}]`);
        }
      } else if (w.type === "number" || w.type === "slider") {
        const { min, max } = w.options ?? {};
        if (typeof w.value !== "number" || Number.isNaN(w.value) || (min != null && w.value < min)
            || (max != null && w.value > max))
          invalid.push(`${where} = ${JSON.stringify(w.value)} outside [${min}, ${max}]`);
      } else if (w.type === "toggle" && typeof w.value !== "boolean") {
        invalid.push(`${where} = ${JSON.stringify(w.value)} is not a boolean`);
      }
    }
  }
  const nodes = app.graph.nodes.map((n) => ({ id: n.id, type: n.type, chart: !!n.bloraChart,
    blockMap: !!n.bloraBlockMapView }));
  await new Promise((resolve) => setTimeout(resolve, 200));
  const alerts = toasts().filter((t) => !before.has(t));  // e.g. the host's schema validation alert
  return { missing, invalid, fileRefs, nodes, alerts };
}
"""


def load_workflow(page, workflow: dict) -> dict:
    """Open a UI-format workflow with app.loadGraphData; returns {missing: node types not registered,
    invalid: widget problems, fileRefs: file-name combo values this server lacks, nodes: [{id, type, chart,
    blockMap}], alerts: toasts the host raised while loading (schema validation...)}. Nothing is loaded when
    types are missing (the host would show its dialog)."""
    result = page.evaluate(_LOAD_AND_CHECK, [workflow, list(FILE_SUFFIXES)])
    page.wait_for_timeout(300)
    return result


def set_widgets(page, overrides: dict) -> list[str]:
    """Set widget values by name, never by index: keys ``"widget"`` (every node that has it) or
    ``"NodeType.widget"``; returns the "type #id widget" entries changed."""
    return page.evaluate("""(overrides) => {
      const changed = [];
      for (const node of app.graph.nodes) for (const w of node.widgets ?? []) {
        for (const key of [`${node.type}.${w.name}`, w.name]) {
          if (!(key in overrides)) continue;
          w.value = overrides[key];
          w.callback?.(w.value, app.canvas, node);
          changed.push(`${node.type} #${node.id} ${w.name}`);
          break;
        }
      }
      app.graph.setDirtyCanvas(true, true);
      return changed;
    }""", overrides)


def focus_mode(page, on: bool = True) -> None:
    """The host's focus mode: menus and side bars hidden, the canvas fills the window."""
    page.evaluate("(on) => { app.extensionManager.focusMode = on; }", on)
    page.wait_for_timeout(400)


# Node ids are numbers in the 1.27 front end and strings ("4") in the 1.4x/1.5x ones: compared as strings.
_BOUNDS = """(ids) => {
  const want = ids ? ids.map(String) : null;
  const nodes = app.graph.nodes.filter((n) => !want || want.includes(String(n.id)));
  if (!nodes.length) throw new Error(`no node with id in ${JSON.stringify(ids)}`);
  const title = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
  const x0 = Math.min(...nodes.map((n) => n.pos[0]));
  const y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  return [x0, y0, x1 - x0, y1 - y0];
}"""


def fit_view(page, margin: float = 0.92, node_ids: list | None = None) -> None:
    """Zoom and pan so every node (or the nodes ``node_ids``) is visible, then redraw."""
    bounds = page.evaluate(_BOUNDS, node_ids)
    page.evaluate("([b, margin]) => { app.canvas.ds.fitToBounds(b, { zoom: margin });"
                  " app.canvas.setDirty(true, true); }", [bounds, margin])
    page.wait_for_timeout(400)


def graph_clip(page, pad: int = 12, node_ids: list | None = None) -> dict:
    """Screen rectangle (a Playwright ``clip``) around every node, or the nodes ``node_ids``, as drawn now."""
    bounds = page.evaluate(_BOUNDS, node_ids)
    clip = page.evaluate("""([b, pad]) => {
      const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([b[0], b[1]]);
      const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([b[0] + b[2], b[1] + b[3]]);
      const r = app.canvas.canvas.getBoundingClientRect();
      const left = Math.max(0, r.left + x0 - pad), top = Math.max(0, r.top + y0 - pad);
      return { x: left, y: top, width: Math.min(window.innerWidth, r.left + x1 + pad) - left,
               height: Math.min(window.innerHeight, r.top + y1 + pad) - top };
    }""", [bounds, pad])
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in clip.values()):
        raise AssertionError(f"graph_clip: the canvas gave {clip} for nodes {node_ids} (bounds {bounds})")
    return clip


def screenshot(page, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), **kwargs)
    return path


def sample_image(path: Path, seed: int, size: int = 96) -> Path:
    """A small synthetic picture (sky-to-ground gradient, a sun, a hill; colours from ``seed``) for the
    examples' LoadImage nodes: nicer in screenshots than noise, and still a real RGB PNG to train on."""
    import numpy as np
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    top, bottom, sun, hill = (tuple(int(c) for c in rng.integers(40, 230, 3)) for _ in range(4))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    pixels = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp).repeat(size, axis=1)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    r = size // 6
    cx, cy = int(rng.integers(r, size - r)), int(rng.integers(r, size // 2))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=sun)
    draw.ellipse([-size // 2, size * 2 // 3, size * 3 // 2, size * 2], fill=hill)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def input_images(workflows: list[Path]) -> list[str]:
    """Image names the workflows' LoadImage nodes point at, and an image in each training folder that a Load
    B-LoRA Training Folder node points at (``<folder>/sample.png``)."""
    names = set()
    for path in workflows:
        for node in read_workflow(path).get("nodes", []):
            values = node.get("widgets_values")
            if node.get("type") == "LoadImage" and isinstance(values, list) and values:
                names.add(str(values[0]))
            elif node.get("type") == "BLoRATrainingFolder" and isinstance(values, list) and values:
                names.add(f"{values[0]}/sample.png")
    return sorted(names)


def read_workflow(path: Path) -> dict:
    return json.loads(path.read_text())
