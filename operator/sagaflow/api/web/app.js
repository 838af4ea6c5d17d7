// The web view's shared code and its list page.
//
// The pages hold no data: everything shown is read from the API's JSON routes, with
// the bearer token the user gave (sessionStorage, this tab only), so the view sees
// exactly what the API lets its caller see. A 401 brings up the token form.
"use strict";

(function () {
  const API = "/v1/namespaces/";
  const TOKEN_KEY = "sagaflow.token";
  const REF_KEY = "$sagaflowRef";
  const EXECUTION_PHASES = [
    "Pending", "Running", "Suspended", "Compensating", "Completed", "Failed",
    "Compensated", "CompensationFailed", "Cancelled",
  ];
  const END_PHASES = new Set(["Completed", "Failed", "Compensated", "CompensationFailed", "Cancelled"]);

  class AuthNeeded extends Error {}
  class ApiFailure extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
    }
  }

  function byId(id) {
    return document.getElementById(id);
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    const held = token();
    if (held) headers.Authorization = "Bearer " + held;
    const response = await fetch(API + path, { headers, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    const message = body && body.error ? body.error.message : response.statusText;
    if (response.status === 401) throw new AuthNeeded(message);
    if (!response.ok) throw new ApiFailure(response.status, message);
    return body;
  }

  // What the page does when the API refuses it or cannot be reached. Returns
  // whether it is worth asking again (a passing network problem).
  function showFailure(error, retry) {
    const problem = byId("problem");
    if (error instanceof AuthNeeded) {
      byId("content").hidden = true;
      problem.hidden = true;
      const form = byId("token-form");
      byId("token-reason").textContent = error.message;
      form.hidden = false;
      form.onsubmit = (event) => {
        event.preventDefault();
        sessionStorage.setItem(TOKEN_KEY, byId("token-input").value.trim());
        byId("token-input").value = "";
        form.hidden = true;
        showForget();
        retry();
      };
      return false;
    }
    problem.textContent = error instanceof ApiFailure
      ? `The API answered ${error.status}: ${error.message}`
      : `The API cannot be reached (${error.message}); trying again.`;
    problem.hidden = false;
    return !(error instanceof ApiFailure);
  }

  function clearFailure() {
    byId("problem").hidden = true;
    byId("token-form").hidden = true;
    byId("content").hidden = false;
  }

  function showForget() {
    const button = byId("forget-token");
    button.hidden = !token();
    button.onclick = () => {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    };
  }

  // ------------------------------------------------------------ formatting

  function humanSize(bytes) {
    if (typeof bytes !== "number") return "";
    if (bytes < 1024) return `${bytes} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let value = bytes / 1024;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
  }

  function millis(iso) {
    return iso ? Date.parse(iso) : NaN;
  }

  function duration(ms) {
    if (!Number.isFinite(ms) || ms < 0) return "";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
    const minutes = Math.floor(ms / 60000);
    if (minutes < 60) return `${minutes} min ${Math.round((ms % 60000) / 1000)} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  function span(start, end) {
    const from = millis(start);
    if (!Number.isFinite(from)) return "";
    const to = end ? millis(end) : Date.now();
    return duration(to - from) + (end ? "" : " so far");
  }

  function clock(iso) {
    const at = new Date(millis(iso));
    if (Number.isNaN(at.getTime())) return "";
    return at.toISOString().replace("T", " ").slice(0, 23) + "Z";
  }

  function badge(phase) {
    return el("span", { class: `badge phase-${phase}`, "data-phase": phase }, phase || "?");
  }

  // ------------------------------------------------- values with references

  function isRef(value) {
    if (!value || typeof value !== "object" || Array.isArray(value)) return false;
    const keys = Object.keys(value);
    const body = value[REF_KEY];
    return keys.length === 1 && body && typeof body === "object" && typeof body.uri === "string";
  }

  function safeHref(uri) {
    try {
      const url = new URL(uri, location.href);
      return ["http:", "https:", "file:"].includes(url.protocol) ? url.href : null;
    } catch (_) {
      return null;
    }
  }

  // A payload stored by reference: a link to it, with its size.
  function refLink(ref) {
    const name = ref.uri.split(/[/?#]/).filter(Boolean).pop() || ref.uri;
    const title = ref.sha256 ? `${ref.uri}\nsha256 ${ref.sha256}` : ref.uri;
    const href = safeHref(ref.uri);
    const link = href
      ? el("a", { class: "ref", href, title, target: "_blank", rel: "noopener" }, name)
      : el("span", { class: "ref", title }, name);
    link.dataset.size = String(ref.size);
    return el("span", { class: "ref-wrap" }, "⧉ ", link, el("span", { class: "size" }, ` (${humanSize(ref.size)})`));
  }

  // JSON, indented, with each reference marker shown as a link.
  function jsonView(value) {
    const out = el("pre", { class: "json" });
    writeJson(out, value, 0);
    return out;
  }

  function writeJson(out, value, depth) {
    const pad = (n) => "  ".repeat(n);
    if (isRef(value)) {
      out.append(refLink(value[REF_KEY]));
    } else if (Array.isArray(value)) {
      if (!value.length) return out.append("[]");
      out.append("[\n");
      value.forEach((item, i) => {
        out.append(pad(depth + 1));
        writeJson(out, item, depth + 1);
        out.append(i < value.length - 1 ? ",\n" : "\n");
      });
      out.append(pad(depth) + "]");
    } else if (value && typeof value === "object") {
      const keys = Object.keys(value);
      if (!keys.length) return out.append("{}");
      out.append("{\n");
      keys.forEach((key, i) => {
        out.append(pad(depth + 1), el("span", { class: "j-key" }, JSON.stringify(key)), ": ");
        writeJson(out, value[key], depth + 1);
        out.append(i < keys.length - 1 ? ",\n" : "\n");
      });
      out.append(pad(depth) + "}");
    } else {
      const kind = value === null ? "null" : typeof value;
      out.append(el("span", { class: `j-${kind}` }, JSON.stringify(value)));
    }
    return out;
  }

  // --------------------------------------------------------------- list page

  function listPage() {
    const query = new URLSearchParams(location.search);
    const ns = query.get("namespace") || "default";
    const workflow = query.get("workflow") || "";
    const phase = query.get("phase") || "";
    const cont = query.get("continue") || "";
    byId("f-namespace").value = ns;
    byId("crumbs").textContent = `Executions in ${ns}`;
    document.title = `Executions in ${ns} · Sagaflow`;
    const phases = byId("f-phase");
    for (const p of EXECUTION_PHASES) phases.append(el("option", { value: p, selected: p === phase }, p));
    let timer = null;

    async function load() {
      clearTimeout(timer);
      const params = new URLSearchParams({ limit: query.get("limit") || "50" });
      if (workflow) params.set("workflow", workflow);
      if (phase) params.set("phase", phase);
      if (cont) params.set("continue", cont);
      let page;
      let workflows;
      try {
        [page, workflows] = await Promise.all([
          api(`${encodeURIComponent(ns)}/executions?${params}`),
          api(`${encodeURIComponent(ns)}/workflows`),
        ]);
      } catch (error) {
        if (showFailure(error, load)) timer = setTimeout(load, 3000);
        return;
      }
      clearFailure();
      fillWorkflows(workflows.items, workflow);
      fillRows(ns, page.items);
      pager(query, page.continue);
      // Keep the list current while any run in it is still going.
      if (page.items.some((e) => !END_PHASES.has((e.status || {}).phase))) timer = setTimeout(load, 2000);
    }
    showForget();
    load();
  }

  function fillWorkflows(items, chosen) {
    const select = byId("f-workflow");
    const names = items.map((w) => w.metadata.name).sort();
    if (chosen && !names.includes(chosen)) names.push(chosen);
    select.replaceChildren(el("option", { value: "" }, "any"),
      ...names.map((n) => el("option", { value: n, selected: n === chosen }, n)));
  }

  function fillRows(ns, items) {
    const body = byId("executions").tBodies[0];
    body.replaceChildren(...items.map((e) => {
      const status = e.status || {};
      const name = e.metadata.name;
      const steps = status.steps || [];
      const counts = new Map();
      for (const s of steps) counts.set(s.phase, (counts.get(s.phase) || 0) + 1);
      const tally = [...counts].map(([p, n]) => `${n} ${p.replace(/([a-z])([A-Z])/g, "$1 $2").toLowerCase()}`);
      const href = `/ui/namespaces/${encodeURIComponent(ns)}/executions/${encodeURIComponent(name)}`;
      const wf = (e.spec.workflowRef || {}).name || "";
      return el("tr", { "data-name": name, "data-phase": status.phase },
        el("td", {}, el("a", { href }, name)),
        el("td", {}, el("a", { href: `/ui?${new URLSearchParams({ namespace: ns, workflow: wf })}` }, wf)),
        el("td", {}, badge(status.phase)),
        el("td", { class: "muted" }, tally.join(" · ")),
        el("td", { class: "nowrap" }, clock(status.startedAt)),
        el("td", { class: "nowrap" }, span(status.startedAt, status.finishedAt)),
        el("td", { class: "error-text" }, status.error ? status.error.message : ""));
    }));
    byId("empty").hidden = items.length > 0;
  }

  function pager(query, next) {
    const first = byId("first-page");
    const following = byId("next-page");
    const base = new URLSearchParams(query);
    base.delete("continue");
    first.hidden = !query.get("continue");
    first.href = `/ui?${base}`;
    following.hidden = !next;
    if (next) {
      base.set("continue", next);
      following.href = `/ui?${base}`;
    }
  }

  window.Sagaflow = {
    END_PHASES, api, badge, byId, clearFailure, clock, duration, el, jsonView, millis,
    refLink, showFailure, showForget, span, svg,
  };

  document.addEventListener("DOMContentLoaded", () => {
    if (document.body.dataset.page === "list") listPage();
  });
})();
