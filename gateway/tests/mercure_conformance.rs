//! The Mercure hub's own conformance suite (`tests/mercure-conformance/`, vendored unmodified
//! from dunglas/mercure v0.24.2, AGPL-3.0-or-later) run by Playwright in Debian's Chromium
//! against three replicas behind `deploy/nginx.conf`, with our configuration beside it
//! (`playwright.gateway.config.ts`). Failed tests' screenshots go with the browser tests'.

mod support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::browser::{self, MERCURE_CONFORMANCE};
use support::nginx::Fleet;
use support::Replica;

/// The key the suite's publisher token is signed with (upstream's CI sets the hub's keys to it).
const SUITE_SECRET: &str = "!ChangeThisMercureHubJWTSecretKey!";
/// The suite's tests: every one must pass.
const SUITE_TESTS: usize = 11;
/// Longest the suite may run: 11 tests of about 3 s each, 10 s at most each, and Chromium's
/// start.
const SUITE_LIMIT: Duration = Duration::from_secs(300);

#[test]
fn the_mercure_conformance_suite_passes_against_a_fleet() {
    let fleet = Fleet::start(&[
        "--mercure",
        "true",
        "--mercure-jwt-secret",
        SUITE_SECRET,
        "--mercure-anonymous",
        "true",
    ]);
    browser::npm_ci(MERCURE_CONFORMANCE);
    let output_dir = browser::artifacts().join("mercure-conformance");
    let log_path = std::env::temp_dir().join(format!(
        "ssegw-mercure-conformance-{}.log",
        std::process::id()
    ));
    let log = std::fs::File::create(&log_path).unwrap();

    // The suite opens `/` of BASE_URL's origin, then subscribes and publishes on
    // `/.well-known/mercure` there, with `fetch` and `EventSource`. A process group of its
    // own, so that a suite that hangs goes with its browser.
    let mut suite = Command::new("npx")
        .args([
            "--no",
            "playwright",
            "test",
            "-c",
            "playwright.gateway.config.ts",
        ])
        .current_dir(MERCURE_CONFORMANCE)
        .env("BASE_URL", fleet.nginx.url("/.well-known/mercure"))
        .env("SSEGW_CHROMIUM", browser::chromium())
        .env("SSEGW_CONFORMANCE_OUTPUT", &output_dir)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .env("FORCE_COLOR", "0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run npx playwright test: {e}"));
    let deadline = Instant::now() + SUITE_LIMIT;
    let status = loop {
        if let Some(status) = suite.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", suite.id())])
                .status();
            let _ = suite.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut output = String::new();
    std::fs::File::open(&log_path)
        .and_then(|mut f| f.read_to_string(&mut output))
        .unwrap();
    let _ = std::fs::remove_file(&log_path);

    let status =
        status.unwrap_or_else(|| panic!("the suite ran longer than {SUITE_LIMIT:?}:\n{output}"));
    // The reporter's summary, one line per outcome ("11 passed (30.2s)", "1 failed", "1
    // flaky"...): the suite's own log lines (what its pages said) come before it.
    let summary: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|line| {
            let mut words = line.splitn(2, ' ');
            let count = words.next().is_some_and(|n| n.parse::<usize>().is_ok());
            let outcome = words.next().unwrap_or_default();
            count
                && [
                    "passed",
                    "failed",
                    "flaky",
                    "skipped",
                    "did not run",
                    "interrupted",
                ]
                .iter()
                .any(|o| outcome.starts_with(o))
        })
        .collect();
    let passed = summary.len() == 1 && summary[0].starts_with(&format!("{SUITE_TESTS} passed"));
    assert!(
        status.success() && passed,
        "the Mercure conformance suite did not pass: {status}, {summary:?} (screenshots of \
         failed tests in {}; nginx said: {}):\n{output}",
        output_dir.display(),
        fleet.nginx.log()
    );
}
