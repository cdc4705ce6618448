// Workflows saved before Train B-LoRA's settings moved to their own nodes (every setting on Train B-LoRA, widget
// values by position). On load, the values are read by their old names: the node's own widgets get theirs, and
// each settings node whose values differ from its defaults is created, filled and wired into Train B-LoRA, so the
// workflow queues with the settings it was saved with; a toast says what moved where. Registers no extension:
// train_chart.js calls it.
import { app } from "../../../scripts/app.js";

/** Train B-LoRA's widgets before the split, in their saved order (control_after_generate follows seed). */
export const OLD_WIDGETS = ["blocks", "layer_filter", "rank", "alpha", "algorithm", "rslora", "learning_rate",
  "loraplus_ratio", "optimizer", "weight_decay", "steps", "batch_size", "grad_accumulation", "resolution", "flip",
  "seed", "control_after_generate", "training_dtype", "gradient_checkpointing", "save_every", "filename_prefix",
  "resume_from", "init", "random_crop", "color_jitter", "save_precision", "seeds", "seed_draws", "dora_wd",
  "lokr_factor", "lokr_decompose_both", "lokr_full_matrix", "adalora_target_rank", "adalora_warmup",
  "adalora_final", "adalora_interval", "adalora_orth_reg"];

const definitions = {};

/** Keep every node definition the front end registers (the settings nodes are found among them). */
export function rememberDefinition(nodeData) {
  definitions[nodeData.name] = nodeData;
}

function defaultOf(spec) {
  if (!Array.isArray(spec)) return undefined;
  if (spec[1] && "default" in spec[1]) return spec[1].default;
  return Array.isArray(spec[0]) ? spec[0][0] : spec[1]?.options?.[0];
}

/** The settings nodes a node takes: [{input, nodeType, title, defaults: {widget: default}}], found by socket type. */
export function settingsNodes(nodeData) {
  return Object.entries(nodeData?.input?.optional ?? {}).flatMap(([input, spec]) => {
    const def = Object.values(definitions).find((d) => d.output?.length === 1 && d.output[0] === spec?.[0]);
    if (!def) return [];
    const defaults = Object.fromEntries(Object.entries(def.input?.required ?? {}).map(([n, s]) => [n, defaultOf(s)]));
    return [{ input, nodeType: def.name, title: def.display_name ?? def.name, defaults }];
  });
}

const WIDGET_TYPES = new Set(["INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"]);

/** How many values a node of this definition saves: one per widget input, one more after a seed (its
 * control_after_generate, which the front end adds to INT inputs named seed). */
export function savedValueCount(nodeData) {
  let count = 0;
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData?.input?.[section] ?? {})) {
      if (!(Array.isArray(spec?.[0]) || WIDGET_TYPES.has(spec?.[0]))) continue;
      count += 1 + (spec?.[1]?.control_after_generate || (spec?.[0] === "INT" && name === "seed") ? 1 : 0);
    }
  }
  return count;
}

/** {old widget name: value} for saved values of the old layout (more values than the node saves now, rslora a
 * boolean where learning_rate stands now), or null when they fit the node as it is. */
export function oldValues(values, valueCount) {
  if (!Array.isArray(values) || values.length <= valueCount || values.length > OLD_WIDGETS.length) return null;
  if (typeof values[OLD_WIDGETS.indexOf("rslora")] !== "boolean") return null;
  const old = Object.fromEntries(values.map((v, i) => [OLD_WIDGETS[i], v]));
  if (typeof old.gradient_checkpointing === "boolean") {
    old.gradient_checkpointing = old.gradient_checkpointing ? "trained blocks" : "off";
  }
  return old;
}

const pending = [];

/** onConfigure of Train B-LoRA: old-layout values go to the widgets of the same name; the rest waits for the
 * graph to finish loading (``afterGraphConfigured``). */
export function configureOld(node, info, nodeData) {
  const old = oldValues(info?.widgets_values, savedValueCount(nodeData));
  if (!old) return;
  for (const w of node.widgets ?? []) if (w.name in old) w.value = old[w.name];
  node.bloraOldSettings = old;
  pending.push(node);
}

function toast(summary, detail) {
  const toasts = app.extensionManager?.toast;
  if (toasts?.add) toasts.add({ severity: "warn", summary, detail, life: 20000 });
  else console.warn(`${summary}: ${detail}`);
}

/** Create, fill and wire the settings nodes the old values need; returns [{nodeType, input, moved: [names]}]. */
export function moveOldSettings(node, nodeData) {
  const old = node.bloraOldSettings;
  const onNode = new Set((node.widgets ?? []).map((w) => w.name)); // kept on the node: never moved
  const made = [];
  let y = node.pos[1];
  for (const group of settingsNodes(nodeData)) {
    const names = Object.keys(group.defaults).filter((n) => n in old && !onNode.has(n));
    const moved = names.filter((n) => old[n] !== group.defaults[n]);
    if (!moved.length) continue;
    const settings = LiteGraph.createNode(group.nodeType);
    if (!settings) continue;
    for (const w of settings.widgets ?? []) if (names.includes(w.name)) w.value = old[w.name];
    settings.pos = [node.pos[0] - settings.size[0] - 40, y];
    y += settings.size[1] + 50;
    node.graph.add(settings);
    settings.connect(0, node, node.findInputSlot(group.input));
    made.push({ nodeType: group.nodeType, title: group.title, input: group.input, moved });
  }
  node.bloraMovedSettings = made;
  delete node.bloraOldSettings;
  const where = made.map((m) => `${m.moved.join(", ")} → ${m.title}`).join("; ");
  toast("Train B-LoRA: this workflow was saved before the settings nodes",
    made.length ? `Moved and wired in: ${where}.` : "Its values were kept; every moved setting was at its default.");
  return made;
}

/** After a graph load: finish every Train B-LoRA node that came with old-layout values. */
export function afterGraphConfigured(nodeType) {
  while (pending.length) {
    const node = pending.shift();
    if (node.graph && node.bloraOldSettings) moveOldSettings(node, definitions[nodeType]);
  }
}
