// Live metric curves: one small uPlot chart per group of metrics, fed point by point from the
// metrics stream and redrawn at most once per animation frame.
//
// Groups: every "*loss" metric shares the loss chart (train and validation together), and
// every other metric the method logs (learning rate, reward, accuracies, margins, KL, ...)
// gets one each, with its validation twin, in the order they first appear.

import uPlot from "./vendor/uplot/uPlot.esm.js";
import { h } from "./dom.js";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
// Bookkeeping values that are not curves worth a chart.
const SKIP = new Set(["object", "step", "created_at", "epoch", "num_tokens"]);

// A validation metric shares its training twin's chart: valid_loss with train_loss, ...
function groupOf(key) {
  if (key.endsWith("loss")) return "loss";
  return key.replace(/^(train|valid)_/, "");
}

export class MetricCharts {
  constructor(container) {
    this.container = container;
    this.byStep = new Map(); // step -> {metric: value}
    this.groups = new Map(); // group -> {keys: [...], plot, el}
    this.pending = false;
  }

  add(point) {
    const values = this.byStep.get(point.step) ?? {};
    for (const [key, value] of Object.entries(point)) {
      if (SKIP.has(key) || (typeof value !== "number" && value !== null)) continue;
      values[key] = value; // a re-logged step (after a resume) keeps its latest value
      const group = groupOf(key);
      if (!this.groups.has(group)) this.groups.set(group, { keys: [], plot: null, el: null });
      const keys = this.groups.get(group).keys;
      if (!keys.includes(key)) keys.push(key);
    }
    this.byStep.set(point.step, values);
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.draw());
    }
  }

  draw() {
    this.pending = false;
    const steps = [...this.byStep.keys()].sort((a, b) => a - b);
    for (const [name, group] of this.groups) {
      // Only the steps that have one of the group's metrics: validation loss is sparse.
      const rows = steps.filter((s) => group.keys.some((k) => this.byStep.get(s)[k] != null));
      const data = [rows, ...group.keys.map((k) => rows.map((s) => this.byStep.get(s)[k] ?? null))];
      if (group.plot && group.plot.series.length !== group.keys.length + 1) {
        group.plot.destroy(); // a new metric joined the group: rebuild with its series
        group.plot = null;
      }
      if (!group.el) {
        group.el = h("figure", { class: "chart", dataset: { metric: name, points: "0" } }, h("figcaption", {}, name));
        this.container.append(group.el);
      }
      if (!group.plot) group.plot = this.plot(group, data);
      else group.plot.setData(data);
      group.el.dataset.points = String(rows.length);
    }
  }

  plot(group, data) {
    const width = Math.max(260, Math.min(460, this.container.clientWidth / 2 - 24));
    const series = group.keys.map((key, i) => ({
      label: key,
      stroke: COLORS[i % COLORS.length],
      width: 1.5,
      spanGaps: true,
      points: { show: data[0].length < 2 || key.startsWith("valid") },
    }));
    return new uPlot(
      {
        width,
        height: 180,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { size: 60 }],
        series: [{ label: "step" }, ...series],
        legend: { live: true },
      },
      data,
      group.el,
    );
  }

  destroy() {
    for (const group of this.groups.values()) group.plot?.destroy();
  }
}
