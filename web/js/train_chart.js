// Train B-LoRA: a live loss chart on the node (raw loss + EMA), step counter, steps/s, ETA and the latest preview,
// and below it the validation preview rows (preview_rows.js), newest on top.
// Driven by the server events `blora.train.progress` {node, step, steps, loss, elapsed, preview?} and
// `blora.train.preview` {node, step, seed, image} while the node runs, and by the node's UI output `loss` (one float
// per step; AdaLoRA adds `ranks`, the final mean rank per block; validation adds `previews` and `preview_seconds`)
// when it finishes or is restored from history.
// State for tests and other extensions: node.bloraChart (a LossChart), node.bloraPreviews (a PreviewRows).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { addPanel, chain, COLORS, element, nodeByExecutionId, redraw, viewUrl } from "./blora_common.js";
import { drawLossChart, LossChart } from "./loss_chart.js";
import { PREVIEW_EVENT, PreviewRows, PreviewRowsView, rowsHeight } from "./preview_rows.js";
import { afterGraphConfigured, configureOld, rememberDefinition } from "./train_legacy.js";

const NODE_TYPE = "BLoRATrain";
const PROGRESS_EVENT = "blora.train.progress";
const MIN_HEIGHT = 190;
const CHART_AND_LINE = 170; // the chart and the summary line keep this much when preview rows share the panel

/** The DOM panel of one node: chart canvas, summary line, preview image. */
class ChartView {
  constructor(node) {
    this.node = node;
    this.root = element("div", { display: "flex", flexDirection: "column", gap: "3px", width: "100%",
      height: "100%", boxSizing: "border-box", overflow: "hidden" });
    this.plot = element("div", { position: "relative", flex: "1 1 auto", minHeight: "90px" });
    this.canvas = element("canvas", { position: "absolute", inset: "0", width: "100%", height: "100%",
      borderRadius: "4px" });
    this.line = element("div", { font: "10px monospace", color: COLORS.text, whiteSpace: "nowrap",
      overflow: "hidden", textOverflow: "ellipsis", flex: "0 0 auto" });
    this.image = element("img", { display: "none", flex: "0 1 auto", minHeight: "0", maxHeight: "45%",
      objectFit: "contain" });
    this.image.alt = "training preview";
    this.rows = new PreviewRowsView();
    this.plot.append(this.canvas);
    this.root.append(this.plot, this.line, this.image, this.rows.root);
    this.resize = new ResizeObserver(() => this.render());
    this.resize.observe(this.plot);
    this.panelHeight = MIN_HEIGHT;
    addPanel(node, "blora_loss_chart", this.root, () => this.panelHeight);
  }

  render() {
    const chart = this.node.bloraChart;
    drawLossChart(this.canvas, chart);
    const previews = this.node.bloraPreviews;
    const extra = previews.seconds != null ? ` · previews +${previews.seconds.toFixed(1)}s` : "";
    this.line.textContent = chart.summary() + extra;
    this.line.title = this.line.textContent;
    this.showPreview(chart.preview);
    this.rows.render(previews);
    this.fitRows(previews.rows.length);
    redraw();
  }

  /** Grow the node (never shrink it) so the chart and up to SHOWN_ROWS preview rows fit. */
  fitRows(rows) {
    this.panelHeight = rows ? CHART_AND_LINE + rowsHeight(this.node.size[0], rows) : MIN_HEIGHT;
    if (!rows) return;
    const wanted = this.node.computeSize()[1];
    if (this.node.size[1] < wanted) this.node.setSize([this.node.size[0], wanted]);
  }

  showPreview(preview) {
    if (!preview) {
      this.image.style.display = "none";
      return;
    }
    const src = viewUrl(preview);
    if (this.image.dataset.src !== src) {
      this.image.dataset.src = src;
      this.image.src = src;
    }
    this.image.style.display = "block";
  }

  dispose() {
    this.resize.disconnect();
  }
}

function trainNode(executionId) {
  const node = executionId == null ? null : nodeByExecutionId(executionId);
  return node?.comfyClass === NODE_TYPE && node.bloraChart ? node : null;
}

function onProgress({ detail }) {
  const node = trainNode(detail?.node);
  if (!node) return;
  node.bloraChart.update(detail);
  node.bloraChartView.render();
}

function onPreview({ detail }) {
  const node = trainNode(detail?.node);
  if (!node || !detail.image) return;
  node.bloraPreviews.add(detail.step, detail.seed, detail.image);
  node.bloraChartView.render();
}

function onExecuting({ detail }) {
  const node = trainNode(detail);
  if (!node) return;
  node.bloraChart.start();
  node.bloraPreviews.clear();
  node.bloraChartView.render();
}

/** An error or a cancel ends the prompt without our node's output: live charts stop their ETA. */
function onStopped() {
  for (const node of app.graph?.nodes ?? []) {
    if (node.comfyClass !== NODE_TYPE || !node.bloraChart?.running) continue;
    node.bloraChart.stop();
    node.bloraChartView.render();
  }
}

app.registerExtension({
  name: "blora.train_chart",

  setup() {
    api.addEventListener(PROGRESS_EVENT, onProgress);
    api.addEventListener(PREVIEW_EVENT, onPreview);
    api.addEventListener("executing", onExecuting);
    api.addEventListener("execution_error", onStopped);
    api.addEventListener("execution_interrupted", onStopped);
  },

  afterConfigureGraph() {
    afterGraphConfigured(NODE_TYPE);
  },

  beforeRegisterNodeDef(nodeType, nodeData) {
    rememberDefinition(nodeData);
    if (nodeData.name !== NODE_TYPE) return;
    const proto = nodeType.prototype;
    chain(proto, "onNodeCreated", function () {
      this.bloraChart = new LossChart();
      this.bloraPreviews = new PreviewRows();
      this.bloraChartView = new ChartView(this);
      this.setSize([Math.max(this.size[0], 420), Math.max(this.size[1], this.computeSize()[1])]);
    });
    chain(proto, "onExecuted", function (output) {
      const losses = output?.loss;
      if (!Array.isArray(losses) || !this.bloraChart) return;
      this.bloraChart.finish(losses.map(Number), Number(output.elapsed?.[0]), output.seed_losses, output.seeds,
        output.ranks?.[0] ?? null);
      this.bloraPreviews.finish(output.previews, Number(output.preview_seconds?.[0]));
      this.bloraChartView.render();
    });
    chain(proto, "onConfigure", function (info) {
      configureOld(this, info, nodeData); // a workflow saved before the settings nodes
    });
    chain(proto, "onRemoved", function () {
      this.bloraChartView?.dispose();
    });
  },
});
