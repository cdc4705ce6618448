// Deliver the pack's UI outputs (loss list, block map info) where the host does not call node.onExecuted:
// - after a page reload or a tab switch: the newest prompt in this ComfyUI server's /history queued from this
//   workflow (same graph id) that ran the node;
// - after a prompt in which our nodes were cached: the server sends no `executed` message for cached nodes, but
//   the prompt's /history entry holds their UI output;
// - outputs the queue panel restores ("load workflow" of a history item).
// Each is replayed through node.onExecuted, so the drawing code has one entry point.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { nodeByExecutionId, OUTPUT_KEYS } from "./blora_common.js";

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

/** Replay the UI outputs of our nodes in one finished prompt of the current graph (cached nodes included). */
async function replayPrompt(promptId) {
  const graph = app.graph;
  if (!graph?.nodes?.some((n) => n.comfyClass in OUTPUT_KEYS)) return;
  try {
    const response = await api.fetchApi(`/history/${encodeURIComponent(promptId)}`);
    const item = response.ok ? (await response.json())[promptId] : null;
    if (item?.prompt?.[3]?.extra_pnginfo?.workflow?.id !== graph.id) return;
    for (const [id, output] of Object.entries(item.outputs ?? {})) {
      const node = nodeByExecutionId(id);
      const key = OUTPUT_KEYS[node?.comfyClass];
      if (key && output?.[key]) node.onExecuted?.(output);
    }
  } catch (error) {
    console.warn("B-LoRA: could not read the finished prompt from /history", error);
  }
}

/** The prompt that succeeded; its history entry exists once the server says nothing is executing. */
function watchFinishedPrompts() {
  let succeeded = null;
  api.addEventListener("execution_success", ({ detail }) => {
    succeeded = detail?.prompt_id ?? null;
  });
  api.addEventListener("executing", ({ detail }) => {
    if (detail !== null || !succeeded) return;
    const promptId = succeeded;
    succeeded = null;
    replayPrompt(promptId);
  });
}

app.registerExtension({
  name: "blora.restore_outputs",

  setup() {
    watchFinishedPrompts();
  },

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
