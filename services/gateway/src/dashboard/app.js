// The Runnel dashboard: plain JavaScript over the gateway's HTTP API, no build step.
//
// What it shows lives in the URL's query string, so a view can be reloaded, bookmarked or
// shared: `topk` and `k` for the table, `series`, `key` and `value` for the chart. A query
// the URL does not name is picked among those that have results: for the table
// `meetup_topics` if it has, for both the one whose most recent window is the newest (the
// liveliest); if none has results yet, the query of the first result that arrives. A key
// is the first of the query's keys. The select boxes change any of them; the URL follows.
"use strict";

const params = new URLSearchParams(location.search);
const topkSize = params.get("k") || "10";
/** What is shown; `null` until picked. */
const shown = {
  topk: params.get("topk"),
  series: params.get("series"),
  key: params.get("key"),
};
/** The value charted: the URL's `value`, else `avg` or `count` if the results have one. */
const valueParam = params.get("value");
/** The table's query when the URL names none and it has results: the book's example. */
const PREFERRED_TOPK = "meetup_topics";
/** The query names offered. */
const queries = [];
/** window_start_ms → value, for the key shown. */
const points = new Map();

const $ = (id) => document.getElementById(id);

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function format(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

async function json(url) {
  const response = await fetch(url);
  return response.ok ? response.json() : null;
}

// ---- choices -----------------------------------------------------------------------------
/** Puts what is shown into the URL, without a reload or a history entry. */
function remember() {
  for (const name of ["topk", "series", "key"]) {
    if (shown[name]) params.set(name, shown[name]);
    else params.delete(name);
  }
  history.replaceState(null, "", `${location.pathname}?${params}`);
}

/** Adds `value` to `select`, in order, once. */
function addOption(select, value) {
  if ([...select.options].some((o) => o.value === value)) return;
  const option = document.createElement("option");
  option.value = value;
  option.textContent = value;
  const next = [...select.options].find((o) => o.value > value);
  select.insertBefore(option, next || null);
}

/** Sets `select` to `value`, or to a placeholder saying what it waits for. */
function choose(select, value, waiting) {
  let placeholder = select.querySelector('option[value=""]');
  if (value) {
    if (placeholder) placeholder.remove();
    addOption(select, value);
  } else if (!placeholder) {
    placeholder = document.createElement("option");
    placeholder.value = "";
    placeholder.textContent = waiting;
    select.prepend(placeholder);
  }
  select.value = value || "";
}

function addQuery(name) {
  if (queries.includes(name)) return;
  queries.push(name);
  addOption($("topk-query"), name);
  addOption($("series-query"), name);
}

/** A query's top keys in its most recent window; `null` if it has no results. */
async function topOf(query, k) {
  const top = await json(`/v1/topk/${encodeURIComponent(query)}?k=${k}`);
  return top && top.window_start_ms != null ? top : null;
}

// ---- top keys ----------------------------------------------------------------------------
let topkTimer = null;
async function refreshTopK() {
  topkTimer = null;
  const query = shown.topk;
  const top = query ? await topOf(query, topkSize) : null;
  if (query !== shown.topk) return;
  $("topk-ranked-by").textContent = (top && top.ranked_by) || "count";
  $("topk-window").textContent = top ? `window from ${top.window_start}` : "";
  const rows = $("topk-rows");
  const before = new Map([...rows.querySelectorAll("tr[data-key]")]
    .map((tr) => [tr.dataset.key, tr.dataset.value]));
  rows.replaceChildren();
  const results = top ? top.results : [];
  results.forEach((result, i) => {
    const value = result.values[top.ranked_by];
    const tr = document.createElement("tr");
    tr.dataset.key = result.key;
    tr.dataset.value = String(value);
    if (before.get(result.key) !== String(value)) tr.className = "changed";
    tr.append(cell(String(i + 1), "rank"), cell(result.key, "key"), cell(format(value), "value"));
    rows.append(tr);
  });
  if (results.length === 0) {
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

function showTopK(query) {
  shown.topk = query;
  choose($("topk-query"), query, "(waiting for results)");
  remember();
  refreshTopK();
}

// ---- time series -------------------------------------------------------------------------
/** Charts `query` for `key`; with no key, the first of the query's keys. */
async function showSeries(query, key) {
  shown.series = query;
  shown.key = key;
  const keys = $("series-key");
  keys.replaceChildren();
  choose($("series-query"), query, "(waiting for results)");
  choose(keys, key, "(waiting for a key)");
  remember();
  loadSeries();
  if (!query) return;
  const top = await topOf(query, 1000);
  if (query !== shown.series) return;
  for (const result of top ? top.results : []) addOption(keys, result.key);
  // The first key, not the "(waiting for a key)" placeholder that sorts before it: with
  // results in the store the chart shows at once, not only when the next window closes.
  const first = [...keys.options].find((option) => option.value);
  if (!shown.key && first) {
    shown.key = first.value;
    loadSeries();
  }
  choose(keys, shown.key, "(waiting for a key)");
  remember();
}

async function loadSeries() {
  const [query, key] = [shown.series, shown.key];
  points.clear();
  drawSeries();
  if (!query || !key) return;
  const url = `/v1/results/${encodeURIComponent(query)}/${encodeURIComponent(key)}/range?limit=500`;
  const range = await json(url);
  if (query !== shown.series || key !== shown.key) return;
  for (const result of range ? range.results : []) addPoint(result);
  drawSeries();
}

function addPoint(result) {
  const names = Object.keys(result.values);
  const name = valueParam || ["avg", "count"].find((n) => names.includes(n)) || names.sort()[0];
  $("series-value-name").textContent = name || "";
  const value = result.values[name];
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

$("topk-query").addEventListener("change", (event) => showTopK(event.target.value || null));
$("series-query").addEventListener("change", (event) => {
  showSeries(event.target.value || null, null);
});
$("series-key").addEventListener("change", (event) => {
  shown.key = event.target.value || null;
  remember();
  loadSeries();
});

// ---- health ------------------------------------------------------------------------------
async function refreshHealth() {
  try {
    const response = await fetch("/v1/pipeline");
    const health = await response.json();
    if (!response.ok) {
      $("gateway-stats").textContent = `pipeline health: ${health.error}`;
      return;
    }
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
    addQuery(result.query);
    if (!shown.topk) showTopK(result.query);
    if (!shown.series) showSeries(result.query, shown.key || result.key);
    if (result.query === shown.topk) scheduleTopK();
    if (result.query === shown.series) {
      addOption($("series-key"), result.key);
      if (!shown.key) {
        shown.key = result.key;
        choose($("series-key"), shown.key, "");
        remember();
        loadSeries();
      } else if (result.key === shown.key) {
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

/** Offers the analyzer's queries (or, without its list, the usual ones), then picks. */
async function start() {
  const listed = await json("/v1/queries");
  const names = listed ? listed.queries.map((q) => q.name) : [];
  for (const name of names.length ? names : [PREFERRED_TOPK, "avg_value_per_key"]) addQuery(name);
  for (const name of [shown.topk, shown.series]) if (name) addQuery(name);
  const offered = [...queries];
  const tops = await Promise.all(offered.map((query) => topOf(query, 1)));
  const newest = offered
    .map((query, i) => [query, tops[i]])
    .filter(([, top]) => top)
    .sort((a, b) => b[1].window_start_ms - a[1].window_start_ms)
    .map(([query]) => query)[0] || null;
  const preferred = tops[offered.indexOf(PREFERRED_TOPK)] ? PREFERRED_TOPK : null;
  // A result that arrived meanwhile may have picked already: its choice stands.
  showTopK(shown.topk || preferred || newest);
  showSeries(shown.series || newest, shown.key);
}

start();
refreshHealth();
setInterval(refreshHealth, 2000);
connect();
