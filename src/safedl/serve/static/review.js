// safedl review page: lists GET v1/review (admin scope) with thumbnails and, per input, one button per label
// (attack, benign, each class name) that POSTs v1/review/ID/label. Every string from the server goes into the DOM
// as text; nothing is parsed as HTML. No libraries, no network beyond this origin.
"use strict";
(() => {
  const STORE = "safedl.dashboard.key";  // the same admin key as /dashboard, for this tab only
  const B64 = /^[A-Za-z0-9+/]*={0,2}$/;
  const $ = (id) => document.getElementById(id);
  const txt = (v) => (v === null || v === undefined ? "—" : String(v));
  let labelled = 0;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    for (const c of children) e.append(c instanceof Node ? c : txt(c));
    return e;
  }

  function setStatus(state, message) {
    document.body.dataset.state = state;
    $("status").textContent = message;
  }

  function headers() {
    const key = sessionStorage.getItem(STORE);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  async function why(res) {
    try { const b = await res.json(); return res.status + " " + txt(b.error && b.error.message || b.detail); }
    catch (e) { return String(res.status); }
  }

  function scores(s) {
    return Object.entries(s || {}).map(([k, v]) => k + " " + (typeof v === "number" ? v.toFixed(3) : txt(v)))
      .join(", ");
  }

  function card(it) {
    const img = el("img", { alt: "queued input " + txt(it.input_sha256).slice(0, 12), width: 96, height: 96 });
    if (typeof it.png_base64 === "string" && B64.test(it.png_base64)) img.src = "data:image/png;base64," + it.png_base64;
    const buttons = el("div", { class: "labels" }, ...(it.choices || []).map((c) => {
      const b = el("button", { type: "button", "data-label": c, "data-item": it.id }, c);
      b.addEventListener("click", () => label(it.id, c));
      return b;
    }));
    const current = it.review_label ? it.review_label + " (by " + txt(it.labelled_by) + ")" : "unlabelled";
    return el("figure", { "data-item": it.id, "data-label": txt(it.review_label) }, img,
      el("figcaption", {}, el("b", {}, txt(it.reason)), el("br"), "#" + it.id + " key ",
        el("span", { class: "id" }, txt(it.key_id)), el("br"), "req " + txt(it.request_id).slice(0, 8) + " · " +
        txt(it.bundle_version), el("br"), scores(it.detector_scores), el("br"),
        el("span", { class: "current" }, current)), buttons);
  }

  async function refresh() {
    const state = $("state").value;
    let res;
    try { res = await fetch("v1/review?state=" + encodeURIComponent(state), { headers: headers(), cache: "no-store",
                                                                             credentials: "omit" }); }
    catch (err) { return setStatus("error", "cannot reach the service (" + err.message + ")"); }
    if (!res.ok) {
      $("data").hidden = true;
      $("queue").replaceChildren();
      return setStatus(res.status === 401 ? "nokey" : res.status === 403 ? "forbidden" : "error", await why(res));
    }
    const data = await res.json();
    const items = Array.isArray(data.items) ? data.items : [];
    $("queue").replaceChildren(...items.map(card));
    $("queue-count").textContent = "(" + items.length + ")";
    $("queue-empty").hidden = items.length > 0;
    $("data").hidden = false;
    setStatus("ok", items.length + " input(s)");
  }

  async function label(id, value) {
    const res = await fetch("v1/review/" + encodeURIComponent(id) + "/label", { method: "POST", cache: "no-store",
      credentials: "omit", headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify({ label: value }) });
    if (!res.ok) return setStatus("error", await why(res));
    labelled += 1;
    document.body.dataset.labelled = String(labelled);
    await refresh();
  }

  function start() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.get("key")) sessionStorage.setItem(STORE, params.get("key").trim());
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    $("keyform").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("keyinput").value.trim();
      $("keyinput").value = "";
      if (key) sessionStorage.setItem(STORE, key);
      refresh();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(STORE);
      $("queue").replaceChildren();
      $("data").hidden = true;
      setStatus("nokey", "Key forgotten. Paste an admin key above to continue.");
    });
    $("state").addEventListener("change", refresh);
    refresh();
  }

  start();
})();
