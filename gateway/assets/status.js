// The live status page (served at `/status/page`): renders each status event of
// `/status/stream` (this replica's `/status` JSON plus `delivery_rate`) and charts the delivery
// rate over the last minute. The browser's EventSource reconnects by itself, to another replica
// behind a balancer when this one goes away. `window.ssegwStatus` keeps what arrived, for tests.
"use strict";

/// Seconds of delivery rate kept for the chart.
const HISTORY = 60;
const COUNTERS = [
  "connections_opened", "resumed", "events_delivered", "gaps_sent", "slow_disconnects",
  "drained", "rejected_at_limit",
];

const status = { state: "connecting", updates: 0, last: null, rates: [] };
window.ssegwStatus = status;

const $ = (id) => document.getElementById(id);

function setFeed(state) {
  status.state = state;
  const badge = $("feed");
  badge.textContent = state;
  badge.dataset.state = state;
  badge.className = "badge " + state;
}

function render(s) {
  status.updates += 1;
  status.last = s;
  $("connections").textContent = String(s.connections);
  $("topics").textContent = String(s.topics);
  $("rate").textContent = s.delivery_rate === null ? "–" : formatRate(s.delivery_rate);
  $("ready").textContent = s.ready ? "yes" : "no";
  $("ready").className = "value " + (s.ready ? "good" : "bad");
  $("bus").textContent = s.bus;
  for (const name of COUNTERS) $(name).textContent = Number(s[name]).toLocaleString("en");
  $("updated").textContent = new Date().toLocaleTimeString();
  if (s.delivery_rate !== null) {
    status.rates.push(s.delivery_rate);
    if (status.rates.length > HISTORY) status.rates.shift();
    chart();
  }
}

function formatRate(rate) {
  return rate >= 1000 ? (rate / 1000).toFixed(1) + "k" : String(Math.round(rate));
}

/// A line over the last minute, scaled to its peak; the newest value on the right.
function chart() {
  const peak = Math.max(1, ...status.rates);
  const step = 600 / (HISTORY - 1);
  const offset = HISTORY - status.rates.length;
  const points = status.rates.map((r, i) =>
    `${((offset + i) * step).toFixed(1)},${(115 - (r / peak) * 105).toFixed(1)}`);
  $("rate-line").setAttribute("points", points.join(" "));
  $("peak").textContent = formatRate(Math.max(0, ...status.rates));
}

document.addEventListener("DOMContentLoaded", () => {
  const feed = new EventSource("/status/stream");
  feed.onopen = () => setFeed("live");
  feed.onmessage = (e) => render(JSON.parse(e.data));
  feed.onerror = () => setFeed(feed.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
});
