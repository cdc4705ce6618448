// Shared helpers for the B-LoRA front end. This module registers no extension; train_chart.js, block_map.js and
// restore_outputs.js import it. Everything here presents data the server sent: no widget values, no requests
// other than to this ComfyUI server.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

/** Node ids whose UI output the pack draws, with the UI output key that carries the data. */
export const OUTPUT_KEYS = { BLoRATrain: "loss", BLoRALoader: "blora" };

/** Role colours shared by the chart legend and the block map. */
export const COLORS = {
  content: "#4f9cf0",
  style: "#f08a4b",
  layout: "#5cc27a",
  other: "#8a8f98",
  empty: "#2a2d33",
  text: "#c9ccd1",
  dim: "#7d828a",
  raw: "rgba(130, 170, 255, 0.7)",
  smooth: "#ffb347",
  grid: "rgba(255, 255, 255, 0.08)",
};

/**
 * The graph node for a server execution id ("12", or "5:3" inside a subgraph), or null.
 * @param {string|number} executionId
 */
export function nodeByExecutionId(executionId) {
  let graph = app.graph;
  let node = null;
  for (const part of String(executionId).split(":")) {
    node = graph?.getNodeById(part) ?? graph?.getNodeById(Number(part)) ?? null;
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

/** URL of an image the server wrote ({filename, subfolder, type}), served by this ComfyUI's /view. */
export function viewUrl(image) {
  const query = new URLSearchParams({
    filename: image.filename,
    subfolder: image.subfolder ?? "",
    type: image.type ?? "temp",
  });
  return api.apiURL(`/view?${query}`);
}

/** A DOM element with inline style and optional text. */
export function element(tag, style = {}, text = "") {
  const el = document.createElement(tag);
  Object.assign(el.style, style);
  if (text) el.textContent = text;
  return el;
}

/**
 * Add a presentation-only DOM widget to a node: never serialised into the workflow or the API prompt, so saved
 * workflows and widget order stay exactly what the backend defines. minHeight: a number, or a function giving it
 * (a panel whose content grows).
 */
export function addPanel(node, name, root, minHeight) {
  const height = typeof minHeight === "function" ? minHeight : () => minHeight;
  const widget = node.addDOMWidget(name, "blora_panel", root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height(),
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false;
  return widget;
}

/** Chain a method on a node type's prototype: the original runs first, then `extra` with the same arguments. */
export function chain(proto, method, extra) {
  const original = proto[method];
  proto[method] = function (...args) {
    const result = original?.apply(this, args);
    extra.apply(this, args);
    return result;
  };
}

/** Ask the canvas to redraw (the DOM widgets follow the node). */
export function redraw() {
  app.graph?.setDirtyCanvas(true, true);
}
