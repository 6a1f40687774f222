// The router: what it believes about each model (posterior mean quality with its 95% credible
// interval), its traffic, and "why this model" for a prompt typed here (the gateway's own router
// decides; no upstream is called, nothing is recorded).

import { api, errorBox, fmt, h, mount, panel, query, select, table } from "../lib.js";
import { colours, forest, interval } from "../charts.js";

function beliefs(data, colour) {
  const rows = data.arms.map((a) => h("tr", { dataset: { model: a.model } },
    h("td", {}, a.model, a.available ? null : h("span", { class: "badge error", title: a.unavailable_because || "" }, "unavailable")),
    h("td", {}, interval(a.posterior, colour[a.model]), " ", fmt.score(a.posterior.mean),
      h("span", { class: "muted" }, ` [${a.posterior.low.toFixed(2)}, ${a.posterior.high.toFixed(2)}]`)),
    h("td", { class: "num" }, fmt.int(a.rated)),
    h("td", { class: "num" }, fmt.score(a.mean_score)),
    h("td", { class: "num" }, fmt.usd(a.cost_per_call_usd)),
    h("td", { class: "num" }, fmt.ms(a.latency_ms_avg)),
    h("td", { class: "num", dataset: { share: a.share === null ? "" : String(a.share) } }, fmt.pct(a.share)),
    h("td", { class: "num" }, fmt.int(a.routed)),
    h("td", { class: "num" }, fmt.pct(a.exploration_rate))));
  return table(
    ["model", "posterior quality, 95% interval", "#rated calls", "#mean score", "#cost / call", "#latency", "#share of routed", "#routed calls", "#exploration"],
    rows, { id: "arms-table" });
}

function explanation(result, colour) {
  const chosen = result.arms.find((a) => a.chosen);
  const head = h("p", { class: "verdict", id: "why-verdict" },
    "The router picks ", h("strong", { id: "why-model" }, result.model),
    ` (layer ${result.layer}`, result.rule ? `, rule ${result.rule}` : "", `, policy ${result.policy}`,
    result.propensity === null ? "" : `, propensity `,
    result.propensity === null ? "" : h("strong", { id: "why-propensity" }, result.propensity.toFixed(3)),
    result.explored ? ", an exploration pick" : "", ").");
  const rows = result.arms.map((a) => h("tr", { class: a.chosen ? "chosen" : "", dataset: { model: a.model } },
    h("td", {}, a.model),
    h("td", {}, a.posterior ? interval(a.posterior, colour[a.model], a.quality_sample) : "–", " ",
      a.posterior ? `${a.posterior.mean.toFixed(3)} [${a.posterior.low.toFixed(2)}, ${a.posterior.high.toFixed(2)}]` : ""),
    h("td", { class: "num" }, fmt.score(a.quality_sample)),
    h("td", { class: "num" }, fmt.score(a.speed)),
    h("td", { class: "num" }, fmt.score(a.cost)),
    h("td", { class: "num" }, fmt.score(a.bonus)),
    h("td", { class: "num" }, fmt.score(a.score)),
    h("td", { class: "num", dataset: { propensity: a.propensity === undefined ? "" : String(a.propensity) } }, fmt.score(a.propensity))));
  const timings = Object.entries(result.timings_ms).map(([k, v]) => `${k.replace(/_ms$/, "")} ${fmt.ms(v)}`).join(" · ");
  return h("div", { id: "why-result" },
    head,
    chosen && chosen.posterior === undefined ? h("p", { class: "muted" }, "A rule or route pinned the model: no draw was made.") : null,
    table(["model", "quality for this prompt (95%; the tick is this draw)", "#sampled quality", "#speed", "#cost", "#bonus", "#score", "#propensity"],
      rows, { id: "why-table" }),
    h("p", { class: "muted" }, `Score = feedback weight × sampled quality + latency weight × speed + cost weight × cost + bonus. `,
      `Timings: ${timings || "none"}. `, result.embedded ? "The prompt was embedded." : "No embedding was needed.",
      " Each draw is fresh: ask again and a close call may go another way."));
}

export default async function router({ view, meta, range, current }) {
  const data = await api(`/ui/api/router${query({ range })}`);
  if (!current()) return;
  const colour = colours(data.arms.map((a) => a.model));
  const out = h("div", { id: "why-output" });
  const form = h("form", { id: "why-form", class: "why",
    onsubmit: async (e) => {
      e.preventDefault();
      const prompt = e.target.elements.prompt.value;
      const model = e.target.elements["why-model-select"].value;
      out.replaceChildren(h("p", { class: "muted" }, "Deciding…"));
      try {
        const result = await api("/ui/api/explain", { method: "POST", body: { prompt, model } });
        out.replaceChildren(explanation(result, colour));
      } catch (err) {
        out.replaceChildren(errorBox(err));
      }
    } },
  h("label", { for: "why-prompt" }, "A prompt, as a user would send it"),
  h("textarea", { id: "why-prompt", name: "prompt", rows: 3, required: true, placeholder: "Explain the CAP theorem in two sentences." }),
  h("div", { class: "row" },
    h("label", {}, "as model ", select("why-model-select", meta.virtual_models.map((m) => [m, m]), "auto", "model")),
    h("button", { type: "submit", id: "why-go" }, "Why this model?")));
  const k = data.knobs;
  mount(view,
    h("h1", {}, "Router"),
    h("p", { class: "muted" },
      `Policy ${data.policy}. Score = ${k.feedback_weight} × quality + ${k.latency_weight} × speed + ${k.cost_weight} × cost + bonus (up to ${k.exploration_bonus}); `,
      `a uniform pick with probability ${k.exploration_rate}. Traffic over ${range}: ${fmt.int(data.routed)} routed calls.`),
    panel("What the router believes: each model's quality (every rated call, 95% credible interval)",
      forest(data.arms.map((a) => ({ label: a.model, colour: colour[a.model], ...a.posterior }))),
      beliefs(data, colour)),
    panel("Why this model?", form, out),
  );
}
