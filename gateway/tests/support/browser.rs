//! Real clients for `browser.rs`: headless Chromium driven through the Node script
//! `tests/browser/driver.mjs` (playwright-core), and the `eventsource` package under Node
//! (`tests/browser/eventsource-client.mjs`); and, for `mercure_conformance.rs`, the Mercure
//! conformance suite's packages. Each directory's pinned packages are installed with `npm ci`
//! once per test binary. A missing `node`, `npm` or Chromium fails the test with what to
//! install; nothing is skipped.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The Node side: `package.json`, `package-lock.json` and the scripts.
pub const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
/// Longest a page may take to reach a state the test waits for.
pub const PAGE_WAIT: Duration = Duration::from_secs(20);
/// Longest one driver command may take, waits included.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// Node 20 is the oldest that playwright-core and eventsource support.
const NODE_MAJOR: u32 = 20;

/// The Mercure hub's conformance suite (Playwright), vendored unmodified with our own
/// configuration beside it; run by `mercure_conformance.rs`.
pub const MERCURE_CONFORMANCE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mercure-conformance");

/// Chromium: `SSEGW_CHROMIUM`, else Debian's.
pub fn chromium() -> PathBuf {
    let path = std::env::var_os("SSEGW_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "Chromium is required for the browser tests: {} is missing (apt-get install chromium, \
         or point SSEGW_CHROMIUM at a Chromium binary)",
        path.display()
    );
    path
}

/// Checks that Node is recent enough, once per test binary.
fn node_checked() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let version = Command::new("node")
            .arg("--version")
            .output()
            .unwrap_or_else(|e| {
                panic!("node is required for the browser tests ({e}); apt-get install nodejs npm")
            });
        let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
        let major: u32 = version
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        assert!(
            major >= NODE_MAJOR,
            "the browser tests need Node {NODE_MAJOR} or newer, found {version:?}"
        );
    });
}

/// Checks Node and installs the packages `dir`'s lock file pins, once per directory and test
/// binary: parallel tests wait for the first. Nothing is installed when `node_modules` already
/// holds them (`./test` runs `npm ci` before the tests). Playwright never downloads a browser:
/// the tests run Debian's Chromium.
pub fn npm_ci(dir: &'static str) {
    // The directories done; held while installing, so that a second test waits.
    static DONE: Mutex<Vec<&str>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(PoisonError::into_inner);
    if done.contains(&dir) {
        return;
    }
    node_checked();
    if !installed(dir) {
        let output = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("npm is required for the browser tests ({e}); apt-get install npm")
            });
        assert!(
            output.status.success(),
            "npm ci in {dir} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            installed(dir),
            "npm ci did not install what {dir}/package-lock.json pins"
        );
    }
    done.push(dir);
}

/// Whether `dir/node_modules` holds the packages of `dir/package-lock.json`, by npm's own
/// record of what it installed there (`node_modules/.package-lock.json`): the same versions,
/// except for optional packages of other platforms, which npm leaves out.
fn installed(dir: &str) -> bool {
    let read = |path: &str| -> Option<serde_json::Map<String, Value>> {
        let text = std::fs::read_to_string(Path::new(dir).join(path)).ok()?;
        let mut lock: Value = serde_json::from_str(&text).ok()?;
        let mut packages = lock.get_mut("packages")?.as_object_mut()?.clone();
        // The root entry describes the project, not an installed package.
        packages.remove("");
        Some(packages)
    };
    let wanted = read("package-lock.json")
        .unwrap_or_else(|| panic!("{dir}/package-lock.json is missing or not a lock file"));
    let Some(has) = read("node_modules/.package-lock.json") else {
        return false;
    };
    let version = |p: &Value| p["version"].clone();
    let all_wanted = wanted.iter().all(|(name, p)| match has.get(name) {
        Some(installed) => version(installed) == version(p),
        None => p["optional"] == true,
    });
    all_wanted && has.keys().all(|name| wanted.contains_key(name))
}

/// Where screenshots go: `SSEGW_ARTIFACTS`, else `target/browser-artifacts`. CI keeps them.
pub fn artifacts() -> PathBuf {
    let dir = std::env::var_os("SSEGW_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .expect("target directory")
                .join("browser-artifacts")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A Node process whose stdout is read line by line on a thread of its own, so that reads can
/// time out. Closing its stdin asks it to end; it is killed on drop if it has not.
struct NodeProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    what: String,
}

impl NodeProcess {
    fn start(script: &str, args: &[&str], env: &[(&str, &Path)]) -> NodeProcess {
        npm_ci(SCRIPTS);
        let mut command = Command::new("node");
        command
            .arg(Path::new(SCRIPTS).join(script))
            .args(args)
            .current_dir(SCRIPTS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node {script}: {e}"));
        let stdout = child.stdout.take().unwrap();
        // Unbounded: the process prints a line per event, and the test reads them all.
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        NodeProcess {
            stdin: child.stdin.take(),
            child,
            lines,
            what: script.to_string(),
        }
    }

    /// The next line as JSON; panics after `limit` or when the process has ended.
    fn next(&self, limit: Duration) -> Value {
        match self.lines.recv_timeout(limit) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", self.what)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{}: nothing within {limit:?}", self.what)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{} ended", self.what),
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot write a command: {e}", self.what));
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // End of input: the driver closes Chromium itself and exits.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless Chromium. Pages are named; each lives in a browser context of its own.
pub struct Browser {
    driver: NodeProcess,
}

impl Browser {
    pub fn start() -> Browser {
        let chromium = chromium();
        let driver = NodeProcess::start("driver.mjs", &[], &[("SSEGW_CHROMIUM", &chromium)]);
        let ready = driver.next(COMMAND_LIMIT);
        assert_eq!(ready["ok"], true, "Chromium did not start: {ready}");
        Browser { driver }
    }

    fn call(&mut self, command: Value) -> Value {
        self.driver.send(&command.to_string());
        let reply = self.driver.next(COMMAND_LIMIT);
        if reply["ok"] != true {
            panic!(
                "browser: {command} failed: {}",
                reply["error"].as_str().unwrap_or("?")
            );
        }
        reply["value"].clone()
    }

    pub fn goto(&mut self, page: &str, url: &str) {
        self.call(json!({ "op": "goto", "page": page, "url": url }));
    }

    pub fn fill(&mut self, page: &str, selector: &str, value: &str) {
        self.call(json!({ "op": "fill", "page": page, "selector": selector, "value": value }));
    }

    pub fn click(&mut self, page: &str, selector: &str) {
        self.call(json!({ "op": "click", "page": page, "selector": selector }));
    }

    /// The value of a JavaScript expression in the page (a promise is awaited).
    pub fn eval(&mut self, page: &str, expr: &str) -> Value {
        self.call(json!({ "op": "eval", "page": page, "expr": expr }))
    }

    /// Waits until a JavaScript expression is truthy in the page (re-evaluated on every frame)
    /// and returns its value; fails after `PAGE_WAIT`.
    pub fn wait(&mut self, page: &str, expr: &str) -> Value {
        let timeout = PAGE_WAIT.as_millis() as u64;
        self.call(json!({ "op": "wait", "page": page, "expr": expr, "timeout": timeout }))
    }

    /// What the page's console said, and its uncaught errors, one line each, in order.
    pub fn console(&mut self, page: &str) -> Vec<String> {
        let lines = self.call(json!({ "op": "console", "page": page }));
        serde_json::from_value(lines).expect("console lines")
    }

    /// A full-page PNG in `artifacts()`; returns its path.
    pub fn screenshot(&mut self, page: &str, name: &str) -> PathBuf {
        let path = artifacts().join(name);
        let path_text = path.to_str().expect("UTF-8 path");
        self.call(json!({ "op": "screenshot", "page": page, "path": path_text }));
        assert!(path.is_file(), "no screenshot at {}", path.display());
        path
    }
}

/// The `eventsource` package under Node, subscribed to one URL; what it sees, line by line.
pub struct NodeEventSource {
    process: NodeProcess,
}

impl NodeEventSource {
    pub fn open(url: &str) -> NodeEventSource {
        NodeEventSource {
            process: NodeProcess::start("eventsource-client.mjs", &[url], &[]),
        }
    }

    /// The next thing that happened: `{"kind": "open" | "event" | "error", ...}`.
    pub fn next(&self) -> Value {
        self.process.next(PAGE_WAIT)
    }
}
