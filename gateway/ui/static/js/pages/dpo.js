// DPO: pairs made over time, and a download of the export (GET /v1/dpo/pairs, every page of it).

import { api, fmt, h, kpi, mount, panel, query, select } from "../lib.js";
import { timeChart } from "../charts.js";

async function download(form, status) {
  const f = form.elements;
  const params = { format: f["dpo-format"].value, kind: f["dpo-kind"].value, min_margin: f["dpo-margin"].value, limit: 10000 };
  const parts = [];
  let lines = 0;
  let cursor = "";
  status.textContent = "Fetching…";
  delete status.dataset.lines;
  for (;;) {
    const resp = await api(`/v1/dpo/pairs${query({ ...params, cursor })}`, { raw: true });
    const text = await resp.text();
    parts.push(text);
    lines += text.split("\n").filter((l) => l).length;
    cursor = resp.headers.get("x-next-cursor") || "";
    if (!cursor) break;
  }
  const blob = new Blob(parts, { type: "application/x-ndjson" });
  const url = URL.createObjectURL(blob);
  const name = params.format || (params.kind === "routes" ? "labels" : "trl");
  const a = h("a", { href: url, download: `dpo-${params.kind}-${name}.jsonl` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  status.textContent = `Downloaded ${fmt.int(lines)} lines.`;
  status.dataset.lines = String(lines);
}

export default async function dpo({ view, range, current }) {
  const data = await api(`/ui/api/dpo${query({ range })}`);
  if (!current()) return;
  const chart = h("div", { class: "chart", id: "chart-pairs" });
  const status = h("p", { id: "dpo-status", role: "status" });
  const form = h("form", { id: "dpo-form", class: "toolbar",
    onsubmit: async (e) => {
      e.preventDefault();
      try { await download(e.target, status); } catch (err) { status.textContent = err.message; }
    } },
  h("label", {}, "Kind ", select("dpo-kind", [["responses", "response pairs"], ["routes", "routing labels"]], "responses")),
  h("label", {}, "Format ", select("dpo-format", [["", "the kind's own (TRL pairs, routing labels)"], ["jsonl", "flat JSONL"]], "")),
  h("label", {}, "Min margin ", h("input", { id: "dpo-margin", name: "dpo-margin", type: "number", min: 0, max: 1, step: 0.05, value: "0.2" })),
  h("button", { type: "submit", id: "dpo-download" }, "Download the export"));
  mount(view,
    h("h1", {}, "DPO pairs"),
    h("div", { class: "kpis" }, kpi("pairs", `Pairs made, last ${range}`, data.pairs, fmt.int(data.pairs))),
    panel(`Pairs made per ${data.bucket}`, chart),
    panel("Export", h("p", { class: "muted" },
      "TRL's preference format loads with datasets.load_dataset(\"json\", ...) straight into DPOTrainer. ",
      "The same as `llm-router export-dpo`."), form, status),
  );
  const xs = data.buckets.map((b) => Date.parse(b.t) / 1000);
  timeChart(chart, xs, [{ label: "pairs", values: data.buckets.map((b) => b.pairs), colour: "#9333ea" }],
    { format: fmt.int, bars: xs.length <= 60, integer: true });
}
