// The tiermem console's page: hash routes, one server-sent event stream, small canvas plots.
"use strict";

const state = {
  info: null,
  samples: [],
  problems: new Map(),
  stream: null,
  streamFilter: "",
  eventsPaused: false,
  namespace: null,
  keyCursors: [],
  keyOffset: 0,
  keyNext: null,
  key: null,
  historyAfter: null,
  travelSeq: null,
  travelOffset: 0,
  travelNext: null,
  travelRequest: null,
  travelNamespace: null,
  shownSeq: 0,
  refreshedAt: 0,
  historyMore: false,
  lastEventSeq: 0,
};

const MAX_EVENT_ROWS = 500;
const REFRESH_MS = 2000;
const COLORS = ["#2f6fb7", "#d9822b", "#3a9a5b", "#b3261e", "#7b5ea7", "#6b7380"];

// ----------------------------------------------------------- helpers

const byId = (id) => document.getElementById(id);

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function formatNumber(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function formatBytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${formatNumber(size, unit ? 1 : 0)} ${units[unit]}`;
}

function formatImportance(value) {
  return value === null || value === undefined ? "–" : formatNumber(value, 3);
}

function formatTime(ms) {
  if (ms === null || ms === undefined) return "–";
  return new Date(ms).toISOString().replace("T", " ").replace("Z", "");
}

function namespaceLink(namespace) {
  return element("a", { href: `#/ns/${encodeURIComponent(namespace)}` }, namespace);
}

function keyLink(namespace, key) {
  return element("a", { href: `#/ns/${encodeURIComponent(namespace)}/key/${encodeURIComponent(key)}`, class: "key-link" }, key);
}

function showError(id, message) {
  const node = byId(id);
  node.textContent = message || "";
  node.hidden = !message;
}

// Fetch a JSON API path; a failure becomes an Error whose message the page shows as is.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { credentials: "same-origin", ...options });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Error("the console server did not respond: is `tiermem console` still running?");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : `the console server responded with HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}

function setProblem(source, message) {
  if (message) state.problems.set(source, message);
  else state.problems.delete(source);
  const box = byId("problems");
  box.replaceChildren(...[...new Set(state.problems.values())].map((text) => element("p", {}, text)));
  box.hidden = state.problems.size === 0;
}

function setSampleProblems(problems) {
  for (const source of [...state.problems.keys()]) {
    if (source.startsWith("sample:")) state.problems.delete(source);
  }
  (problems || []).forEach((text, index) => state.problems.set(`sample:${index}`, text));
  setProblem("refresh", null);
}

// ----------------------------------------------------------- routing

function route() {
  const hash = location.hash.replace(/^#\/?/, "") || "overview";
  const parts = hash.split("/");
  let view = ["events", "namespaces"].includes(parts[0]) ? parts[0] : "overview";
  const openers = { overview: renderOverview, events: renderEventTypes, namespaces: loadNamespaces };
  let open = openers[view];
  if (parts[0] === "ns" && parts.length >= 2) {
    const namespace = decodeURIComponent(parts[1]);
    if (parts[2] === "key" && parts.length >= 4) {
      view = "key";
      open = () => openKey(namespace, decodeURIComponent(parts.slice(3).join("/")));
    } else if (parts[2] === "travel") {
      view = "travel";
      open = () => openTravel(namespace);
    } else {
      view = "namespace";
      open = () => openNamespace(namespace);
    }
  }
  for (const link of document.querySelectorAll("nav a")) {
    const section = ["namespace", "key", "travel"].includes(view) ? "namespaces" : view;
    link.classList.toggle("active", link.dataset.nav === section);
  }
  // Show the section before drawing into it: a hidden canvas has no size.
  for (const section of document.querySelectorAll("section.view")) {
    section.hidden = section.id !== `view-${view}`;
  }
  open();
}

// ----------------------------------------------------------- the stream

function streamQuery() {
  const parameters = new URLSearchParams();
  for (const box of document.querySelectorAll("#event-types input:checked")) parameters.append("type", box.value);
  const namespace = byId("event-namespace").value.trim();
  if (namespace) parameters.set("namespace", namespace);
  return parameters.toString();
}

function connectStream() {
  const query = streamQuery();
  if (state.stream && query === state.streamFilter) return;
  if (state.stream) state.stream.close();
  state.streamFilter = query;
  const source = new EventSource(`/api/stream${query ? `?${query}` : ""}`);
  state.stream = source;

  const connection = byId("connection");
  source.onopen = () => {
    connection.textContent = "live";
    connection.className = "pill live";
    setProblem("stream", null);
  };
  source.onerror = () => {
    connection.textContent = "reconnecting";
    connection.className = "pill down";
    setProblem("stream", "the live stream from the console server was interrupted; the page is reconnecting");
  };

  source.addEventListener("hello", (message) => {
    const hello = JSON.parse(message.data);
    byId("events").tBodies[0].replaceChildren();
    state.lastEventSeq = 0;
    addEvents(hello.events, 0);
    if (hello.sample) addSample(hello.sample);
  });
  source.addEventListener("events", (message) => {
    const batch = JSON.parse(message.data);
    addEvents(batch.events, batch.skipped);
  });
  source.addEventListener("redact", (message) => {
    for (const item of JSON.parse(message.data)) redactRows(item);
  });
  source.addEventListener("sample", (message) => addSample(JSON.parse(message.data)));
  source.addEventListener("reset", () => {
    state.stream.close();
    state.stream = null;
    connectStream();
  });
}

function addSample(sample) {
  const last = state.samples[state.samples.length - 1];
  if (last && last.t === sample.t) return;
  state.samples.push(sample);
  const keep = (state.info && state.info.samples) || 300;
  if (state.samples.length > keep) state.samples.splice(0, state.samples.length - keep);
  setSampleProblems(sample.problems);
  if (!byId("view-overview").hidden) renderOverview();
  refreshFromProjections(sample);
}

// Reload the first page of the open key list or key history when the
// projections have read further, at most every REFRESH_MS.
function refreshFromProjections(sample) {
  const checkpoint = sample.projections ? Math.min(...Object.values(sample.projections)) : null;
  if (checkpoint === null || Date.now() - state.refreshedAt < REFRESH_MS) return;
  if (!byId("view-namespace").hidden && state.keyCursors.length === 0 && state.keyOffset === 0 && checkpoint > state.shownSeq) {
    state.refreshedAt = Date.now();
    loadKeys();
  } else if (!byId("view-key").hidden && !state.historyMore && checkpoint > state.shownSeq) {
    state.refreshedAt = Date.now();
    loadHistory(false);
  } else if (!byId("view-namespaces").hidden && checkpoint > state.shownSeq) {
    state.refreshedAt = Date.now();
    loadNamespaces();
  }
  if (!byId("view-travel").hidden && sample.last_seq !== null) {
    const slider = byId("travel-slider");
    if (Number(slider.max) < sample.last_seq) slider.max = sample.last_seq;
  }
}

// ----------------------------------------------------------- live events

function renderEventTypes() {
  const box = byId("event-types");
  if (box.querySelector("input") || !state.info) return;
  for (const type of state.info.event_types) {
    box.append(element("label", {}, element("input", { type: "checkbox", value: type, checked: true }), ` ${type}`));
  }
}

function eventDetail(item) {
  if (item.type === "Store") {
    if (item.redacted || item.value === null) {
      return element("span", { class: "hidden-value" }, "value hidden: the key was forgotten later");
    }
    const tags = item.tags && item.tags.length ? ` tags ${item.tags.join(", ")}` : "";
    return element("span", {}, element("code", {}, item.value), ` importance ${formatImportance(item.importance)}${tags}`);
  }
  if (item.type === "Search") return element("span", {}, "query ", element("code", {}, item.query));
  if (item.type === "Maintain") return element("span", {}, item.namespace === null ? "maintenance pass over every namespace" : "maintenance pass");
  if (item.type === "Forget") return element("span", {}, item.conditional ? "conditional forget" : "forget");
  return element("span", {}, "read");
}

function eventRow(item) {
  const key = item.key !== undefined ? keyLink(item.namespace, item.key) : "";
  const row = element(
    "tr",
    { "data-seq": item.seq, "data-type": item.type },
    element("td", { class: "number" }, item.seq),
    element("td", {}, formatTime(item.ts)),
    element("td", {}, element("span", { class: `badge ${item.type}` }, item.type)),
    element("td", {}, item.namespace === null ? element("span", { class: "muted" }, "every namespace") : namespaceLink(item.namespace)),
    element("td", {}, key),
    element("td", { class: "detail" }, eventDetail(item)),
  );
  row._event = item;
  return row;
}

function addEvents(events, skipped) {
  const body = byId("events").tBodies[0];
  if (skipped) byId("events-note").textContent = `${formatNumber(skipped)} events were not shown: the stream was faster than the page lists it.`;
  // An event can come both in the stream's backlog and right after it.
  const fresh = events.filter((item) => item.seq > state.lastEventSeq);
  if (fresh.length) state.lastEventSeq = fresh[fresh.length - 1].seq;
  if (state.eventsPaused || !fresh.length) return;
  const rows = fresh.map(eventRow).reverse();
  body.prepend(...rows);
  while (body.rows.length > MAX_EVENT_ROWS) body.deleteRow(body.rows.length - 1);
}

function redactRows(redaction) {
  for (const row of byId("events").tBodies[0].rows) {
    const item = row._event;
    if (item && item.type === "Store" && item.namespace === redaction.namespace && item.key === redaction.key && item.seq < redaction.before_seq) {
      item.redacted = true;
      item.value = null;
      row.querySelector(".detail").replaceChildren(eventDetail(item));
    }
  }
}

// ----------------------------------------------------------- overview

function card(label, value) {
  return element("div", { class: "card" }, element("div", { class: "label" }, label), element("div", { class: "number" }, value));
}

function renderOverview() {
  const latest = state.samples[state.samples.length - 1];
  const cards = byId("cards");
  if (!latest) {
    cards.replaceChildren(card("status", "waiting for the first sample"));
    return;
  }
  const tiers = latest.tiers || {};
  const pending = latest.shards.reduce((total, shard) => total + (shard.pending || 0), 0);
  cards.replaceChildren(
    card("last seq", formatNumber(latest.last_seq)),
    card("ingest, events/s", formatNumber(latest.ingest_rate, 1)),
    card("apply, events/s", formatNumber(latest.apply_rate, 1)),
    card("not yet applied", latest.shards.length ? formatNumber(pending) : "–"),
    card("namespaces", formatNumber(latest.namespaces)),
    card("STM records", formatNumber(tiers.stm && tiers.stm.records)),
    card("IM records", formatNumber(tiers.im && tiers.im.records)),
    card("LTM records", formatNumber(tiers.ltm && tiers.ltm.records)),
  );

  const samples = state.samples;
  const series = (pick) => samples.map((sample) => {
    const value = pick(sample);
    return value === null || value === undefined ? null : value;
  });
  drawChart("tiers", ["stm", "im", "ltm"].map((tier) => ({ label: tier, values: series((s) => s.tiers && s.tiers[tier] && s.tiers[tier].records) })));
  drawChart("lanes", ["high", "normal", "low"].map((lane) => ({ label: lane, values: series((s) => s.lane_rates && s.lane_rates[lane]) })));
  drawChart("rates", [
    { label: "ingest", values: series((s) => s.ingest_rate) },
    { label: "apply", values: series((s) => s.apply_rate) },
  ]);
  const shards = latest.shards.map((shard) => shard.shard);
  drawChart("apply-lag", shards.map((index) => ({
    label: `shard ${index}`,
    values: series((s) => {
      const found = s.shards.find((shard) => shard.shard === index);
      return found ? found.pending : null;
    }),
  })));
  const projections = Object.keys(latest.projections || {});
  drawChart("projection-lag", projections.map((name) => ({ label: name, values: series((s) => s.projection_lag && s.projection_lag[name]) })));

  byId("shards").tBodies[0].replaceChildren(...latest.shards.map((shard) => element(
    "tr", {},
    element("td", { class: "number" }, shard.shard),
    element("td", { class: "number" }, formatNumber(shard.watermark)),
    element("td", { class: "number" }, formatNumber(shard.keys)),
    element("td", { class: "number" }, shard.pending === null ? "–" : `${shard.at_least ? "≥ " : ""}${formatNumber(shard.pending)}`),
    element("td", { class: "number" }, formatNumber(shard.apply_rate, 1)),
    element("td", { class: "number" }, shard.pid),
    element("td", {}, shard.node),
  )));
  byId("projections").tBodies[0].replaceChildren(...projections.map((name) => element(
    "tr", {},
    element("td", {}, name),
    element("td", { class: "number" }, formatNumber(latest.projections[name])),
    element("td", { class: "number" }, latest.projection_lag ? formatNumber(latest.projection_lag[name]) : "–"),
  )));
}

// Draw line series on a canvas: y from 0 to the largest value, x over the samples kept.
function drawChart(name, series) {
  const canvas = byId(`chart-${name}`);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.scale(ratio, ratio);
  context.clearRect(0, 0, width, height);

  const points = Math.max(2, ...series.map((item) => item.values.length));
  let top = 0;
  for (const item of series) for (const value of item.values) if (value !== null && value > top) top = value;
  const ceiling = top > 0 ? top * 1.1 : 1;
  const left = 4;
  const bottom = height - 14;

  context.strokeStyle = "#dde1e7";
  context.lineWidth = 1;
  context.beginPath();
  context.moveTo(left, bottom + 0.5);
  context.lineTo(width, bottom + 0.5);
  context.stroke();
  context.fillStyle = "#6b7380";
  context.font = "11px system-ui, sans-serif";
  context.fillText(`max ${formatNumber(top, top < 10 ? 1 : 0)}`, left, 11);
  const seconds = Math.round(((state.info && state.info.sample_interval_s) || 1) * (points - 1));
  context.fillText(`${seconds} s ago`, left, height - 2);
  context.textAlign = "right";
  context.fillText("now", width - 2, height - 2);
  context.textAlign = "left";

  series.forEach((item, index) => {
    context.strokeStyle = COLORS[index % COLORS.length];
    context.lineWidth = 1.6;
    context.beginPath();
    let drawing = false;
    const offset = points - item.values.length;
    item.values.forEach((value, position) => {
      if (value === null) {
        drawing = false;
        return;
      }
      const x = left + ((position + offset) / (points - 1)) * (width - left - 2);
      const y = bottom - (value / ceiling) * (bottom - 16);
      if (drawing) context.lineTo(x, y);
      else context.moveTo(x, y);
      drawing = true;
    });
    context.stroke();
  });

  byId(`legend-${name}`).replaceChildren(...series.map((item, index) => {
    const values = item.values.filter((value) => value !== null);
    const now = values.length ? values[values.length - 1] : null;
    const swatch = element("i");
    // A style property set through the CSSOM, because the page's CSP forbids style attributes.
    swatch.style.background = COLORS[index % COLORS.length];
    return element("span", {}, swatch, `${item.label}: ${formatNumber(now, now !== null && now < 10 ? 1 : 0)}`);
  }));
}

async function takeDigest() {
  const button = byId("digest-button");
  const output = byId("digest");
  button.disabled = true;
  output.replaceChildren(element("p", { class: "muted" }, "waiting for every shard to apply what came before…"));
  try {
    const reply = await postJSON("/api/digest", {});
    output.replaceChildren(
      element("p", {}, `at seq ${formatNumber(reply.seq)}`),
      element("table", {},
        element("thead", {}, element("tr", {}, ...["shard", "tier", "records", "digest"].map((name) => element("th", {}, name)))),
        element("tbody", {}, ...reply.tiers.map((item) => element("tr", {},
          element("td", { class: "number" }, item.shard),
          element("td", {}, item.tier),
          element("td", { class: "number" }, formatNumber(item.records)),
          element("td", {}, element("code", {}, item.digest.slice(0, 16))),
        ))),
      ),
    );
  } catch (error) {
    output.replaceChildren(element("p", { class: "error" }, error.message));
  } finally {
    button.disabled = false;
  }
}

// ----------------------------------------------------------- namespaces

async function loadNamespaces() {
  showError("namespaces-error", null);
  try {
    const reply = await api("/api/namespaces");
    state.shownSeq = reply.stats_seq;
    byId("namespaces-note").textContent = `From the stats projection, which has read the log up to seq ${formatNumber(reply.stats_seq)}.`;
    byId("namespace-list").replaceChildren(...reply.namespaces.map((item) => element("option", { value: item.namespace })));
    byId("namespaces").tBodies[0].replaceChildren(...reply.namespaces.map((item) => element(
      "tr", {},
      element("td", {}, namespaceLink(item.namespace)),
      element("td", { class: "number" }, formatNumber(item.records)),
      element("td", { class: "number" }, formatNumber(item.tiers.stm || 0)),
      element("td", { class: "number" }, formatNumber(item.tiers.im || 0)),
      element("td", { class: "number" }, formatNumber(item.tiers.ltm || 0)),
      element("td", { class: "number" }, formatBytes(item.bytes)),
    )));
    if (!reply.namespaces.length) {
      byId("namespaces").tBodies[0].replaceChildren(element("tr", {}, element("td", { colspan: 6, class: "muted" }, "no namespace has a current memory yet")));
    }
  } catch (error) {
    showError("namespaces-error", error.message);
  }
}

function openNamespace(namespace) {
  if (state.namespace !== namespace) {
    state.namespace = namespace;
    state.keyCursors = [];
    state.keyOffset = 0;
    byId("search-results").replaceChildren();
    byId("search-input").value = "";
    showError("search-error", null);
  }
  byId("namespace-name").textContent = namespace;
  byId("namespace-travel").href = `#/ns/${encodeURIComponent(namespace)}/travel`;
  loadKeys();
}

async function loadKeys() {
  const namespace = state.namespace;
  const order = byId("key-order").value;
  const parameters = new URLSearchParams({ namespace, order, limit: "100" });
  if (order === "key" && state.keyCursors.length) parameters.set("after", state.keyCursors[state.keyCursors.length - 1]);
  if (order === "reads") parameters.set("offset", String(state.keyOffset));
  showError("keys-error", null);
  try {
    const page = await api(`/api/keys?${parameters}`);
    if (namespace !== state.namespace) return;
    state.shownSeq = Math.min(page.stats_seq, page.history_seq);
    state.keyNext = order === "key" ? page.next_after : page.next_offset;
    const first = order === "key" ? state.keyCursors.length * 100 : state.keyOffset;
    let info = `no current memories in this namespace (stats projection at seq ${formatNumber(page.stats_seq)})`;
    if (page.total) {
      info = `${formatNumber(first + 1)}–${formatNumber(first + page.keys.length)} of ${formatNumber(page.total)} memories, from the stats projection at seq ${formatNumber(page.stats_seq)}`;
      if (page.importance_error) info += `; importance is not shown because ${page.importance_error}`;
      else if (!page.importance_complete) info += "; importance is not shown where its Store could not be read in time";
    }
    byId("keys-info").textContent = info;
    byId("keys-next").disabled = state.keyNext === null;
    byId("keys-previous").disabled = order === "key" ? state.keyCursors.length === 0 : state.keyOffset === 0;
    byId("keys").tBodies[0].replaceChildren(...page.keys.map((item) => element(
      "tr", {},
      element("td", {}, keyLink(namespace, item.key)),
      element("td", {}, item.tier),
      element("td", { class: "number" }, formatImportance(item.importance)),
      element("td", { class: "number" }, formatNumber(item.access_count)),
      element("td", {}, formatTime(item.last_access_ts)),
      element("td", { class: "number" }, formatNumber(item.bytes)),
      element("td", {}, formatTime(item.updated_ts)),
    )));
  } catch (error) {
    showError("keys-error", error.message);
  }
}

function pageKeys(step) {
  const order = byId("key-order").value;
  if (order === "key") {
    if (step > 0 && state.keyNext !== null) state.keyCursors.push(state.keyNext);
    if (step < 0) state.keyCursors.pop();
  } else if (step > 0 && state.keyNext !== null) {
    state.keyOffset = state.keyNext;
  } else if (step < 0) {
    state.keyOffset = Math.max(0, state.keyOffset - 100);
  }
  loadKeys();
}

async function runSearch(event) {
  event.preventDefault();
  const query = byId("search-input").value;
  const results = byId("search-results");
  showError("search-error", null);
  results.replaceChildren(element("p", { class: "muted" }, "searching…"));
  try {
    const reply = await postJSON("/api/search", { namespace: state.namespace, query, limit: 50 });
    if (!reply.hits.length) {
      results.replaceChildren(element("p", { class: "muted" }, `no memory matches every word of "${query}" (index at seq ${formatNumber(reply.index_seq)})`));
      return;
    }
    results.replaceChildren(
      element("p", { class: "muted" }, `${reply.hits.length} hits for "${query}", best first, from the search index at seq ${formatNumber(reply.index_seq)}`),
      element("ol", { id: "search-hits" }, ...reply.hits.map((hit) => element(
        "li", {},
        keyLink(state.namespace, hit.key), ` (${hit.tier}, score ${Number(hit.score).toPrecision(3)}) `,
        element("span", { class: "muted" }, hit.snippet),
      ))),
    );
  } catch (error) {
    results.replaceChildren();
    showError("search-error", error.message);
  }
}

// ----------------------------------------------------------- one key

function describeEntry(entry) {
  switch (entry.kind) {
    case "store": return "stored in stm";
    case "read": return entry.tier ? `read, served by ${entry.tier}` : "read, not found";
    case "move": return `moved ${entry.tier} → ${entry.target} (${entry.reason})`;
    case "forget": return entry.tier ? `forgotten, removed from ${entry.tier}` : "forgotten (it did not exist)";
    case "delete": return `deleted from ${entry.tier} (${entry.reason})`;
    case "conflict": return `conditional write rejected (expected:actual version ${entry.reason})`;
    default: return entry.kind;
  }
}

function valueCell(entry) {
  switch (entry.value_state) {
    case "shown": return element("td", { class: "value" }, entry.value);
    case "forgotten": return element("td", { class: "value" }, element("span", { class: "hidden-value" }, "hidden: the key was forgotten later"));
    case "withheld": return element("td", { class: "value" }, element("span", { class: "hidden-value" }, "hidden: see the note above"));
    case "missing": return element("td", { class: "value" }, element("span", { class: "hidden-value" }, "not available: see the note above, if any"));
    default: return element("td", { class: "value" });
  }
}

function openKey(namespace, key) {
  state.key = { namespace, key };
  state.historyAfter = null;
  byId("key-name").textContent = key;
  const link = byId("key-namespace");
  link.textContent = namespace;
  link.href = `#/ns/${encodeURIComponent(namespace)}`;
  byId("history").tBodies[0].replaceChildren();
  byId("key-get").hidden = !(state.info && state.info.allow_get);
  byId("key-get-result").textContent = "";
  loadHistory(false);
}

async function loadHistory(more) {
  const { namespace, key } = state.key;
  const parameters = new URLSearchParams({ namespace, key, limit: "200" });
  if (more && state.historyAfter) {
    parameters.set("after_seq", state.historyAfter[0]);
    parameters.set("after_position", state.historyAfter[1]);
  }
  showError("key-error", null);
  try {
    const reply = await api(`/api/history?${parameters}`);
    if (!state.key || state.key.key !== key || state.key.namespace !== namespace) return;
    state.shownSeq = Math.min(reply.stats_seq, reply.history_seq);
    state.historyMore = more;
    renderKeySummary(reply);
    const body = byId("history").tBodies[0];
    if (!more) body.replaceChildren();
    body.append(...reply.entries.map((entry) => element(
      "tr", { "data-kind": entry.kind },
      element("td", { class: "number" }, entry.seq),
      element("td", {}, formatTime(entry.ts)),
      element("td", {}, describeEntry(entry)),
      valueCell(entry),
    )));
    if (!more && !reply.entries.length) {
      body.append(element("tr", {}, element("td", { colspan: 4, class: "muted" }, `nothing touched this key up to seq ${formatNumber(reply.history_seq)} of the history projection`)));
    }
    state.historyAfter = reply.next_after;
    byId("history-more").hidden = !reply.next_after;
  } catch (error) {
    showError("key-error", error.message);
  }
}

function renderKeySummary(reply) {
  const box = byId("key-current");
  const current = reply.current;
  const notes = [];
  if (reply.values_note) notes.push(element("p", { class: "error", id: "key-values-note" }, reply.values_note));
  if (!current) {
    const text = reply.forgotten_seq !== null
      ? `This key was forgotten at seq ${formatNumber(reply.forgotten_seq)}. Its values are no longer shown.`
      : "This key has no current record: it was deleted by maintenance, it expired, or it never existed.";
    box.replaceChildren(...notes, element("p", { id: "key-state" }, text));
    return;
  }
  const tags = current.tags && current.tags.length ? current.tags.join(", ") : "none";
  box.replaceChildren(...notes, element(
    "dl", { class: "summary", id: "key-state" },
    element("dt", {}, "tier"), element("dd", {}, current.tier),
    element("dt", {}, "importance"), element("dd", {}, formatImportance(current.importance)),
    element("dt", {}, "tags"), element("dd", {}, tags),
    element("dt", {}, "reads"), element("dd", {}, formatNumber(current.access_count)),
    element("dt", {}, "last read"), element("dd", {}, formatTime(current.last_access_ts)),
    element("dt", {}, "last stored"), element("dd", {}, `${formatTime(current.updated_ts)} (seq ${formatNumber(current.store_seq)})`),
    element("dt", {}, "value"), element("dd", {}, element("code", { id: "key-value" }, current.value === null ? "–" : current.value)),
  ), element("p", { class: "muted" }, `From the projections at seq ${formatNumber(reply.stats_seq)}; values from the event log.`));
}

async function getThroughBus() {
  const output = byId("key-get-result");
  output.textContent = "…";
  try {
    const reply = await postJSON("/api/get", state.key);
    output.textContent = reply.found
      ? `seq ${reply.seq}, served by ${reply.tier}${reply.degraded ? " (degraded)" : ""}: ${reply.value}`
      : `seq ${reply.seq}: not found${reply.degraded ? " (degraded)" : ""}`;
  } catch (error) {
    output.textContent = error.message;
  }
}

// ----------------------------------------------------------- time travel

function openTravel(namespace) {
  if (state.travelNamespace !== namespace) {
    state.travelNamespace = namespace;
    state.travelSeq = null;
    state.travelOffset = 0;
    byId("travel").tBodies[0].replaceChildren();
    byId("travel-summary").replaceChildren();
  }
  const link = byId("travel-namespace");
  link.textContent = namespace;
  link.href = `#/ns/${encodeURIComponent(namespace)}`;
  const latest = state.samples[state.samples.length - 1];
  const slider = byId("travel-slider");
  if (latest && latest.last_seq !== null && Number(slider.max) < latest.last_seq) slider.max = latest.last_seq;
  if (state.travelSeq === null) loadPast({ seq: latest && latest.last_seq !== null ? latest.last_seq : null });
}

function localTimeToUtc(text) {
  // The field shows UTC: its text is read as a UTC time.
  return text ? `${text}Z` : "";
}

async function loadPast(position) {
  const parameters = new URLSearchParams({ namespace: state.travelNamespace, limit: "100", offset: String(state.travelOffset) });
  if (position.time) parameters.set("time", position.time);
  else if (position.seq !== null && position.seq !== undefined) parameters.set("seq", String(position.seq));
  else parameters.set("time", String(Date.now()));
  if (byId("travel-changes").checked) parameters.set("changes", "1");
  if (state.travelRequest) state.travelRequest.abort();
  const request = new AbortController();
  state.travelRequest = request;
  showError("travel-error", null);
  byId("travel-status").textContent = "rebuilding the namespace's shard from the log…";
  try {
    const page = await api(`/api/past?${parameters}`, { signal: request.signal });
    if (state.travelRequest !== request) return;
    state.travelRequest = null;
    state.travelSeq = page.seq;
    renderPast(page);
  } catch (error) {
    if (error.name === "AbortError") return;
    byId("travel-status").textContent = "";
    showError("travel-error", error.message);
  }
}

function stateCell(record, forgottenSeq) {
  if (!record) return element("td", { class: "muted" }, "–");
  const value = record.value === null
    ? element("span", { class: "hidden-value" }, forgottenSeq !== null ? `value hidden: forgotten at seq ${forgottenSeq}` : "value hidden")
    : element("code", {}, record.value);
  return element("td", { class: "value" }, `${record.tier}${record.cached ? " + cache" : ""}, v${record.version}, importance ${formatImportance(record.importance)}: `, value);
}

function renderPast(page) {
  const slider = byId("travel-slider");
  slider.max = Math.max(Number(slider.max), page.now_seq);
  slider.value = page.seq;
  byId("travel-seq").max = page.now_seq;
  byId("travel-seq").value = page.seq;
  byId("travel-time").value = page.ts ? new Date(page.ts).toISOString().replace("Z", "") : "";
  byId("travel-status").textContent = `rebuilt in ${page.built_seconds} s`;
  const counts = page.counts;
  byId("travel-summary").replaceChildren(element(
    "p", { id: "travel-position" },
    `Then: after seq ${formatNumber(page.seq)} (${formatTime(page.ts)}), ${formatNumber(page.then_records)} memories. `,
    `Now: seq ${formatNumber(page.now_seq)}, ${formatNumber(page.now_records)} memories. `,
    `Since then: ${counts.added} added, ${counts.removed} removed, ${counts.changed} changed, ${counts.moved} moved, ${counts.same} unchanged.`,
  ));
  const body = byId("travel").tBodies[0];
  body.replaceChildren(...page.rows.map((row) => element(
    "tr", { "data-key": row.key, "data-change": row.change },
    element("td", {}, keyLink(page.namespace, row.key)),
    element("td", {}, element("span", { class: `badge ${row.change}` }, row.change === "removed" && row.forgotten_seq !== null ? "forgotten" : row.change)),
    stateCell(row.then, row.forgotten_seq),
    stateCell(row.now, null),
  )));
  if (!page.rows.length) body.append(element("tr", {}, element("td", { colspan: 4, class: "muted" }, "no memories then or now")));
  state.travelNext = page.next_offset;
  byId("travel-next").disabled = page.next_offset === null;
  byId("travel-previous").disabled = page.offset === 0;
  byId("travel-info").textContent = page.total_rows ? `rows ${page.offset + 1}–${page.offset + page.rows.length} of ${formatNumber(page.total_rows)}` : "";
}

async function discardPast() {
  try {
    const reply = await api(`/api/past?namespace=${encodeURIComponent(state.travelNamespace)}`, { method: "DELETE" });
    byId("travel-status").textContent = `discarded ${reply.discarded} cached state(s)`;
  } catch (error) {
    showError("travel-error", error.message);
  }
}

// ----------------------------------------------------------- start

function bind() {
  window.addEventListener("hashchange", route);
  byId("digest-button").addEventListener("click", takeDigest);
  byId("event-filter").addEventListener("change", (event) => {
    if (event.target.id === "event-pause") {
      state.eventsPaused = event.target.checked;
      return;
    }
    connectStream();
  });
  byId("event-filter").addEventListener("submit", (event) => event.preventDefault());
  byId("namespace-open").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/ns/${encodeURIComponent(byId("namespace-input").value.trim())}`;
  });
  byId("search-form").addEventListener("submit", runSearch);
  byId("key-order").addEventListener("change", () => {
    state.keyCursors = [];
    state.keyOffset = 0;
    loadKeys();
  });
  byId("keys-next").addEventListener("click", () => pageKeys(1));
  byId("keys-previous").addEventListener("click", () => pageKeys(-1));
  byId("history-more").addEventListener("click", () => loadHistory(true));
  byId("key-get-button").addEventListener("click", getThroughBus);

  const slider = byId("travel-slider");
  slider.addEventListener("input", () => { byId("travel-seq").value = slider.value; });
  slider.addEventListener("change", () => {
    state.travelOffset = 0;
    loadPast({ seq: Number(slider.value) });
  });
  byId("travel-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.travelOffset = 0;
    const time = byId("travel-time");
    if (document.activeElement === time && time.value) loadPast({ time: localTimeToUtc(time.value) });
    else loadPast({ seq: Number(byId("travel-seq").value) });
  });
  byId("travel-time").addEventListener("change", (event) => {
    if (!event.target.value) return;
    state.travelOffset = 0;
    loadPast({ time: localTimeToUtc(event.target.value) });
  });
  byId("travel-seq").addEventListener("change", (event) => {
    state.travelOffset = 0;
    loadPast({ seq: Number(event.target.value) });
  });
  byId("travel-now").addEventListener("click", () => {
    state.travelOffset = 0;
    loadPast({ time: String(Date.now()) });
  });
  byId("travel-changes").addEventListener("change", () => {
    state.travelOffset = 0;
    loadPast({ seq: state.travelSeq });
  });
  byId("travel-next").addEventListener("click", () => {
    if (state.travelNext === null) return;
    state.travelOffset = state.travelNext;
    loadPast({ seq: state.travelSeq });
  });
  byId("travel-previous").addEventListener("click", () => {
    state.travelOffset = Math.max(0, state.travelOffset - 100);
    loadPast({ seq: state.travelSeq });
  });
  byId("travel-discard").addEventListener("click", discardPast);
  window.addEventListener("resize", () => { if (!byId("view-overview").hidden) renderOverview(); });
}

async function start() {
  bind();
  try {
    const [info, overview] = await Promise.all([api("/api/info"), api("/api/overview")]);
    state.info = info;
    byId("data-dir").textContent = info.data_dir;
    state.samples = overview.samples;
    if (overview.samples.length) setSampleProblems(overview.samples[overview.samples.length - 1].problems);
  } catch (error) {
    setProblem("start", error.message);
  }
  renderEventTypes();
  connectStream();
  route();
}

start();
