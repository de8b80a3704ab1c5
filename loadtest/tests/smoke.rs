//! CI smoke of every scenario: a few hundred connections for a few seconds against a spawned
//! Redis and two gateway replicas (`--spawn 2`), each run checked for zero loss, zero
//! duplicates, exit status 0 and a complete JSON report; many topics on a spawned Redis
//! Cluster of three primaries (`--redis-cluster 3`); the same fan-out against each baseline
//! target (`--target actix`, `--target nchan`), the floor (`--target floor`) and
//! `../shared/bench/floor` itself (`--target reference`); plus the SLO gate failing a run and bad flags
//! exiting 2. Runs one at a time: they share two cores.
//!
//! The gateway binary comes from the same target directory: `cargo test --workspace` builds
//! every binary of the workspace before running tests. The nchan run needs nginx and its nchan
//! module installed (`.ci/run` installs them); without them it fails, saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;

/// One harness run at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const HARNESS: &str = env!("CARGO_BIN_EXE_ssegw-loadtest");

/// `sse-gateway`, next to the harness binary.
fn gateway_bin() -> PathBuf {
    let path = Path::new(HARNESS).with_file_name("sse-gateway");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test --workspace` (or `cargo build -p sse-gateway`) first",
        path.display()
    );
    path
}

/// What to spawn: the harness's flags for it and the replica names expected in the report.
struct Fleet {
    flags: Vec<String>,
    /// The Redis processes expected in the report.
    redis: &'static [&'static str],
    replicas: &'static [&'static str],
}

/// Two gateway replicas.
fn gateways() -> Fleet {
    let gateway = gateway_bin().display().to_string();
    Fleet {
        flags: vec![
            "--spawn".into(),
            "2".into(),
            "--gateway-bin".into(),
            gateway,
        ],
        redis: &["redis"],
        replicas: &["replica-0", "replica-1"],
    }
}

/// One gateway replica on a cluster of three primaries.
fn gateway_on_cluster() -> Fleet {
    let gateway = gateway_bin().display().to_string();
    Fleet {
        flags: vec![
            "--spawn".into(),
            "1".into(),
            "--gateway-bin".into(),
            gateway,
            "--redis-cluster".into(),
            "3".into(),
        ],
        redis: &["redis-0", "redis-1", "redis-2"],
        replicas: &["replica-0"],
    }
}

/// One replica of a baseline target.
fn baseline(target: &str) -> Fleet {
    Fleet {
        flags: ["--spawn", "1", "--target", target]
            .map(String::from)
            .to_vec(),
        redis: &["redis"],
        replicas: &["replica-0"],
    }
}

/// Runs the harness with `flags` plus a spawned gateway fleet and a report file; returns the
/// output and the parsed report (if one was written).
fn harness(name: &str, flags: &[&str]) -> (Output, Option<Value>) {
    harness_on(&gateways(), name, flags)
}

fn harness_on(fleet: &Fleet, name: &str, flags: &[&str]) -> (Output, Option<Value>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!(
        "ssegw-loadtest-smoke-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.json");
    let chart = dir.join("chart.svg");
    let output = Command::new(HARNESS)
        .args(&fleet.flags)
        .arg("--report")
        .arg(&report)
        .arg("--chart")
        .arg(&chart)
        .args(flags)
        .output()
        .expect("cannot run ssegw-loadtest");
    let parsed = std::fs::read(&report)
        .ok()
        .map(|bytes| serde_json::from_slice(&bytes).expect("report is JSON"));
    if parsed.is_some() {
        let svg = std::fs::read_to_string(&chart).expect("chart written with the report");
        assert!(
            svg.starts_with("<svg") && svg.contains("p99"),
            "chart: {}",
            &svg[..svg.len().min(200)]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    (output, parsed)
}

fn text(output: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a scenario that must pass against gateways, checks exactness and the report's shape,
/// returns the report.
fn exact_run(name: &str, flags: &[&str]) -> Value {
    exact_run_on(&gateways(), name, flags)
}

fn exact_run_on(fleet: &Fleet, name: &str, flags: &[&str]) -> Value {
    let (output, report) = harness_on(fleet, name, flags);
    assert_eq!(output.status.code(), Some(0), "{name}: {}", text(&output));
    let r = report.unwrap_or_else(|| panic!("{name}: no report; {}", text(&output)));
    let d = &r["delivery"];
    let expected = d["expected"].as_u64().expect("delivery.expected");
    assert!(expected > 0, "{name}: nothing expected: {d}");
    assert_eq!(d["received"].as_u64(), Some(expected), "{name}: {d}");
    for field in [
        "lost",
        "duplicates",
        "out_of_order",
        "gap_events",
        "unknown_events",
        "connections_with_loss",
    ] {
        assert_eq!(
            d[field].as_u64(),
            Some(0),
            "{name}: delivery.{field} in {d}"
        );
    }
    assert_eq!(d["caught_up"], true, "{name}: {d}");
    let c = &r["connections"];
    assert_eq!(c["opened"], c["target"], "{name}: {c}");
    assert!(
        r["publish"]["acked"].as_u64() > Some(0),
        "{name}: {}",
        r["publish"]
    );
    assert_eq!(
        r["publish"]["failed"].as_u64(),
        Some(0),
        "{name}: {}",
        r["publish"]
    );
    assert!(
        r["latency"]["count"].as_u64() >= Some(expected),
        "{name}: {}",
        r["latency"]
    );
    for field in ["p50_ms", "p99_ms", "max_ms"] {
        assert!(
            r["latency"][field].as_f64().is_some(),
            "{name}: latency.{field}"
        );
    }
    assert!(
        !r["intervals"].as_array().expect("intervals").is_empty(),
        "{name}"
    );
    let processes = r["processes"].as_array().expect("processes");
    let names: Vec<&str> = processes
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for want in ["harness"].iter().chain(fleet.redis).chain(fleet.replicas) {
        assert!(names.contains(want), "{name}: processes {names:?}");
    }
    assert!(
        processes
            .iter()
            .all(|p| p["rss_kib_peak"].as_u64() > Some(0)),
        "{name}: {processes:?}"
    );
    assert_eq!(r["slo"]["passed"], true, "{name}: {}", r["slo"]);
    r
}

#[test]
fn fanout_over_worker_processes() {
    let r = exact_run(
        "fanout",
        &[
            "--scenario",
            "fanout",
            "-c",
            "300",
            "--conns-per-process",
            "150",
            "--rate",
            "20",
            "--duration",
            "3s",
        ],
    );
    assert_eq!(r["settings"]["client_processes"], 2);
    assert_eq!(r["connections"]["dropped"], 0, "{}", r["connections"]);
    assert_eq!(r["connections"]["reconnects"], 0, "{}", r["connections"]);
    assert_eq!(
        r["delivery"]["expected"].as_u64(),
        Some(300 * r["publish"]["acked"].as_u64().unwrap())
    );
}

/// Fan-out of 300 connections to a baseline target: every event reaches every connection.
fn baseline_fanout(target: &str) -> Value {
    let r = exact_run_on(
        &baseline(target),
        target,
        &["-c", "300", "--rate", "20", "--duration", "2s"],
    );
    assert_eq!(r["settings"]["target"], target);
    assert_eq!(r["connections"]["reconnects"], 0, "{}", r["connections"]);
    assert_eq!(
        r["delivery"]["expected"].as_u64(),
        Some(300 * r["publish"]["acked"].as_u64().unwrap())
    );
    r
}

#[test]
fn actix_baseline_fanout() {
    baseline_fanout("actix");
}

/// The floor (`ssegw-floor`) is driven as the baselines are.
#[test]
fn floor_fanout() {
    baseline_fanout("floor");
}

/// `../shared/bench/floor` itself, built from its own manifest (beside this repository, as
/// `.ci/run` has it) into this target directory.
fn reference_bin() -> PathBuf {
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/floor/Cargo.toml");
    assert!(
        manifest.is_file(),
        "{} is missing: the reference instruments live in ../shared beside the repository",
        manifest.display()
    );
    let target_dir = Path::new(HARNESS)
        .parent()
        .and_then(Path::parent)
        .expect("the harness lives in target/<profile>/")
        .join("reference-floor");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--quiet",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .expect("cannot run cargo");
    assert!(
        output.status.success(),
        "building the reference: {}",
        text(&output)
    );
    target_dir.join("release/floor")
}

/// The reference, published to with its own `POST /go`: every event it wrote reaches every
/// connection, stamped by it, and the report's publishing rate is the one it reached.
#[test]
fn reference_floor_fanout() {
    let fleet = Fleet {
        flags: vec![
            "--spawn".into(),
            "1".into(),
            "--target".into(),
            "reference".into(),
            "--gateway-bin".into(),
            reference_bin().display().to_string(),
        ],
        redis: &["redis"],
        replicas: &["replica-0"],
    };
    let r = exact_run_on(
        &fleet,
        "reference",
        &["-c", "300", "--rate", "20", "--duration", "2s"],
    );
    assert_eq!(r["settings"]["target"], "reference");
    assert_eq!(r["publish"]["acked"].as_u64(), Some(40), "{}", r["publish"]);
    assert_eq!(r["delivery"]["expected"].as_u64(), Some(300 * 40));
    let rate = r["publish"]["achieved_rate"]
        .as_f64()
        .expect("achieved_rate");
    // 40 events at 20 a second, the first one period in: no faster than asked.
    assert!(rate > 5.0 && rate <= 20.5, "{}", r["publish"]);
}

/// Without nginx and its nchan module the harness refuses the flags (status 2), naming the
/// packages to install, and this fails with its output.
#[test]
fn nchan_baseline_fanout() {
    baseline_fanout("nchan");
}

#[test]
fn many_topics_published_over_http() {
    let r = exact_run(
        "many-topics",
        &[
            "--scenario",
            "many-topics",
            "-c",
            "200",
            "--rate",
            "200",
            "--duration",
            "3s",
            "--publish-via",
            "http",
        ],
    );
    assert_eq!(r["settings"]["topics"], 200);
}

/// Topics spread over the three primaries' slots; the harness publishes each with FCALL on
/// its topic's primary, and the gateway receives them over one sharded pub/sub link per
/// primary.
#[test]
fn many_topics_on_a_cluster() {
    let r = exact_run_on(
        &gateway_on_cluster(),
        "cluster",
        &[
            "--scenario",
            "many-topics",
            "-c",
            "60",
            "--rate",
            "120",
            "--duration",
            "2s",
        ],
    );
    let s = &r["settings"];
    assert_eq!(s["redis"]["kind"], "cluster", "{s}");
    assert_eq!(s["redis"]["primaries"], 3, "{s}");
    assert_eq!(s["redis"]["replicas_per_primary"], 0, "{s}");
    assert_eq!(s["redis_nodes"].as_array().map(Vec::len), Some(3), "{s}");
    assert_eq!(s["publish_via"], "redis", "{s}");
    assert_eq!(
        r["delivery"]["expected"].as_u64(),
        r["publish"]["acked"].as_u64(),
        "one connection per topic: {}",
        r["delivery"]
    );
}

#[test]
fn churn_resumes_without_loss() {
    let r = exact_run(
        "churn",
        &[
            "--scenario",
            "churn",
            "-c",
            "200",
            "--churn-rate",
            "100",
            "--rate",
            "50",
            "--duration",
            "3s",
        ],
    );
    assert!(
        r["connections"]["resumes"].as_u64() > Some(50),
        "{}",
        r["connections"]
    );
}

#[test]
fn resume_storm_moves_every_client() {
    let r = exact_run(
        "resume-storm",
        &[
            "--scenario",
            "resume-storm",
            "-c",
            "200",
            "--rate",
            "50",
            "--duration",
            "3s",
        ],
    );
    let storm = &r["resume_storm"];
    assert!(storm["recovered_after_s"].as_f64().is_some(), "{storm}");
    assert_eq!(
        storm["dropped"].as_u64(),
        Some(100),
        "half the clients were on the killed replica: {storm}"
    );
}

#[test]
fn soak_with_multi_topic_connections() {
    let r = exact_run(
        "soak",
        &[
            "--scenario",
            "soak",
            "-c",
            "100",
            "--topics",
            "5",
            "--topics-per-conn",
            "3",
            "--rate",
            "50",
            "--duration",
            "3s",
            "--interval",
            "500ms",
        ],
    );
    assert_eq!(r["soak"]["stable"], true, "{}", r["soak"]);
    assert!(r["soak"]["rss_growth"].as_f64().is_some(), "{}", r["soak"]);
}

#[test]
fn slo_gate_fails_the_run() {
    let (output, report) = harness(
        "slo",
        &[
            "-c",
            "20",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--max-p99-ms",
            "0",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let r = report.expect("a failing run still writes its report");
    assert_eq!(r["slo"]["passed"], false);
    assert!(
        r["slo"]["violations"][0].as_str().unwrap().contains("p99"),
        "{}",
        r["slo"]
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("FAIL"));
}

#[test]
fn bad_flags_exit_2() {
    for flags in [
        &["--url", "ftp://x"][..],
        &["--spawn", "1", "--scenario", "resume-storm"],
        &["--spawn", "1", "--target", "nchan", "--scenario", "churn"],
        &["--connections", "many"],
        &[],
    ] {
        let output = Command::new(HARNESS).args(flags).output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{flags:?}: {}",
            text(&output)
        );
        assert!(!output.stderr.is_empty(), "{flags:?}: no message");
    }
}
