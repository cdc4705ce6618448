// Load B-LoRA: a compact map of the 11 SDXL attention blocks on the node (filled where the file holds the block,
// coloured by role: content OUT0, style OUT1, layout IN08) and one text line (rank, alpha, dialect, parameters).
// A FLUX.1 file (`architecture` "FLUX.1") gets FLUX's 57 blocks instead: a row of the 19 double-stream blocks
// (D00-D18, in no role) and two rows of the 38 single-stream ones (S00-S09 content, S10-S37 style: SplitFlux).
// Driven by the node's UI output `blora` = [{architecture, dialect, roles, blocks, ranks, alpha, num_params, ...}].
// State for tests and other extensions: node.bloraBlockMap = {info, present: [slot names]}.
import { app } from "../../../scripts/app.js";
import { addPanel, chain, COLORS, element, redraw } from "./blora_common.js";

const NODE_TYPE = "BLoRALoader";

/** SDXL attention blocks in U-Net order: LBW slot, LDM module, role (B-LoRA paper + InstantStyle layout). */
export const SLOTS = [
  ["IN04", "input_blocks.4.1"], ["IN05", "input_blocks.5.1"], ["IN07", "input_blocks.7.1"],
  ["IN08", "input_blocks.8.1", "layout"], ["MID", "middle_block.1"], ["OUT0", "output_blocks.0.1", "content"],
  ["OUT1", "output_blocks.1.1", "style"], ["OUT2", "output_blocks.2.1"], ["OUT3", "output_blocks.3.1"],
  ["OUT4", "output_blocks.4.1"], ["OUT5", "output_blocks.5.1"],
].map(([slot, ldm, role]) => ({ slot, ldm, role }));

const pad = (n) => String(n).padStart(2, "0");
/** FLUX.1 blocks in model order: slot, host module, role (blora/arch/flux.py). */
export const FLUX_SLOTS = [
  ...Array.from({ length: 19 }, (_, n) => ({ slot: `D${pad(n)}`, ldm: `double_blocks.${n}` })),
  ...Array.from({ length: 38 }, (_, n) => ({ slot: `S${pad(n)}`, ldm: `single_blocks.${n}`,
    role: n < 10 ? "content" : "style" })),
];

/** The slots of the architecture a loader's UI output names (SDXL unless "FLUX.1"). */
export function slotsFor(info) {
  return String(info?.architecture ?? "").startsWith("FLUX") ? FLUX_SLOTS : SLOTS;
}

/** Slot names present in `blocks` (slots like "OUT1" or "S12", or module paths like "output_blocks.1.1"). A role
 * name marks a block only on SDXL, where each role is one block. */
export function presentSlots(blocks, slots = SLOTS) {
  const names = new Set((blocks ?? []).map((b) => String(b)));
  const byRole = slots === SLOTS;
  return slots.filter((s) => names.has(s.slot) || names.has(s.ldm) || (byRole && names.has(s.role)))
    .map((s) => s.slot);
}

/** "64", "8/16/64" from a number, a list or a {block: rank} mapping. */
export function rankText(ranks) {
  const values = typeof ranks === "object" && ranks !== null ? Object.values(ranks) : [ranks];
  const unique = [...new Set(values.filter((v) => v !== undefined && v !== null).map(Number))];
  return unique.sort((a, b) => a - b).join("/") || "?";
}

function paramsText(n) {
  if (!Number.isFinite(n)) return null;
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)}M params` : `${(n / 1e3).toFixed(1)}k params`;
}

function roleNames(roles) {
  if (Array.isArray(roles)) return roles.map(String);
  return roles && typeof roles === "object" ? Object.keys(roles) : [];
}

/** The text line under the map: rank, alpha, dialect, kinds (when not plain LoRA), DoRA, parameters. */
export function summaryText(info) {
  const parts = [`rank ${rankText(info.ranks)}`];
  parts.push(info.alpha === undefined || info.alpha === null ? "no alpha" : `alpha ${rankText(info.alpha)}`);
  if (info.dialect) parts.push(String(info.dialect));
  const kinds = (info.kinds ?? []).map(String).filter((k) => k.toLowerCase() !== "lora");
  if (kinds.length) parts.push(kinds.join("+"));
  if (info.dora) parts.push("DoRA");
  const params = paramsText(Number(info.num_params));
  if (params) parts.push(params);
  return parts.join(" · ");
}

class BlockMapView {
  constructor(node) {
    this.node = node;
    this.root = element("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%",
      font: "10px sans-serif", color: COLORS.text, boxSizing: "border-box" });
    this.grid = element("div", { display: "grid", gap: "2px" });
    this.layout(SLOTS);
    this.line = element("div", { font: "10px monospace", lineHeight: "13px", maxHeight: "26px",
      overflow: "hidden", overflowWrap: "anywhere" }, "block map: shown after a run");
    this.root.append(this.grid, this.line);
    addPanel(node, "blora_block_map", this.root, 62);
  }

  /** (Re)build the cells for `slots`: SDXL's 11 labelled cells in one row, FLUX's 57 small ones in 3 rows. */
  layout(slots) {
    if (this.slots === slots) return;
    this.slots = slots;
    this.grid.replaceChildren();
    this.grid.style.gridTemplateColumns = `repeat(${slots === SLOTS ? 11 : 19}, 1fr)`;
    this.cells = new Map(slots.map((s) => [s.slot, this.cell(s, slots === SLOTS)]));
  }

  cell(s, labelled) {
    const c = element("div", { height: labelled ? "26px" : "8px", borderRadius: labelled ? "3px" : "2px",
      display: "flex", alignItems: "center", justifyContent: "center", border: `1px solid ${COLORS.other}`,
      background: COLORS.empty, color: COLORS.dim, fontSize: "9px", overflow: "hidden" },
    labelled ? s.slot.replace("OUT", "O").replace("IN0", "I") : "");
    c.title = `${s.slot} (${s.ldm})${s.role ? `: ${s.role}` : ""}`;
    this.grid.append(c);
    return c;
  }

  render(info) {
    const slots = slotsFor(info);
    this.layout(slots);
    const present = new Set(presentSlots(info.blocks, slots));
    const roles = new Set(roleNames(info.roles));
    for (const s of slots) {
      const on = present.has(s.slot);
      const color = s.role && (on || roles.has(s.role)) ? COLORS[s.role] : COLORS.other;
      const cell = this.cells.get(s.slot);
      cell.style.background = on ? color : COLORS.empty;
      cell.style.borderColor = s.role ? COLORS[s.role] : COLORS.other;
      cell.style.color = on ? "#101114" : COLORS.dim;
      cell.style.fontWeight = on ? "bold" : "normal";
    }
    this.line.textContent = summaryText(info);
    this.line.title = [info.file, summaryText(info), `roles: ${[...roles].join(", ") || "none"}`]
      .filter(Boolean).join("\n");
    this.node.bloraBlockMap = { info, present: slots.filter((s) => present.has(s.slot)).map((s) => s.slot) };
    redraw();
  }
}

app.registerExtension({
  name: "blora.block_map",

  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.bloraBlockMapView = new BlockMapView(this);
      this.setSize([Math.max(this.size[0], 360), Math.max(this.size[1], this.computeSize()[1])]);
    });
    chain(nodeType.prototype, "onExecuted", function (output) {
      const info = output?.blora?.[0];
      if (info && typeof info === "object") this.bloraBlockMapView?.render(info);
    });
  },
});
