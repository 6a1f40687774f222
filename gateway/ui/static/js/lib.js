// What every page shares: the admin key (sessionStorage only), the JSON API, a DOM builder that
// never parses text as HTML (prompts and answers are untrusted), and number formats.

const KEY = "llm-router.admin-key";
const RANGE = "llm-router.range";

export const session = {
  key: () => sessionStorage.getItem(KEY),
  setKey: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
  range: () => sessionStorage.getItem(RANGE) || "24h",
  setRange: (range) => sessionStorage.setItem(RANGE, range),
};

export class ApiError extends Error {
  constructor(status, message, error) {
    super(message);
    this.status = status;
    this.error = error || {};
  }
}

// fetch with the admin key; JSON in and out; an OpenAI-shaped error becomes an ApiError.
export async function api(path, { method = "GET", body, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${session.key() || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  if (raw && resp.ok) return resp;
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const error = (data && data.error) || {};
    const err = new ApiError(resp.status, error.message || `HTTP ${resp.status}`, error);
    if (resp.status === 401 || resp.status === 403) {
      document.dispatchEvent(new CustomEvent("auth-failed", { detail: err.message }));
    }
    throw err;
  }
  return data;
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, v);
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// h("a", {href: "#/x", class: "c", dataset: {k: "v"}, onclick: fn}, "text", node, [more])
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (k === "checked" || k === "selected" || k === "disabled") el[k] = Boolean(v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  return append(el, children);
}

const SVG = "http://www.w3.org/2000/svg";

export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  }
  return append(el, children);
}

export function select(id, options, current, label) {
  return h(
    "select",
    { id, name: id, "aria-label": label || id },
    options.map(([value, text]) => h("option", { value, selected: value === current }, text)),
  );
}

// --- formats
const dash = "–";
export const fmt = {
  int: (v) => (v === null || v === undefined ? dash : Number(v).toLocaleString("en-US")),
  usd: (v) => {
    if (v === null || v === undefined) return dash;
    if (v === 0) return "$0";
    const digits = Math.abs(v) >= 1 ? 2 : Math.abs(v) >= 0.01 ? 4 : 6;
    return `$${v.toFixed(digits)}`;
  },
  ms: (v) => {
    if (v === null || v === undefined) return dash;
    if (v < 10) return `${v.toFixed(2)} ms`;
    if (v < 1000) return `${v.toFixed(1)} ms`;
    return `${(v / 1000).toFixed(2)} s`;
  },
  score: (v) => (v === null || v === undefined ? dash : Number(v).toFixed(3)),
  pct: (v) => (v === null || v === undefined ? dash : `${(v * 100).toFixed(1)}%`),
  time: (v) => (v ? new Date(v).toISOString().replace("T", " ").slice(0, 19) : dash),
  text: (v) => (v === null || v === undefined || v === "" ? dash : String(v)),
};

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function kpi(name, label, value, shown, note) {
  return h(
    "div",
    { class: "kpi" },
    h("div", { class: "label" }, label),
    h("div", { class: "value", dataset: { kpi: name, value: value === null || value === undefined ? "" : String(value) } }, shown),
    note ? h("div", { class: "note" }, note) : null,
  );
}

export function panel(title, ...children) {
  return h("section", { class: "panel" }, h("h2", {}, title), ...children);
}

// head: column titles; a title starting with "#" is a number column (right-aligned).
export function table(head, rows, props = {}) {
  return h(
    "table",
    props,
    h("thead", {}, h("tr", {}, head.map((c) => (c.startsWith("#") ? h("th", { class: "num" }, c.slice(1)) : h("th", {}, c))))),
    h("tbody", {}, rows),
  );
}

// Replace what `view` shows (null, false and undefined children are left out).
export function mount(view, ...children) {
  view.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

export function errorBox(err) {
  return h("div", { class: "error-box", role: "alert" }, err && err.message ? err.message : String(err));
}
