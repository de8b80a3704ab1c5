// Drives headless Chromium for gateway/tests/browser.rs, one command per line: the Rust test
// writes a JSON command to stdin and reads one JSON reply line from stdout, so the test decides
// every step (publish, kill a replica) between browser actions. No test logic lives here.
//
//   {"op": "goto", "page": "a", "url": "http://..."}            opens page "a" on first use
//   {"op": "fill", "page": "a", "selector": "#topics", "value": "x"}
//   {"op": "click", "page": "a", "selector": "#connect"}
//   {"op": "eval", "page": "a", "expr": "window.ssegw.events"}   -> the JSON value
//   {"op": "wait", "page": "a", "expr": "...", "timeout": 20000} -> the first truthy value
//   {"op": "screenshot", "page": "a", "path": "/x.png"}
//   {"op": "console", "page": "a"}                              -> the page's console lines
//
// Replies: {"ok": true, "value": ...} or {"ok": false, "error": "..."}. The first line out is
// {"ok": true, "value": "<browser version>"} once Chromium runs (SSEGW_CHROMIUM, default
// /usr/bin/chromium). Pages ignore certificate errors: the TLS tests use a self-signed one.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const executablePath = process.env.SSEGW_CHROMIUM || "/usr/bin/chromium";

function reply(message) {
  process.stdout.write(JSON.stringify(message) + "\n");
}

let browser;
try {
  browser = await chromium.launch({
    executablePath,
    headless: true,
    // No sandbox: CI runs as root, where Chromium refuses to start with one.
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
} catch (e) {
  reply({ ok: false, error: `cannot start ${executablePath}: ${e.message}` });
  process.exit(1);
}
reply({ ok: true, value: browser.version() });

/// Pages by name, each in a context of its own (no shared connections or cache).
const pages = new Map();
/// What each page's console and uncaught errors said, for the test's failure messages.
const consoles = new Map();

async function page(name) {
  if (!pages.has(name)) {
    const context = await browser.newContext({
      ignoreHTTPSErrors: true,
      // The pages' Content-Security-Policy forbids evaluating strings, which waitForFunction
      // does with its predicate; the policy is for the pages' own code, not the test's.
      bypassCSP: true,
      viewport: { width: 1280, height: 900 },
    });
    const created = await context.newPage();
    const lines = [];
    created.on("console", (m) => lines.push(`${m.type()}: ${m.text()}`));
    created.on("pageerror", (e) => lines.push(`uncaught: ${e.message}`));
    pages.set(name, created);
    consoles.set(name, lines);
  }
  return pages.get(name);
}

async function run(command) {
  const p = await page(command.page ?? "main");
  switch (command.op) {
    case "goto":
      await p.goto(command.url, { waitUntil: "load" });
      return null;
    case "fill":
      await p.fill(command.selector, command.value);
      return null;
    case "click":
      await p.click(command.selector);
      return null;
    case "eval":
      return await p.evaluate(command.expr);
    case "wait": {
      const handle = await p.waitForFunction(command.expr, null, {
        timeout: command.timeout ?? 20000,
        polling: "raf",
      });
      return await handle.jsonValue();
    }
    case "screenshot":
      await p.screenshot({ path: command.path, fullPage: true });
      return command.path;
    case "console":
      return consoles.get(command.page ?? "main");
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

// Commands run one at a time, in order; stdin closing ends the browser and the process.
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let command;
  try {
    command = JSON.parse(line);
    reply({ ok: true, value: (await run(command)) ?? null });
  } catch (e) {
    const said = command ? consoles.get(command.page ?? "main") ?? [] : [];
    reply({ ok: false, error: `${e.message}\npage console:\n${said.join("\n")}` });
  }
}
await browser.close();
