// The Runnel dashboard: plain JavaScript over the gateway's HTTP API, no build step.
"use strict";

const params = new URLSearchParams(location.search);
const topkQuery = params.get("topk") || "meetup_topics";
const topkSize = params.get("k") || "10";
const seriesQuery = params.get("series") || "avg_value_per_key";
const valueName = params.get("value") || "avg";
let seriesKey = params.get("key") || "";
/** window_start_ms → value, for the key shown. */
const points = new Map();

const $ = (id) => document.getElementById(id);
$("topk-query").textContent = topkQuery;
$("series-query").textContent = seriesQuery;
$("series-value-name").textContent = valueName;

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function format(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

// ---- top keys --------------------------------------------------------------------------
let topkTimer = null;
async function refreshTopK() {
  topkTimer = null;
  const response = await fetch(`/v1/topk/${encodeURIComponent(topkQuery)}?k=${topkSize}`);
  if (!response.ok) return;
  const top = await response.json();
  $("topk-ranked-by").textContent = top.ranked_by || "count";
  $("topk-window").textContent = top.window_start ? `window from ${top.window_start}` : "";
  const rows = $("topk-rows");
  const before = new Map([...rows.querySelectorAll("tr[data-key]")]
    .map((tr) => [tr.dataset.key, tr.dataset.value]));
  rows.replaceChildren();
  top.results.forEach((result, i) => {
    const value = result.values[top.ranked_by];
    const tr = document.createElement("tr");
    tr.dataset.key = result.key;
    tr.dataset.value = String(value);
    if (before.get(result.key) !== String(value)) tr.className = "changed";
    tr.append(cell(String(i + 1), "rank"), cell(result.key, "key"), cell(format(value), "value"));
    rows.append(tr);
  });
  if (top.results.length === 0) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    tr.append(cell("no results yet"));
    tr.firstChild.colSpan = 3;
    rows.append(tr);
  }
}
function scheduleTopK() {
  if (topkTimer === null) topkTimer = setTimeout(refreshTopK, 100);
}

// ---- time series -----------------------------------------------------------------------
function addKeyOption(key) {
  const select = $("series-key");
  if ([...select.options].some((o) => o.value === key)) return;
  const placeholder = select.querySelector('option[value=""]');
  if (placeholder) placeholder.remove();
  const option = document.createElement("option");
  option.value = key;
  option.textContent = key;
  select.append(option);
  select.value = seriesKey;
}

async function loadSeries() {
  points.clear();
  if (!seriesKey) return drawSeries();
  const url = `/v1/results/${encodeURIComponent(seriesQuery)}/${encodeURIComponent(seriesKey)}/range?limit=500`;
  const response = await fetch(url);
  if (response.ok) {
    for (const result of (await response.json()).results) addPoint(result);
  }
  drawSeries();
}

function addPoint(result) {
  const value = result.values[valueName];
  if (typeof value === "number") points.set(result.window_start_ms, value);
}

function drawSeries() {
  const svg = $("series-chart");
  svg.replaceChildren();
  const sorted = [...points.entries()].sort((a, b) => a[0] - b[0]).slice(-120);
  $("series-latest").textContent = sorted.length ? format(sorted[sorted.length - 1][1]) : "–";
  if (sorted.length === 0) return;
  const [w, h, pad] = [640, 240, 24];
  const xs = sorted.map((p) => p[0]);
  const ys = sorted.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const x = (t) => pad + (x1 === x0 ? (w - 2 * pad) / 2 : ((t - x0) / (x1 - x0)) * (w - 2 * pad));
  const y = (v) => h - pad - ((v - y0) / (y1 - y0)) * (h - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", sorted.map(([t, v]) => `${x(t)},${y(v)}`).join(" "));
  svg.append(line);
  for (const [t, v] of sorted) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", x(t));
    dot.setAttribute("cy", y(v));
    dot.setAttribute("r", 3);
    svg.append(dot);
  }
  for (const [text, ty] of [[format(y1), pad - 6], [format(y0), h - 6]]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 4);
    label.setAttribute("y", ty);
    label.textContent = text;
    svg.append(label);
  }
}

$("series-key").addEventListener("change", (event) => {
  seriesKey = event.target.value;
  loadSeries();
});

// ---- health ------------------------------------------------------------------------------
async function refreshHealth() {
  try {
    const response = await fetch("/v1/pipeline");
    const health = await response.json();
    const rows = $("health-rows");
    rows.replaceChildren();
    for (const service of health.services) {
      const tr = document.createElement("tr");
      tr.dataset.service = service.name;
      tr.append(cell(service.name),
        cell(service.status, service.status === "SERVING" ? "SERVING" : "unhealthy"));
      rows.append(tr);
    }
    const g = health.gateway;
    $("gateway-stats").textContent =
      `gateway: store stream ${g.store_stream}, ${g.watchers} live clients, ` +
      `${g.webhooks_failing} failing webhooks, last sequence ${g.last_sequence}`;
  } catch (error) {
    $("gateway-stats").textContent = `gateway unreachable: ${error}`;
  }
}

// ---- live --------------------------------------------------------------------------------
function connect() {
  // EventSource reconnects by itself and resumes after Last-Event-ID: no result is missed.
  const events = new EventSource("/v1/watch");
  events.onopen = () => {
    document.body.dataset.live = "connected";
    $("live-text").textContent = "live";
  };
  events.onerror = () => {
    document.body.dataset.live = "reconnecting";
    $("live-text").textContent = "reconnecting…";
  };
  events.addEventListener("result", (event) => {
    const result = JSON.parse(event.data);
    $("sequence").textContent = String(result.sequence);
    if (result.query === topkQuery) scheduleTopK();
    if (result.query === seriesQuery) {
      if (!seriesKey) {
        seriesKey = result.key;
        addKeyOption(result.key);
        loadSeries();
      }
      addKeyOption(result.key);
      if (result.key === seriesKey) {
        addPoint(result);
        drawSeries();
      }
    }
  });
  events.addEventListener("gap", () => {
    // Results were dropped for this slow page: re-read what is shown.
    scheduleTopK();
    loadSeries();
  });
}

if (seriesKey) addKeyOption(seriesKey);
refreshTopK();
loadSeries();
refreshHealth();
setInterval(refreshHealth, 2000);
connect();
