// A second, independent EventSource implementation for gateway/tests/browser.rs: the
// `eventsource` package under Node (WHATWG-compliant: it reconnects after `retry:` and sends
// Last-Event-ID by itself). It subscribes to the URL given as its argument and prints one JSON
// line per thing that happens; the Rust test asserts on them:
//
//   {"kind": "open"}
//   {"kind": "event", "type": "message", "id": "...", "data": "..."}
//   {"kind": "error", "readyState": 0, "message": "..."}     (0: reconnecting, 2: closed)
//
// It runs until its stdin closes (the test ending it), so it never outlives the test.
import { EventSource } from "eventsource";

const url = process.argv[2];
if (!url) {
  console.error("usage: node eventsource-client.mjs <url>");
  process.exit(2);
}

function print(line) {
  process.stdout.write(JSON.stringify(line) + "\n");
}

const source = new EventSource(url);
source.onopen = () => print({ kind: "open" });
source.onerror = (e) =>
  print({ kind: "error", readyState: source.readyState, message: e.message ?? null });
const onEvent = (e) => print({ kind: "event", type: e.type, id: e.lastEventId, data: e.data });
source.onmessage = onEvent;
source.addEventListener("ssegw-gap", onEvent);

process.stdin.on("end", () => {
  source.close();
  process.exit(0);
});
process.stdin.resume();
