// Validation preview rows of Train B-LoRA (B-LoRA Validation wired): one row per seed and preview step, each the
// views content only | style only | both side by side, newest on top. Pure presentation: the rows come from the
// server event `blora.train.preview` {node, step, seed, image} while the node runs and from the node's UI output
// `previews` ([{step, seed, filename, subfolder, type}]) when it finishes or is restored from history.
import { COLORS, element, viewUrl } from "./blora_common.js";

export const PREVIEW_EVENT = "blora.train.preview";
export const VIEWS = ["content", "style", "both"];
export const SHOWN_ROWS = 4; // the node grows to show this many rows; more scroll
const LABEL_WIDTH = 46;

/** Height (canvas units) the rows need on a node ``width`` wide: square views, SHOWN_ROWS rows at most. */
export function rowsHeight(width, rows) {
  const view = Math.max(16, (width - LABEL_WIDTH - 24) / VIEWS.length);
  return rows ? 16 + Math.min(rows, SHOWN_ROWS) * (view + 2) : 0;
}

/** Rows newest first (a higher step first; seeds in order within a step). */
export function newestFirst(rows) {
  return [...rows].sort((a, b) => b.step - a.step || a.seed - b.seed);
}

/** The rows of one run: live rows are replaced by the saved ones when the run ends. */
export class PreviewRows {
  constructor() {
    this.rows = [];
    this.seconds = null;
  }

  clear() {
    this.rows = [];
    this.seconds = null;
  }

  add(step, seed, image) {
    this.rows = this.rows.filter((r) => !(r.step === step && r.seed === seed));
    this.rows.push({ step: Number(step), seed: Number(seed), image });
  }

  finish(saved, seconds) {
    this.rows = (saved ?? []).map((r) => ({ step: Number(r.step), seed: Number(r.seed), image: r }));
    this.seconds = Number.isFinite(seconds) ? seconds : null;
  }

  get seedCount() {
    return new Set(this.rows.map((r) => r.seed)).size;
  }
}

/** The DOM of the rows: a header naming the views, then one labelled image per row. */
export class PreviewRowsView {
  constructor() {
    this.root = element("div", { display: "none", flexDirection: "column", gap: "2px", flex: "0 1 auto",
      minHeight: "0", overflowY: "auto" });
    this.root.className = "blora-preview-rows";
    this.header = element("div", { display: "grid", gridTemplateColumns: `${LABEL_WIDTH}px 1fr 1fr 1fr`,
      font: "10px monospace", color: COLORS.dim, textAlign: "center", flex: "0 0 auto" });
    this.time = element("span", { textAlign: "left" }, "");
    this.time.title = "time the previews added to the run";
    this.header.append(this.time, ...VIEWS.map((v) => element("span", { color: COLORS[v] ?? COLORS.text }, v)));
    this.list = element("div", { display: "flex", flexDirection: "column", gap: "2px" });
    this.root.append(this.header, this.list);
  }

  render(previews) {
    const rows = newestFirst(previews.rows);
    this.root.style.display = rows.length ? "flex" : "none";
    this.time.textContent = previews.seconds != null ? `+${previews.seconds.toFixed(1)}s` : "";
    const showSeed = previews.seedCount > 1;
    const keys = rows.map((r) => `${r.step}:${r.seed}:${viewUrl(r.image)}`);
    if (this.list.dataset.keys === keys.join("|")) return;
    this.list.dataset.keys = keys.join("|");
    this.list.replaceChildren(...rows.map((r) => this.row(r, showSeed)));
  }

  row(r, showSeed) {
    const line = element("div", { display: "grid", gridTemplateColumns: `${LABEL_WIDTH}px 1fr`, alignItems: "center" });
    line.className = "blora-preview-row";
    line.dataset.step = String(r.step);
    line.dataset.seed = String(r.seed);
    const label = element("span", { font: "10px monospace", color: COLORS.text, whiteSpace: "pre" },
      `step ${r.step}${showSeed ? `\nseed ${r.seed}` : ""}`);
    const img = element("img", { width: "100%", height: "auto", display: "block", imageRendering: "auto" });
    img.alt = `preview step ${r.step} seed ${r.seed}: ${VIEWS.join(" | ")}`;
    img.src = viewUrl(r.image);
    line.append(label, img);
    return line;
  }
}
