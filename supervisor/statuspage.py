"""The admin API's status page (``GET /``) and the counters it polls (``GET /api/summary``).

The page is one static HTML document with its CSS and script inline: no other asset, nothing
from elsewhere. Its script polls the JSON endpoints of the same listener (``/api/status``,
``/api/summary``, ``/api/tunnels``, ``/api/flows``) and builds every table cell with DOM text
nodes, never HTML from the data: tenants, contexts and flow fields come from clients. A strict
Content-Security-Policy backs that up: only this exact inline script and style run (by hash),
requests go only to the page's own origin, and with Trusted Types a string can never be assigned
as HTML.

Throughput history is kept by the page, not by the supervisor (see docs/admin-api.md): the
daemon samples nothing while no one looks, and keeps no state a reader could grow.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web


class _Child(Protocol):
    pid: int


# Worker metric samples the summary carries: sample name -> (summary key, label or None).
SAMPLES: dict[str, tuple[str, str | None]] = {
    "ipferry_packets_total": ("packets", "direction"),
    "ipferry_bytes_total": ("bytes", "direction"),
    "ipferry_drops_total": ("drops", "reason"),
    "ipferry_flows_started_total": ("flows_started", "protocol"),
    "ipferry_flows_active": ("flows_active", "protocol"),
    "ipferry_tunnels_active": ("tunnels_active", None),
    "ipferry_gue_tunnels_active": ("gue_tunnels_active", None),
}


def _empty() -> dict[str, Any]:
    return {key: ({} if label else 0) for key, label in SAMPLES.values()}


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if float(value).is_integer() else round(float(value), 6)


def _add(into: dict[str, Any], key: str, label: str | None, labels: Mapping, value: int | float):
    if label is None:
        into[key] += value
    else:
        name = str(labels.get(label, ""))
        into[key][name] = into[key].get(name, 0) + value


def summarize(live: Iterable[tuple[int, _Child]], snapshots: Mapping[int, list[dict] | None],
              clock: float, now: float) -> dict:
    """``/api/summary``: of each ready worker that answered, its pid (a restarted worker's
    counters start again from zero) and the samples of :data:`SAMPLES` (from the metric
    families it sent, as for ``/metrics``); their sums over those workers; the ready workers
    that did not answer."""
    workers: dict[str, dict[str, Any]] = {}
    total = _empty()
    missing = []
    for index, child in live:
        families = snapshots.get(index)
        if families is None:
            missing.append(index)
            continue
        row = _empty()
        for family in families:  # a large family may come in several pieces of one name
            for name, labels, value in family.get("samples") or ():
                wanted = SAMPLES.get(name)
                number = _number(value)
                if wanted is None or number is None:
                    continue
                _add(row, *wanted, labels, number)
                _add(total, *wanted, labels, number)
        workers[str(index)] = {"pid": child.pid, **row}
    return {"clock": round(clock, 6), "time": round(now, 6), "workers": workers, "total": total,
            "workers_missing": missing}


# -- the page -------------------------------------------------------------------------------------

STYLE = """
:root { color-scheme: light; --fg: #1f2430; --muted: #667085; --line: #e4e7ec; --bg: #f6f7f9;
        --card: #fff; --in: #2563eb; --out: #16a34a; --bad: #b42318; --warn: #b54708; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 12px; padding: 10px 16px;
         background: #111827; color: #f9fafb; }
header h1 { font-size: 16px; margin: 0; }
header .meta { color: #cbd5e1; margin-left: auto; }
main { padding: 12px 16px; display: grid; gap: 12px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
          padding: 8px 12px; min-width: 0; }
h2 { font-size: 13px; margin: 0 0 6px; text-transform: uppercase; letter-spacing: .04em;
     color: var(--muted); }
h2 .note, .note { text-transform: none; letter-spacing: 0; font-weight: normal; color: var(--muted); }
.badge { display: inline-block; padding: 0 8px; border-radius: 9px; font-weight: 600; }
.ok { background: #dcfae6; color: #067647; }
.bad { background: #fee4e2; color: var(--bad); }
.warn { background: #fef0c7; color: var(--warn); }
.idle { background: #eaecf0; color: #344054; }
#error { background: #fee4e2; color: var(--bad); border: 1px solid #fda29b; border-radius: 6px;
         padding: 6px 12px; }
.cards { display: grid; grid-template-columns: repeat(7, minmax(0, 1fr)); gap: 12px; }
.card .value { font-size: 20px; font-weight: 600; white-space: nowrap; }
.card .label { color: var(--muted); }
.card.in .value { color: var(--in); }
.card.out .value { color: var(--out); }
.chartbox { position: relative; }
#chart { display: block; width: 100%; height: 180px; border-left: 1px solid var(--line);
         border-bottom: 1px solid var(--line); }
#chart polyline { fill: none; stroke-width: 2; vector-effect: non-scaling-stroke;
                  stroke-linejoin: round; }
#chart line { stroke: var(--line); stroke-width: 1; vector-effect: non-scaling-stroke; }
#chart .in { stroke: var(--in); }
#chart .out { stroke: var(--out); }
.axis { display: flex; justify-content: space-between; color: var(--muted); }
.ylabel { position: absolute; left: 6px; color: var(--muted); background: rgba(255,255,255,.8); }
#chart-max { top: 0; }
#chart-mid { top: 82px; }
.legend { display: flex; gap: 16px; }
.legend .in::before, .legend .out::before { content: ""; display: inline-block; width: 14px;
  height: 3px; margin: 0 6px 3px 0; vertical-align: middle; }
.legend .in::before { background: var(--in); }
.legend .out::before { background: var(--out); }
.split { display: grid; grid-template-columns: 3fr 2fr; gap: 12px; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 3px 8px 3px 0; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { color: var(--muted); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.ctx, td.addr { font-family: "DejaVu Sans Mono", monospace; font-size: 12px;
                  overflow-wrap: anywhere; }
td.empty { color: var(--muted); font-style: italic; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
"""

BODY = """
<header>
  <h1>ipferry</h1>
  <span id="ready" class="badge idle">loading</span>
  <span id="status-line">&#8203;</span>
  <span class="meta" id="updated">not updated yet</span>
</header>
<main>
  <div id="error" role="alert" hidden></div>
  <div class="cards">
    <section class="card in"><div class="value" id="c-in">&#8211;</div>
      <div class="label">from tunnels</div></section>
    <section class="card out"><div class="value" id="c-out">&#8211;</div>
      <div class="label">to tunnels</div></section>
    <section class="card"><div class="value" id="c-pps">&#8211;</div>
      <div class="label">packets/s (both ways)</div></section>
    <section class="card"><div class="value" id="c-fps">&#8211;</div>
      <div class="label">new flows/s</div></section>
    <section class="card"><div class="value" id="c-dps">&#8211;</div>
      <div class="label">drops/s</div></section>
    <section class="card"><div class="value" id="c-flows">&#8211;</div>
      <div class="label">active flows</div></section>
    <section class="card"><div class="value" id="c-tunnels">&#8211;</div>
      <div class="label">tunnels</div></section>
  </div>
  <section>
    <h2>Throughput <span class="note" id="chart-note"></span></h2>
    <div class="chartbox">
      <svg id="chart" viewBox="0 0 1000 200" preserveAspectRatio="none" role="img"
           aria-label="IP throughput from and to tunnels"></svg>
      <span class="ylabel" id="chart-max"></span><span class="ylabel" id="chart-mid"></span>
    </div>
    <div class="axis"><span id="chart-start"></span>
      <span class="legend"><span class="in">from tunnels</span><span class="out">to tunnels</span></span>
      <span>now</span></div>
  </section>
  <div class="split">
    <section>
      <h2>Workers <span class="note" id="workers-note"></span></h2>
      <table><thead><tr><th class="num">worker</th><th class="num">pid</th><th>state</th>
        <th class="num">restarts</th><th>tun</th><th class="num">up</th><th class="num">flows</th>
        <th class="num">tunnels</th><th class="num">from tunnels</th><th class="num">to tunnels</th>
        <th>audit</th></tr></thead>
      <tbody id="workers"></tbody></table>
    </section>
    <section>
      <h2>Drop reasons <span class="note">since each worker started; rate over the last minute</span></h2>
      <table><thead><tr><th>reason</th><th class="num">total</th><th class="num">per minute</th>
        </tr></thead><tbody id="drops"></tbody></table>
    </section>
  </div>
  <section>
    <h2>Tunnels <span class="note" id="tunnels-note"></span></h2>
    <table><thead><tr><th class="num">worker</th><th class="num">id</th><th>on-ramp</th>
      <th>kind</th><th>tenant</th><th>peer</th><th>context</th><th class="num">packets in</th>
      <th class="num">packets out</th></tr></thead><tbody id="tunnels"></tbody></table>
  </section>
  <section>
    <h2>Top flows <span class="note" id="flows-note"></span></h2>
    <table><thead><tr><th>tenant</th><th>protocol</th><th>source</th><th>destination</th>
      <th>state</th><th>decision</th><th class="num">packets &#8593;/&#8595;</th>
      <th class="num">payload &#8593;/&#8595;</th><th class="num">age</th>
      <th class="num">worker</th></tr></thead><tbody id="flows"></tbody></table>
  </section>
  <section>
    <h2>Daemon</h2>
    <dl id="daemon"></dl>
  </section>
  <noscript>This page needs JavaScript. The same data: /api/status, /api/summary, /api/tunnels,
    /api/flows.</noscript>
</main>
"""

# ASCII only (non-ASCII as \\u escapes): the hash in the policy is over these exact bytes.
SCRIPT = r"""
"use strict";
(() => {
  const POLL_MS = 2000, HIDDEN_POLL_MS = 10000, FETCH_TIMEOUT_MS = 8000;
  const WINDOW_S = 600, MIN_SPAN_S = 60, GAP_S = 30, RATE_S = 10, DROP_RATE_S = 60;
  const MAX_TUNNELS = 50, TOP_FLOWS = 10, FLOW_PAGE = 200, MAX_TEXT = 160;
  const STATES = {ready: "ok", starting: "warn", stopping: "warn", backoff: "bad",
                  failed: "bad", stopped: "idle"};
  const DASH = "\u2013", SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const samples = [];  // /api/summary answers, each with "seen": the page's clock (seconds)
  let polls = 0;

  // Every value shown goes through text() and lands in a Text node: never parsed as HTML.
  function text(value) {
    if (value === null || value === undefined || value === "") return DASH;
    let s = typeof value === "object" ? JSON.stringify(value) : String(value);
    if (s.length > MAX_TEXT) s = s.slice(0, MAX_TEXT - 1) + "\u2026";
    return s;
  }
  function el(tag, cls, ...children) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    for (const c of children) e.append(c instanceof Node ? c : text(c));
    return e;
  }
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : 0);
  const own = (o, k) => o !== null && typeof o === "object" && Object.hasOwn(o, k);
  function entries(o) {
    return o !== null && typeof o === "object" && !Array.isArray(o) ? Object.entries(o) : [];
  }
  function si(n, unit) {
    if (typeof n !== "number" || !Number.isFinite(n)) return DASH;
    const prefixes = ["", "k", "M", "G", "T"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < prefixes.length - 1) { n /= 1000; i++; }
    const digits = i === 0 ? (n !== 0 && Math.abs(n) < 10 && n % 1 ? 1 : 0)
                           : (Math.abs(n) < 10 ? 2 : Math.abs(n) < 100 ? 1 : 0);
    return n.toFixed(digits) + " " + prefixes[i] + unit;
  }
  const bits = (bytesPerSecond) => si(bytesPerSecond * 8, "bit/s");
  function count(n) {
    return typeof n === "number" && Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : DASH;
  }
  function bytes(n) {
    if (typeof n !== "number" || !Number.isFinite(n)) return DASH;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 1 : 0) : String(n)) + " " + units[i];
  }
  function duration(s) {
    if (typeof s !== "number" || !Number.isFinite(s) || s < 0) return DASH;
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + " d " + h + " h";
    if (h) return h + " h" + (m ? " " + m + " min" : "");
    const rest = Math.floor(s % 60);
    return m + " min" + (rest ? " " + rest + " s" : "");
  }
  function hostport(addr, port) {
    const a = text(addr);
    return (a.includes(":") ? "[" + a + "]" : a) + ":" + text(port);
  }
  function serverNow() {  // uptimes by the daemon's clock (the browser's may be another's)
    const last = samples[samples.length - 1];
    return last ? num(last.time) + performance.now() / 1000 - last.seen : Date.now() / 1000;
  }
  function pair(v, fmt) {
    return Array.isArray(v) && v.length === 2 ? fmt(v[0]) + " / " + fmt(v[1]) : DASH;
  }
  function empty(tbody, columns, message) {
    const td = el("td", "empty", message);
    td.colSpan = columns;
    tbody.replaceChildren(el("tr", null, td));
  }

  // -- rates, from two /api/summary answers --------------------------------------------------
  // A counter's growth summed over the workers present in both with the same pid (a restarted
  // worker starts again from zero: its interval is left out, as is a counter that went down).
  function growth(a, b, field) {
    const out = new Map();
    for (const [index, wb] of entries(b.workers)) {
      const wa = own(a.workers, index) ? a.workers[index] : null;
      if (!wa || wa.pid !== wb.pid) continue;
      const before = wa[field], after = wb[field];
      if (typeof after === "number") {
        if (after >= num(before)) out.set("", (out.get("") || 0) + after - num(before));
        continue;
      }
      for (const [k, v] of entries(after)) {
        const d = num(v) - (own(before, k) ? num(before[k]) : 0);
        if (d >= 0) out.set(k, (out.get(k) || 0) + d);
      }
    }
    return out;
  }
  const sum = (m) => { let s = 0; for (const v of m.values()) s += v; return s; };
  function rates(a, b) {
    const dt = num(b.clock) - num(a.clock);
    if (!(dt > 0)) return null;
    const by = growth(a, b, "bytes"), packets = growth(a, b, "packets");
    return {
      dt, in: (by.get("from_tunnel") || 0) / dt, out: (by.get("to_tunnel") || 0) / dt,
      pps: ((packets.get("from_tunnel") || 0) + (packets.get("to_tunnel") || 0)) / dt,
      fps: sum(growth(a, b, "flows_started")) / dt, dps: sum(growth(a, b, "drops")) / dt,
    };
  }
  function since(seconds) {  // the oldest sample at most `seconds` before the last one
    const last = samples[samples.length - 1];
    for (const s of samples) if (s !== last && last.clock - s.clock <= seconds) return s;
    return samples.length > 1 ? samples[samples.length - 2] : null;
  }

  // -- rendering -----------------------------------------------------------------------------
  function renderStatus(s) {
    const ready = $("ready");
    ready.textContent = s.ready ? "ready" : "NOT READY";
    ready.className = "badge " + (s.ready ? "ok" : "bad");
    $("status-line").textContent = text(s.status);
    const rows = [];
    const add = (term, value) => rows.push(el("dt", null, term), el("dd", null, value));
    add("supervisor", "pid " + text(s.pid) + ", up " + duration(serverNow() - num(s.started_at)));
    add("config", s.config === null ? "built-in default" : s.config);
    const nsd = s.nsd || {};
    add("nsd", "pid " + text(nsd.pid) + ", " + text(nsd.state) + ", restarts " + text(nsd.restarts));
    const audit = s.audit || {};
    add("audit", text(audit.sink) + " (on error: " + text(audit.on_error) + ")"
        + (audit.degraded ? ", DEGRADED: " + text(audit.failing) : ""));
    for (const o of Array.isArray(s.onramps) ? s.onramps : []) {
      add("on-ramp " + text(o.name), text(o.kind) + " "
          + (o.from_systemd ? "from systemd" : text(o.path !== null ? o.path : o.address)));
    }
    $("daemon").replaceChildren(...rows);
  }

  function renderWorkers(list, last, rateFrom) {
    const tbody = $("workers");
    if (!Array.isArray(list) || !list.length) return empty(tbody, 11, "no workers");
    const lw = last ? last.workers : {};
    tbody.replaceChildren(...list.map((w) => {
      const key = String(w.index);
      const m = own(lw, key) ? lw[key] : null;
      let inRate = null, outRate = null;
      if (m && rateFrom && own(rateFrom.workers, key) && rateFrom.workers[key].pid === m.pid) {
        const r = rates({clock: rateFrom.clock, workers: {[key]: rateFrom.workers[key]}},
                        {clock: last.clock, workers: {[key]: m}});
        if (r) { inRate = r.in; outRate = r.out; }
      }
      const flows = m ? sum(new Map(entries(m.flows_active).map(([k, v]) => [k, num(v)]))) : null;
      const tunnels = m ? num(m.tunnels_active) + num(m.gue_tunnels_active) : null;
      const state = el("span", "badge " + (own(STATES, w.state) ? STATES[w.state] : "idle"), w.state);
      return el("tr", null, el("td", "num", w.index), el("td", "num", w.pid), el("td", null, state),
        el("td", "num", w.restarts), el("td", null, w.tun),
        el("td", "num", w.pid === null ? DASH : duration(serverNow() - num(w.started_at))),
        el("td", "num", count(flows)), el("td", "num", count(tunnels)),
        el("td", "num", inRate === null ? DASH : bits(inRate)),
        el("td", "num", outRate === null ? DASH : bits(outRate)),
        el("td", null, w.audit_error ? w.audit_error : "ok"));
    }));
  }

  function renderSummary(last) {
    const total = last.total || {};
    const flows = entries(total.flows_active).reduce((s, [, v]) => s + num(v), 0);
    $("c-flows").textContent = count(flows);
    $("c-tunnels").textContent = count(num(total.tunnels_active) + num(total.gue_tunnels_active));
    const from = since(RATE_S);
    const r = from ? rates(from, last) : null;
    $("c-in").textContent = r ? bits(r.in) : DASH;
    $("c-out").textContent = r ? bits(r.out) : DASH;
    $("c-pps").textContent = r ? si(r.pps, "") : DASH;
    $("c-fps").textContent = r ? si(r.fps, "") : DASH;
    $("c-dps").textContent = r ? si(r.dps, "") : DASH;
    const missing = Array.isArray(last.workers_missing) ? last.workers_missing : [];
    $("workers-note").textContent = missing.length
      ? "worker(s) " + missing.map(text).join(", ") + " did not answer" : "";

    const minute = since(DROP_RATE_S);
    const recent = minute ? growth(minute, last, "drops") : new Map();
    const span = minute ? num(last.clock) - num(minute.clock) : 0;
    const drops = entries(total.drops).filter(([, v]) => num(v) > 0)
      .sort((a, b) => num(b[1]) - num(a[1]) || (a[0] < b[0] ? -1 : 1));
    const tbody = $("drops");
    if (!drops.length) return empty(tbody, 3, "no drops");
    tbody.replaceChildren(...drops.map(([reason, n]) => el("tr", null, el("td", null, reason),
      el("td", "num", count(num(n))),
      el("td", "num", span > 0 ? si((recent.get(reason) || 0) * 60 / span, "") : DASH))));
  }

  function renderChart() {
    const svg = $("chart");
    const W = 1000, H = 200;
    const points = [];
    for (let i = 1; i < samples.length; i++) {
      const r = rates(samples[i - 1], samples[i]);
      if (r) points.push({seen: samples[i].seen, gap: r.dt > GAP_S, in: r.in * 8, out: r.out * 8});
    }
    const now = samples.length ? samples[samples.length - 1].seen : 0;
    const history = samples.length ? now - samples[0].seen : 0;  // whole minutes, up to WINDOW_S
    const span = Math.min(WINDOW_S, Math.max(MIN_SPAN_S, Math.ceil(history / 60) * 60));
    let max = 0;
    for (const p of points) max = Math.max(max, p.in, p.out);
    const magnitude = max > 0 ? Math.pow(10, Math.floor(Math.log10(max))) : 1;
    const top = max > 0 ? [1, 2, 2.5, 5, 10].map((f) => f * magnitude).find((v) => v >= max) : 1000;
    const x = (t) => (W - (now - t) / span * W).toFixed(1);
    const y = (v) => (H - v / top * (H - 2)).toFixed(1);
    const nodes = [];
    for (const frac of [0.25, 0.5, 0.75]) {
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("x1", "0"); line.setAttribute("x2", String(W));
      line.setAttribute("y1", String(H * frac)); line.setAttribute("y2", String(H * frac));
      nodes.push(line);
    }
    for (const series of ["in", "out"]) {
      let run = [];
      const flush = () => {
        if (run.length > 1) {
          const line = document.createElementNS(SVG, "polyline");
          line.setAttribute("class", series);
          line.setAttribute("points", run.join(" "));
          nodes.push(line);
        }
        run = [];
      };
      for (const p of points) {
        if (p.gap) flush();
        run.push(x(p.seen) + "," + y(p[series]));
      }
      flush();
    }
    svg.replaceChildren(...nodes);
    $("chart-max").textContent = si(top, "bit/s");
    $("chart-mid").textContent = si(top / 2, "bit/s");
    $("chart-start").textContent = "\u2212" + duration(span);
    $("chart-note").textContent = points.length ? "IP bytes read from and handed to tunnels, every "
      + POLL_MS / 1000 + " s while this page is open (up to the last " + WINDOW_S / 60 + " minutes)"
      : "collecting: the first rate comes with the second sample";
  }

  function renderTunnels(list) {
    const rows = Array.isArray(list) ? list.slice() : [];
    const busy = (t) => num(t.packets_in) + num(t.packets_out);
    rows.sort((a, b) => busy(b) - busy(a) || num(a.worker) - num(b.worker) || num(a.id) - num(b.id));
    $("tunnels-note").textContent = rows.length > MAX_TUNNELS
      ? rows.length + " open, the " + MAX_TUNNELS + " busiest shown" : rows.length + " open";
    const tbody = $("tunnels");
    if (!rows.length) return empty(tbody, 9, "no tunnels open");
    tbody.replaceChildren(...rows.slice(0, MAX_TUNNELS).map((t) => el("tr", null,
      el("td", "num", t.worker), el("td", "num", t.id), el("td", null, t.onramp),
      el("td", null, text(t.kind) + (t.offload ? " (vnet)" : "")), el("td", null, t.tenant),
      el("td", "addr", t.peer),
      el("td", "ctx", t.context === null && own(t, "context_omitted")
        ? "omitted (" + text(t.context_omitted) + " bytes)" : t.context),
      el("td", "num", count(t.packets_in)), el("td", "num", count(t.packets_out)))));
  }

  function renderFlows(page) {
    const rows = page && Array.isArray(page.flows) ? page.flows.slice() : [];
    const total = page ? num(page.total) : 0;
    const size = (f) => (Array.isArray(f.payload_bytes)
      ? num(f.payload_bytes[0]) + num(f.payload_bytes[1]) : 0);
    rows.sort((a, b) => size(b) - size(a) || num(b.age) - num(a.age));
    const missing = page && Array.isArray(page.workers_missing) && page.workers_missing.length
      ? "; worker(s) " + page.workers_missing.map(text).join(", ") + " did not answer" : "";
    $("flows-note").textContent = (total > rows.length
      ? "by payload bytes, among the first " + rows.length + " of " + count(total) + " live flows"
      : "by payload bytes, of " + count(total) + " live flows") + missing;
    const tbody = $("flows");
    if (!rows.length) return empty(tbody, 10, "no live flows");
    tbody.replaceChildren(...rows.slice(0, TOP_FLOWS).map((f) => el("tr", null,
      el("td", null, f.tenant), el("td", null, f.protocol), el("td", "addr", hostport(f.src, f.sport)),
      el("td", "addr", hostport(f.dst, f.dport)), el("td", null, f.state), el("td", null, f.decision),
      el("td", "num", pair(f.packets, count)), el("td", "num", pair(f.payload_bytes, bytes)),
      el("td", "num", duration(f.age)), el("td", "num", f.worker))));
  }

  // -- polling -------------------------------------------------------------------------------
  async function getJSON(path) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      const resp = await fetch(path, {cache: "no-store", credentials: "omit", signal: abort.signal,
                                      headers: {"Accept": "application/json"}});
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      return await resp.json();
    } catch (err) {
      const why = err && err.name === "AbortError" ? "timed out" : text(err && err.message);
      throw new Error(path + ": " + why);
    } finally {
      clearTimeout(timer);
    }
  }

  async function poll() {
    const errors = [];
    const step = (what, fn) => {
      try { fn(); } catch (err) { errors.push(what + ": " + text(err && err.message)); }
    };
    const [status, summary, tunnels, flows] = await Promise.allSettled([
      getJSON("/api/status"), getJSON("/api/summary"), getJSON("/api/tunnels"),
      getJSON("/api/flows?limit=" + FLOW_PAGE)]);
    for (const r of [status, summary, tunnels, flows]) {
      if (r.status === "rejected") errors.push(text(r.reason && r.reason.message));
    }
    if (summary.status === "fulfilled" && summary.value && typeof summary.value === "object") {
      const s = summary.value;
      const last = samples[samples.length - 1];
      if (!last || num(s.clock) > num(last.clock)) {
        s.seen = performance.now() / 1000;
        samples.push(s);
        while (samples.length > 2 && s.seen - samples[0].seen > WINDOW_S) samples.shift();
      }
    }
    const last = samples.length ? samples[samples.length - 1] : null;
    if (status.status === "fulfilled") {
      step("status", () => renderStatus(status.value));
      step("workers", () => renderWorkers(status.value.workers, last, last ? since(RATE_S) : null));
    }
    if (last) step("summary", () => renderSummary(last));
    step("chart", renderChart);
    if (tunnels.status === "fulfilled") step("tunnels", () => renderTunnels(tunnels.value));
    if (flows.status === "fulfilled") step("flows", () => renderFlows(flows.value));
    const banner = $("error");
    banner.textContent = errors.length ? "Some data could not be read (retrying): " + errors.join("; ") : "";
    banner.hidden = !errors.length;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
    document.body.dataset.polls = String(++polls);
    setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }
  poll();
})();
"""


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    f"script-src {_sha256(SCRIPT)}",  # this page's inline script, nothing else
    f"style-src {_sha256(STYLE)}",
    "connect-src 'self'",  # the JSON endpoints of the same listener
    "img-src data:",  # the empty favicon below (no request for /favicon.ico)
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",  # no string is ever assigned as HTML
    "trusted-types 'none'",
])

HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}

PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<meta name="referrer" content="no-referrer">\n'
    "<title>ipferry status</title>\n"
    '<link rel="icon" href="data:,">\n'
    f"<style>{STYLE}</style>\n</head>\n<body>{BODY}<script>{SCRIPT}</script>\n</body>\n</html>\n"
).encode()


async def page(request: web.Request) -> web.Response:
    """``GET /``: the status page (the same bytes every time)."""
    return web.Response(body=PAGE, headers=HEADERS)
