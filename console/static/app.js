// vigil console: the page. State comes from the console's websocket (a snapshot, then updates); actions are
// HTTP POSTs with the token in the X-Vigil-Token header. All text from the runtime goes in as textContent.
"use strict";

const TOKEN_KEY = "vigil-console-token";
const OPERATOR_KEY = "vigil-console-operator";
const WINDOW_S = 60;        // the trace charts show this many seconds
const MAX_POINTS = 3000;    // per robot
const MAX_ROWS = 300;       // alerts rendered
const LEVELS = ["ok", "warn", "alert", "stop"];
const SVG = "http://www.w3.org/2000/svg";

// The token arrives once in the address (?token=...): keep it for this origin, take it out of the address bar.
(() => {
  const params = new URLSearchParams(location.search);
  const t = params.get("token");
  if (t) {
    localStorage.setItem(TOKEN_KEY, t);
    history.replaceState(null, "", location.pathname);
  }
})();
const token = () => localStorage.getItem(TOKEN_KEY) || "";

const S = {
  robots: [], trace: {}, thresholds: {}, alerts: new Map(), requests: new Map(), swaps: new Map(), gains: [],
  events: [], status: null, console: {}, policy: "", live: false, form: null, rowMsg: {}, newAlerts: new Set(),
  preferences: new Map(), prefSelected: null, prefDetail: null, prefMsg: null,
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toPrecision(d));
const us = (x) => (x === null || x === undefined ? "–" : x >= 1000 ? `${(x / 1000).toFixed(2)} ms` : `${x.toFixed(0)} µs`);

// -- the operator's name: per tab (sessionStorage), remembered as the default for new tabs -------------------

const operatorInput = $("#operator");
operatorInput.value = sessionStorage.getItem(OPERATOR_KEY) || localStorage.getItem(OPERATOR_KEY) || "operator";
operatorInput.addEventListener("input", () => {
  sessionStorage.setItem(OPERATOR_KEY, operatorInput.value);
  localStorage.setItem(OPERATOR_KEY, operatorInput.value);
});
const operator = () => operatorInput.value.trim();

function notice(text, kind) {
  const n = $("#notice");
  n.textContent = text;
  n.className = kind;
  n.dataset.kind = kind;
}

// -- rendering, coalesced: several updates in a burst render once -----------------------------------------

const dirty = new Set();
let scheduled = false;
function mark(...parts) {
  parts.forEach((p) => dirty.add(p));
  if (!scheduled) {
    scheduled = true;
    setTimeout(render, 30);  // not requestAnimationFrame: a background tab must still update
  }
}
function render() {
  scheduled = false;
  const parts = [...dirty];
  dirty.clear();
  const renderers = { status: renderStatus, robots: renderRobots, traces: renderTraces, alerts: renderAlerts,
    requests: renderRequests, preferences: renderPreferences, swaps: renderSwaps, gains: renderGains,
    events: renderEvents };
  for (const p of parts) renderers[p]();
}
const ALL = ["status", "robots", "traces", "alerts", "requests", "preferences", "swaps", "gains", "events"];

function renderStatus() {
  const st = S.status;
  const page = $("#page-status");
  page.textContent = S.live ? "console live" : "console not reachable: retrying";
  page.className = `chip ${S.live ? "ok" : "bad"}`;
  const rt = $("#runtime-status");
  if (!st) {
    rt.textContent = "runtime: unknown";
  } else if (st.heard_ago_s === null) {
    rt.textContent = `runtime not heard from (since the console started ${Math.round(st.up_s)} s ago) at ${st.connect}`;
  } else if (st.silent) {
    rt.textContent = `runtime not heard from for ${Math.round(st.heard_ago_s)} s (${st.connect})`;
  } else {
    rt.textContent = `runtime live${S.policy ? `: ${S.policy}` : ""}`;
  }
  rt.className = `chip ${st && !st.silent && S.live ? "ok" : "bad"}`;
  rt.dataset.silent = String(!st || st.silent);
  const store = st ? st.store : { status: "unknown", detail: "" };
  const ss = $("#store-status");
  ss.textContent = store.status === "ok" ? "store ok" : `store ${store.status}: ${store.detail}`;
  ss.className = `chip ${store.status === "ok" ? "ok" : store.status === "unknown" ? "" : "bad"}`;
  ss.dataset.status = store.status;
  const auth = $("#auth-status");
  auth.textContent = token() ? "actions: token held" : "read-only: open the address `vigil console` printed to act";
  auth.className = `chip ${token() ? "ok" : "warn"}`;
  $("#policy").textContent = S.policy || "unknown";
  const c = st ? st.counters : {};
  $("#counters").textContent = Object.keys(c).sort().map((k) => `${k} ${c[k]}`).join(" · ");
  $("#swap-button").disabled = !S.console.control;
  $("#swap-hint").textContent = S.console.control ? "" : "No control channel: start the console with --control to swap from here.";
}

function renderRobots() {
  const body = $("#robots tbody");
  const silent = !S.status || S.status.silent;
  body.replaceChildren(...S.robots.map((r) => el("tr", { dataset: { robot: r.robot, state: r.state },
    class: silent ? "stale" : "" },
  el("td", {}, r.robot),
  el("td", { class: `state-${r.state.replace(" ", ".")}` }, silent && r.state === "connected" ? "connected?" : r.state),
  el("td", {}, r.env || ""),
  el("td", { class: "num" }, r.rate_hz === null ? "–" : `${r.rate_hz.toFixed(1)} Hz`),
  el("td", { class: "num" }, us(r.p50_us)), el("td", { class: "num" }, us(r.p99_us)),
  el("td", { class: "num" }, String(r.safe)), el("td", { class: "num" }, String(r.episode)),
  el("td", { class: "num" }, String(r.ticks)), el("td", { class: "num" }, String(r.errors)))));
  $("#robots-empty").hidden = S.robots.length > 0;
}

function renderTraces() {
  const box = $("#traces");
  const robots = Object.keys(S.trace).sort();
  $("#traces-empty").hidden = robots.length > 0;
  for (const robot of robots) {
    let card = box.querySelector(`[data-trace="${CSS.escape(robot)}"]`);
    if (!card) {
      card = el("div", { class: "trace", dataset: { trace: robot } }, el("h3", {}, robot), el("div", { class: "info" }));
      box.append(card);
    }
    drawTrace(card, S.trace[robot], S.thresholds[robot] || {});
  }
}

function drawTrace(card, points, th) {
  const W = 560, H = 130, V = 12, L = 4;
  const last = points[points.length - 1];
  const t1 = last ? last.t : 0, t0 = t1 - WINDOW_S;
  const shown = points.filter((p) => p.t >= t0);
  const scores = shown.filter((p) => typeof p.score === "number" && Number.isFinite(p.score));
  const lines = ["warn", "alert", "stop"].filter((k) => typeof th[k] === "number" && Number.isFinite(th[k]));
  // VFD scores span orders of magnitude: a log axis when every value is positive, so the thresholds stay visible
  const values = [...scores.map((p) => p.score), ...lines.map((k) => th[k])];
  const log = values.length > 0 && values.every((v) => v > 0);
  const f = log ? Math.log10 : (v) => v;
  const hi = Math.max(...values.map(f), log ? -12 : 1e-12) + (log ? 0.3 : 0);
  const lo = log ? Math.min(...values.map(f)) - 0.3 : 0;
  const x = (t) => L + ((t - t0) / WINDOW_S) * (W - 2 * L);
  const y = (v) => H - 4 - ((f(v) - lo) / (hi - lo || 1)) * (H - 8);
  const chart = svg("svg", { width: W, height: H + V + 2, viewBox: `0 0 ${W} ${H + V + 2}`, role: "img" });
  lines.forEach((k, i) => {
    chart.append(svg("line", { x1: 0, x2: W, y1: y(th[k]), y2: y(th[k]), class: `th-${k}` }));
    const label = svg("text", { x: 6 + 90 * i, y: y(th[k]) - 2 });
    label.textContent = `${k} ${fmt(th[k])}`;
    chart.append(label);
  });
  if (log) {
    const axis = svg("text", { x: W - 48, y: 10 });
    axis.textContent = "log scale";
    chart.append(axis);
  }
  if (!scores.length && shown.length) {
    const note = svg("text", { x: 8, y: 16 });
    note.textContent = "this policy scores nothing: verdicts only";
    chart.append(note);
  } else if (scores.length) {  // one line per stretch without a pause of more than 2 s (between runs, say)
    let run = [];
    scores.forEach((p, i) => {
      run.push(`${x(p.t).toFixed(1)},${y(p.score).toFixed(1)}`);
      if (i === scores.length - 1 || scores[i + 1].t - p.t > 2) {
        chart.append(svg("polyline", { class: "score", points: run.join(" ") }));
        run = [];
      }
    });
  }
  // the verdicts: one strip, a segment per run of the same level
  let start = 0;
  for (let i = 1; i <= shown.length; i++) {
    if (i < shown.length && shown[i].level === shown[start].level) continue;
    const a = x(shown[start].t), b = i < shown.length ? x(shown[i].t) : Math.max(a + 2, x(t1));
    chart.append(svg("rect", { x: a, y: H + 2, width: Math.max(1, b - a), height: V, class: `v-${shown[start].level}` }));
    start = i;
  }
  card.querySelector("svg")?.remove();
  card.append(chart);
  card.dataset.points = String(points.length);
  card.dataset.lastScore = last && typeof last.score === "number" ? String(last.score) : "";
  card.dataset.level = last ? last.level : "";
  const info = card.querySelector(".info");
  info.textContent = last
    ? `score ${fmt(last.score)} · ${last.level}${last.safe ? " · safe action" : ""} · episode ${last.episode} plan ${last.plan} · ${points.length} points`
    : "";
}

// the dynamics monitor's diagnosis (docs/dynamics.md): who should act on the alert
const DIAGNOSES = { robot: "maintenance", world: "world changed", unfamiliar: "unfamiliar state" };

function renderAlerts() {
  const rows = [...S.alerts.values()].sort((a, b) => (b.id || Infinity) - (a.id || Infinity)).slice(0, MAX_ROWS);
  $("#alerts tbody").replaceChildren(...rows.map((a) => {
    const diagnosis = a.values && DIAGNOSES[a.values.diagnosis] ? a.values.diagnosis : null;
    return el("tr", {
      dataset: { alertId: a.id, diagnosis: diagnosis || "" }, class: S.newAlerts.has(a.id) ? "new" : "" },
    el("td", { class: "num" }, String(a.id || "–")), el("td", {}, clock(a.t_ns / 1e9)),
    el("td", { class: `sev-${a.severity}` }, a.severity), el("td", {}, a.robot || "–"),
    el("td", {}, a.monitor, ...(diagnosis ? [" ", el("span", { class: `diag diag-${diagnosis}` }, DIAGNOSES[diagnosis])]
      : [])),
    el("td", {}, a.reason), el("td", { class: "num" }, a.count > 1 ? String(a.count) : ""), el("td", {}, a.source));
  }));
  S.newAlerts.clear();
  const maintenance = [...S.alerts.values()].filter((a) => a.values && a.values.diagnosis === "robot").length;
  $("#alerts-info").textContent = `${S.alerts.size} shown` + (maintenance ? `, ${maintenance} maintenance` : "")
    + "; gaps in ids are read back from the store";
}

function requestState(r) {
  return r.status === "claimed" && (r.lease_until_ns || 0) / 1e6 <= Date.now() ? "expired" : r.status;
}

function requestDetail(r, state) {
  if (state === "claimed") return `by ${r.claimed_by} until ${clock(r.lease_until_ns / 1e9)}`;
  if (state === "expired") return `was ${r.claimed_by}`;
  if (state === "fulfilled") return `by ${r.resolved_by}: ${r.demo} in ${r.dataset}`;
  if (state === "rejected") return `by ${r.resolved_by}: ${r.reason}`;
  return "";
}

let requestsShown = "";
function renderRequests() {
  const body = $("#requests tbody");
  const rows = [];
  const requests = [...S.requests.values()].sort((a, b) => b.id - a.id);
  // re-render only on a change: a re-render replaces the inputs of an open form under the operator's fingers
  const shown = JSON.stringify([requests.map((r) => [r.id, requestState(r), requestDetail(r, requestState(r))]),
    S.rowMsg, S.form && [S.form.id, S.form.action], operator()]);
  if (shown === requestsShown) return;
  requestsShown = shown;
  for (const r of requests) {
    const state = requestState(r);
    const open = state !== "fulfilled" && state !== "rejected";
    const button = (action) => el("button", { type: "button", dataset: { action, request: r.id },
      onclick: () => choose(r.id, action) }, action);
    const msg = S.rowMsg[r.id];
    rows.push(el("tr", { dataset: { requestId: r.id, state } },
      el("td", { class: "num" }, String(r.id)), el("td", {}, clock(r.t_ns / 1e9)), el("td", {}, state),
      el("td", {}, r.task || "–"), el("td", {}, r.robot), el("td", { class: "num" }, String(r.step)),
      el("td", { class: "num" }, `${fmt(r.score)} > ${fmt(r.threshold)}`),
      el("td", {}, requestDetail(r, state), msg ? el("div", { class: `msg-${msg.kind}`, dataset: { msg: r.id } }, msg.text) : ""),
      el("td", { class: "actions" }, ...(open ? ["claim", "answer", "reject", "release"].map(button) : []))));
    // an open form stays when the request is resolved elsewhere: the operator's text is kept, and sending it
    // gets the store's answer ("already fulfilled by ...")
    if (S.form && S.form.id === r.id) rows.push(formRow(r));
  }
  body.replaceChildren(...rows);
}

function formRow(r) {
  const f = S.form;
  const input = (name, placeholder, size) => el("input", { name, placeholder, size, value: f.values[name] || "",
    oninput: (e) => { f.values[name] = e.target.value; } });
  const fields = f.action === "answer"
    ? [input("dataset", "dataset folder (recorded demonstration)", 30), input("demo", "episode id", 14)]
    : [input("reason", "reason", 40)];
  return el("tr", { class: "form-row", dataset: { formFor: r.id } }, el("td", { colspan: 9 },
    `${f.action} #${r.id} as ${operator() || "?"}: `, ...fields,
    el("button", { type: "button", dataset: { send: f.action }, onclick: () => send(r.id, f.action, f.values) }, "send"),
    el("button", { type: "button", onclick: () => { S.form = null; mark("requests"); } }, "cancel")));
}

function choose(id, action) {
  if (action === "answer" || action === "reject") {
    // the same form already open stays as it is, with what the operator typed (a second click wipes nothing)
    if (!(S.form && S.form.id === id && S.form.action === action)) S.form = { id, action, values: {} };
    mark("requests");
  } else {
    send(id, action, {});
  }
}

async function post(path, body) {
  let res;
  try {
    res = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json", "X-Vigil-Token": token() },
      body: JSON.stringify(body) });
  } catch (err) {
    return { status: 0, body: { error: `the console did not answer (${err})` } };
  }
  const answer = await res.json().catch(() => ({ error: res.statusText }));
  return { status: res.status, body: answer };
}

async function send(id, action, values) {
  const { status, body } = await post(`/api/requests/${id}/${action}`, { by: operator(), ...values });
  if (status === 200) {
    notice(body.message, "ok");
    S.rowMsg[id] = { kind: "ok", text: body.message };
    if (S.form && S.form.id === id) S.form = null;
  } else {
    const text = `${status || "no answer"}: ${body.error || "refused"}`;
    notice(text, "error");
    S.rowMsg[id] = { kind: "error", text };
  }
  if (body.request) S.requests.set(body.request.id, body.request);
  mark("requests");
}

// -- preference queries: which of two attempts at the same task was better ---------------------------------

const ANSWER_LABELS = { a: "A better", b: "B better", tie: "tie", unsure: "cannot tell" };
const ANSWERED_LISTED = 20;  // answered queries listed under the open ones, newest first
const HAND = ["x", "y", "z"];

function prefDetail(p) {
  return p.status === "answered" ? `answered by ${p.by}: ${ANSWER_LABELS[p.answer] || p.answer}` : "";
}

let prefsShown = "";
function renderPreferences() {
  const all = [...S.preferences.values()];
  const open = all.filter((p) => p.status === "open").sort((a, b) => a.id - b.id);
  const answered = all.filter((p) => p.status !== "open").sort((a, b) => b.id - a.id).slice(0, ANSWERED_LISTED);
  const rows = [...open, ...answered];
  const selected = S.preferences.get(S.prefSelected);
  const d = S.prefDetail;
  // re-render only on a change: the attempts are redrawn from scratch
  const shown = JSON.stringify([rows.map((p) => [p.id, p.status, p.answer, p.by]), S.prefSelected,
    selected && [selected.status, selected.answer, selected.by], d && [d.id, !!d.loading, d.error || ""], S.prefMsg]);
  if (shown === prefsShown) return;
  prefsShown = shown;
  $("#prefs tbody").replaceChildren(...rows.map((p) => el("tr", {
    dataset: { prefId: p.id, state: p.status }, class: p.id === S.prefSelected ? "selected" : "",
    onclick: () => selectPreference(p.id) },
  el("td", { class: "num" }, String(p.id)), el("td", {}, clock(p.t_ns / 1e9)), el("td", {}, p.status),
  el("td", {}, p.task), el("td", {}, p.rule), el("td", { class: "num" }, String(p.batch)),
  el("td", { class: "num" }, p.predicted === null ? "–" : Number(p.predicted).toFixed(2)),
  el("td", {}, prefDetail(p)))));
  $("#prefs-empty").hidden = rows.length > 0;
  $("#prefs-info").textContent = all.length ? `${open.length} open` : "";
  renderCompare();
}

function renderCompare() {
  const box = $("#pref-compare");
  const id = S.prefSelected;
  if (id === null) {
    box.replaceChildren(S.preferences.size ? el("p", { class: "hint" }, "Select a query to compare its two attempts.") : "");
    return;
  }
  const p = S.preferences.get(id);
  const d = S.prefDetail && S.prefDetail.id === id ? S.prefDetail : null;
  const head = el("h3", {}, `query #${id}`, p ? `: ${p.task} (rule ${p.rule}, batch ${p.batch})` : "");
  const state = el("p", { id: "pref-state", dataset: { state: p ? p.status : "" } },
    !p ? "" : p.status === "answered" ? `${prefDetail(p)}. An answer is final.` : "Open: which attempt was better?");
  let body;
  if (!d || d.loading) {
    body = el("p", { class: "hint" }, "loading the attempts…");
  } else if (d.error) {
    body = el("p", { class: "msg-error", dataset: { error: "query" } }, d.error);
  } else {
    const scale = handScale([d.attempts.a, d.attempts.b]);
    body = el("div", { class: "attempts" }, attemptCard("a", d.attempts.a, scale), attemptCard("b", d.attempts.b, scale));
  }
  const buttons = el("div", { class: "pref-answers" },
    ...Object.entries(ANSWER_LABELS).map(([answer, label]) => el("button", { type: "button", dataset: { answer },
      onclick: () => answerPreference(id, answer) }, label)),
    el("button", { type: "button", id: "pref-next", onclick: nextPreference }, "next open query"));
  const m = S.prefMsg && S.prefMsg.id === id ? S.prefMsg : null;
  box.replaceChildren(head, state, body, buttons, m ? el("p", { id: "pref-msg", class: `msg-${m.kind}` }, m.text) : "");
}

function attemptCard(side, a, scale) {
  const name = side.toUpperCase();
  const card = el("div", { class: "attempt", dataset: { side } }, el("h4", {}, `${name}: ${a.id}`));
  if (a.error) {
    card.append(el("p", { class: "msg-error", dataset: { error: side } }, a.error));
    return card;
  }
  const success = a.success ? `success (after step ${a.success_step + 1})` : "no success";
  card.append(el("p", { class: "info" }, `${a.steps} steps · ${success} · return ${fmt(a.return, 4)}`));
  if (a.frames.length) {
    card.append(el("div", { class: "frames" }, ...a.frames.map((src, i) => el("img", { src,
      alt: `${name} at step ${a.frame_steps[i]}`, title: `step ${a.frame_steps[i]}` }))));
  } else if (a.hand) {
    card.append(drawHand(side, a, scale));
  } else {
    card.append(el("p", { class: "hint" }, a.note || "nothing to draw"));
  }
  return card;
}

function handScale(attempts) {
  // one scale for both attempts, so that the two plots compare at a glance
  let t = 1, lo = Infinity, hi = -Infinity;
  for (const a of attempts) {
    if (!a || !a.hand) continue;
    t = Math.max(t, a.steps);
    for (const p of a.hand) for (const v of p) if (typeof v === "number") { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  }
  if (!(hi > lo)) { lo = (Number.isFinite(lo) ? lo : 0) - 1; hi = lo + 2; }
  const pad = 0.05 * (hi - lo);
  return { t, lo: lo - pad, hi: hi + pad };
}

function drawHand(side, a, scale) {
  const W = 380, H = 150, L = 34, R = 24, B = 14;
  const x = (t) => L + (t / scale.t) * (W - L - R);
  const y = (v) => 4 + (1 - (v - scale.lo) / (scale.hi - scale.lo)) * (H - B - 8);
  const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `hand position of attempt ${side.toUpperCase()} over its steps` });
  const label = (text, attrs) => { const t = svg("text", attrs); t.textContent = text; chart.append(t); };
  label(fmt(scale.hi), { x: 2, y: 12 });
  label("hand", { x: W - R - 2, y: 10 });
  label(fmt(scale.lo), { x: 2, y: H - B - 4 });
  label("step 0", { x: L, y: H - 3 });
  label(`${scale.t}`, { x: W - R - 12, y: H - 3 });
  chart.append(svg("line", { x1: L, x2: L, y1: 4, y2: H - B - 4, stroke: "#ccc" }));
  if (a.success_step !== null && a.success_step !== undefined) {
    chart.append(svg("line", { class: "success-mark", x1: x(a.success_step + 1), x2: x(a.success_step + 1), y1: 4,
      y2: H - B - 4 }));
  }
  HAND.forEach((axis, k) => {
    const pts = [];
    a.hand.forEach((p, i) => { if (typeof p[k] === "number") pts.push(`${x(a.hand_steps[i]).toFixed(1)},${y(p[k]).toFixed(1)}`); });
    if (!pts.length) return;
    chart.append(svg("polyline", { class: `hand-${axis}`, points: pts.join(" ") }));
    label(axis, { x: W - R + 6, y: 22 + 11 * k, class: `hand-${axis}` });
  });
  return chart;
}

async function selectPreference(id) {
  S.prefSelected = id;
  S.prefDetail = { id, loading: true };
  mark("preferences");
  let status, body;
  try {
    const res = await fetch(`/api/preferences/${id}`, { headers: { "X-Vigil-Token": token() } });
    status = res.status;
    body = await res.json().catch(() => ({ error: res.statusText }));
  } catch (err) {
    status = 0;
    body = { error: `the console did not answer (${err})` };
  }
  if (S.prefSelected !== id) return;  // another query was selected meanwhile
  S.prefDetail = status === 200 ? { id, attempts: body.attempts } : { id, error: `${status || "no answer"}: ${body.error || "refused"}` };
  if (body.preference) S.preferences.set(id, body.preference);
  mark("preferences");
}

function nextPreference() {
  const open = [...S.preferences.values()].filter((p) => p.status === "open" && p.id !== S.prefSelected)
    .sort((a, b) => a.id - b.id);
  if (open.length) selectPreference(open[0].id);
  else notice("no open preference query left", "ok");
}

async function answerPreference(id, answer) {
  const { status, body } = await post(`/api/preferences/${id}/answer`, { by: operator(), answer });
  if (status === 200) {
    notice(body.message, "ok");
    S.prefMsg = { id, kind: "ok", text: body.message };
  } else {
    const text = `${status || "no answer"}: ${body.error || "refused"}`;
    notice(text, "error");
    S.prefMsg = { id, kind: "error", text };
  }
  if (body.preference) S.preferences.set(body.preference.id, body.preference);
  mark("preferences");
}

$("#swap-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const bundle = $("#swap-bundle").value.trim();
  notice(`swapping to ${bundle}… (the runtime loads it in the background)`, "ok");
  const { status, body } = await post("/api/swap", { bundle });
  notice(status === 200 ? body.message : `${status || "no answer"}: ${body.error || "refused"}`, status === 200 ? "ok" : "error");
});

function renderSwaps() {
  const swaps = [...S.swaps.values()].sort((a, b) => b.id - a.id);
  $("#swaps").replaceChildren(...swaps.map((s) => {
    const li = el("li", { dataset: { swapId: s.id, ok: String(s.ok) } }, `${clock(s.t)} `,
      el("span", { class: s.ok ? "msg-ok" : "msg-error" }, s.ok ? "swapped" : "refused"), " ",
      s.ok ? `${s.previous} → ${s.policy}` : s.reason, el("br"), el("code", {}, s.bundle));
    const m = s.manifest;
    if (m) {
      const dl = el("dl", { class: "prov" });
      const add = (k, v) => dl.append(el("dt", {}, k), el("dd", {}, typeof v === "string" ? v : JSON.stringify(v)));
      if (m.error) add("manifest", m.error);
      else {
        add("name", `${m.name} (${m.kind}, sha256 ${m.sha256}…, ${m.control_rate_hz} Hz)`);
        for (const [k, v] of Object.entries(m.provenance || {})) add(k, v);
        if (Object.keys(m.vfd_thresholds || {}).length) add("vfd thresholds", m.vfd_thresholds);
      }
      li.append(dl);
    }
    return li;
  }));
}

function renderGains() {
  const rows = S.gains.slice(-100).reverse();
  $("#gains tbody").replaceChildren(...rows.map((g) => el("tr", { dataset: { gainRobot: g.robot } },
    el("td", {}, clock(g.t)), el("td", {}, g.robot), el("td", { class: "num" }, String(g.epoch ?? "")),
    el("td", { class: "num" }, String(g.steps ?? "")),
    el("td", {}, JSON.stringify(g.gain).slice(0, 120)),
    el("td", {}, ["fallback", "guarded", "failed"].filter((k) => g[k]).join(", ")),
    el("td", { class: "num" }, g.update_ms === undefined ? "" : `${g.update_ms} ms`))));
}

function renderEvents() {
  const rows = S.events.slice(-50).reverse();
  $("#events").replaceChildren(...rows.map((e) => el("li", { dataset: { event: e.event } },
    `${clock(e.t)} ${e.robot || "runtime"} ${e.event} `, el("code", {}, JSON.stringify(e.values).slice(0, 160)))));
}

// -- the websocket ---------------------------------------------------------------------------------------

function addTrace(points, thresholds) {
  for (const [robot, pts] of Object.entries(points)) {
    const list = (S.trace[robot] = (S.trace[robot] || []).concat(pts));
    if (list.length > MAX_POINTS) S.trace[robot] = list.slice(-MAX_POINTS);
  }
  Object.assign(S.thresholds, thresholds || {});
}

function onMessage(msg) {
  switch (msg.type) {
    case "snapshot":
      S.robots = msg.robots; S.trace = msg.trace; S.thresholds = msg.thresholds; S.status = msg.status;
      S.policy = msg.status.policy; S.console = msg.console || {};
      S.alerts = new Map(msg.alerts.map((a) => [a.id || `0-${a.t_ns}`, a]));
      S.requests = new Map(msg.requests.map((r) => [r.id, r]));
      S.preferences = new Map((msg.preferences || []).map((p) => [p.id, p]));
      S.swaps = new Map(msg.swaps.map((s) => [s.id, s]));
      S.gains = msg.gains; S.events = msg.events;
      mark(...ALL);
      break;
    case "status":
      S.status = msg; S.policy = msg.policy || S.policy; mark("status", "robots");
      break;
    case "telemetry":
      S.robots = msg.robots; S.policy = msg.policy; mark("robots", "status");
      break;
    case "event":
      S.events.push(msg.event); S.robots = msg.robots; S.policy = msg.policy || S.policy;
      mark("events", "robots", "status");
      break;
    case "trace":
      addTrace(msg.points, msg.thresholds); mark("traces");
      break;
    case "alerts":
      for (const a of msg.alerts) { S.alerts.set(a.id || `0-${a.t_ns}`, a); S.newAlerts.add(a.id); }
      mark("alerts");
      break;
    case "requests":
      for (const r of msg.requests) S.requests.set(r.id, r);
      mark("requests");
      break;
    case "preferences":
      for (const p of msg.preferences) S.preferences.set(p.id, p);
      mark("preferences");
      break;
    case "swap":
      S.swaps.set(msg.swap.id, msg.swap); mark("swaps");
      break;
    case "gain":
      S.gains.push(msg.gain); mark("gains");
      break;
    case "error":
      notice(`console: ${msg.error}`, "error");
      break;
    default:
      break;
  }
}

function connect() {
  const q = token() ? `?token=${encodeURIComponent(token())}` : "";
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${q}`);
  ws.onopen = () => { S.live = true; mark("status"); };
  ws.onmessage = (ev) => {
    try { onMessage(JSON.parse(ev.data)); } catch (err) { console.error("vigil console: bad update", err); }
  };
  ws.onclose = (ev) => {
    S.live = false;
    if (ev.code === 4401 || ev.code === 4403) notice(`${ev.code === 4401 ? 401 : 403}: ${ev.reason}`, "error");
    mark("status");
    setTimeout(connect, 1000);
  };
  window.vigilSocket = ws;  // for tests and the curious: vigilSocket.send(...)
}

setInterval(() => mark("requests"), 5000);  // claims lapse with time
mark(...ALL);
connect();
