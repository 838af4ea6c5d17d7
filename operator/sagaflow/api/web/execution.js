// One execution's page: the DAG coloured by phase, the timeline of attempts and
// waits, the steps' outputs, the history. It asks the API again every second
// until the run reaches an end phase, then stops.
"use strict";

(function () {
  const S = window.Sagaflow;
  const { el, svg, byId } = S;
  const STEP_PHASES = [
    "Pending", "Running", "Retrying", "Succeeded", "Failed", "Skipped",
    "Compensating", "Compensated", "CompensationFailed", "CompensationSkipped",
  ];
  const COMPENSATION_PHASES = new Set(["Compensating", "Compensated", "CompensationFailed", "CompensationSkipped"]);
  // History kinds that open a bar on the timeline, and those that close one.
  const OPENS = {
    StepDispatched: "attempt",
    StepWaiting: "wait",
    StepWaitingForSignal: "wait",
    StepCompensating: "compensation",
  };
  const CLOSES_ATTEMPT = {
    StepSucceeded: "succeeded", StepCompleted: "succeeded", StepFailed: "failed",
    StepRetrying: "retried", StepTimedOut: "failed", StepTimeout: "failed",
    StepInDoubt: "failed", StepSkipped: "failed", StepCancelled: "failed",
  };
  const CLOSES_COMPENSATION = {
    StepCompensated: "succeeded", StepCompensationFailed: "failed",
    StepCompensationRetrying: "retried", StepCompensationTimedOut: "failed",
    StepCompensationSkipped: "failed",
  };
  const NODE_W = 196;
  const NODE_H = 50;

  // ------------------------------------------------------------------- DAG

  // Each step's column is its dependency depth; `finally` steps come after all.
  function layout(spec, statusSteps) {
    const defs = new Map();
    for (const step of spec.steps || []) defs.set(step.name, { ...step, final: false });
    for (const step of spec.finally || []) defs.set(step.name, { ...step, final: true });
    for (const step of statusSteps) if (!defs.has(step.name)) defs.set(step.name, { name: step.name, final: false });
    const depth = new Map();
    const visit = (name, seen) => {
      if (depth.has(name)) return depth.get(name);
      const def = defs.get(name);
      if (!def || seen.has(name)) return 0;
      seen.add(name);
      const deps = (def.dependsOn || []).filter((d) => defs.has(d));
      const d = deps.length ? 1 + Math.max(...deps.map((x) => visit(x, seen))) : 0;
      depth.set(name, d);
      return d;
    };
    for (const name of defs.keys()) visit(name, new Set());
    const forward = [...defs.values()].filter((d) => !d.final).map((d) => depth.get(d.name));
    const last = forward.length ? Math.max(...forward) : -1;
    const columns = [];
    for (const def of defs.values()) {
      const col = def.final ? last + 1 + depth.get(def.name) : depth.get(def.name);
      (columns[col] = columns[col] || []).push(def.name);
    }
    const place = new Map();
    columns.forEach((names, col) => (names || []).forEach((name, row) => place.set(name, { col, row })));
    return { defs, place, columns: columns.length, rows: Math.max(1, ...columns.map((c) => (c || []).length)) };
  }

  function drawDag(spec, steps) {
    const { defs, place, columns, rows } = layout(spec, steps);
    const status = new Map(steps.map((s) => [s.name, s]));
    const gapX = 64;
    const gapY = 22;
    const width = columns * NODE_W + (columns - 1) * gapX + 24;
    const height = rows * NODE_H + (rows - 1) * gapY + 24;
    const at = (name) => {
      const p = place.get(name);
      return { x: 12 + p.col * (NODE_W + gapX), y: 12 + p.row * (NODE_H + gapY) };
    };
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "steps by dependency" });
    root.append(svg("defs", {}, svg("marker", {
      id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
    }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow" }))));
    for (const def of defs.values()) {
      for (const dep of def.dependsOn || []) {
        if (!place.has(dep)) continue;
        const a = at(dep);
        const b = at(def.name);
        const x1 = a.x + NODE_W;
        const y1 = a.y + NODE_H / 2;
        const x2 = b.x - 2;
        const y2 = b.y + NODE_H / 2;
        const mid = (x1 + x2) / 2;
        root.append(svg("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" }));
      }
    }
    for (const def of defs.values()) {
      const s = status.get(def.name) || { phase: "Pending", attempts: 0 };
      const p = at(def.name);
      const comp = COMPENSATION_PHASES.has(s.phase);
      const detail = [s.phase];
      if (s.attempts > 1) detail.push(`${s.attempts} attempts`);
      if (s.compensation && s.compensation.attempts > 1) detail.push(`undo ×${s.compensation.attempts}`);
      const label = def.name.length > 24 ? def.name.slice(0, 23) + "…" : def.name;
      const node = svg("g", {
        class: `node phase-${s.phase}${comp ? " compensation" : ""}${def.final ? " final" : ""}`,
        "data-step": def.name, "data-phase": s.phase, transform: `translate(${p.x},${p.y})`, tabindex: 0,
      },
      svg("title", {}, `${def.name}${def.type ? " (" + def.type + ")" : ""}: ${s.phase}${def.compensate ? "; compensated by " + def.compensate.type : ""}`),
      svg("rect", { width: NODE_W, height: NODE_H, rx: 8 }),
      svg("text", { x: 12, y: 21, class: "name" }, label),
      svg("text", { x: 12, y: 38, class: "detail" }, detail.join(" · ")));
      if (comp) node.append(svg("text", { x: NODE_W - 10, y: 21, class: "undo-mark", "text-anchor": "end" }, "↺"));
      else if (def.compensate) node.append(svg("text", { x: NODE_W - 10, y: 21, class: "can-undo", "text-anchor": "end" }, "↺"));
      root.append(node);
    }
    byId("dag").replaceChildren(root);
    // The timeline's rows follow the DAG: by column, then top to bottom.
    return [...place.entries()].sort(([, a], [, b]) => a.col - b.col || a.row - b.row).map(([n]) => n);
  }

  function drawLegend() {
    const legend = byId("legend");
    if (legend.childElementCount) return;
    for (const phase of STEP_PHASES) {
      const comp = COMPENSATION_PHASES.has(phase);
      legend.append(el("li", { class: comp ? "comp" : "" }, el("span", { class: `swatch node-swatch phase-${phase}${comp ? " compensation" : ""}` }), phase));
    }
    legend.append(el("li", { class: "muted" }, "↺ has a compensation; dashed: being or been undone"));
  }

  // -------------------------------------------------------------- timeline

  function bars(history) {
    const open = new Map();
    const out = [];
    const close = (key, at, outcome) => {
      const bar = open.get(key);
      if (!bar) return;
      bar.end = at;
      bar.outcome = outcome;
      open.delete(key);
    };
    for (const row of history) {
      if (!row.step) continue;
      const kind = OPENS[row.kind];
      const forward = `${row.step}/forward`;
      const undo = `${row.step}/compensation`;
      if (kind) {
        const key = kind === "compensation" ? undo : forward;
        close(key, row.at, "succeeded");
        const bar = { kind, step: row.step, attempt: row.attempt, start: row.at, end: null, outcome: "running", message: row.message };
        open.set(key, bar);
        out.push(bar);
      } else if (CLOSES_ATTEMPT[row.kind]) {
        close(forward, row.at, CLOSES_ATTEMPT[row.kind]);
      } else if (CLOSES_COMPENSATION[row.kind]) {
        close(undo, row.at, CLOSES_COMPENSATION[row.kind]);
      }
    }
    return out;
  }

  function niceStep(span, target) {
    const raw = span / target;
    const power = 10 ** Math.floor(Math.log10(raw || 1));
    for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
    return 10 * power;
  }

  function drawGantt(execution, history, order) {
    const status = execution.status || {};
    const ended = S.END_PHASES.has(status.phase);
    const list = bars(history);
    const times = history.map((r) => S.millis(r.at)).filter(Number.isFinite);
    const t0 = Math.min(S.millis(status.startedAt) || Infinity, ...times);
    const t1 = ended ? Math.max(S.millis(status.finishedAt) || 0, ...times) : Date.now();
    const box = byId("gantt");
    if (!Number.isFinite(t0)) {
      box.replaceChildren(el("p", { class: "muted" }, "Nothing has run yet."));
      return;
    }
    const total = Math.max(t1 - t0, 1);
    const labelW = 170;
    const width = Math.max(box.clientWidth, 480);
    const plot = width - labelW - 16;
    const rowH = 26;
    const steps = order.filter((name) => list.some((b) => b.step === name));
    const height = 26 + steps.length * rowH + 6;
    const x = (ms) => labelW + ((ms - t0) / total) * plot;
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "attempts over time" });
    const tick = niceStep(total, 6);
    for (let t = 0; t <= total + 1e-6; t += tick) {
      const px = x(t0 + t);
      root.append(svg("line", { class: "grid-line", x1: px, x2: px, y1: 18, y2: height - 4 }),
        svg("text", { class: "tick", x: px, y: 12, "text-anchor": t === 0 ? "start" : "middle" }, t === 0 ? "0" : S.duration(t)));
    }
    steps.forEach((name, i) => {
      const y = 24 + i * rowH;
      if (i % 2 === 0) root.append(svg("rect", { class: "band", x: 0, y: y - 2, width, height: rowH }));
      root.append(svg("text", { class: "row-label", x: 8, y: y + 15 }, name.length > 24 ? name.slice(0, 23) + "…" : name));
      for (const bar of list.filter((b) => b.step === name)) {
        const start = S.millis(bar.start);
        const end = bar.end ? S.millis(bar.end) : t1;
        const bx = x(start);
        const bw = Math.max(x(end) - bx, 3);
        const what = bar.kind === "compensation" ? "compensation attempt" : bar.kind === "wait" ? "wait" : "attempt";
        root.append(svg("rect", {
          class: `bar bar-${bar.kind} outcome-${bar.outcome}${bar.end ? "" : " open"}`,
          "data-kind": bar.kind, "data-step": name, "data-attempt": bar.attempt, "data-outcome": bar.outcome,
          x: bx, y: y + 3, width: bw, height: rowH - 10, rx: 3,
        }, svg("title", {}, `${name} ${what} ${bar.attempt ?? ""}: ${S.duration(end - start)}, ${bar.outcome}\n${bar.message || ""}`)));
      }
    });
    box.replaceChildren(root);
  }

  // --------------------------------------------------------------- tables

  function drawSteps(spec, steps) {
    const defs = new Map([...(spec.steps || []), ...(spec.finally || [])].map((s) => [s.name, s]));
    byId("step-table").tBodies[0].replaceChildren(...steps.map((s) => {
      let shown = "";
      if (s.outputRef) shown = S.refLink(s.outputRef);
      else if (s.output !== undefined) shown = S.jsonView(s.output);
      const notes = [];
      if (s.error) notes.push(el("div", { class: "error-text" }, `${s.error.type}: ${s.error.message}`));
      if (s.compensation && s.compensation.error) {
        const e = s.compensation.error;
        notes.push(el("div", { class: "error-text" }, `compensation: ${e.type}: ${e.message}`));
      }
      if (s.reason) notes.push(el("div", { class: "muted" }, s.reason));
      const attempts = s.compensation ? `${s.attempts} + ${s.compensation.attempts} undo` : String(s.attempts);
      return el("tr", { "data-step": s.name },
        el("td", {}, s.name),
        el("td", { class: "mono" }, (defs.get(s.name) || {}).type || ""),
        el("td", {}, S.badge(s.phase)),
        el("td", { class: "num" }, attempts),
        el("td", { class: "nowrap" }, s.startedAt ? S.span(s.startedAt, s.finishedAt) : ""),
        el("td", {}, shown, ...notes));
    }));
  }

  // What a Transition row says caused it, short: the fact, and its step or timer.
  function causeOf(row) {
    const data = row.data || {};
    const fact = data.fact || {};
    const type = fact.type || String(row.message || "").split(" ")[0];
    let what = "";
    if (fact.step) what = `${fact.step} #${fact.attempt ?? ""}${fact.compensation ? " (undo)" : ""}`;
    else if (data.cause && !String(data.cause).startsWith("message:")) what = String(data.cause);
    return { text: [type, what].filter(Boolean).join(" · "), full: row.message || "" };
  }

  // Transition rows carry the cause of the rows after them: shown as a column.
  function drawHistory(history) {
    let cause = { text: "", full: "" };
    let any = false;
    let shown = 0;
    const rows = [];
    history.forEach((row) => {
      if (row.kind === "Transition") {
        cause = causeOf(row);
        any = true;
        return;
      }
      shown += 1;
      const tone = /Fail|TimedOut|Timeout|Refused|InDoubt/.test(row.kind) ? "bad" : /Compensat/.test(row.kind) ? "comp" : "";
      rows.push(el("tr", { "data-kind": row.kind, "data-step": row.step || "", class: tone },
        el("td", { class: "num muted" }, String(row.seq ?? shown)),
        el("td", { class: "nowrap mono" }, S.clock(row.at)),
        el("td", { class: "kind" }, row.kind),
        el("td", { class: "nowrap" }, row.step || ""),
        el("td", { class: "num" }, row.attempt ?? ""),
        el("td", {}, row.message || ""),
        el("td", { class: "cause-col muted", title: cause.full }, cause.text)));
    });
    const table = byId("history");
    table.classList.toggle("with-cause", any);
    table.tBodies[0].replaceChildren(...rows);
  }

  function drawSummary(ns, execution) {
    const status = execution.status || {};
    const wf = (execution.spec.workflowRef || {}).name || "";
    byId("exec-name").textContent = execution.metadata.name;
    const phase = byId("phase");
    phase.className = `badge phase-${status.phase}`;
    phase.dataset.phase = status.phase;
    phase.textContent = status.phase;
    const facts = [
      ["Workflow", el("a", { href: `/ui?${new URLSearchParams({ namespace: ns, workflow: wf })}` }, wf),
        status.workflowVersion ? ` v${status.workflowVersion}` : ""],
      ["Namespace", ns],
      ["Started", S.clock(status.startedAt)],
      ["Finished", S.clock(status.finishedAt) || "—"],
      ["Duration", S.span(status.startedAt, status.finishedAt)],
    ];
    if (status.currentSteps) facts.push(["Now", status.currentSteps.join(", ")]);
    if (execution.spec.correlationKey) facts.push(["Correlation key", execution.spec.correlationKey]);
    const ready = (status.conditions || []).find((c) => c.type === "Ready");
    if (ready && ready.message && ready.message !== `execution ${String(status.phase).toLowerCase()}`) facts.push(["Outcome", ready.message]);
    byId("facts").replaceChildren(...facts.flatMap(([k, ...v]) => [el("dt", {}, k), el("dd", {}, ...v)]));
    const error = byId("exec-error");
    error.hidden = !status.error;
    error.textContent = status.error ? `${status.error.type}: ${status.error.message}` : "";
    byId("exec-input").replaceChildren(S.jsonView(execution.spec.input ?? null));
    const ended = S.END_PHASES.has(status.phase);
    let output = el("p", { class: "muted" }, ended ? "none" : "none yet");
    if (status.outputRef) output = S.refLink(status.outputRef);
    else if (status.output !== undefined) output = S.jsonView(status.output);
    byId("exec-output").replaceChildren(output);
  }

  function executionPage() {
    const parts = location.pathname.split("/");
    const ns = decodeURIComponent(parts[3] || "");
    const name = decodeURIComponent(parts[5] || "");
    const base = `${encodeURIComponent(ns)}/executions/${encodeURIComponent(name)}`;
    document.title = `${name} · Sagaflow`;
    byId("crumbs").replaceChildren(el("a", { href: `/ui?${new URLSearchParams({ namespace: ns })}` }, ns), " / ", name);
    const live = byId("live");
    let spec = null;
    let specVersion = null;
    let seen = "";
    let timer = null;
    let order = [];

    async function refresh() {
      clearTimeout(timer);
      let execution;
      let history;
      try {
        [execution, history] = await Promise.all([S.api(base), S.api(`${base}/history`)]);
        // The DAG of the version the run pins (a redrive onto the latest moves it).
        const version = (execution.status || {}).workflowVersion;
        if (spec === null || (version && version !== specVersion)) {
          const wf = encodeURIComponent((execution.spec.workflowRef || {}).name);
          if (version) {
            const found = await S.api(`${encodeURIComponent(ns)}/workflows/${wf}/versions/${version}`);
            spec = found.spec;
            specVersion = version;
          } else {
            const workflows = await S.api(`${encodeURIComponent(ns)}/workflows`);
            const found = workflows.items.find((w) => w.metadata.name === decodeURIComponent(wf));
            spec = found ? found.spec : {};
          }
        }
      } catch (error) {
        live.hidden = true;
        if (S.showFailure(error, refresh)) timer = setTimeout(refresh, 2000);
        return;
      }
      S.clearFailure();
      const status = execution.status || {};
      const steps = status.steps || [];
      const ended = S.END_PHASES.has(status.phase);
      const key = JSON.stringify([execution, history.items]);
      if (key !== seen) {
        seen = key;
        drawSummary(ns, execution);
        order = drawDag(spec, steps);
        drawLegend();
        drawSteps(spec, steps);
        drawHistory(history.items);
      }
      drawGantt(execution, history.items, order);
      live.hidden = false;
      live.dataset.live = String(!ended);
      live.textContent = ended ? "finished" : "live · every second";
      if (!ended) timer = setTimeout(refresh, 1000);
    }
    S.showForget();
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (document.body.dataset.page === "execution") executionPage();
  });
})();
