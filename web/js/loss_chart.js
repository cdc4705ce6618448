// Loss chart state and drawing for Train B-LoRA. Pure presentation: no extension is registered here
// (train_chart.js does that), no request is made.
import { COLORS } from "./blora_common.js";

/** Weight of the exponential moving average drawn over the raw loss (TensorBoard-style, debiased). */
export const EMA_WEIGHT = 0.9;

/** Debiased exponential moving average of `values`; non-finite values are skipped (the average holds). */
export function smooth(values, weight = EMA_WEIGHT) {
  const out = [];
  let acc = 0;
  let n = 0;
  for (const v of values) {
    if (Number.isFinite(v)) {
      acc = weight * acc + (1 - weight) * v;
      n += 1;
    }
    out.push(n ? acc / (1 - weight ** n) : NaN);
  }
  return out;
}

/** "1:05", "1:02:03". */
export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const hms = [Math.floor(s / 3600), Math.floor(s / 60) % 60, s % 60];
  const [h, m, sec] = hms.map((v) => String(v).padStart(2, "0"));
  return hms[0] ? `${hms[0]}:${m}:${sec}` : `${Number(m)}:${sec}`;
}

/** What one Train B-LoRA node shows: one point per step, the run length, timing and the latest preview. */
export class LossChart {
  constructor() {
    this.reset();
  }

  reset() {
    this.points = []; // [{step, loss}]
    this.seedLosses = []; // seeds > 1: one array of losses per seed (drawn instead of the single curve)
    this.seeds = [];
    this.steps = 0;
    this.elapsed = null; // seconds since the run started, as the server reported
    this.preview = null; // {filename, subfolder, type}
    this.running = false;
    this.stopped = false; // the run ended without the node's output (error or cancel)
    this.ranks = null; // AdaLoRA: {slot: mean rank per layer} of the finished run
  }

  /** A run of this node started: forget the previous one. */
  start() {
    this.reset();
    this.running = true;
  }

  /** One `blora.train.progress` message: {step, steps, loss, elapsed, preview?}. */
  update({ step, steps, loss, elapsed, preview, losses, seeds }) {
    const last = this.points.at(-1);
    if (last && step <= last.step) this.reset(); // a new run whose start we did not see
    this.running = true;
    this.points.push({ step, loss });
    if (Array.isArray(losses)) losses.forEach((v, k) => (this.seedLosses[k] ??= []).push(v));
    if (Array.isArray(seeds)) this.seeds = seeds;
    this.steps = steps ?? this.steps;
    this.elapsed = elapsed ?? this.elapsed;
    if (preview) this.preview = preview;
  }

  /** The prompt failed or was cancelled while this chart was live: keep the points, drop the ETA. */
  stop() {
    if (!this.running) return;
    this.running = false;
    this.stopped = true;
  }

  /** The finished run from the node's UI output (`loss`: one float per step; `ranks`: AdaLoRA's final mean rank
   *  per block); keeps the live timing if any. */
  finish(losses, elapsed, seedLosses = null, seeds = null, ranks = null) {
    this.ranks = ranks && typeof ranks === "object" ? ranks : null;
    const sameRun = this.points.length === losses.length;
    this.points = losses.map((loss, i) => ({ step: i + 1, loss }));
    this.seedLosses = Array.isArray(seedLosses) ? seedLosses.map((a) => a.map(Number)) : [];
    this.seeds = Array.isArray(seeds) ? seeds : [];
    this.steps = losses.length;
    if (Number.isFinite(elapsed)) this.elapsed = elapsed;
    else if (!sameRun) this.elapsed = null;
    this.running = false;
    this.stopped = false;
  }

  get smoothed() {
    return smooth(this.points.map((p) => p.loss));
  }

  get lastStep() {
    return this.points.at(-1)?.step ?? 0;
  }

  /** Steps per second so far, or null before the server reported any time. */
  get rate() {
    return this.elapsed > 0 ? this.lastStep / this.elapsed : null;
  }

  /** Seconds left at the current rate, or null. */
  get eta() {
    const rate = this.rate;
    return rate ? Math.max(0, this.steps - this.lastStep) / rate : null;
  }

  /** The one text line under the chart. */
  summary() {
    if (!this.points.length) return this.running ? "starting…" : "loss chart: runs when the node runs";
    const last = this.points.at(-1).loss;
    const ema = this.smoothed.at(-1);
    const parts = [`step ${this.lastStep}/${this.steps}`];
    if (this.rate) parts.push(`${this.rate.toFixed(2)} it/s`);
    if (this.running) parts.push(`ETA ${formatDuration(this.eta)}`);
    else if (this.stopped) parts.push("stopped");
    else if (this.elapsed) parts.push(`took ${formatDuration(this.elapsed)}`);
    parts.push(`loss ${fmt(last)}`, `ema ${fmt(ema)}`);
    if (this.ranks) {
      parts.push("rank " + Object.entries(this.ranks).map(([slot, r]) => `${slot} ${Number(r).toFixed(1)}`).join(" "));
    }
    return parts.join(" · ");
  }
}

function fmt(v) {
  return Number.isFinite(v) ? v.toPrecision(3) : String(v);
}

const PAD = { left: 44, right: 8, top: 8, bottom: 16 };

/** Draw `chart` on `canvas`, sized to the canvas's CSS box at the device pixel ratio. */
export function drawLossChart(canvas, chart) {
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width < 20 || height < 20) return;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#16181c";
  ctx.fillRect(0, 0, width, height);
  ctx.font = "10px sans-serif";
  const perSeed = chart.seedLosses.length > 1;
  const values = perSeed ? chart.seedLosses.flat() : chart.points.map((p) => p.loss);
  const finite = values.filter(Number.isFinite);
  if (!finite.length) {
    ctx.fillStyle = COLORS.dim;
    ctx.textAlign = "center";
    ctx.fillText(chart.running ? "waiting for the first step…" : "no run yet", width / 2, height / 2);
    return;
  }
  const box = { x: PAD.left, y: PAD.top, w: width - PAD.left - PAD.right, h: height - PAD.top - PAD.bottom };
  const scale = scales(chart, finite, box);
  drawGrid(ctx, box, scale, chart);
  if (perSeed) {
    const items = chart.seedLosses.map((losses, k) => {
      const color = SEED_COLORS[k % SEED_COLORS.length];
      drawLine(ctx, scale, losses.map((_, i) => i + 1), smooth(losses), color, 2);
      return [`seed ${chart.seeds[k] ?? k}`, color];
    });
    drawLegend(ctx, box, items);
    return;
  }
  const steps = chart.points.map((p) => p.step);
  drawLine(ctx, scale, steps, chart.points.map((p) => p.loss), COLORS.raw, 1);
  drawLine(ctx, scale, steps, chart.smoothed, COLORS.smooth, 2);
  drawLegend(ctx, box);
}

/** One EMA curve per seed (seeds > 1). */
const SEED_COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292"];

function scales(chart, finite, box) {
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (hi - lo < 1e-12) {
    const pad = Math.abs(hi) * 0.1 || 0.5;
    lo -= pad;
    hi += pad;
  }
  const xMax = Math.max(chart.steps, chart.lastStep, 1);
  return {
    lo,
    hi,
    xMax,
    x: (step) => box.x + (step / xMax) * box.w,
    y: (loss) => box.y + (1 - (loss - lo) / (hi - lo)) * box.h,
  };
}

function drawGrid(ctx, box, scale, chart) {
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.dim;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 3; i++) {
    const v = scale.lo + ((scale.hi - scale.lo) * i) / 3;
    const y = Math.round(scale.y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(box.x, y);
    ctx.lineTo(box.x + box.w, y);
    ctx.stroke();
    ctx.fillText(v.toPrecision(3), box.x - 4, y);
  }
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText("0", box.x, box.y + box.h + 3);
  ctx.textAlign = "right";
  ctx.fillText(`${scale.xMax} steps`, box.x + box.w, box.y + box.h + 3);
}

function drawLine(ctx, scale, steps, values, color, lineWidth) {
  ctx.strokeStyle = color;
  ctx.lineWidth = lineWidth;
  ctx.lineJoin = "round";
  ctx.beginPath();
  let pen = false;
  values.forEach((v, i) => {
    if (!Number.isFinite(v)) {
      pen = false;
      return;
    }
    const [x, y] = [scale.x(steps[i]), scale.y(v)];
    if (pen) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
    pen = true;
  });
  ctx.stroke();
  if (values.length === 1 && Number.isFinite(values[0])) {
    ctx.fillStyle = color;
    ctx.fillRect(scale.x(steps[0]) - 1.5, scale.y(values[0]) - 1.5, 3, 3);
  }
}

function drawLegend(ctx, box, items = [["loss", COLORS.raw], [`ema ${EMA_WEIGHT}`, COLORS.smooth]]) {
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let x = box.x + box.w - 60 * items.length;
  for (const [label, color] of items) {
    ctx.fillStyle = color;
    ctx.fillRect(x, box.y + 4, 12, 3);
    ctx.fillStyle = COLORS.text;
    ctx.fillText(label, x + 16, box.y + 6);
    x += 60;
  }
}
