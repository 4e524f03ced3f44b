// Shoal operator UI: one page, no build step, served by the anchor.
// Reads the JSON API, follows /api/events (server-sent events) to stay
// live. Edits are signed in this browser with the operator's own key when
// it holds one (the Keys page; ADR 0015), else made through /api/apply by
// the anchor's operator identity where it keeps one (ADR 0006).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
// Where a page draws. Logged out, a page whose data came back after the
// login form was drawn draws nowhere, not over the form.
const main = () => (me ? $("#main") : document.createElement("div"));
let me = null;          // whoami
let events = null;      // EventSource
let dirty = false;      // an editor holds unsaved text: do not re-render under it
let refreshTimer = null;

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  const text = await r.text();
  try { data = JSON.parse(text); } catch { data = { text }; }
  if (r.status === 401 && path !== "/api/login") { showLogin(); throw new Error("not logged in"); }
  if (!r.ok) { const e = new Error(data.error || r.statusText); e.status = r.status; e.data = data; throw e; }
  return data;
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - t));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}
const badge = (st) => `<span class="state ${esc(st)}">${esc(st)}</span>`;

function route() {
  const h = location.hash.replace(/^#/, "") || "/overview";
  const [path, query] = h.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query || "") };
}

function setActive() {
  const first = route().parts[0] || "overview";
  document.querySelectorAll("#nav a").forEach((a) => {
    const target = a.getAttribute("href").replace("#/", "");
    a.classList.toggle("active", target === first || (first === "node" && target === "nodes") || (first === "app" && target === "apps") || (first === "config" && target === "configs"));
  });
}

// One page is drawn at a time: a render asked for while one runs (the
// hash changed, a live update came) runs after it, once. Two renders that
// interleaved could let the older page, whose data came back last, draw
// over the newer one.
let rendering = null, renderAgain = false;
function render() {
  if (rendering) { renderAgain = true; return rendering; }
  rendering = (async () => {
    try {
      do { renderAgain = false; await renderOnce(); } while (renderAgain);
    } finally { rendering = null; }
  })();
  return rendering;
}

async function renderOnce() {
  if (!me) return;
  setActive();
  const { parts, params } = route();
  const page = parts[0] || "overview";
  const pages = { overview, nodes, node, apps, app: editor, configs, config: editor, artifacts, rollouts, conflicts, keys, security, timeline, demo };
  const f = pages[page];
  if (!f) { main().innerHTML = `<p>No page ${esc(page)}.</p>`; return; }
  try { await f(parts, params); } catch (e) { if (e.message !== "not logged in") main().innerHTML = `<div class="error">${esc(e.message)}</div>`; }
}

function scheduleRefresh() {
  // The editors are not redrawn under the operator: what they show came
  // from the server when opened, and their result notices stay.
  const editing = () => dirty || ["app", "config"].includes(route().parts[0]);
  if (editing()) return;
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => { if (!editing()) render(); }, 150);
}

// ---- login ----------------------------------------------------------------

function showLogin(msg) {
  me = null;
  $("#nav").hidden = true;
  $("#who").textContent = "";
  if (events) { events.close(); events = null; }
  $("#main").innerHTML = `<div class="login">
    <h1>Log in</h1>
    <p class="muted">Paste an operator token (<code>shoal operator token create --name you</code>).</p>
    <form id="login-form"><input id="token" type="password" autocomplete="off" placeholder="shoal-op-…">
    <button class="primary" type="submit">Log in</button></form>
    ${msg ? `<div class="error" id="login-error">${esc(msg)}</div>` : ""}</div>`;
  $("#login-form").onsubmit = async (ev) => {
    ev.preventDefault();
    await login($("#token").value.trim());
  };
}

async function login(token) {
  try {
    await api("POST", "/api/login", { token });
    await start();
  } catch (e) {
    showLogin(e.message);
  }
}

async function start() {
  me = await api("GET", "/api/whoami");
  $("#nav").hidden = false;
  $("#nav-demo").hidden = !me.demo;
  $("#fleet").textContent = `fleet ${me.fleet} · ${me.anchor}`;
  const role = me.role ? ` <span class="muted" id="role">(${esc(me.role)}${me.site ? ` of ${esc(me.site)}` : ""})</span>` : "";
  $("#who").innerHTML = `${esc(me.operator)}${role} · <a href="#" id="logout">log out</a>`;
  $("#logout").onclick = async (ev) => { ev.preventDefault(); await api("POST", "/api/logout"); showLogin(); };
  if (!events) {
    events = new EventSource("/api/events");
    events.onopen = () => $("#live").classList.add("on");
    events.onerror = () => $("#live").classList.remove("on");
    events.addEventListener("update", () => scheduleRefresh());
  }
  await render();
}

// ---- pages ----------------------------------------------------------------

async function overview() {
  const o = await api("GET", "/api/overview");
  $("#conflict-count").textContent = o.conflicts || "";
  const st = o.states || {};
  const offline = await api("GET", "/api/nodes?state=offline&per_page=20");
  main().innerHTML = `<h1>Fleet overview</h1>
  <div class="cards">
    <div class="card"><b id="total-nodes">${o.nodes}</b>nodes</div>
    <div class="card"><b id="total-connected">${o.connected}</b>connected</div>
    <div class="card"><b id="total-offline">${(st.offline || 0) + (st.unknown || 0)}</b>cut off</div>
    <div class="card"><b>${st.failed || 0}</b>failing</div>
    <div class="card"><b>${st.behind || 0}</b>behind</div>
    <div class="card"><b>${o.conflicts}</b><a href="#/conflicts">conflicts</a></div>
    <div class="card"><b>${o.security_events}</b><a href="#/security">security events</a></div>
  </div>
  <h2>Sites</h2>
  <table id="sites"><thead><tr><th>Site</th><th>Nodes</th><th>Connected</th><th>Cut off</th><th>Since</th><th>Failing</th><th>Behind</th><th>Most behind</th></tr></thead><tbody>
  ${o.sites.map((s) => `<tr data-site="${esc(s.name)}"><td><a href="#/nodes?site=${encodeURIComponent(s.name)}">${esc(s.name)}</a>${s.has_overrides ? ' <span class="muted">(overrides)</span>' : ""}</td>
    <td>${s.nodes}</td><td>${s.connected}</td><td>${s.offline ? `<span class="state offline">${s.offline}</span>` : 0}</td>
    <td>${s.offline_since ? ago(s.offline_since) : "-"}</td><td>${s.failed}</td><td>${s.behind}</td><td>${s.max_behind ? s.max_behind + " changes" : "-"}</td></tr>`).join("")}
  </tbody></table>
  <h2>Cut off</h2>
  ${offline.total ? `<table><thead><tr><th>Node</th><th>Site</th><th>Cut off since</th><th>Behind</th></tr></thead><tbody>${offline.items.map((n) =>
    `<tr><td><a href="#/node/${encodeURIComponent(n.name)}">${esc(n.name)}</a></td><td>${esc(n.site)}</td><td>${n.offline_since ? ago(n.offline_since) : "never seen"}</td><td>${n.behind}</td></tr>`).join("")}</tbody></table>
    ${offline.total > offline.items.length ? `<p><a href="#/nodes?state=offline">all ${offline.total}</a></p>` : ""}` : `<p class="muted">No node is cut off.</p>`}`;
}

async function nodes(_parts, params) {
  const q = new URLSearchParams(params);
  if (!q.get("per_page")) q.set("per_page", "50");
  const [list, sites] = await Promise.all([api("GET", "/api/nodes?" + q), api("GET", "/api/sites")]);
  const sel = (name, opts) => `<select id="f-${name}"><option value="">any ${name}</option>${opts.map((o) => `<option ${params.get(name) === o ? "selected" : ""}>${esc(o)}</option>`).join("")}</select>`;
  main().innerHTML = `<h1>Nodes <span class="muted" id="node-total">${list.total}</span></h1>
  <form class="filters" id="filters">
    <input id="f-q" placeholder="search name" value="${esc(params.get("q") || "")}">
    ${sel("site", sites.items.map((s) => s.name))}
    ${sel("state", ["ok", "behind", "failed", "offline", "unknown"])}
    <input id="f-label" placeholder="label key=value" value="${esc(params.get("label") || "")}">
    <button type="submit">Filter</button>
  </form>
  <table id="nodes"><thead><tr><th>Node</th><th>Site</th><th>State</th><th>Last contact</th><th>Behind</th><th>Workloads</th></tr></thead><tbody>
  ${list.items.map((n) => `<tr data-node="${esc(n.name)}" data-state="${esc(n.state)}"><td><a href="#/node/${encodeURIComponent(n.name)}">${esc(n.name)}</a></td><td>${esc(n.site)}</td><td>${badge(n.state)}</td>
    <td>${n.connected ? "connected" : (n.offline_since ? "cut off " + ago(n.offline_since) : ago(n.last_contact))}</td><td>${n.behind || "-"}</td>
    <td>${Object.entries(n.workloads).map(([a, w]) => `${esc(a)} ${badge(w.state)}`).join(" ")}</td></tr>`).join("")}
  </tbody></table>
  <div class="pager"><button id="prev" ${list.page <= 1 ? "disabled" : ""}>‹ prev</button> page ${list.page} of ${list.pages} <button id="next" ${list.page >= list.pages ? "disabled" : ""}>next ›</button></div>`;
  const go = (page) => {
    const p = new URLSearchParams();
    for (const k of ["q", "site", "state", "label"]) { const v = $("#f-" + k).value.trim(); if (v) p.set(k, v); }
    if (page > 1) p.set("page", page);
    location.hash = "#/nodes?" + p;
  };
  $("#filters").onsubmit = (ev) => { ev.preventDefault(); go(1); };
  $("#f-site").onchange = $("#f-state").onchange = () => go(1);
  $("#prev").onclick = () => go(list.page - 1);
  $("#next").onclick = () => go(list.page + 1);
}

async function node(parts, params) {
  const d = await api("GET", "/api/nodes/" + encodeURIComponent(parts[1]));
  const n = d.node;
  const up = n.uplink;
  main().innerHTML = `<h1>Node ${esc(n.name)} <span id="node-state">${badge(n.state)}</span></h1>
  <table><tbody>
   <tr><th>Site</th><td><a href="#/nodes?site=${encodeURIComponent(n.site)}">${esc(n.site)}</a></td></tr>
   <tr><th>Labels</th><td>${Object.entries(n.labels).map(([k, v]) => `<code>${esc(k)}=${esc(v)}</code>`).join(" ") || "-"}</td></tr>
   <tr><th>Connection</th><td>${n.connected ? "connected" : "cut off" + (n.offline_since ? " since " + new Date(n.offline_since * 1000).toLocaleString() + " (" + ago(n.offline_since) + ")" : "")}; last contact ${ago(n.last_contact)}</td></tr>
   <tr><th>Desired state</th><td>${n.behind ? `${n.behind} changes behind${n.behind_since ? ", the oldest from " + ago(n.behind_since) : ""}` : "applied"}</td></tr>
   <tr><th>Last reconcile</th><td>${ago(n.reconciled_at)}</td></tr>
   <tr><th>Peers</th><td>${n.peers.map(esc).join(", ") || "-"}</td></tr>
   <tr><th>Data uplink</th><td id="uplink">${up ? `<span class="state behind">backlog</span> ${up.records} records waiting, the oldest from ${esc(new Date(up.oldest_ms).toLocaleString())} (${ago(up.oldest_ms / 1000)})${up.summarised ? `; ${up.summarised} readings summarised by its quota` : ""}` : "keeping up"}</td></tr>
  </tbody></table>
  <h2>Data</h2>
  <div class="filters"><label>Series <select id="series-pick"></select></label>
   <label>Range <select id="series-range">${["1m", "5m", "1h", "6h", "1d", "7d", "30d"].map((r) => `<option${(params.get("range") || "1h") === r ? " selected" : ""}>${r}</option>`).join("")}</select></label>
   <span class="legend"><span class="key line"></span>readings <span class="key summary"></span>summarised by the node's quota <span class="key gap"></span>no data</span></div>
  <div id="chart" class="chart muted">no data from this node yet</div>
  <h2>Devices</h2>
  <table id="devices"><thead><tr><th>Device</th><th>State</th><th>Reported values</th><th>Setpoints</th><th>Error</th></tr></thead><tbody>
  ${Object.entries(d.devices).map(([name, v]) => `<tr data-device="${esc(name)}"><td>${esc(name)}</td><td>${badge(v.online === true ? "online" : v.online === false ? "offline" : "unknown")}</td>
    <td>${Object.entries(v.values || {}).map(([r, x]) => `<code>${esc(r)}=${esc(JSON.stringify(x))}</code>`).join(" ") || "-"}</td>
    <td>${Object.entries(v.setpoints || {}).map(([r, sp]) => `<code>${esc(r)}=${esc(JSON.stringify(sp.desired))}</code> ${sp.applied ? "applied" : `<span class="state failed">${esc(sp.error || "pending")}</span>`}`).join("<br>") || "-"}</td>
    <td>${esc(v.error || "")}</td></tr>`).join("") || `<tr><td colspan=5 class="muted">none</td></tr>`}
  </tbody></table>
  <h2>Workloads</h2>
  <table id="workloads"><thead><tr><th>App</th><th>State</th><th>Version</th><th>Restarts</th><th>Reason</th></tr></thead><tbody>
  ${Object.entries(n.workloads).map(([a, w]) => `<tr><td><a href="#/app/${encodeURIComponent(a)}">${esc(a)}</a></td><td>${badge(w.state)}</td><td>${esc(w.version || "-")}</td><td>${w.restarts}</td><td>${esc(w.reason || "")}</td></tr>`).join("") || `<tr><td colspan=5 class="muted">none reported</td></tr>`}
  </tbody></table>
  <h2>Desired here</h2>
  <p>${d.desired.map((w) => `<code>${esc(w.app)}${w.spec.version ? "@" + esc(w.spec.version) : ""}</code>`).join(" ") || '<span class="muted">nothing</span>'}</p>
  <h2>Recent events</h2>
  ${timelineTable(d.timeline)}`;
  await drawSeries(n.name, params);
}

const RANGES = { "1m": 60e3, "5m": 300e3, "1h": 3600e3, "6h": 6 * 3600e3, "1d": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };

// The node page's chart: one series over a range, ~600 steps.
async function drawSeries(name, params) {
  const list = (await api("GET", `/api/nodes/${encodeURIComponent(name)}/series`)).items;
  const pick = $("#series-pick");
  if (!pick || !list.length) return;
  const chosen = list.includes(params.get("series")) ? params.get("series") : list[0];
  pick.innerHTML = list.map((x) => `<option${x === chosen ? " selected" : ""}>${esc(x)}</option>`).join("");
  const go = () => {
    const q = new URLSearchParams({ series: pick.value, range: $("#series-range").value });
    location.hash = `#/node/${encodeURIComponent(name)}?${q}`;
  };
  pick.onchange = go;
  $("#series-range").onchange = go;
  const span = RANGES[params.get("range") || "1h"] || RANGES["1h"];
  const to = Date.now();
  const from = to - span;
  const step = Math.max(500, Math.ceil(span / 600 / 500) * 500);
  const d = await api("GET", `/api/nodes/${encodeURIComponent(name)}/series/${chosen.split("/").map(encodeURIComponent).join("/")}?from=${from}&to=${to}&step=${step}`);
  $("#chart").innerHTML = chartSvg(d);
  $("#chart").classList.remove("muted");
}

// An SVG of a series answer: the mean per step as a line, broken at gaps;
// each summary of dropped readings as a band (min to max) with its mean;
// each gap nothing covers as a hatched stretch marked "no data".
function chartSvg(d, width = 920, height = 240) {
  const L = 60, R = 12, T = 12, B = 26;
  const x = (t) => L + ((t - d.from) / Math.max(1, d.to - d.from)) * (width - L - R);
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
  const ys = [];
  d.points.forEach((p) => { [num(p.v), num(p.min), num(p.max)].forEach((v) => v !== null && ys.push(v)); });
  d.summaries.forEach((s) => { [num(s.summary.min), num(s.summary.max)].forEach((v) => v !== null && ys.push(v)); });
  if (!ys.length) return `<p class="muted">${d.records} records, none numeric (${esc(d.series)})</p>`;
  let lo = Math.min(...ys), hi = Math.max(...ys);
  if (lo === hi) { lo -= 1; hi += 1; }
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (height - T - B);
  const out = [`<svg class="series" viewBox="0 0 ${width} ${height}" width="${width}" height="${height}" role="img" aria-label="${esc(d.series)}">`,
    `<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#cf222e" stroke-width="1.5"/></pattern></defs>`];
  const clip = (t) => Math.max(L, Math.min(width - R, x(t)));
  for (const g of d.gaps) {
    if (g.summarised) continue;
    const a = clip(g.from), b = clip(g.to);
    out.push(`<rect class="gap" x="${a}" y="${T}" width="${Math.max(1, b - a)}" height="${height - T - B}" fill="url(#hatch)" opacity=".35"><title>no data ${esc(new Date(g.from).toLocaleString())} – ${esc(new Date(g.to).toLocaleString())}</title></rect>`);
    out.push(`<text class="gap-label" x="${(a + b) / 2}" y="${T + 14}" text-anchor="middle">no data</text>`);
  }
  for (const s of d.summaries) {
    const m = s.summary, a = clip(m.first_ms ?? s.t), b = clip(m.last_ms ?? s.t);
    if (num(m.min) === null) continue;
    // At least 10 px high, so a flat stretch still shows.
    const top = Math.min(y(m.max), y(m.mean) - 5), h = Math.max(10, y(m.min) - y(m.max));
    out.push(`<rect class="summary" x="${a}" y="${top}" width="${Math.max(2, b - a)}" height="${h}"><title>${m.count} readings summarised: min ${m.min}, mean ${m.mean}, max ${m.max}</title></rect>`);
    out.push(`<line class="summary-mean" x1="${a}" x2="${Math.max(a + 2, b)}" y1="${y(m.mean)}" y2="${y(m.mean)}"/>`);
  }
  let path = "", prev = null;
  for (const p of d.points) {
    const v = num(p.v);
    if (v === null) { prev = null; continue; }
    // A gap starts between the last point and this one: the line breaks.
    const broken = prev !== null && d.gaps.some((g) => g.from >= prev && g.from < p.t);
    path += `${prev === null || broken ? "M" : "L"}${x(p.t).toFixed(1)},${y(v).toFixed(1)} `;
    prev = p.t;
  }
  out.push(`<path class="line" d="${path}"/>`);
  out.push(`<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${height - B}"/><line class="axis" x1="${L}" x2="${width - R}" y1="${height - B}" y2="${height - B}"/>`);
  out.push(`<text x="${L - 6}" y="${T + 4}" text-anchor="end">${esc(hi.toPrecision(4))}</text><text x="${L - 6}" y="${height - B}" text-anchor="end">${esc(lo.toPrecision(4))}</text>`);
  out.push(`<text x="${L}" y="${height - 6}">${esc(new Date(d.from).toLocaleString())}</text><text x="${width - R}" y="${height - 6}" text-anchor="end">${esc(new Date(d.to).toLocaleString())}</text>`);
  out.push(`</svg><p class="muted">${esc(d.series)}: ${d.records} records, ${d.summaries.length} summaries, ${d.gaps.length} gaps${d.truncated ? " (range truncated)" : ""}</p>`);
  return out.join("");
}

async function apps() {
  const d = await api("GET", "/api/apps");
  main().innerHTML = `<h1>Apps <button id="new-app">New app</button></h1>
  <table id="apps"><thead><tr><th>App</th><th>Version</th><th>Runtime</th><th>Placement</th><th>On nodes</th></tr></thead><tbody>
  ${d.items.map((a) => `<tr data-app="${esc(a.name)}"><td><a href="#/app/${encodeURIComponent(a.name)}">${esc(a.name)}</a></td><td>${esc(a.spec.version || "-")}</td><td>${esc(a.spec.runtime || (a.spec.kube ? "kube" : "native"))}</td>
   <td>${a.spec.replicas ? a.spec.replicas + " replicas" : "every match"} ${Object.entries(a.spec.selector || {}).map(([k, v]) => `<code>${esc(k)}=${esc(v)}</code>`).join(" ")}</td>
   <td>${Object.entries(a.workloads || {}).map(([s, n]) => `${n} ${badge(s)}`).join(" ") || "-"}</td></tr>`).join("") || `<tr><td colspan=5 class="muted">no apps</td></tr>`}
  </tbody></table>`;
  $("#new-app").onclick = () => { location.hash = "#/app/new"; };
}

async function configs() {
  const d = await api("GET", "/api/configs");
  main().innerHTML = `<h1>Configs <button id="new-config">New config</button></h1>
  <table id="configs"><thead><tr><th>Config</th><th>Keys</th></tr></thead><tbody>
  ${d.items.map((c) => `<tr data-config="${esc(c.name)}"><td><a href="#/config/${encodeURIComponent(c.name)}">${esc(c.name)}</a></td><td>${Object.keys(c.spec.data || {}).map((k) => `<code>${esc(k)}</code>`).join(" ")}</td></tr>`).join("") || `<tr><td colspan=2 class="muted">no configs</td></tr>`}
  </tbody></table>`;
  $("#new-config").onclick = () => { location.hash = "#/config/new"; };
}

// A size for people (1000-based units, as disks are sold; as the CLI).
function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let v = n, u = 0;
  while (v >= 1000 && u + 1 < units.length) { v /= 1000; u++; }
  return u === 0 ? `${n} B` : `${v.toFixed(1)} ${units[u]}`;
}

// Artifacts: each with, per node that needs it, how much it holds and from
// whom it came (from the nodes' reports); an upload straight to the anchor.
async function artifacts() {
  const d = await api("GET", "/api/get/artifacts?output=json");
  const held = (n, r) => {
    const from = Object.entries(r.from || {}).map(([p, b]) => `${p} ${bytes(b)}`).join(", ");
    const pct = Math.floor((100 * r.held) / Math.max(1, r.size));
    const state = r.error ? `<span class="state failed">${esc(r.error)}</span>`
      : `<progress max="100" value="${pct}"></progress> ${pct === 100 ? "whole" : pct + "%"}`;
    return `<div class="held" data-node="${esc(n)}" title="${esc(from ? "from " + from : "")}">${esc(n)} ${state}${from ? ` <span class="muted">from ${esc(from)}</span>` : ""}</div>`;
  };
  const rows = Object.entries(d).map(([name, a]) => `<tr data-artifact="${esc(name)}"><td>${esc(name)}</td><td>${bytes(a.size)}</td><td><code title="${esc(a.hash)}">${esc(a.hash.slice(0, 12))}</code></td><td>${esc(a.mediaType || "-")}</td>
    <td>${Object.entries(a.nodes || {}).map(([n, r]) => held(n, r)).join("") || '<span class="muted">no node needs it yet</span>'}</td></tr>`).join("");
  main().innerHTML = `<h1>Artifacts</h1>
  <form id="upload"><input type="file" id="up-file"> <input id="up-name" placeholder="name, e.g. model-v4"> <button>Upload</button> <span id="up-status"></span></form>
  <table id="artifacts"><thead><tr><th>Artifact</th><th>Size</th><th>Hash</th><th>Type</th><th>Nodes</th></tr></thead><tbody>
  ${rows || '<tr><td colspan=5 class="muted">no artifacts</td></tr>'}</tbody></table>`;
  $("#upload").onsubmit = (ev) => {
    ev.preventDefault();
    const file = $("#up-file").files[0], name = $("#up-name").value.trim();
    const status = (html) => { $("#up-status").innerHTML = html; };
    if (!file || !name) { status(`<span class="error">choose a file and a name</span>`); return; }
    // Not redrawn under the upload: its progress stays in view.
    dirty = true;
    const q = file.type && file.type.includes("/") ? `?mediaType=${encodeURIComponent(file.type)}` : "";
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", `/api/artifacts/${encodeURIComponent(name)}${q}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) status(`uploading ${Math.floor((100 * e.loaded) / e.total)}%`); };
    xhr.onload = () => {
      dirty = false;
      let r = {};
      try { r = JSON.parse(xhr.responseText); } catch { r = {}; }
      if (xhr.status === 200) {
        status(`<span class="notice" id="uploaded">uploaded ${esc(r.name)}: ${bytes(r.size)}, ${esc(String(r.hash).slice(0, 12))}</span>`);
        setTimeout(() => { if (route().parts[0] === "artifacts") render(); }, 1500);
      } else status(`<span class="error">${esc(r.error || xhr.statusText)}</span>`);
    };
    xhr.onerror = () => { dirty = false; status(`<span class="error">the upload broke off</span>`); };
    xhr.send(file);
  };
}

const TEMPLATES = {
  app: `apiVersion: shoal.dev/v1\nkind: App\nmetadata:\n  name: my-app\nspec:\n  version: v1\n  selector: {}\n  native:\n    command: ["/bin/sleep", "infinity"]\n`,
  config: `apiVersion: shoal.dev/v1\nkind: Config\nmetadata:\n  name: my-config\nspec:\n  data:\n    key: value\n`,
};

// The line of a dotted field path in YAML text (best effort: follows the keys in order).
function lineOf(text, field) {
  if (!field) return -1;
  const lines = text.split("\n");
  let from = 0, found = -1;
  for (const seg of field.split(".")) {
    const key = seg.replace(/\[\d+\]$/, "");
    const re = new RegExp("^\\s*(- )?[\"']?" + key.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + "[\"']?\\s*:");
    let hit = -1;
    for (let i = from; i < lines.length; i++) if (re.test(lines[i])) { hit = i; break; }
    if (hit < 0) break;
    found = hit; from = hit + 1;
  }
  return found;
}

async function editor(parts) {
  const kind = parts[0];             // app | config
  const name = parts[1];
  const isNew = name === "new";
  let yaml = TEMPLATES[kind];
  if (!isNew) yaml = (await api("GET", `/api/${kind}s/${encodeURIComponent(name)}`)).yaml;
  dirty = false;
  main().innerHTML = `<h1>${kind === "app" ? "App" : "Config"} ${isNew ? "(new)" : esc(name)}</h1>
  <p class="muted">Edit the manifest as with <code>shoal apply</code>; it is validated before anything is written.</p>
  <div class="editor"><div class="gutter" id="gutter"></div><textarea id="yaml" spellcheck="false"></textarea></div>
  <div id="result"></div>
  <p><button class="primary" id="save">Apply</button> <button id="validate">Validate</button> ${isNew ? "" : `<button class="danger" id="delete">Delete ${esc(kind)}</button>`} <a href="#/${kind}s">back</a></p>`;
  const ta = $("#yaml");
  ta.value = yaml;
  const gutter = (bad) => {
    const n = ta.value.split("\n").length;
    $("#gutter").innerHTML = Array.from({ length: n }, (_, i) => i === bad ? `<span class="bad" id="bad-line">${i + 1}</span>` : String(i + 1)).join("\n");
  };
  gutter(-1);
  ta.oninput = () => { dirty = true; gutter(-1); };
  const show = (e) => {
    const line = lineOf(ta.value, e.data && e.data.field);
    gutter(line);
    $("#result").innerHTML = `<div class="error" id="validation-error">${e.data && e.data.field ? `<span class="field">${esc(e.data.field)}</span>${line >= 0 ? ` (line ${line + 1})` : ""}: ` : ""}${esc(e.message)}</div>`;
  };
  const send = async (dry) => {
    const files = [{ name: `${kind}/${isNew ? "new" : name}`, text: ta.value }];
    try {
      const r = dry ? await api("POST", "/api/apply", { files, dry_run: true })
        : await edit({ apply: { files } }, () => api("POST", "/api/apply", { files }));
      gutter(-1);
      if (dry) { $("#result").innerHTML = `<div class="notice">Valid: ${r.valid.map(esc).join(", ")}</div>`; return; }
      if (!r) return;
      dirty = false;
      if (r.signed) { $("#result").innerHTML = `<div class="notice" id="applied">${signedText(r)}</div>`; return; }
      const changed = r.applied.map((a) => `${a.kind.toLowerCase()}/${a.name}: ${a.fields ? a.fields + " fields written" : "unchanged"}`);
      $("#result").innerHTML = `<div class="notice" id="applied">Applied: ${changed.map(esc).join(", ")}</div>`;
      const first = r.applied[0];
      if (isNew && first) location.hash = `#/${first.kind.toLowerCase()}/${encodeURIComponent(first.name)}`;
    } catch (e) { if (e.data) show(e); else throw e; }
  };
  $("#save").onclick = () => send(false);
  $("#validate").onclick = () => send(true);
  if (!isNew) $("#delete").onclick = async () => {
    if (!confirm(`Delete ${kind} ${name} from every node?`)) return;
    try {
      const r = await edit({ delete: { kind, name } }, () => api("DELETE", `/api/${kind}s/${encodeURIComponent(name)}`));
      if (!r) return;
    } catch (e) { if (e.data) { show(e); return; } throw e; }
    dirty = false;
    location.hash = `#/${kind}s`;
  };
}

// Staged rollouts (ADR 0011): per wave, how many nodes are updated,
// healthy, failed and unreachable, why nodes failed, every decision with
// its author; pause, resume and abort.
async function rollouts() {
  const d = await api("GET", "/api/rollouts");
  const when = (t) => new Date(t * 1000).toISOString().replace(".000Z", "Z");
  const one = (r) => {
    const over = r.phase === "done" || r.phase === "aborted";
    const fails = r.waves.flatMap((w, i) => Object.entries(w.failures || {}).map(([n, why]) => `<li data-failed="${esc(n)}">wave ${i}: <a href="#/node/${encodeURIComponent(n)}">${esc(n)}</a>: ${esc(why)}</li>`));
    return `<section class="rollout" data-app="${esc(r.app)}" data-phase="${esc(r.phase)}">
    <h2><a href="#/app/${encodeURIComponent(r.app)}">${esc(r.app)}</a> ${esc(r.version || r.revision)} <span class="muted">from ${esc(r.from_version || "-")}</span> <span class="state phase ${r.phase === "rolling" || r.phase === "done" ? "running" : r.phase === "paused" ? "pending" : "failed"}">${esc(r.phase)}</span></h2>
    ${r.waiting_for ? `<p class="muted">${esc(r.waiting_for)}</p>` : ""}
    <table class="waves"><thead><tr><th>Wave</th><th>Nodes</th><th>Open</th><th>Updated</th><th>Healthy</th><th>Failed</th><th>Unreachable</th></tr></thead><tbody>
    ${r.waves.map((w, i) => `<tr data-wave="${i}"><td>${i}</td><td>${w.nodes}</td><td>${w.open ? "yes" : "no"}</td><td>${w.updated}</td><td>${w.healthy}</td><td>${w.failed}</td><td>${w.unreachable}</td></tr>`).join("")}
    </tbody></table>
    ${fails.length ? `<h3>Failures</h3><ul class="failures">${fails.join("")}</ul>` : ""}
    <h3>Decisions</h3>
    <table class="decisions"><tbody>${r.decisions.map(([what, m]) => `<tr><td>${when(m.at)}</td><td>${esc(what)}</td><td>${esc(m.by)}</td><td>${esc(m.reason || "")}</td></tr>`).join("") || `<tr><td class="muted">none yet: wave 0 is open</td></tr>`}</tbody></table>
    <p>${over ? "" : `${r.phase === "paused" || r.phase === "halted" ? `<button data-action="resume">Resume</button>` : `<button data-action="pause">Pause</button>`} <button class="danger" data-action="abort">Abort: every node back to ${esc(r.from_version || "the version before")}</button>`}
    <span class="result"></span></p></section>`;
  };
  main().innerHTML = `<h1>Rollouts</h1>${d.rollouts.map(one).join("") || `<p class="muted">No rollout. An App with <code>spec.rollout</code> starts one when its spec changes.</p>`}`;
  document.querySelectorAll(".rollout button[data-action]").forEach((b) => {
    b.onclick = async () => {
      const sec = b.closest(".rollout"), action = b.dataset.action, app = sec.dataset.app;
      if (action === "abort" && !confirm(`Abort the rollout of ${app}? Every node goes back to the version before.`)) return;
      try {
        const r = await edit({ rollout: { app, action } }, () => api("POST", `/api/rollouts/${encodeURIComponent(app)}/${action}`));
        if (!r) return;
        sec.querySelector(".result").innerHTML = `<span class="notice">${r.signed ? signedText(r) : esc(r.result)}</span>`;
        setTimeout(() => { if (route().parts[0] === "rollouts") render(); }, 300);
      } catch (e) { sec.querySelector(".result").innerHTML = `<span class="error">${esc(e.message)}</span>`; }
    };
  });
}

async function conflicts() {
  const d = await api("GET", "/api/conflicts");
  $("#conflict-count").textContent = d.items.length || "";
  main().innerHTML = `<h1>Conflicts</h1>
  <p class="muted">Concurrent edits of one field (an operator and a field engineer while a site was cut off). Every copy shows the same winner; keep one value to settle it everywhere.</p>
  ${d.items.length ? d.items.map((c, i) => `<div class="site-box conflict" data-doc="${esc(c.doc)}" data-field="${esc(c.field)}"><b>${esc(c.doc)}</b> · <code>${esc(c.field)}</code>
   <table><thead><tr><th>Value</th><th>Written by</th><th></th><th></th></tr></thead><tbody>
   ${c.values.map((v, j) => `<tr><td class="${v.winner ? "winner" : ""}"><code>${esc(JSON.stringify(v.value))}</code></td><td>${esc(v.writer)} <span class="muted">${esc(v.role || "")}</span>${v.message ? `<br><span class="muted">${esc(v.message)}</span>` : ""}</td>
    <td>${v.winner ? "shown now" : ""}</td><td><button class="keep" data-i="${i}" data-j="${j}">Keep this</button></td></tr>`).join("")}
   </tbody></table></div>`).join("") : `<p class="muted" id="no-conflicts">No conflicts.</p>`}`;
  document.querySelectorAll("button.keep").forEach((b) => {
    b.onclick = async () => {
      const c = d.items[+b.dataset.i];
      const resolve = { doc: c.doc, field: c.field, value: c.values[+b.dataset.j].value };
      try {
        if (!await edit({ resolve }, () => api("POST", "/api/conflicts/resolve", resolve))) return;
      } catch (e) { main().insertAdjacentHTML("afterbegin", `<div class="error" id="resolve-error">${esc(e.message)}</div>`); return; }
      await render();
    };
  });
}

function timelineTable(items) {
  const by = (e) => [e.who && `by ${esc(e.who)}`, e.from && `from ${esc(e.from)}`].filter(Boolean).join(" ");
  return `<table class="timeline"><thead><tr><th>When</th><th>What</th><th>Subject</th><th></th><th>Who</th><th>Anchor</th></tr></thead><tbody>
  ${items.map((e) => `<tr data-kind="${esc(e.kind)}"><td title="${new Date(e.at * 1000).toLocaleString()}">${ago(e.at)}</td><td>${esc(e.kind)}</td><td>${esc(e.subject)}</td><td>${esc(e.text)}</td><td class="muted">${by(e)}</td><td class="muted">${esc(e.anchor || "")}</td></tr>`).join("") || `<tr><td colspan=6 class="muted">nothing yet</td></tr>`}</tbody></table>`;
}

function pager(d, base) {
  return `<div class="pager"><a href="${base}page=${d.page - 1}" ${d.page <= 1 ? "hidden" : ""}>‹ newer</a> page ${d.page} of ${d.pages} <a href="${base}page=${d.page + 1}" ${d.page >= d.pages ? "hidden" : ""}>older ›</a></div>`;
}

async function security(_parts, params) {
  const d = await api("GET", "/api/security?" + params);
  main().innerHTML = `<h1>Security events <span class="muted">${d.total_since_start} since start</span></h1>
  <table id="security"><thead><tr><th>When</th><th>Source</th><th>What was refused</th><th>Anchor</th></tr></thead><tbody>
  ${d.items.map((e) => `<tr><td>${ago(e.at)}</td><td>${esc(e.source)}</td><td>${esc(e.reason)}</td><td class="muted">${esc(e.anchor || "")}</td></tr>`).join("") || `<tr><td colspan=4 class="muted">none</td></tr>`}</tbody></table>
  ${pager(d, "#/security?")}`;
}

async function timeline(_parts, params) {
  const d = await api("GET", "/api/timeline?" + params);
  main().innerHTML = `<h1>Timeline</h1><p class="muted">Partitions, merges, edits and conflicts, newest first, as every anchor of the fleet recorded them (replicas exchange their entries).</p>${timelineTable(d.items)}${pager(d, "#/timeline?")}`;
}

async function demo() {
  const d = await api("GET", "/api/demo");
  if (dirty) return;
  main().innerHTML = `<h1>Demo</h1>
  <p class="muted">Each site reaches the anchor over its own link. Cut one off: its nodes keep running what they have, stay connected to each other, and their site engineer can still edit the site through a node. Meanwhile edit as operator — fleet-wide (the site's own override wins at that site) or the same site override (a real conflict). Restore the link and watch the merge on the Timeline and Conflicts pages. The anchor notices a silent link within about a minute (QUIC idle timeout).</p>
  ${d.sites.map((s) => `<div class="site-box ${s.cut ? "cut" : ""}" data-site="${esc(s.name)}"><b>site ${esc(s.name)}</b> — link ${s.cut ? "<b>cut</b>" : "up"}
    <button class="${s.cut ? "primary" : "danger"} toggle" data-site="${esc(s.name)}" data-cut="${s.cut}">${s.cut ? "Restore link" : "Cut site off"}</button>
    <form class="site-edit filters" data-site="${esc(s.name)}" style="margin-top:.5em">as ${esc(s.engineer || "site engineer")}, at the site: message = <input name="value" placeholder="Hello from ${esc(s.name)}"> <button type="submit">Edit at site</button></form></div>`).join("")}
  <form id="operator-edit" class="filters">as operator, <select name="scope"><option value="">fleet-wide</option>${d.sites.map((s) => `<option value="${esc(s.name)}">site ${esc(s.name)} override</option>`).join("")}</select>: message = <input name="value" placeholder="Hello from the operator"> <button type="submit" class="primary">Apply</button></form>
  <div id="demo-result"></div>
  <h2>The sample app on each node</h2>
  <table id="demo-apps"><thead><tr><th>Node</th><th>Site</th><th>Shows</th><th>Running</th><th></th></tr></thead><tbody>
  ${d.apps.map((a) => `<tr data-node="${esc(a.node)}"><td><a href="#/node/${encodeURIComponent(a.node)}">${esc(a.node)}</a></td><td>${esc(a.site)}</td><td class="message">${esc(a.message ?? "(not running)")}</td><td>${a.running_s ?? "-"} s</td><td>${a.url ? `<a href="${esc(a.url)}" target="_blank">open</a>` : ""}</td></tr>`).join("")}
  </tbody></table>`;
  document.querySelectorAll("button.toggle").forEach((b) => {
    b.onclick = async () => { await api("POST", `/api/demo/sites/${encodeURIComponent(b.dataset.site)}/${b.dataset.cut === "true" ? "restore" : "cut"}`); await render(); };
  });
  const result = (html) => { $("#demo-result").innerHTML = html; };
  document.querySelectorAll("form.site-edit").forEach((f) => {
    f.querySelector("input").oninput = () => { dirty = true; };
    f.onsubmit = async (ev) => {
      ev.preventDefault();
      dirty = false;
      try {
        await api("POST", `/api/demo/sites/${encodeURIComponent(f.dataset.site)}/edit`, { config: "greeting", key: "message", value: f.value.value });
        result(`<div class="notice">Site ${esc(f.dataset.site)} edited through its node's site API.</div>`);
      } catch (e) { result(`<div class="error">${esc(e.message)}</div>`); }
    };
  });
  const op = $("#operator-edit");
  op.querySelector("input").oninput = op.scope.onchange = () => { dirty = true; };
  op.onsubmit = async (ev) => {
    ev.preventDefault();
    dirty = false;
    const v = JSON.stringify(op.value.value), site = op.scope.value;
    const text = site
      ? `apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: { name: ${JSON.stringify(site)} }\nspec:\n  configs: { greeting: { data: { message: ${v} } } }\n`
      : `apiVersion: shoal.dev/v1\nkind: Config\nmetadata: { name: greeting }\nspec:\n  data: { message: ${v} }\n`;
    const files = [{ name: "demo", text }];
    try {
      const r = await edit({ apply: { files } }, () => api("POST", "/api/apply", { files }));
      if (r) result(`<div class="notice">${r.signed ? signedText(r) : "Applied as operator."}</div>`);
    }
    catch (e) { result(`<div class="error">${esc(e.message)}</div>`); }
  };
}

// ---- operators' own keys (ADR 0015) -----------------------------------------
// The browser holds the operator's Ed25519 key: made by WebCrypto, not
// extractable, kept in IndexedDB. The anchor prepares an edit: the fields
// to write and the unsigned change that writes them as this key. The page
// decodes the change with the official Automerge, checks that it writes
// exactly the fields it shows, shows them, and signs it here; the anchor
// checks the signature like any synced change and cannot make one itself.

const KEY_DB = "shoal-keys";
function idb(mode, f) {
  return new Promise((ok, fail) => {
    const open = indexedDB.open(KEY_DB, 1);
    open.onupgradeneeded = () => open.result.createObjectStore("keys");
    open.onerror = () => fail(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction("keys", mode);
      const req = f(tx.objectStore("keys"));
      tx.oncomplete = () => { open.result.close(); ok(req.result); };
      tx.onerror = () => { open.result.close(); fail(tx.error); };
    };
  });
}
// One key per anchor, fleet and login (people sharing a browser keep theirs
// apart).
const keySlot = () => `${location.origin} ${me.fleet} ${me.operator}`;
const loadKey = () => idb("readonly", (st) => st.get(keySlot())).catch(() => undefined);
const saveKey = (rec) => idb("readwrite", (st) => st.put(rec, keySlot()));
const forgetKey = () => idb("readwrite", (st) => st.delete(keySlot()));

const hex = (b) => Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, "0")).join("");
const unhex = (h) => Uint8Array.from(h.match(/../g) || [], (x) => parseInt(x, 16));
const unb64 = (t) => Uint8Array.from(atob(t), (c) => c.charCodeAt(0));
const fingerprint = (h) => h.slice(0, 24).match(/..../g).join(" ");
const utf8 = (t) => new TextEncoder().encode(t);
function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
function be(n, bytes) {
  const b = new Uint8Array(bytes);
  for (let i = bytes - 1; i >= 0; i--) { b[i] = n & 0xff; n = Math.floor(n / 256); }
  return b;
}

async function enrollKey(code) {
  if (!window.crypto || !crypto.subtle) throw new Error("This page is not a secure context (HTTPS): the browser offers no keys here.");
  const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
  const key = hex(await crypto.subtle.exportKey("raw", pair.publicKey));
  // Kept before it is sent: the code binds to this key, and a reload must
  // not lose it.
  const rec = { privateKey: pair.privateKey, key, code, state: "new" };
  await saveKey(rec);
  return await refreshKey(rec);
}

// Asks the anchor what became of the key; keeps its certificate once the
// root issued one for exactly this key.
async function refreshKey(rec) {
  const r = await api("POST", "/api/keys/enroll", { code: rec.code, key: rec.key });
  Object.assign(rec, { state: r.state, name: r.name, role: r.role, site: r.site });
  if (r.certificate && r.certificate.key === rec.key) { rec.certificate = r.certificate; delete rec.code; }
  await saveKey(rec);
  return rec;
}

let automergeLoad = null;
function loadAutomerge() {
  if (window.Automerge) return Promise.resolve(window.Automerge);
  automergeLoad = automergeLoad || new Promise((ok, fail) => {
    const el = document.createElement("script");
    el.src = me.automerge;
    el.onload = () => (window.Automerge ? ok(window.Automerge) : fail(new Error("Automerge did not load")));
    el.onerror = () => { automergeLoad = null; fail(new Error(`could not load ${me.automerge}`)); };
    document.head.appendChild(el);
  });
  return automergeLoad;
}

// What a writer signs for a change (crdt-state's signing_message): the
// domain, the document id, a zero byte, the change hash.
const CHANGE_DOMAIN = "shoal/change/v1\0";

// An offline bundle (crdt-state's Bundle::encode): what /api/changes takes.
function bundleBytes(rootHex, docs) {
  const parts = [utf8("SHOALBDL"), Uint8Array.of(1), unhex(rootHex), be(0, 4), be(docs.length, 4)];
  for (const d of docs) {
    const id = utf8(d.doc);
    parts.push(be(id.length, 2), id, be(d.changes.length, 4));
    for (const c of d.changes) parts.push(be(c.bytes.length, 4), c.bytes, c.signature);
  }
  return concat(parts);
}

const shown = (v) => (v === null || v === undefined ? "—" : v.length > 120 ? v.slice(0, 117) + "…" : v);

// Shows what will be written and waits for the operator's yes.
function confirmEdit(edits, rec) {
  return new Promise((ok) => {
    const rows = edits.flatMap((e) => Object.entries(e.ops).map(([k, v]) =>
      `<tr><td>${esc(e.doc)}</td><td><code>${esc(k)}</code></td><td><code>${esc(shown(e.before[k]))}</code></td><td>${v === null ? "<i>deleted</i>" : `<code>${esc(shown(v))}</code>`}</td></tr>`));
    const box = document.createElement("div");
    box.className = "dialog";
    box.id = "sign-dialog";
    box.innerHTML = `<div class="dialog-box"><h2>Sign this edit as ${esc(rec.name)}?</h2>
      <p class="muted">Your browser's key (<code>${fingerprint(rec.key)}</code>) signs these fields; the anchor only checks the signature and passes the change on.</p>
      <table><thead><tr><th>Document</th><th>Field</th><th>Now</th><th>After</th></tr></thead><tbody>${rows.join("")}</tbody></table>
      <p><button class="primary" id="sign-confirm">Sign and apply</button> <button id="sign-cancel">Cancel</button></p></div>`;
    document.body.appendChild(box);
    const done = (v) => { box.remove(); ok(v); };
    $("#sign-confirm").onclick = () => done(true);
    $("#sign-cancel").onclick = () => done(false);
  });
}

// The change the anchor made says exactly what the page shows: a fresh
// actor's first change naming this browser's key, one put or delete at the
// document's root per field shown, with the value shown, nothing else.
function checkChange(A, bytes, e, key) {
  const c = A.decodeChange(bytes);
  const fail = (why) => { throw new Error(`the anchor's change to ${e.doc} ${why}; nothing was signed`); };
  if (c.author !== key) fail("is not made for this browser's key");
  if (c.seq !== 1) fail("is not a fresh actor's first change");
  if (e.hash && c.hash !== e.hash) fail("is not the one it named");
  const left = new Set(Object.keys(e.ops));
  for (const op of c.ops) {
    if (op.obj !== "_root" || !left.has(op.key)) fail(`writes ${op.key === undefined ? "elsewhere" : op.key}, which is not shown or twice`);
    const v = e.ops[op.key];
    // Keeping the value a conflicted field shows now: Automerge writes it
    // as deletes of the other values (which ones is the anchor's word,
    // like every operation's predecessors).
    const keeps = op.action === "del" && v !== null && e.before[op.key] === v;
    if (v === null ? op.action !== "del" : !keeps && (op.action !== "set" || op.value !== v)) fail(`writes ${op.key} otherwise than shown`);
    left.delete(op.key);
  }
  if (left.size) fail(`leaves out ${[...left].join(", ")}`);
  return c;
}

async function signEdit(what, rec) {
  const p = await api("POST", `/api/prepare?key=${rec.key}`, what);
  if (!p.edits.length) return { signed: [], by: rec.name };
  const A = await loadAutomerge();
  const made = p.edits.map((e) => {
    const bytes = unb64(e.change || "");
    return { e, bytes, change: checkChange(A, bytes, e, rec.key) };
  });
  if (!await confirmEdit(p.edits, rec)) return null;
  const docs = [];
  for (const { e, bytes, change } of made) {
    const msg = concat([utf8(CHANGE_DOMAIN), utf8(e.doc), Uint8Array.of(0), unhex(change.hash)]);
    const signature = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, rec.privateKey, msg));
    docs.push({ doc: e.doc, changes: [{ bytes, signature }] });
  }
  const r = await fetch("/api/changes", { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/octet-stream" }, body: bundleBytes(p.root, docs) });
  if (!r.ok) {
    let data = {};
    try { data = await r.json(); } catch { /* not JSON */ }
    const e = new Error(data.error || r.statusText); e.status = r.status; e.data = data; throw e;
  }
  return { signed: p.edits.map((e) => ({ doc: e.doc, fields: Object.keys(e.ops).length })), by: rec.name };
}

function signedText(r) {
  if (!r.signed.length) return "Nothing to change.";
  return `Signed by ${esc(r.by)} in this browser: ${r.signed.map((s) => `${esc(s.doc)} (${s.fields} field${s.fields === 1 ? "" : "s"})`).join(", ")}`;
}

// An edit: signed here when this browser holds a certified key; else made
// by the anchor's own operator identity, where it keeps one.
async function edit(what, viaAnchor) {
  const rec = await loadKey();
  if (rec && rec.certificate) return await signEdit(what, rec);
  if (me.anchor_signs) return await viaAnchor();
  // The anchor says first whether this login may make the edit at all.
  await api("POST", "/api/prepare", what);
  const e = new Error("This anchor signs no edits for you: enroll your browser's key on the Keys page (an admin invites you with shoal identity invite).");
  e.status = 403; e.data = { error: e.message };
  throw e;
}

async function keys() {
  let rec = await loadKey();
  let problem = "";
  if (rec && !rec.certificate && rec.code) {
    try { rec = await refreshKey(rec); } catch (e) { problem = e.message; }
  }
  const of = (r) => `${esc(r.name || "")} (${esc(r.role || "")}${r.site ? ` of ${esc(r.site)}` : ""})`;
  const mine = !rec
    ? `<p>No signing key in this browser. An admin invites you (<code>shoal identity invite --name you --role operator</code>); enter the code here once.</p>
      <form id="enroll-form" class="filters">Invitation code <input id="enroll-code" autocomplete="off" placeholder="shoal-key-…"> <button class="primary" type="submit" id="enroll">Make a key and enroll it</button></form>`
    : `<table id="my-key"><tbody><tr><th>Fingerprint</th><td id="key-fingerprint"><code>${fingerprint(rec.key)}</code></td></tr>
      <tr><th>Writer</th><td>${of(rec)}</td></tr>
      <tr><th>State</th><td id="key-state" data-state="${esc(rec.state)}">${badge(rec.state)}</td></tr></tbody></table>
      ${rec.state === "pending" ? `<p class="notice">Waiting for an admin to approve this key with the fleet root: <code>shoal identity approve --name ${esc(rec.name)} --fingerprint "${fingerprint(rec.key)}"</code>. Tell them the fingerprint yourself, not through this page.</p>` : ""}
      ${rec.certificate ? `<p class="muted">Your edits on this anchor are signed in this browser as ${of(rec)}.</p>` : ""}
      <p><button class="danger" id="forget-key">Forget this key</button></p>`;
  let admin = "";
  if (me.role === "admin") {
    const list = await api("GET", "/api/keys");
    admin = `<h2>Invite a writer</h2>
      <form id="invite-form" class="filters">name <input name="name" required> role <select name="role"><option>operator</option><option>site-engineer</option></select> site <input name="site" placeholder="site engineers only"> <button type="submit">Invite</button></form>
      <div id="invite-result"></div>
      <h2>Invitations</h2><table id="invitations"><thead><tr><th>Writer</th><th>State</th><th>Fingerprint</th><th>Invited by</th><th>Code good until</th></tr></thead><tbody>
      ${list.items.map((i) => `<tr data-name="${esc(i.name)}"><td>${of(i)}</td><td>${badge(i.state)}</td><td><code>${esc(i.fingerprint || "")}</code></td><td>${esc(i.by)}</td><td>${new Date(i.expires_at * 1000).toLocaleString()}</td></tr>`).join("") || `<tr><td colspan=5 class="muted">none</td></tr>`}</tbody></table>`;
  }
  main().innerHTML = `<h1>Keys</h1>
    <p class="muted">Edits you make here are signed in this browser with your own key, which the browser keeps and cannot export; the anchor checks them like any synced change and cannot sign for you.</p>
    ${problem ? `<div class="error" id="key-error">${esc(problem)}</div>` : ""}
    <h2>This browser</h2>${mine}${admin}`;
  // Typing is not redrawn away by live updates.
  document.querySelectorAll("#enroll-form input, #invite-form input").forEach((i) => { i.oninput = () => { dirty = true; }; });
  const form = $("#enroll-form");
  if (form) form.onsubmit = async (ev) => {
    ev.preventDefault();
    dirty = false;
    try { await enrollKey($("#enroll-code").value.trim()); await render(); }
    catch (e) {
      // Refused (a wrong or spent code): the key is of no use. A lost
      // answer keeps it: the code may be bound to it already, and the
      // page asks again on its next visit.
      if (e.status) await forgetKey();
      main().insertAdjacentHTML("beforeend", `<div class="error" id="key-error">${esc(e.message)}</div>`);
    }
  };
  const forget = $("#forget-key");
  if (forget) forget.onclick = async () => {
    if (!confirm("Forget this browser's key? Edits here will need a new invitation.")) return;
    await forgetKey();
    await render();
  };
  const inv = $("#invite-form");
  if (inv) inv.onsubmit = async (ev) => {
    ev.preventDefault();
    dirty = false;
    try {
      const r = await api("POST", "/api/keys/invite", { name: inv.name.value, role: inv.role.value, site: inv.site.value || null });
      $("#invite-result").innerHTML = `<div class="notice">Code for ${esc(r.name)} (shown once): <code id="invite-code">${esc(r.code)}</code></div>`;
      dirty = true; // shown once: live updates must not redraw it away
    } catch (e) { $("#invite-result").innerHTML = `<div class="error">${esc(e.message)}</div>`; }
  };
  if (rec && rec.state === "pending") setTimeout(() => { if (route().parts[0] === "keys" && !dirty) render(); }, 2000);
}

// ---- boot -------------------------------------------------------------------

// Leaving the page (or into the back/forward cache) closes the live stream:
// browsers allow six connections per host.
window.addEventListener("pagehide", () => { if (events) { events.close(); events = null; } });
window.addEventListener("pageshow", (ev) => { if (ev.persisted && me) start(); });
window.addEventListener("hashchange", () => { dirty = false; clearTimeout(refreshTimer); render(); });
// The anchor serves plain HTTP only with --insecure-http; say so on every
// page (behind a TLS proxy the browser's own link is https: and this stays
// hidden).
$("#insecure").hidden = location.protocol !== "http:";
(async () => {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname + "#/overview");
    await login(decodeURIComponent(m[1]));
    return;
  }
  try { await start(); } catch (e) { if (e.message !== "not logged in") showLogin(e.message); }
})();
// Relative times age even without events.
setInterval(() => { if (me && !dirty && (route().parts[0] || "overview") !== "demo") scheduleRefresh(); }, 10000);
setInterval(() => { if (me && !dirty && route().parts[0] === "demo") scheduleRefresh(); }, 2000);
