// Charts: time series with uPlot (vendored, global `uPlot`), credible intervals as hand-made SVG.

import { h, s } from "./lib.js";

export const PALETTE = [
  "#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2",
  "#dc2626", "#ca8a04", "#db2777", "#4b5563", "#65a30d",
];

export function colours(models) {
  const out = {};
  [...models].sort().forEach((m, i) => { out[m] = PALETTE[i % PALETTE.length]; });
  return out;
}

function alpha(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${a})`;
}

const charts = new Set();
// Redraw at the new width when the window is resized.
window.addEventListener("resize", () => {
  for (const chart of charts) {
    if (!chart.root.isConnected) { charts.delete(chart); continue; }
    chart.setSize({ width: chart.root.parentElement.clientWidth, height: chart.height });
  }
});

// series: [{label, values, colour}]; xs: epoch seconds. Options: format (y values), bars, stacked
// (values are stacked on top of each other, shown as they are).
export function timeChart(el, xs, series, { format = String, bars = false, stacked = false, integer = false, height = 200 } = {}) {
  if (typeof uPlot === "undefined") {
    el.append(h("p", { class: "muted" }, "(charts unavailable)"));
    return null;
  }
  let data = series.map((x) => x.values);
  if (stacked) {
    const sums = xs.map(() => 0);
    data = series.map((x) => x.values.map((v, i) => (v === null || v === undefined ? null : (sums[i] += v))));
  }
  const opts = {
    width: Math.max(280, el.clientWidth),
    height,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
    scales: {
      // bars are centred on their bucket's start: half a bucket more on each side keeps them whole
      x: { time: true, range: bars && xs.length ? (u, min, max) => [min - half(xs), max + half(xs)] : undefined },
      y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.08 : 1] },
    },
    cursor: { drag: { x: false, y: false } },
    legend: { live: true },
    series: [
      { value: (u, v) => (v === null ? "–" : new Date(v * 1e3).toISOString().replace("T", " ").slice(0, 16) + " UTC") },
      ...series.map((x, i) => ({
        label: x.label,
        stroke: x.colour,
        width: bars ? 1 : 2,
        fill: bars || stacked ? alpha(x.colour, stacked ? 0.45 : 0.6) : undefined,
        paths: bars ? uPlot.paths.bars({ size: [0.7, 40] }) : undefined,
        points: { show: !bars && xs.length <= 48 },
        spanGaps: false,
        value: (u, v, si, idx) => {
          const raw = series[i].values[idx];
          return raw === null || raw === undefined ? "–" : format(raw);
        },
      })),
    ],
    bands: stacked ? series.slice(1).map((_, i) => ({ series: [i + 2, i + 1] })) : undefined,
    axes: [
      { stroke: "#475569", grid: { stroke: "#e2e8f0" } },
      { stroke: "#475569", grid: { stroke: "#e2e8f0" }, size: 64, values: (u, ticks) => ticks.map(format),
        incrs: integer ? [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6] : undefined },
    ],
  };
  const chart = new uPlot(opts, [xs, ...data], el);
  charts.add(chart);
  return chart;
}

function half(xs) {
  return xs.length > 1 ? (xs[1] - xs[0]) / 2 : 1800;
}

// A forest plot: per row a label, its 95% credible interval and its mean on a 0..1 axis.
export function forest(rows, { width = 720, rowHeight = 30 } = {}) {
  const left = 170, right = 150, top = 26;
  const plot = width - left - right;
  const height = top + rows.length * rowHeight + 8;
  const x = (v) => left + Math.max(0, Math.min(1, v)) * plot;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "forest", role: "img",
    "aria-label": "posterior mean quality with 95% credible intervals" });
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(
      s("line", { x1: x(t), x2: x(t), y1: top - 6, y2: height - 4, class: "grid" }),
      s("text", { x: x(t), y: 14, "text-anchor": "middle", class: "tick" }, t.toFixed(2)),
    );
  }
  rows.forEach((r, i) => {
    const y = top + i * rowHeight + rowHeight / 2;
    svg.append(
      s("text", { x: left - 10, y: y + 4, "text-anchor": "end", class: "label" }, r.label),
      s("line", { x1: x(r.low), x2: x(r.high), y1: y, y2: y, class: "ci", stroke: r.colour }),
      s("line", { x1: x(r.low), x2: x(r.low), y1: y - 6, y2: y + 6, class: "ci", stroke: r.colour }),
      s("line", { x1: x(r.high), x2: x(r.high), y1: y - 6, y2: y + 6, class: "ci", stroke: r.colour }),
      s("circle", { cx: x(r.mean), cy: y, r: 5, fill: r.colour, class: "mean" }),
      s("text", { x: width - right + 10, y: y + 4, class: "value" },
        `${r.mean.toFixed(3)} [${r.low.toFixed(2)}, ${r.high.toFixed(2)}]`),
    );
  });
  return svg;
}

// A small interval for a table cell: the 0..1 track, the interval, the mean, and a sample if given.
export function interval(p, colour = "#2563eb", sample = null) {
  const w = 120, hgt = 16, x = (v) => 2 + Math.max(0, Math.min(1, v)) * (w - 4);
  const svg = s("svg", { viewBox: `0 0 ${w} ${hgt}`, width: w, height: hgt, class: "interval", role: "img",
    "aria-label": `mean ${p.mean.toFixed(3)}, 95% interval ${p.low.toFixed(3)} to ${p.high.toFixed(3)}` },
  s("line", { x1: 2, x2: w - 2, y1: hgt / 2, y2: hgt / 2, class: "track" }),
  s("line", { x1: x(p.low), x2: x(p.high), y1: hgt / 2, y2: hgt / 2, class: "ci", stroke: colour }),
  s("circle", { cx: x(p.mean), cy: hgt / 2, r: 3.5, fill: colour }));
  if (sample !== null && sample !== undefined) {
    svg.append(s("line", { x1: x(sample), x2: x(sample), y1: 2, y2: hgt - 2, class: "sample" }));
  }
  return svg;
}
