// Rebuild the pack's node displays (loss chart, block map) after a page reload or a tab switch. The front end does
// not call onExecuted for outputs it restores, so this asks this ComfyUI server's /history for the newest prompt
// queued from this workflow (same graph id) that ran the node, and replays that node's UI output through
// node.onExecuted. It also replays outputs the queue panel restores ("load workflow" of a history item).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { OUTPUT_KEYS } from "./blora_common.js";

const HISTORY_ITEMS = 64;

/** Our nodes in the root graph that show nothing yet. */
function emptyNodes(graph) {
  return (graph?.nodes ?? []).filter((n) => n.comfyClass in OUTPUT_KEYS && !hasData(n));
}

function hasData(node) {
  return Boolean(node.bloraChart?.points?.length || node.bloraBlockMap);
}

/** {prompt number, node outputs} for history items queued from the graph with `graphId`, newest first. */
function runsOf(history, graphId) {
  return Object.values(history ?? {})
    .filter((item) => item?.prompt?.[3]?.extra_pnginfo?.workflow?.id === graphId)
    .map((item) => ({ number: Number(item.prompt[0]), prompt: item.prompt[2] ?? {}, outputs: item.outputs ?? {} }))
    .sort((a, b) => b.number - a.number);
}

/** Replay the newest matching output of each node; returns how many nodes were restored. */
export function replayHistory(graph, history) {
  let restored = 0;
  const runs = runsOf(history, graph.id);
  for (const node of emptyNodes(graph)) {
    const id = String(node.id);
    const key = OUTPUT_KEYS[node.comfyClass];
    const run = runs.find((r) => r.prompt[id]?.class_type === node.comfyClass && r.outputs[id]?.[key]);
    if (!run) continue;
    node.onExecuted?.(run.outputs[id]);
    restored += 1;
  }
  return restored;
}

async function restoreFromHistory() {
  const graph = app.graph;
  if (!emptyNodes(graph).length) return;
  try {
    const response = await api.fetchApi(`/history?max_items=${HISTORY_ITEMS}`);
    if (!response.ok) return;
    replayHistory(graph, await response.json());
  } catch (error) {
    console.warn("B-LoRA: could not restore node outputs from /history", error);
  }
}

app.registerExtension({
  name: "blora.restore_outputs",

  async afterConfigureGraph() {
    await restoreFromHistory();
  },

  onNodeOutputsUpdated(nodeOutputs) {
    for (const [locator, output] of Object.entries(nodeOutputs ?? {})) {
      if (locator.includes(":")) continue; // nodes inside subgraphs: not restored
      const node = app.graph?.getNodeById(Number(locator)) ?? app.graph?.getNodeById(locator);
      const key = OUTPUT_KEYS[node?.comfyClass];
      if (key && output?.[key]) node.onExecuted?.(output);
    }
  },
});
