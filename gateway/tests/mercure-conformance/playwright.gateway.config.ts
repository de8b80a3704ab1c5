// sse-gateway's own configuration for the vendored Mercure conformance suite (this file is ours,
// not upstream's; the suite's files are unmodified): the suite's settings, run by the list
// reporter in Debian's Chromium only (SSEGW_CHROMIUM, else /usr/bin/chromium), never retried.
// gateway/tests/mercure_conformance.rs runs it with BASE_URL pointing at the gateway's hub.
import base from "./playwright.config";
import { devices } from "@playwright/test";

export default {
  ...base,
  // "html" would write a report and serve it after a failure; the test prints the list.
  reporter: [["list"]],
  // A retry would turn a failure into "flaky"; one browser at a time on a small machine.
  retries: 0,
  workers: 1,
  // Screenshots of failed tests, kept with the browser tests' (SSEGW_CONFORMANCE_OUTPUT).
  outputDir: process.env.SSEGW_CONFORMANCE_OUTPUT ?? "test-results",
  use: { ...base.use, screenshot: "only-on-failure" },
  projects: [
    {
      name: "chromium",
      use: {
        ...devices["Desktop Chrome"],
        launchOptions: {
          executablePath: process.env.SSEGW_CHROMIUM ?? "/usr/bin/chromium",
          // No sandbox: CI runs as root, where Chromium refuses to start with one (as in
          // ../browser/driver.mjs).
          args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        },
      },
    },
  ],
};
