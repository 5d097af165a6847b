// freecall dashboard: plain JavaScript, no build step, no network beyond this daemon.
// The token comes from the URL fragment (#token=...), which browsers never send to a server,
// and is kept in sessionStorage for this tab only.
"use strict";

const KEY = "freecall-token";
const state = { token: null, calls: [], events: null, refreshTimer: null, ticker: null };

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function takeToken() {
  const match = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);  // out of sight
  }
  return sessionStorage.getItem(KEY);
}

class Unauthorized extends Error {}

async function api(method, path, body) {
  const options = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401) throw new Unauthorized("wrong or missing token");
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error((data && data.error) || response.statusText);
  return data;
}

function message(text, isError) {
  const footer = $("message");
  footer.textContent = text || "";
  footer.className = isError ? "error" : "muted";
}

// -- security at a glance ---------------------------------------------------------------------

function verdict(sec) {
  const s = sec || {};
  if (s.verification === "mitm-suspected")
    return { cls: "mitm", title: "Man in the middle suspected",
             text: s.reason || "The keys do not match an earlier call. Hang up unless you can explain it." };
  if (s.state === "secure" && (s.verification === "verified" || s.verification === "trusted-first-use"))
    return { cls: "verified", title: "Secure and verified",
             text: s.verification === "verified" ? "Encrypted; the other party is confirmed."
                                                  : "Encrypted; the other node's key is pinned since first use." };
  if (s.state === "secure")
    return { cls: "unverified", title: "Secure, not verified",
             text: "Encrypted. Read these words aloud; the other person must see the same:" };
  if (s.state === "local")
    return { cls: "local", title: "Local call", text: "Both phones are on this machine: the media never leaves it." };
  if (s.state === "pending")
    return { cls: "pending", title: "Securing…", text: "Negotiating keys with the other node." };
  if (s.state === "failed")
    return { cls: "insecure", title: "Security failed", text: s.reason || "" };
  return { cls: "insecure", title: "Not encrypted", text: s.reason || "The media of this call travels in clear." };
}

function duration(seconds) {
  const s = Math.round(seconds || 0);
  const m = Math.floor(s / 60);
  return m ? `${m} min ${s % 60} s` : `${s} s`;
}

function callCard(call) {
  const v = verdict(call.security);
  const sec = call.security || {};
  const media = call.media || {};
  const live = call.state !== "ended";
  const actions = el("div", { class: "actions" });
  if (live && sec.state === "secure" && sec.verification === "unverified") {
    actions.append(el("button", { class: "confirm", type: "button", "data-call-id": call.id,
                                  onclick: () => confirmSas(call.id) }, "The words match"));
  }
  if (live) {
    actions.append(el("button", { class: "hangup danger", type: "button", "data-call-id": call.id,
                                  disabled: call.state !== "active",
                                  title: call.state !== "active" ? "not answered yet" : "end the call for both parties",
                                  onclick: () => hangUp(call.id) }, "Hang up"));
  }
  return el("article", { class: `call ${live ? "live" : "ended"} ${v.cls}`, "data-call-id": call.id,
                         "data-state": call.state },
    el("div", { class: "call-head" },
      el("span", { class: "parties" }, call.from, " → ", call.to),
      el("span", { class: "call-state" }, call.state === "ended" ? `ended (${call.outcome})` : call.state),
      el("span", { class: "muted" }, `${call.direction}, ${call.route}, ${duration(call.duration_s)}`)),
    el("div", { class: `security ${v.cls}`, "data-security": v.cls },
      el("strong", {}, v.title), " ", live ? el("span", {}, v.text) : null,
      (sec.sas && (v.cls === "unverified" || v.cls === "mitm")) ? el("div", { class: "sas" }, sec.sas) : null,
      (sec.sas && v.cls === "verified") ? el("span", { class: "muted" }, ` (SAS ${sec.sas})`) : null),
    el("div", { class: "media muted" },
      media.codec ? `${media.codec}  ` : "",
      media.local ? `${media.local} ⇄ ${media.remote || "?"}  ` : "",
      `packets in ${media.packets_in || 0}, out ${media.packets_out || 0}, lost ${media.lost || 0}`,
      sec.cipher ? `  ${sec.cipher}` : "",
      call.remote_node ? `  node ${String(call.remote_node).slice(0, 16)}` : ""),
    actions);
}

function renderCalls() {
  const box = $("calls");
  const live = state.calls.filter(c => c.state !== "ended");
  const ended = state.calls.filter(c => c.state === "ended").slice(0, 8);
  box.replaceChildren();
  if (!live.length && !ended.length) { box.append(el("p", { class: "muted" }, "no calls")); return; }
  if (!live.length) box.append(el("p", { class: "muted", id: "no-live" }, "no call in progress"));
  for (const call of [...live, ...ended]) box.append(callCard(call));
}

function renderTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map(cells => el("tr", {}, cells.map(c => el("td", {}, c ?? "-")))));
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "none")));
}

function renderStatus(s) {
  $("node").textContent = `${s.name} · ${s.role} · ${s.version}`;
  const items = [["node id", s.node_id || "-"], ["signing key", s.key_fingerprint || "-"],
                 ["security policy", s.security_policy], ["up", duration(s.uptime_s)],
                 ["calls", `${s.calls_active} active, ${s.calls_total} since start`],
                 ["listening", (s.listeners || []).join("\n")]];
  $("status").replaceChildren(...items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

// -- data -------------------------------------------------------------------------------------

async function refresh() {
  try {
    const [status, regs, peers, calls] = await Promise.all([
      api("GET", "/api/status"), api("GET", "/api/registrations"),
      api("GET", "/api/peers"), api("GET", "/api/calls")]);
    renderStatus(status);
    renderTable("registrations", regs.map(r => [r.user, r.contact.replace(/^[^<]*<([^>]*)>.*$/, "$1"),
                                                r.source, `${r.expires_s} s`]));
    renderTable("peers", peers.map(p => [String(p.node_id).slice(0, 16), (p.routes || []).join(", "),
      (p.addresses || []).map(a => `${a.kind}:${a.host}:${a.port}`).join(", "),
      p.last_seen_s === null ? "-" : `${p.last_seen_s} s ago`]));
    state.calls = calls;
    renderCalls();
    message("");
  } catch (error) {
    if (error instanceof Unauthorized) return signOut(error.message);
    message(String(error.message || error), true);
  }
}

function scheduleRefresh() {
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(() => { state.refreshTimer = null; refresh(); }, 150);
}

function onEvent(event) {
  if ((event.type === "call" || event.type === "security") && event.call) {
    const index = state.calls.findIndex(c => c.id === event.call.id);
    if (index >= 0) state.calls[index] = event.call; else state.calls.unshift(event.call);
    renderCalls();
  }
  scheduleRefresh();
}

function connectEvents() {
  if (state.events) state.events.close();
  const source = new EventSource("/api/events?token=" + encodeURIComponent(state.token));
  state.events = source;
  const pill = $("live");
  source.onopen = () => { pill.textContent = "live"; pill.className = "pill on"; refresh(); };
  source.onerror = () => { pill.textContent = "reconnecting"; pill.className = "pill off"; };
  source.onmessage = (msg) => { try { onEvent(JSON.parse(msg.data)); } catch (e) { /* ignore */ } };
}

async function hangUp(id) {
  try { await api("POST", `/api/calls/${encodeURIComponent(id)}/hangup`); message(`call ${id} ended`); }
  catch (error) { message(String(error.message || error), true); }
  refresh();
}

async function confirmSas(id) {
  try { await api("POST", `/api/calls/${encodeURIComponent(id)}/confirm-sas`, { verified: true }); }
  catch (error) { message(String(error.message || error), true); }
  refresh();
}

// -- sign in ----------------------------------------------------------------------------------

function signOut(why) {
  sessionStorage.removeItem(KEY);
  state.token = null;
  if (state.events) { state.events.close(); state.events = null; }
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
  $("token").value = "";
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  refresh();
  connectEvents();
  if (!state.ticker) {  // packet counters of live calls move without events
    state.ticker = setInterval(() => {
      if (state.token && state.calls.some(c => c.state !== "ended")) refresh();
    }, 2000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(KEY, token);
    state.token = token;
    start();
  });
  state.token = takeToken();
  if (state.token) start(); else signOut("");
});
