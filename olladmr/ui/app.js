// olladmr's dashboard: subscribes to /internal/ui/events (Server-Sent Events read with fetch, so an admin key can go
// in a header, never in the URL), renders each snapshot in place, and polls /internal/ui/snapshot while the stream is
// down. Written for this page; no library, nothing loaded from elsewhere. Every value is set with textContent.
"use strict";

(function () {
  const KEY = "olladmr.adminKey";
  const POLL_MS = 2000;
  const RECONNECT_MS = 5000;
  const WINDOW_S = 300;
  const events = new Map(); // id -> event
  let pollTimer = null;
  let reconnectTimer = null;
  let streaming = false;
  let lastSnapshot = null;

  const $ = (id) => document.getElementById(id);

  function authHeaders() {
    const key = sessionStorage.getItem(KEY);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function setState(state, text) {
    const badge = $("connection");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  function locked(message) {
    stopPolling();
    streaming = false;
    setState("locked", "admin key required");
    $("main").hidden = true;
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    $("admin-key").focus();
  }

  // -- the stream

  async function openStream() {
    clearTimeout(reconnectTimer);
    let response;
    try {
      response = await fetch("/internal/ui/events", { headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      return streamDown();
    }
    if (response.status === 401) {
      return locked(sessionStorage.getItem(KEY) ? "That key was refused." : "");
    }
    if (!response.ok || !response.body) {
      return streamDown();
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          dispatch(block);
        }
      }
    } catch (err) {
      // the connection dropped
    }
    streamDown();
  }

  function dispatch(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    if (!data.length) return;
    let payload;
    try {
      payload = JSON.parse(data.join("\n"));
    } catch (err) {
      return;
    }
    if (!streaming) {
      streaming = true;
      stopPolling();
      setState("live", "live");
    }
    if (name === "snapshot") render(payload);
    else if (name === "events") payload.forEach(addEvent), renderEvents();
    else if (name === "event") addEvent(payload), renderEvents();
  }

  function streamDown() {
    streaming = false;
    if ($("key-form").hidden === false) return;
    setState("disconnected", "disconnected — polling the status API");
    startPolling();
    reconnectTimer = setTimeout(openStream, RECONNECT_MS);
  }

  // -- the fallback

  function startPolling() {
    if (pollTimer === null) {
      poll();
      pollTimer = setInterval(poll, POLL_MS);
    }
  }

  function stopPolling() {
    if (pollTimer !== null) clearInterval(pollTimer);
    pollTimer = null;
  }

  async function poll() {
    try {
      const response = await fetch("/internal/ui/snapshot", { headers: authHeaders(), cache: "no-store" });
      if (response.status === 401) return locked("");
      if (!response.ok) throw new Error("HTTP " + response.status);
      const snapshot = await response.json();
      render(snapshot);
      (snapshot.events || []).forEach(addEvent);
      renderEvents();
      if (!streaming) setState("polling", "disconnected — polling the status API");
    } catch (err) {
      if (!streaming) setState("disconnected", "disconnected — olladmr is not answering");
    }
  }

  // -- rendering

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function ms(value) {
    return value === null || value === undefined ? "–" : value < 10 ? value.toFixed(1) + " ms" : Math.round(value) + " ms";
  }

  function pair(latency) {
    return latency ? ms(latency.p50) + " / " + ms(latency.p95) : "–";
  }

  function tokens(count) {
    if (count === null || count === undefined) return "–";
    return count >= 10000 ? Math.round(count / 1000) + "k" : String(count);
  }

  function percent(rate) {
    return rate === null || rate === undefined ? "–" : (rate * 100).toFixed(rate && rate < 0.1 ? 1 : 0) + "%";
  }

  function ago(then, now) {
    if (!then) return "never";
    const s = Math.max(0, Math.round(now - then));
    return s < 90 ? s + " s ago" : Math.round(s / 60) + " min ago";
  }

  function render(snapshot) {
    lastSnapshot = snapshot;
    $("key-form").hidden = true;
    $("main").hidden = false;
    const service = snapshot.service || {};
    $("version").textContent = service.version ? "v" + service.version : "";
    const eps = service.endpoints || {};
    $("summary").textContent =
      (eps.routable ?? 0) + " of " + (eps.total ?? 0) + " endpoints routable · " +
      (service.active_requests ?? 0) + " in flight · " + (service.requests ? service.requests.total : 0) +
      " requests · balancer " + (service.balancer || "–") + (service.draining ? " · draining" : "");
    renderFleet(snapshot.endpoints || [], snapshot.time);
    renderModels(snapshot.models || []);
    renderTraffic(snapshot.traffic || { samples: [] }, snapshot.time);
  }

  function renderFleet(endpoints, now) {
    const body = $("fleet").tBodies[0];
    const rows = endpoints.map((ep) => {
      const tr = document.createElement("tr");
      tr.dataset.endpoint = ep.name;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = ep.name;
      tr.appendChild(name);
      cell(tr, ep.url, "url");
      const status = cell(tr, ep.status, "status");
      status.dataset.status = ep.status;
      if (ep.status_reason) {
        const reason = document.createElement("span");
        reason.className = "reason";
        reason.textContent = ep.status_reason;
        status.appendChild(reason);
      }
      cell(tr, ep.breaker, "breaker").dataset.breaker = ep.breaker;
      cell(tr, ep.priority, "num");
      cell(tr, ep.active_connections, "num");
      cell(tr, ep.queued, "num");
      const traffic = ep.traffic || {};
      cell(tr, traffic.requests ?? 0, "num requests");
      cell(tr, percent(traffic.error_rate), "num");
      cell(tr, pair(traffic.latency_ms), "num");
      cell(tr, ago(ep.last_check, now));
      cell(tr, (ep.models || []).join(", ") || "none");
      cell(tr, ep.loaded_models === null || ep.loaded_models === undefined ? "unknown" : ep.loaded_models.join(", ") || "none");
      cell(tr, (ep.prefilling ?? 0) + " / " + tokens(ep.prefill_queue_tokens), "num prefill");
      const cache = ep.prefix_cache;
      cell(tr, cache ? tokens(cache.tokens) + " / " + tokens(cache.capacity_tokens) : "–", "num cache");
      return tr;
    });
    body.replaceChildren(...rows);
  }

  function renderModels(models) {
    const body = $("models").tBodies[0];
    const rows = models.map((m) => {
      const tr = document.createElement("tr");
      tr.dataset.model = m.key || m.id;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = m.id + (m.aliases && m.aliases.length ? " (" + m.aliases.join(", ") + ")" : "");
      tr.appendChild(name);
      cell(tr, (m.endpoints || []).map((e) => e.name + (e.loaded ? " (loaded)" : "") + (e.routable ? "" : " (down)")).join(", "));
      cell(tr, m.requests ?? 0, "num requests");
      cell(tr, percent(m.error_rate), "num");
      cell(tr, pair(m.latency_ms), "num");
      cell(tr, m.ttft_ms ? ms(m.ttft_ms.p50) : "–", "num");
      const speed = m.tokens_per_second && m.tokens_per_second.p50;
      cell(tr, speed === null || speed === undefined ? "–" : speed.toFixed(1), "num");
      return tr;
    });
    body.replaceChildren(...rows);
  }

  function renderTraffic(traffic, now) {
    const samples = traffic.samples || [];
    const last = samples.length ? samples[samples.length - 1] : [now, 0, 0];
    $("now-requests").textContent = "now " + last[1].toFixed(1);
    $("now-tokens").textContent = "now " + last[2].toFixed(1);
    chart($("chart-requests"), samples, 1, now, "--chart");
    chart($("chart-tokens"), samples, 2, now, "--chart2");
  }

  function chart(canvas, samples, column, now, colour) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = canvas.clientHeight || canvas.height;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    const style = getComputedStyle(document.documentElement);
    const line = style.getPropertyValue(colour).trim();
    const grid = style.getPropertyValue("--line").trim();
    const text = style.getPropertyValue("--muted").trim();
    ctx.clearRect(0, 0, width, height);
    const top = Math.max(1, ...samples.map((s) => s[column])) * 1.15;
    const left = 4, bottom = height - 14;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    for (let i = 0; i <= 2; i++) {
      const y = 4 + ((bottom - 4) * i) / 2;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width, y); ctx.stroke();
    }
    ctx.fillStyle = text;
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText(top.toFixed(top < 10 ? 1 : 0) + "/s", left + 2, 14);
    ctx.fillText("−5 min", left + 2, height - 2);
    ctx.fillText("now", width - 24, height - 2);
    const x = (t) => left + ((width - left) * (WINDOW_S - (now - t))) / WINDOW_S;
    const y = (v) => bottom - ((bottom - 4) * v) / top;
    ctx.strokeStyle = line;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    for (const s of samples) {
      if (now - s[0] > WINDOW_S) continue;
      if (!started) { ctx.moveTo(x(s[0]), y(s[column])); started = true; }
      else ctx.lineTo(x(s[0]), y(s[column]));
    }
    ctx.stroke();
  }

  function addEvent(event) {
    if (event && event.id !== undefined) events.set(event.id, event);
  }

  function renderEvents() {
    const newest = [...events.values()].sort((a, b) => b.id - a.id).slice(0, 50);
    for (const id of [...events.keys()]) if (!newest.some((e) => e.id === id)) events.delete(id);
    const items = newest.map((e) => {
      const li = document.createElement("li");
      li.dataset.kind = e.kind;
      const when = document.createElement("time");
      const date = new Date(e.time * 1000);
      when.dateTime = date.toISOString();
      when.textContent = date.toLocaleTimeString();
      const kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = e.kind.replace("_", " ");
      const message = document.createElement("span");
      message.className = "message";
      message.textContent = e.message;
      li.append(when, kind, message);
      return li;
    });
    $("events").replaceChildren(...items);
    $("no-events").hidden = items.length > 0;
  }

  // -- start

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, $("admin-key").value);
      $("admin-key").value = "";
      $("key-form").hidden = true;
      setState("connecting", "connecting…");
      openStream();
    });
    openStream();
  });
})();
