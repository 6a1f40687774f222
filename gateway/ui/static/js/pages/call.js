// One call: its messages and response, the decision (candidates, propensity), stage timings,
// attempts, cost, ratings, the DPO pairs it is in, and a form that rates it through POST /feedback.

import { api, badge, errorBox, fmt, h, mount, panel, table } from "../lib.js";

function facts(c) {
  const rows = [
    ["request id", c.id],
    ["time", `${fmt.time(c.created_at)} UTC`],
    ["kind", c.kind + (c.duel_of ? ` of ${c.duel_of}` : "")],
    ["key", fmt.text(c.caller)],
    ["requested model", c.requested_model],
    ["model", fmt.text(c.model)],
    ["upstream model", fmt.text(c.upstream_model)],
    ["layer", fmt.text(c.layer)],
    ["strategy", fmt.text(c.strategy)],
    ["policy", fmt.text(c.policy)],
    ["rule", fmt.text(c.decision.rule)],
    ["propensity", fmt.score(c.propensity)],
    ["exploration pick", c.decision.explored ? "yes" : "no"],
    ["stream", c.stream ? "yes" : "no"],
    ["HTTP status", String(c.http_status)],
    ["tokens", `${fmt.int(c.prompt_tokens)} in, ${fmt.int(c.completion_tokens)} out${c.decision.usage_estimated ? " (estimated)" : ""}`],
    ["cost", fmt.usd(c.cost_usd)],
    ["score", c.score === null ? "not rated" : `${fmt.score(c.score)} (${c.score_source})`],
    ["trace id", fmt.text(c.trace_id)],
  ];
  return h("dl", { class: "facts", id: "call-facts" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { fact: k } }, v)]));
}

function messages(list) {
  return h("div", { class: "messages", id: "call-messages" }, list.map((m) => {
    const content = typeof m.content === "string" ? m.content
      : Array.isArray(m.content) ? m.content.map((p) => (p && p.type === "text" ? p.text : `[${p && p.type}]`)).join("\n")
        : JSON.stringify(m.content ?? m.tool_calls ?? null, null, 1);
    return h("div", { class: `message ${m.role}` }, h("div", { class: "role" }, m.role), h("pre", {}, content));
  }));
}

function timings(c) {
  const stages = Object.entries(c.decision.timings_ms || {}).map(([k, v]) => [k.replace(/_ms$/, ""), v]);
  stages.push(["gateway overhead", c.overhead_ms], ["upstream", c.upstream_ms]);
  if (c.ttft_ms !== null) stages.push(["time to first token", c.ttft_ms]);
  const known = stages.filter(([, v]) => v !== null && v !== undefined);
  const max = Math.max(1e-9, ...known.map(([, v]) => v));
  return h("div", { class: "timings", id: "call-timings" }, known.map(([k, v]) => h("div", { class: "timing" },
    h("span", { class: "name" }, k),
    h("span", { class: "bar" }, h("span", { class: "fill", dataset: { w: String(Math.max(0.5, (100 * v) / max)) } })),
    h("span", { class: "num" }, fmt.ms(v)))));
}

function rateForm(c, reload, said, whose) {
  const out = h("p", { id: "rate-result", role: "status" }, said || "");
  const value = h("output", { id: "rate-value" }, Number(c.score ?? 0.5).toFixed(2));
  return h("form", { id: "rate-form", class: "rate",
    onsubmit: async (e) => {
      e.preventDefault();
      const f = e.target.elements;
      const body = { request_id: c.id, score: Number(f.score.value) };
      if (f.feedback_text.value.trim()) body.feedback_text = f.feedback_text.value.trim();
      out.textContent = "Sending…";
      try {
        const r = await api(`/feedback${whose}`, { method: "POST", body });
        await reload(`Rated ${fmt.score(body.score)}${r.applied ? "" : " (kept; a human's score stands)"}; ${r.pairs} DPO pair(s) made or updated.`);
      } catch (err) {
        out.replaceChildren(errorBox(err));
      }
    } },
  h("label", { for: "rate-score" }, "Score (0 = useless, 1 = perfect) "),
  h("input", { id: "rate-score", name: "score", type: "range", min: 0, max: 1, step: 0.05, value: c.score ?? 0.5,
    oninput: (e) => { value.textContent = Number(e.target.value).toFixed(2); } }),
  value,
  h("textarea", { id: "rate-text", name: "feedback_text", rows: 2, placeholder: "What was right or wrong (optional)" }),
  h("button", { type: "submit", id: "rate-button" }, c.score === null ? "Rate this call" : "Rate again"),
  out);
}

export default async function call({ view, arg, params, current }) {
  // A call id is unique within its tenant: the key (caller) says whose call this is.
  const whose = params.has("caller") ? `?caller=${encodeURIComponent(params.get("caller"))}` : "";
  const load = async (said) => {
    const c = await api(`/ui/api/calls/${encodeURIComponent(arg)}${whose}`);
    if (!current()) return;
    const propensities = c.decision.propensities || {}; // every eligible arm's (older records: per candidate)
    const candidates = (c.decision.candidates || []).map((x, i) => h("tr", { class: i === 0 ? "chosen" : "" },
      h("td", {}, x.model), h("td", {}, i === 0 ? "picked" : "", x.model === c.model && i > 0 ? "answered (a fallback)" : ""),
      h("td", { class: "num" }, fmt.score(x.score)), h("td", { class: "num" }, fmt.score(x.quality_sample)),
      h("td", { class: "num" }, fmt.score(x.quality_mean)), h("td", { class: "num" }, fmt.score(x.speed)),
      h("td", { class: "num" }, fmt.score(x.cost)), h("td", { class: "num" }, fmt.score(x.bonus)),
      h("td", { class: "num" }, fmt.score(x.evidence)), h("td", { class: "num" }, fmt.score(propensities[x.model] ?? x.propensity))));
    const attempts = (c.attempts || []).map((a, i) => h("tr", {}, h("td", {}, String(i + 1)), h("td", {}, a.model),
      h("td", {}, badge(a.outcome === "ok" ? "ok" : "error"), ` ${a.outcome}`), h("td", { class: "num" }, fmt.ms(a.ms ?? null)),
      h("td", {}, a.status ? String(a.status) : "–"), h("td", {}, fmt.text(a.error))));
    const feedback = (c.feedback || []).map((f) => h("tr", {}, h("td", {}, fmt.time(f.created_at)),
      h("td", { class: "num" }, fmt.score(f.score)), h("td", {}, f.source), h("td", {}, fmt.text(f.feedback_text))));
    const pairs = c.pairs.map((p) => {
      const other = p.role === "chosen" ? [p.rejected_id, p.rejected_model, p.rejected_score] : [p.chosen_id, p.chosen_model, p.chosen_score];
      return h("tr", {}, h("td", {}, p.role), h("td", {}, h("a", { href: `#/call/${encodeURIComponent(other[0])}${whose}` }, other[0])),
        h("td", {}, other[1]), h("td", { class: "num" }, fmt.score(other[2])), h("td", { class: "num" }, fmt.score(p.margin)),
        h("td", { class: "num" }, fmt.score(p.similarity)), h("td", {}, fmt.time(p.updated_at)));
    });
    mount(view,
      h("p", {}, h("a", { href: "#/calls" }, "← Calls")),
      h("h1", {}, "Call ", h("code", { id: "call-id" }, c.id), " ", badge(c.status)),
      c.error ? h("div", { class: "error-box", id: "call-error" }, c.error) : null,
      h("div", { class: "grid2" },
        panel("Facts", facts(c)),
        panel("Rate it", rateForm(c, load, said, whose), h("h3", {}, "Ratings"),
          feedback.length ? table(["time", "#score", "source", "text"], feedback, { id: "feedback-table" })
            : h("p", { class: "muted", id: "feedback-none" }, "Not rated yet."))),
      panel("Messages", messages(c.messages)),
      panel("Response", h("pre", { class: "response", id: "call-response" }, c.response ?? "(no response)")),
      panel("Decision: candidates, best score first (propensity: the chance the policy picks it)",
        candidates.length ? table(["model", "", "#score", "#sampled quality", "#mean quality", "#speed", "#cost", "#bonus", "#evidence", "#propensity"],
          candidates, { id: "candidates-table" }) : h("p", { class: "muted" }, "No draw (an explicit model, or a rule)."),
        c.decision.fallbacks && c.decision.fallbacks.length ? h("p", {}, `Fallbacks: ${c.decision.fallbacks.join(", ")}`) : null),
      h("div", { class: "grid2" },
        panel("Stage timings", timings(c)),
        panel("Upstream attempts", attempts.length ? table(["", "model", "outcome", "#time", "HTTP", "error"], attempts, { id: "attempts-table" })
          : h("p", { class: "muted" }, "None."))),
      panel("DPO pairs it is in", pairs.length
        ? table(["this call is", "other call", "other model", "#other score", "#margin", "#similarity", "updated"], pairs, { id: "pairs-table" })
        : h("p", { class: "muted", id: "pairs-none" }, "None yet.")),
    );
    for (const fill of view.querySelectorAll(".timing .fill")) fill.style.width = `${fill.dataset.w}%`;
  };
  try {
    await load();
  } catch (err) {
    if (current()) view.replaceChildren(h("p", {}, h("a", { href: "#/calls" }, "← Calls")), errorBox(err));
  }
}
