// Calls: a searchable, paged list (newest first); filters live in the URL's hash, never the key.

import { api, badge, fmt, h, mount, query, select, table } from "../lib.js";

const FILTERS = ["since", "until", "caller", "model", "layer", "status", "rated", "q", "id"];
const pages = []; // cursors of the pages before this one (for "Newer")

function utcInput(value) {
  return value ? value.replace(/Z$/, "").slice(0, 16) : "";
}

function filterForm(params, meta) {
  const v = (k) => params.get(k) || "";
  const opts = (list) => [["", "any"], ...list.map((x) => [x, x])];
  return h("form", { id: "calls-filter", class: "filters",
    onsubmit: (e) => {
      e.preventDefault();
      const f = e.target.elements;
      const next = {};
      for (const k of FILTERS) {
        let value = f[`f-${k}`].value.trim();
        if ((k === "since" || k === "until") && value) value = `${value}:00Z`;
        next[k] = value;
      }
      pages.length = 0;
      location.hash = `#/calls${query(next)}`;
    } },
  h("label", {}, "From (UTC)", h("input", { type: "datetime-local", id: "f-since", value: utcInput(v("since")) })),
  h("label", {}, "To (UTC)", h("input", { type: "datetime-local", id: "f-until", value: utcInput(v("until")) })),
  h("label", {}, "Key", h("input", { id: "f-caller", value: v("caller"), placeholder: "key_…", size: 16 })),
  h("label", {}, "Model", select("f-model", opts(meta.models), v("model"))),
  h("label", {}, "Layer", select("f-layer", opts(meta.layers), v("layer"))),
  h("label", {}, "Status", select("f-status", opts(meta.statuses), v("status"))),
  h("label", {}, "Rated", select("f-rated", [["", "any"], ["true", "rated"], ["false", "not rated"]], v("rated"))),
  h("label", { class: "wide" }, "Text in the prompt", h("input", { id: "f-q", type: "search", value: v("q"), placeholder: "search…" })),
  h("label", {}, "Request or trace id", h("input", { id: "f-id", value: v("id"), size: 20 })),
  h("div", { class: "buttons" },
    h("button", { type: "submit", id: "calls-apply" }, "Apply"),
    h("button", { type: "button", class: "secondary", onclick: () => { pages.length = 0; location.hash = "#/calls"; } }, "Clear")));
}

export default async function calls({ view, params, meta, range, current }) {
  const filters = {};
  for (const k of FILTERS) if (params.get(k)) filters[k] = params.get(k);
  const cursor = params.get("cursor") || "";
  const explicitTime = filters.since || filters.until;
  const since = explicitTime ? filters.since : new Date(Date.now() - rangeMs(range)).toISOString();
  const data = await api(`/ui/api/calls${query({ ...filters, since, limit: 50, cursor })}`);
  if (!current()) return;
  const rows = data.data.map((c) => h("tr", { dataset: { id: c.id } },
    h("td", { class: "nowrap" }, fmt.time(c.created_at)),
    h("td", {}, h("a", { href: `#/call/${encodeURIComponent(c.id)}?caller=${encodeURIComponent(c.caller ?? "")}`, class: "call-link" }, c.id)),
    h("td", {}, c.caller ? h("a", { href: `#/calls${query({ ...filters, caller: c.caller })}` }, c.caller) : "–"),
    h("td", {}, c.requested_model === c.model ? fmt.text(c.model) : `${c.requested_model} → ${fmt.text(c.model)}`),
    h("td", {}, fmt.text(c.layer)),
    h("td", {}, badge(c.status), c.kind !== "call" ? h("span", { class: "badge kind" }, c.kind) : null),
    h("td", { class: "num" }, fmt.ms(c.overhead_ms !== null && c.upstream_ms !== null ? c.overhead_ms + c.upstream_ms : c.overhead_ms)),
    h("td", { class: "num" }, fmt.usd(c.cost_usd)),
    h("td", { class: "num" }, fmt.score(c.score)),
    h("td", { class: "preview" }, c.preview)));
  const nav = h("div", { class: "pager" },
    h("button", { type: "button", class: "secondary", id: "calls-newer", disabled: !cursor,
      onclick: () => { const prev = pages.pop() || ""; location.hash = `#/calls${query({ ...filters, cursor: prev })}`; } }, "← Newer"),
    h("span", { class: "muted", id: "calls-page" }, `page ${pages.length + 1} · ${data.data.length} calls`),
    h("button", { type: "button", class: "secondary", id: "calls-older", disabled: !data.next_cursor,
      onclick: () => { pages.push(cursor); location.hash = `#/calls${query({ ...filters, cursor: data.next_cursor })}`; } }, "Older →"));
  mount(view,
    h("h1", {}, "Calls"),
    h("p", { class: "muted" }, explicitTime ? "In the chosen time range." : `The last ${range}; pick a range with From and To.`),
    filterForm(params, meta),
    data.data.length
      ? table(["time (UTC)", "request id", "key", "model", "layer", "status", "#latency", "#cost", "#score", "prompt"], rows, { id: "calls-table" })
      : h("p", { class: "muted", id: "calls-empty" }, "No calls match."),
    nav,
  );
}

function rangeMs(range) {
  const n = parseInt(range, 10);
  return range.endsWith("d") ? n * 86400e3 : n * 3600e3;
}
