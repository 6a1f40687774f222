// The dashboard's shell: login (the admin key lives in sessionStorage, never in a URL), the
// navigation, the range, and the pages by hash route (#/overview, #/router, #/calls, #/call/<id>, #/dpo).

import { api, errorBox, h, session } from "./lib.js";
import overview from "./pages/overview.js";
import router from "./pages/router.js";
import calls from "./pages/calls.js";
import call from "./pages/call.js";
import dpo from "./pages/dpo.js";

const PAGES = { overview, router, calls, call, dpo };
const $ = (id) => document.getElementById(id);
let meta = null;
let token = 0;

function route() {
  const [path, search = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [page, ...rest] = path.split("/");
  return {
    page: PAGES[page] ? page : "overview",
    arg: rest.length ? decodeURIComponent(rest.join("/")) : "",
    params: new URLSearchParams(search),
  };
}

function showLogin(message) {
  $("nav").hidden = true;
  $("tools").hidden = true;
  $("view").replaceChildren();
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("admin-key").focus();
}

async function render() {
  if (!session.key()) { showLogin(); return; }
  if (!meta) {
    try {
      meta = await api("/ui/api/meta");
    } catch (err) {
      session.clear();
      showLogin(err.message);
      return;
    }
  }
  $("login").hidden = true;
  $("nav").hidden = false;
  $("tools").hidden = false;
  $("range").value = session.range();
  const { page, arg, params } = route();
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.page === (page === "call" ? "calls" : page));
  }
  const mine = ++token;
  const view = $("view");
  view.replaceChildren(h("p", { class: "muted loading" }, "Loading…"));
  document.body.dataset.page = page;
  document.body.dataset.ready = "false";
  try {
    await PAGES[page]({ view, arg, params, meta, range: session.range(), current: () => mine === token });
  } catch (err) {
    if (mine === token) view.replaceChildren(errorBox(err));
  }
  if (mine === token) document.body.dataset.ready = "true";
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("admin-key").value.trim();
  if (!key) return;
  session.setKey(key);
  meta = null;
  $("login-error").textContent = "";
  $("login-button").disabled = true;
  try {
    meta = await api("/ui/api/meta");
    $("admin-key").value = "";
    if (!location.hash) location.hash = "#/overview";
    await render();
  } catch (err) {
    session.clear();
    showLogin(err.status === 401 || err.status === 403 ? `Not accepted: ${err.message}` : err.message);
  } finally {
    $("login-button").disabled = false;
  }
});

$("logout").addEventListener("click", () => {
  session.clear();
  meta = null;
  showLogin("Logged out.");
});

$("range").addEventListener("change", () => {
  session.setRange($("range").value);
  render();
});

document.addEventListener("auth-failed", (event) => {
  session.clear();
  meta = null;
  showLogin(`The gateway refused the key: ${event.detail}`);
});

window.addEventListener("hashchange", render);
render();
