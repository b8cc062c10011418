// safedl on-call page: polls GET v1/monitor/summary (admin scope) and draws alerts, traffic charts, top keys and
// the flagged-input gallery. Every string from the server goes into the DOM as text (textContent, setAttribute,
// append(string)); nothing is ever parsed as HTML. No libraries, no network beyond this origin.
"use strict";
(() => {
  const REFRESH_MS = 5000;
  const STORE = "safedl.dashboard.key";
  const SUMMARY = "v1/monitor/summary";  // relative: works behind a path prefix too
  const SVG = "http://www.w3.org/2000/svg";
  const SEVERITIES = ["critical", "high", "medium", "warning", "low", "info"];
  const B64 = /^[A-Za-z0-9+/]*={0,2}$/;
  let timer = null;
  let updates = 0;
  let generation = 0;  // a new key or "forget" makes answers still on their way stale

  const $ = (id) => document.getElementById(id);
  const txt = (v) => (v === null || v === undefined ? "—" : String(v));

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    for (const c of children) e.append(c instanceof Node ? c : txt(c));  // strings become text nodes
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function clock(ts) {
    if (typeof ts !== "number" || !isFinite(ts)) return "—";
    return new Date(ts * 1000).toISOString().slice(11, 19);
  }

  function num(v, digits) {
    if (typeof v !== "number" || !isFinite(v)) return txt(v);
    return Number.isInteger(v) ? String(v) : v.toFixed(digits === undefined ? 3 : digits);
  }

  // ---- the key: URL fragment (#key=...) or the form, kept for this tab only -------------------------------------
  function keyFromFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const key = params.get("key");
    if (key) sessionStorage.setItem(STORE, key.trim());
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);  // out of the address bar
  }

  function setStatus(state, message) {
    document.body.dataset.state = state;
    $("status").textContent = message;
  }

  function clearData() {
    for (const id of ["meta", "alerts-count", "charts-window", "gallery-count"]) $(id).textContent = "";
    $("alerts").tBodies[0].replaceChildren();
    $("keys").tHead.replaceChildren();
    $("keys").tBodies[0].replaceChildren();
    $("charts").replaceChildren();
    $("gallery").replaceChildren();
    $("data").hidden = true;
  }

  // ---- polling -----------------------------------------------------------------------------------------------
  async function refresh() {
    clearTimeout(timer);
    const mine = ++generation;
    const key = sessionStorage.getItem(STORE);
    const headers = key ? { Authorization: "Bearer " + key } : {};
    let res, data, why;
    try {
      res = await fetch(SUMMARY, { headers, cache: "no-store", credentials: "omit" });
    } catch (err) {
      return mine === generation && failed("cannot reach the service (" + err.message + ")");
    }
    try {
      if (res.ok) data = await res.json();
      else why = await errorMessage(res);
    } catch (err) {
      why = "the answer is not JSON";
    }
    if (mine !== generation) return;  // a newer refresh (new key, "forget") owns the page
    if (res.status === 401 || res.status === 403 || res.status === 404) return refused(res.status, why, Boolean(key));
    if (!res.ok || data === undefined) return failed("HTTP " + res.status + " from " + SUMMARY + ": " + why);
    try {
      render(data);
    } catch (err) {
      return failed("unexpected summary (" + err.message + ")");
    }
    updates += 1;
    document.body.dataset.updates = String(updates);
    $("data").classList.remove("stale");
    setStatus("ok", "Live: updated " + clock(data.now) + " UTC, every " + REFRESH_MS / 1000 + " s");
    timer = setTimeout(refresh, REFRESH_MS);
  }

  async function errorMessage(res) {
    try {
      const body = await res.json();
      return (body && body.error && body.error.message) || res.statusText;
    } catch (err) {
      return res.statusText;
    }
  }

  function refused(status, why, hadKey) {
    clearData();  // nothing stays on screen once the server refuses
    if (status === 401) {
      setStatus("unauthorized", "401 Unauthorized: " + (hadKey ? "the key was refused" : "no API key given") +
        " (" + why + "). Open /dashboard#key=<admin key> or paste an admin key above.");
    } else if (status === 404) {
      setStatus("off", "404: no monitor data (" + why + ").");
    } else {
      setStatus("forbidden", "403 Forbidden: this key may not read the monitor (" + why + "); " +
        "it needs the admin scope.");
    }
    // no retry with a refused key (or without a monitor): a new key from the form, or a reload, polls again
  }

  function failed(message) {
    $("data").classList.add("stale");
    setStatus("error", "Error: " + message + "; showing the last data, retrying in " + REFRESH_MS / 1000 + " s");
    timer = setTimeout(refresh, REFRESH_MS);
  }

  // ---- rendering ---------------------------------------------------------------------------------------------
  function render(data) {
    if (!data || !Array.isArray(data.alerts) || !Array.isArray(data.keys) || !data.series ||
        !Array.isArray(data.flagged_inputs)) throw new Error("missing alerts, keys, series or flagged_inputs");
    const names = new Map(data.keys.map((k) => [k.key_id, k.name]));
    $("meta").textContent = "bundle " + txt(data.bundle_version) + " · server time " + clock(data.now) + " UTC";
    renderAlerts(data.alerts, names);
    renderCharts(data.series);
    renderKeys(data.keys);
    renderGallery(data.flagged_inputs, names);
    $("data").hidden = false;
  }

  function severity(s) {
    return SEVERITIES.includes(s) ? s : "unknown";
  }

  function keyCell(keyId, names) {
    if (keyId === null || keyId === undefined) return el("td", {}, "(global)");
    const name = names.get(keyId);
    return el("td", { class: "name" }, name === undefined ? "" : name + " ", el("span", { class: "id" }, keyId));
  }

  function renderAlerts(alerts, names) {
    const rank = (a) => [a.state === "firing" ? 0 : 1, SEVERITIES.indexOf(severity(a.severity)) + 1 || 9,
      -(a.started_at || 0)];
    const sorted = alerts.slice().sort((a, b) => {
      const ra = rank(a), rb = rank(b);
      return ra[0] - rb[0] || ra[1] - rb[1] || ra[2] - rb[2];
    });
    const rows = sorted.map((a) => {
      const sev = severity(a.severity);
      const state = a.state === "firing" ? "firing" : "resolved";
      return el("tr", { class: state, "data-state": state, "data-severity": sev, "data-key-id": txt(a.key_id),
        "data-alert-id": txt(a.alert_id) },
        el("td", {}, state), el("td", {}, el("span", { class: "sev sev-" + sev }, txt(a.severity))),
        el("td", {}, a.rule), keyCell(a.key_id, names), el("td", { class: "num" }, num(a.value)),
        el("td", { class: "num" }, num(a.events)), el("td", { class: a.action ? "action" : "" }, a.action || "—"),
        el("td", {}, clock(a.started_at)), el("td", {}, clock(a.resolved_at)));
    });
    $("alerts").tBodies[0].replaceChildren(...rows);
    const firing = alerts.filter((a) => a.state === "firing").length;
    $("alerts-count").textContent = "(" + firing + " firing, " + (alerts.length - firing) + " resolved)";
    $("alerts-empty").hidden = alerts.length > 0;
  }

  function renderKeys(keys) {
    const detectors = [...new Set(keys.flatMap((k) => Object.keys(k.flags || {})))].sort();
    const head = el("tr", {}, el("th", {}, "Key"), el("th", {}, "Tier"), el("th", { class: "num" }, "Queries"),
      el("th", { class: "num" }, "Rejected"), el("th", {}, "Action"),
      ...detectors.map((d) => el("th", { title: "query number of the first flag" }, d + " flag")));
    $("keys").tHead.replaceChildren(head);
    const rows = keys.map((k) => {
      const flags = k.flags || {};
      const flagged = detectors.some((d) => flags[d] !== null && flags[d] !== undefined);
      const attrs = { class: flagged ? "flagged" : "", "data-key-id": txt(k.key_id), "data-flagged": flagged ? 1 : 0 };
      return el("tr", attrs,
        el("td", { class: "name" }, txt(k.name) + " ", el("span", { class: "id" }, txt(k.key_id))),
        el("td", {}, k.tier), el("td", { class: "num" }, num(k.queries)), el("td", { class: "num" }, num(k.rejected)),
        el("td", { class: k.action ? "action" : "" }, k.action || "—"),
        ...detectors.map((d) => (flags[d] === null || flags[d] === undefined
          ? el("td", { class: "noflag", "data-detector": d }, "—")
          : el("td", { class: "flag", "data-detector": d }, "at query " + num(flags[d])))));
    });
    $("keys").tBodies[0].replaceChildren(...rows);
    $("keys-empty").hidden = keys.length > 0;
  }

  function renderGallery(items, names) {
    const figs = items.filter((f) => typeof f.png_base64 === "string" && B64.test(f.png_base64)).map((f) => {
      const img = el("img", { alt: "flagged input " + txt(f.sha256).slice(0, 12), "data-key-id": txt(f.key_id),
        width: 96, height: 96 });
      img.addEventListener("load", () => { img.dataset.state = "loaded"; });
      img.addEventListener("error", () => { img.dataset.state = "broken"; img.alt = "unreadable image"; });
      img.src = "data:image/png;base64," + f.png_base64;
      const name = names.get(f.key_id);
      return el("figure", { "data-key-id": txt(f.key_id) }, img,
        el("figcaption", {}, el("b", {}, txt(f.reason)), el("br"), (name === undefined ? "" : name + " "),
          el("span", { class: "id" }, txt(f.key_id)), el("br"), clock(f.ts) + " UTC ",
          el("span", { class: "id", title: "sha256 " + txt(f.sha256) }, "req " + txt(f.request_id).slice(0, 8))));
    });
    $("gallery").replaceChildren(...figs);
    $("gallery-count").textContent = "(" + figs.length + ")";
    $("gallery-empty").hidden = figs.length > 0;
  }

  // ---- charts: SVG line charts with axes ---------------------------------------------------------------------
  function renderCharts(series) {
    const t = Array.isArray(series.t) ? series.t : [];
    const col = (name) => (Array.isArray(series[name]) ? series[name] : t.map(() => null));
    const queries = col("queries"), rejected = col("rejected");
    const rate = queries.map((q, i) => (q > 0 && typeof rejected[i] === "number" ? rejected[i] / q : null));
    const span = t.length ? "(" + t.length + " buckets of " + txt(series.bucket_s) + " s, UTC)" : "";
    $("charts-window").textContent = span;
    $("charts").replaceChildren(
      chart("volume", "Volume (queries per bucket)", t, [["queries", queries], ["rejected", rejected]]),
      chart("rate", "Rejection (detection) rate", t, [["rejection rate", rate]], { pct: true }),
      chart("flags", "Query-detector flags and alerts", t, [["flags", col("flags")], ["alerts", col("alerts")]]));
  }

  function yScale(maxV) {
    // ticks every 1, 2 or 5 x 10^k, whole numbers for counts: [step, top of the axis]
    const raw = Math.max(maxV, 1) / 4, p = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = Math.max(1, Math.round([1, 2, 5, 10].map((m) => m * p).find((v) => v >= raw)));
    return [step, step * Math.max(1, Math.ceil(maxV / step))];
  }

  function chart(id, title, t, lines, opts) {
    const o = opts || {};
    const W = 420, H = 170, L = 44, R = 10, T = 8, B = 24;
    const values = lines.flatMap(([, v]) => v).filter((v) => typeof v === "number" && isFinite(v));
    const [step, yMax] = o.pct ? [0.25, 1] : yScale(Math.max(0, ...values));
    const t0 = t.length ? t[0] : 0, t1 = t.length > 1 ? t[t.length - 1] : t0 + 1;
    const x = (ts) => L + ((ts - t0) / (t1 - t0)) * (W - L - R);
    const y = (v) => T + (1 - v / yMax) * (H - T - B);
    const s = svg("svg", { class: "chart", "data-chart": id, viewBox: `0 0 ${W} ${H}`, width: W, height: H,
      role: "img", "aria-label": title });
    for (let v = 0; v <= yMax + 1e-9; v += step) {  // y grid and labels
      s.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
        svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, o.pct ? Math.round(v * 100) + "%" : String(v)));
    }
    const ticks = Math.min(5, t.length);
    for (let i = 0; i < ticks; i++) {  // x labels
      const ts = t[Math.round((i * (t.length - 1)) / Math.max(1, ticks - 1))];
      const anchor = i === 0 ? "start" : i === ticks - 1 ? "end" : "middle";  // the end labels stay inside
      s.append(svg("text", { x: x(ts), y: H - B + 14, "text-anchor": anchor }, clock(ts).slice(0, 5)));
    }
    s.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }),
      svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    lines.forEach(([name, v], k) => s.append(...linePath(name, v, t, x, y, "c" + k)));
    const legend = el("figcaption", {}, title, " ", el("span", { class: "legend" },
      ...lines.map(([name], k) => el("span", {}, el("i", { class: "c" + k }), name))));
    return el("figure", { class: "chart" }, legend, s);
  }

  function linePath(name, v, t, x, y, cls) {
    // one path per series, broken at missing values; a point with no neighbour is drawn as a dot
    let d = "", run = 0, points = 0;
    const dots = [];
    v.forEach((val, i) => {
      if (typeof val !== "number" || !isFinite(val) || i >= t.length) { run = 0; return; }
      const px = x(t[i]).toFixed(1), py = y(val).toFixed(1);
      d += (run === 0 ? "M" : "L") + px + " " + py + " ";
      run += 1;
      points += 1;
      const next = v[i + 1];
      if (run === 1 && (typeof next !== "number" || !isFinite(next))) {
        dots.push(svg("circle", { class: cls, cx: px, cy: py, r: 2.5, "data-series": name }));
      }
    });
    const path = svg("path", { class: "line " + cls, d: d.trim(), "data-series": name, "data-points": points });
    path.append(svg("title", {}, name));
    return [path, ...dots];
  }

  // ---- start ---------------------------------------------------------------------------------------------------
  function start() {
    keyFromFragment();
    $("keyform").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("keyinput").value.trim();
      $("keyinput").value = "";
      if (key) sessionStorage.setItem(STORE, key);
      refresh();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(STORE);
      generation += 1;
      clearTimeout(timer);
      clearData();
      setStatus("nokey", "Key forgotten. Paste an admin key above to continue.");
    });
    refresh();
  }

  start();
})();
