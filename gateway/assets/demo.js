// The demo page (served at `/`): one EventSource for the topics typed in, a log of what arrives
// (ids, event types, topics, reconnects, resumes and the `ssegw-gap` and `ssegw-expired` control
// events) and a form that publishes through `POST /publish`, both with the token of the Token
// field if there is one. It uses only the gateway's public API. Everything the page saw is also
// kept in `window.ssegw`, to look at in the console; the browser tests read it. The token itself
// is never shown, kept in `window.ssegw`, logged or put in the page's own URL.
"use strict";

const GAP_EVENT = "ssegw-gap";
/// Sent by the gateway just before it ends a stream whose token expired.
const EXPIRED_EVENT = "ssegw-expired";
/// The gateway's control events, with the name of the row that shows each.
const CONTROL_ROWS = new Map([[GAP_EVENT, "gap"], [EXPIRED_EVENT, "expired"]]);
/// What the page shows instead of a token.
const MASKED = "…";
/// Rows kept in the table; older ones leave it (not `window.ssegw`).
const MAX_ROWS = 500;

/// What the page saw, in order. `events` holds every event handed to the page, the control
/// events included: `{n, id, type, topic, data, time, connection}`, where `connection` counts
/// the opens of the current EventSource (2 after the first reconnect).
const seen = {
  state: "idle",
  /// The stream's URL as shown, its token masked.
  url: null,
  topics: [],
  events: [],
  gaps: [],
  /// How many streams the gateway ended because their token expired (`ssegw-expired`).
  expired: 0,
  /// Why the gateway last refused the stream, as it said: `"401: missing token: ..."`.
  refusal: null,
  log: [],
  opens: 0,
  reconnects: 0,
  /// For each reconnect, the id the browser resumed after, as far as the page knows it (null
  /// when no event had arrived: the browser then sends the stream's starting id).
  resumedFrom: [],
  lastEventId: null,
};
window.ssegw = seen;

/// The EventSource of the current connection, or null.
let source = null;
/// Whether the current connection carries a token from the field (else it is anonymous or
/// relies on the gateway's cookie).
let withToken = false;
/// Event types the current EventSource has listeners for, besides `message` and the control
/// events.
let listening = new Set();
/// Multi-topic connections: each topic's position, decoded from the last cursor seen, so that
/// the next cursor tells which topic moved (ids are cursors over all topics; see docs/subscribing.md, "Event ids").
let positions = null;

const $ = (id) => document.getElementById(id);

function splitList(text) {
  return text.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
}

// ---- connection ------------------------------------------------------------------------------

function connect(topics, types, resumeId, token) {
  disconnect(false);
  // The gateway sorts a connection's topics; cursor positions follow that order.
  topics = [...new Set(topics)].sort();
  const params = new URLSearchParams();
  for (const topic of topics) params.append("topic", topic);
  if (resumeId) params.set("lastEventId", resumeId);
  const path = "/events?" + params.toString();
  // An EventSource cannot send headers, so the token goes in its URL; only there.
  const url = token ? `${path}&access_token=${encodeURIComponent(token)}` : path;
  const shown = token ? `${path}&access_token=${MASKED}` : path;
  Object.assign(seen, {
    url: shown,
    topics,
    refusal: null,
    opens: 0,
    reconnects: 0,
    resumedFrom: [],
    lastEventId: resumeId || null,
  });
  positions = resumeId ? decodeCursor(resumeId, topics.length) : null;

  const es = new EventSource(url);
  source = es;
  withToken = Boolean(token);
  listening = new Set();
  es.onopen = () => es === source && opened(resumeId);
  es.onerror = () => es === source && failed(es);
  es.onmessage = (e) => es === source && received(e);
  es.addEventListener(GAP_EVENT, (e) => es === source && gap(e));
  es.addEventListener(EXPIRED_EVENT, (e) => es === source && expired(e));
  for (const type of types) listen(type);

  $("stream-url").textContent = shown;
  $("connect").textContent = "Reconnect";
  $("disconnect").disabled = false;
  const publishTopic = $("publish-topic");
  if (!topics.includes(publishTopic.value.trim())) publishTopic.value = topics[0];
  history.replaceState(null, "", "?" + topics.map((t) => "topic=" + encodeURIComponent(t)).join("&"));
  setState("connecting");
  note("connect", `connecting: ${topics.join(", ")}` + (resumeId ? ` after ${resumeId}` : "") +
    (token ? " with the token" : ""));
  updateShell();
}

function disconnect(byUser) {
  if (!source) return;
  source.close();
  source = null;
  $("disconnect").disabled = true;
  $("connect").textContent = "Connect";
  setState("idle");
  if (byUser) note("disconnect", "disconnected");
}

/// Listens for a named event type on the current connection (an EventSource hands a page only
/// the types it listens for).
function listen(type) {
  if (!source || listening.has(type) || CONTROL_ROWS.has(type) || type === "message") return;
  listening.add(type);
  const es = source;
  es.addEventListener(type, (e) => es === source && received(e));
}

function opened(resumeId) {
  seen.opens += 1;
  if (seen.opens === 1) {
    note("open", resumeId ? `open: resuming after ${resumeId}` : "open: live from now on");
  } else {
    seen.reconnects += 1;
    seen.resumedFrom.push(seen.lastEventId);
    const from = seen.lastEventId ?? "the stream's starting id";
    note("resumed", `reconnected: resumed from ${from}`);
  }
  $("reconnects").textContent = String(seen.reconnects);
  setState("open");
}

function failed(es) {
  if (es.readyState === EventSource.CONNECTING) {
    // A network error or the end of the stream: the browser retries by itself after the
    // gateway's `retry:` delay, sending its Last-Event-ID.
    if (seen.state !== "reconnecting") {
      setState("reconnecting");
      note("lost", `connection lost; the browser reconnects with Last-Event-ID ${seen.lastEventId ?? "(the starting id)"}`);
    }
    return;
  }
  // Closed for good: the gateway answered with an error status (the browser does not retry).
  closed("closed");
  explain(es.url);
}

/// The current connection is over for good; `state` says why.
function closed(state, reason) {
  source = null;
  $("disconnect").disabled = true;
  $("connect").textContent = "Connect";
  setState(state, reason);
}

/// Asks the gateway why it refused the stream: EventSource itself does not say. The request is
/// the stream's own, token and all, so the answer is the one the stream got.
async function explain(url) {
  const abort = new AbortController();
  try {
    const response = await fetch(url, { signal: abort.signal, headers: { Accept: "text/event-stream" } });
    if (response.ok) {
      abort.abort();
      note("closed", "the stream failed and the browser gave up; connect again");
    } else {
      const reply = await response.json().catch(() => ({}));
      const refusal = `${response.status}: ${reply.error ?? response.statusText}`;
      // Unless the page connected again meanwhile.
      if (!source) {
        seen.refusal = refusal;
        $("state-reason").textContent = refusal;
      }
      note("closed", `the gateway refused the stream: ${refusal}`);
    }
  } catch (e) {
    note("closed", `the gateway cannot be reached (${e.message})`);
  }
}

// ---- events ----------------------------------------------------------------------------------

function received(e) {
  const topic = topicOf(e.lastEventId);
  seen.lastEventId = e.lastEventId || seen.lastEventId;
  $("last-id").textContent = seen.lastEventId ?? "–";
  record({ id: e.lastEventId, type: e.type, topic, data: e.data });
  $("count").textContent = String(seen.events.filter((ev) => !CONTROL_ROWS.has(ev.type)).length);
}

function gap(e) {
  let info = {};
  try {
    info = JSON.parse(e.data);
  } catch {
    // Shown raw below.
  }
  seen.gaps.push(info);
  // The topic restarts from its oldest retained event, whose id may be older than ours.
  const index = seen.topics.indexOf(info.topic);
  if (positions && index >= 0) positions[index] = null;
  record({ id: null, type: GAP_EVENT, topic: info.topic ?? "?", data: e.data, reason: info.reason });
}

/// The gateway ends the stream after this event because its token expired. The browser would
/// reconnect with the same URL, and a token from the field would only be refused as expired:
/// the page closes the stream itself and puts the last id in "Resume after id", so that a
/// fresh token and Connect go on with nothing lost. Without one (the gateway's cookie), the
/// browser reconnects with the cookie as it is by then, as any page would.
function expired(e) {
  seen.expired += 1;
  record({ id: null, type: EXPIRED_EVENT, topic: seen.topics.join(", "), data: e.data });
  if (!withToken) return;
  source.close();
  closed("expired", "a fresh token and Connect resume");
  if (seen.lastEventId) $("resume-id").value = seen.lastEventId;
  note("expired", "the token expired and the gateway ended the stream; enter a fresh token and " +
    "connect again" + (seen.lastEventId ? ` to resume after ${seen.lastEventId}` : ""));
}

function record(entry) {
  entry.n = seen.events.length + 1;
  entry.time = new Date().toISOString().slice(11, 23);
  entry.connection = seen.opens;
  seen.events.push(entry);
  const row = document.createElement("tr");
  const control = CONTROL_ROWS.get(entry.type);
  row.dataset.testid = control ? `${control}-row` : "event-row";
  row.dataset.id = entry.id ?? "";
  row.dataset.type = entry.type;
  row.dataset.topic = entry.topic;
  if (control) row.className = control;
  let data = entry.data;
  if (entry.type === GAP_EVENT) {
    data = `history lost (${entry.reason ?? "?"}): events of ${entry.topic} were missed; the stream goes on from the oldest one kept. ${entry.data}`;
  } else if (entry.type === EXPIRED_EVENT) {
    data = `token expired: the gateway ended the stream. ${entry.data}`;
  }
  cells(row, [String(entry.n), entry.time, entry.id ?? "–", entry.type, entry.topic, data]);
  addRow(row);
}

/// The topic of an event: the only one, or for several topics the one whose position moved in
/// the cursor. The first event after a fresh start has no cursor before it: its topic is the
/// one now furthest ahead, unless two tie.
function topicOf(id) {
  if (seen.topics.length === 1) return seen.topics[0];
  const now = decodeCursor(id, seen.topics.length);
  if (!now) return "?";
  const before = positions;
  positions = now;
  let candidates;
  if (before) {
    candidates = now.map((p, i) => (compare(p, before[i]) > 0 ? i : -1)).filter((i) => i >= 0);
  } else {
    const newest = now.reduce((best, p) => (compare(p, best) > 0 ? p : best), null);
    candidates = now.map((p, i) => (newest && compare(p, newest) === 0 ? i : -1)).filter((i) => i >= 0);
  }
  return candidates.length === 1 ? seen.topics[candidates[0]] : "?";
}

/// A multi-topic cursor `<fp>.<base>.<p1>.<p2>...` as one `[ms, seq]` (or null: before the
/// first event) per topic, in sorted topic order; null if it is not one for `count` topics.
function decodeCursor(id, count) {
  const parts = (id || "").split(".");
  if (count < 2 || parts.length !== count + 2) return null;
  const base = parseInt(parts[1], 36);
  if (!Number.isFinite(base)) return null;
  return parts.slice(2).map((p) => {
    if (p === "_") return null;
    const [delta, seq] = p.split("-");
    return [base - parseInt(delta, 36), seq ? parseInt(seq, 36) : 0];
  });
}

function compare(a, b) {
  if (a === null || b === null) return (a === null ? 0 : 1) - (b === null ? 0 : 1);
  return a[0] - b[0] || a[1] - b[1];
}

// ---- publishing ------------------------------------------------------------------------------

async function publish() {
  const topic = $("publish-topic").value.trim();
  const event = $("publish-event").value.trim();
  const data = $("publish-data").value;
  const token = $("token").value.trim();
  const body = { topic, data };
  if (event) body.event = event;
  // `POST /publish` takes a token from this header only.
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  result("pending", "publishing…");
  try {
    const response = await fetch("/publish", { method: "POST", headers, body: JSON.stringify(body) });
    const reply = await response.json().catch(() => ({}));
    if (response.ok) {
      result("ok", `published ${reply.id} on ${topic}`, response.status);
      // Show events of this type from now on.
      if (event) listen(event);
    } else {
      const hint = response.status === 401 && !token ? " (this gateway wants a token: see Token)" : "";
      result("error", `${response.status}: ${reply.error ?? response.statusText}${hint}`, response.status);
    }
  } catch (e) {
    result("error", `cannot reach the gateway: ${e.message}`);
  }
}

/// Shows how a publish went; `status` is the HTTP status, if there was an answer.
function result(outcome, text, status) {
  const out = $("publish-result");
  out.dataset.outcome = outcome;
  out.dataset.status = status ?? "";
  out.textContent = text;
}

// ---- presentation ----------------------------------------------------------------------------

/// `reason`, shown beside the state, says why it is what it is (a refusal, an expiry).
function setState(state, reason) {
  seen.state = state;
  const badge = $("state");
  badge.textContent = state === "expired" ? "token expired" : state;
  badge.dataset.state = state;
  badge.className = "badge " + state;
  $("state-reason").textContent = reason ?? "";
}

/// A row about the connection itself (opened, lost, resumed, closed).
function note(kind, text) {
  const time = new Date().toISOString().slice(11, 23);
  seen.log.push({ kind, text, time });
  const row = document.createElement("tr");
  row.className = "note " + kind;
  row.dataset.testid = "note-row";
  row.dataset.kind = kind;
  const cell = document.createElement("td");
  cell.colSpan = 6;
  cell.textContent = `${time}  ${text}`;
  row.append(cell);
  addRow(row);
}

function cells(row, texts) {
  for (const text of texts) {
    const cell = document.createElement("td");
    cell.textContent = text.length > 300 ? text.slice(0, 300) + "…" : text;
    if (text.length > 300) cell.title = text;
    row.append(cell);
  }
}

/// Newest first, so that what just happened is in view.
function addRow(row) {
  const body = $("events-body");
  body.prepend(row);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  $("empty").hidden = true;
}

/// The HTTP version this page came over: over HTTP/1.1 a browser holds at most six
/// connections to an origin, so more than six event streams (across tabs too) stall.
function showProtocol() {
  const [navigation] = performance.getEntriesByType("navigation");
  const protocol = navigation?.nextHopProtocol || "unknown";
  $("protocol").textContent = protocol;
  $("protocol-note").textContent = protocol === "h2" || protocol === "h3"
    ? "event streams share one connection"
    : protocol.startsWith("http/1") ? "at most six event streams per origin (see docs/http2-and-tls.md)" : "";
}

function updateShell() {
  const origin = location.origin;
  const topics = splitList($("topics").value);
  const query = topics.map((t) => "topic=" + encodeURIComponent(t)).join("&") || "topic=demo";
  const topic = $("publish-topic").value.trim() || "demo";
  const payload = JSON.stringify({ topic, data: { hello: "from curl" } });
  // The token stays in the field: the commands name a shell variable instead.
  const auth = $("token").value.trim() ? `-H "Authorization: Bearer $TOKEN" ` : "";
  $("shell-commands").textContent =
    `curl -N ${auth}'${origin}/events?${query}'\n` +
    `curl -X POST ${origin}/publish ${auth}-H 'Content-Type: application/json' \\\n     -d '${payload}'`;
}

document.addEventListener("DOMContentLoaded", () => {
  $("subscribe-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const topics = splitList($("topics").value);
    if (topics.length > 0) {
      connect(topics, splitList($("types").value), $("resume-id").value.trim(), $("token").value.trim());
    }
  });
  $("disconnect").addEventListener("click", () => disconnect(true));
  $("publish-form").addEventListener("submit", (e) => {
    e.preventDefault();
    publish();
  });
  $("clear").addEventListener("click", () => {
    $("events-body").replaceChildren();
    $("empty").hidden = false;
  });
  $("topics").addEventListener("input", updateShell);
  $("publish-topic").addEventListener("input", updateShell);
  $("token").addEventListener("input", updateShell);
  showProtocol();
  // `/?topic=a&topic=b` subscribes at once: a link to a live view. A token never comes from
  // the page's URL, which browsers keep in their history and send to the server's logs; only
  // from the field.
  const linked = new URLSearchParams(location.search).getAll("topic");
  if (linked.length > 0) {
    $("topics").value = linked.join(", ");
    connect(linked, splitList($("types").value), "", $("token").value.trim());
  }
  updateShell();
});
