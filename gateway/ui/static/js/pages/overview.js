// Overview: requests, errors, cost and mean feedback score over time, traffic share per model,
// latency and the gateway's overhead; optionally one key's calls only.

import { api, fmt, h, kpi, mount, panel, query, table } from "../lib.js";
import { colours, timeChart } from "../charts.js";

export default async function overview({ view, params, range, current }) {
  const caller = params.get("caller") || "";
  const data = await api(`/ui/api/overview${query({ range, caller, bucket: params.get("bucket") })}`);
  if (!current()) return;
  const t = data.totals;
  const keyForm = h(
    "form",
    { class: "toolbar", id: "overview-filter",
      onsubmit: (e) => {
        e.preventDefault();
        const key = e.target.elements.caller.value.trim();
        location.hash = `#/overview${query({ caller: key })}`;
      } },
    h("label", {}, "Key ", h("input", { name: "caller", id: "overview-caller", value: caller, placeholder: "all keys (or key_…)", size: 22 })),
    h("button", { type: "submit" }, "Show"),
    h("span", { class: "muted" }, `${fmt.time(data.since)} → ${fmt.time(data.until)} UTC, by ${data.bucket}`),
  );
  const kpis = h(
    "div",
    { class: "kpis" },
    kpi("requests", "Requests", t.requests, fmt.int(t.requests)),
    kpi("errors", "Errors", t.errors, fmt.int(t.errors), t.error_rate === null ? null : `${fmt.pct(t.error_rate)} of requests`),
    kpi("cost", "Cost", t.cost_usd, fmt.usd(t.cost_usd), t.side_cost_usd ? `+ ${fmt.usd(t.side_cost_usd)} duels and judge` : null),
    kpi("mean-score", "Mean feedback score", t.mean_score, fmt.score(t.mean_score), `${fmt.int(t.rated)} rated calls`),
    kpi("latency-p50", "Latency p50", t.latency_p50_ms, fmt.ms(t.latency_p50_ms), "gateway + upstream"),
    kpi("latency-p99", "Latency p99", t.latency_p99_ms, fmt.ms(t.latency_p99_ms), `over ${fmt.int(t.answered)} answered calls`),
    kpi("overhead-p50", "Gateway overhead p50", t.overhead_p50_ms, fmt.ms(t.overhead_p50_ms), "routing included, upstream not"),
    kpi("overhead-p99", "Gateway overhead p99", t.overhead_p99_ms, fmt.ms(t.overhead_p99_ms), `over ${fmt.int(t.answered)} answered calls`),
  );
  const traffic = h("div", { class: "chart", id: "chart-traffic" });
  const cost = h("div", { class: "chart", id: "chart-cost" });
  const score = h("div", { class: "chart", id: "chart-score" });
  const share = h("div", { class: "chart", id: "chart-share" });
  const models = data.models.map((m) => m.model);
  const colour = colours(models);
  const modelRows = data.models.map((m) =>
    h("tr", {}, h("td", {}, h("span", { class: "swatch", dataset: { colour: colour[m.model] } }), m.model),
      h("td", { class: "num" }, fmt.int(m.requests)), h("td", { class: "num" }, fmt.pct(m.share)),
      h("td", {}, h("a", { href: `#/calls${query({ model: m.model })}` }, "calls →"))));
  mount(view,
    h("h1", {}, caller ? `Overview for ${caller}` : "Overview"),
    keyForm,
    kpis,
    h("div", { class: "grid2" },
      panel("Requests and errors", traffic),
      panel("Cost (USD)", cost),
      panel("Mean feedback score", score),
      panel("Traffic share per model", share)),
    panel("Models", data.models.length
      ? table(["model", "#requests", "#share", ""], modelRows, { id: "models-table" })
      : h("p", { class: "muted" }, "No calls in this range.")),
  );
  for (const sw of view.querySelectorAll(".swatch")) sw.style.background = sw.dataset.colour;
  const xs = data.buckets.map((b) => Date.parse(b.t) / 1000);
  const bars = xs.length <= 60;
  timeChart(traffic, xs, [
    { label: "requests", values: data.buckets.map((b) => b.requests), colour: "#2563eb" },
    { label: "errors", values: data.buckets.map((b) => b.errors), colour: "#dc2626" },
  ], { format: fmt.int, bars, integer: true });
  const spent = [{ label: "calls", values: data.buckets.map((b) => b.cost_usd), colour: "#16a34a" }];
  if (data.buckets.some((b) => b.side_cost_usd)) {
    spent.push({ label: "duels and judge", values: data.buckets.map((b) => b.side_cost_usd), colour: "#9333ea" });
  }
  timeChart(cost, xs, spent, { format: fmt.usd, stacked: true });
  timeChart(score, xs, [
    { label: "mean score", values: data.buckets.map((b) => b.mean_score), colour: "#ea580c" },
  ], { format: (v) => v.toFixed(2) });
  timeChart(share, xs, models.map((m) => ({
    label: m,
    values: data.buckets.map((b) => (b.requests ? (b.models[m] || 0) / b.requests : null)),
    colour: colour[m],
  })), { format: fmt.pct, stacked: true });
}
