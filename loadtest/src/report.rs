//! The outcome of a run: the JSON report (`--report`), the summary table printed at the end,
//! and the SLO verdict that sets the exit status.

use serde::Serialize;

use crate::config::{LossBudget, Plan, PublishVia, Scenario, SpawnedRedis};
use crate::latency::LatencySummary;
use crate::target::Target;
use crate::tracking::Tally;

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub run_id: String,
    pub started_at_unix_s: u64,
    pub settings: Settings,
    pub connections: Connections,
    pub publish: Publish,
    pub delivery: Delivery,
    pub latency: LatencySummary,
    pub processes: Vec<ProcessReport>,
    pub resume_storm: Option<ResumeStorm>,
    pub soak: Option<Soak>,
    pub intervals: Vec<Interval>,
    pub slo: Slo,
}

#[derive(Debug, Serialize)]
pub struct Settings {
    /// The server under test (`gateway`, or a baseline: `actix`, `nchan`).
    pub target: Target,
    pub connections: u64,
    pub topics: u32,
    pub topics_per_conn: u32,
    pub urls: Vec<String>,
    pub spawn: Option<usize>,
    /// The Redis --spawn started: `{"kind": "standalone"}`, or `{"kind": "cluster",
    /// "primaries": P, "replicas_per_primary": R}` (nodes `redis-0`… in `processes`, the
    /// primaries first); `None` without --spawn.
    pub redis: Option<SpawnedRedis>,
    /// The Redis URL published to, or every node of the spawned cluster; empty when none.
    pub redis_nodes: Vec<String>,
    pub publish_via: PublishVia,
    pub rate: f64,
    pub duration_s: f64,
    pub connect_rate: f64,
    pub payload_bytes: usize,
    pub churn_rate: Option<f64>,
    /// Harness processes holding connections (1: the harness itself).
    pub client_processes: usize,
    pub source_addrs: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Connections {
    pub target: u64,
    /// Connections that got a 200 response at least once.
    pub opened: u64,
    /// Time from the first connection attempt until all had opened (or the connect timeout).
    pub connect_s: f64,
    /// `opened / connect_s`: new SSE connections per second achieved.
    pub connect_rate: f64,
    pub reconnects: u64,
    pub resumes: u64,
    pub connect_errors: u64,
    /// Open streams ended by the server or the network (not by churn).
    pub dropped: u64,
    pub first_connect_error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Publish {
    pub offered_rate: f64,
    /// Events stored per second over the publishing period.
    pub achieved_rate: f64,
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// Due while too many replies were outstanding: never sent.
    pub skipped: u64,
    /// Sent more than 5 ms after their scheduled time.
    pub late: u64,
    pub first_error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delivery {
    #[serde(flatten)]
    pub tally: Tally,
    pub gap_events: u64,
    pub unknown_events: u64,
    pub connections_with_loss: u64,
    /// Every connection saw the last event of its topics before the drain ended.
    pub caught_up: bool,
    /// Deliveries per second over the publishing period.
    pub deliveries_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ProcessReport {
    pub name: String,
    pub pid: u32,
    /// Before the first connection.
    pub rss_kib_start: Option<u64>,
    /// Once all connections were open, before publishing.
    pub rss_kib_connected: Option<u64>,
    /// Last sample (before a killed process died, for a killed one).
    pub rss_kib_end: Option<u64>,
    pub rss_kib_peak: u64,
    /// `(connected - start) / connections on it`, for gateway replicas.
    pub kib_per_connection: Option<f64>,
    pub cpu_s: f64,
    /// CPU time over wall time, in percent of one core.
    pub cpu_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct ResumeStorm {
    pub killed: String,
    pub killed_at_s: f64,
    /// Streams that dropped after the kill.
    pub dropped: u64,
    /// From the kill until every connection was open again; `None`: never.
    pub recovered_after_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Soak {
    pub stable: bool,
    /// Watched gateway memory, mean of the last quarter over the first, minus one.
    pub rss_growth: Option<f64>,
    /// Median of the interval p99s in the first and last quarter.
    pub p99_first_ms: f64,
    pub p99_last_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    /// Seconds since the first connection attempt.
    pub t_s: f64,
    pub phase: &'static str,
    pub connected: u64,
    pub published_per_s: f64,
    pub delivered_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Resident memory of each watched process, in `processes` order.
    pub rss_kib: Vec<Option<u64>>,
}

#[derive(Debug, Serialize)]
pub struct Slo {
    pub max_p99_ms: Option<f64>,
    pub max_loss: LossBudget,
    pub allow_duplicates: bool,
    pub violations: Vec<String>,
    pub passed: bool,
}

/// The violations of `plan`'s SLOs by `report`.
pub fn violations(plan: &Plan, report: &Report) -> Vec<String> {
    let a = &plan.args;
    let d = &report.delivery;
    let mut out = Vec::new();
    if let Some(max) = a.max_p99_ms {
        if report.latency.count > 0 && report.latency.p99_ms > max {
            out.push(format!(
                "p99 latency {:.1} ms exceeds --max-p99-ms {max}",
                report.latency.p99_ms
            ));
        }
    }
    if !a.max_loss.allows(d.tally.lost, d.tally.expected) {
        out.push(format!(
            "{} of {} events lost (--max-loss {:?})",
            d.tally.lost, d.tally.expected, a.max_loss
        ));
    }
    if !a.allow_duplicates && (d.tally.duplicates > 0 || d.tally.out_of_order > 0) {
        out.push(format!(
            "{} duplicated and {} out-of-order events",
            d.tally.duplicates, d.tally.out_of_order
        ));
    }
    let c = &report.connections;
    if c.opened < c.target {
        let why = c
            .first_connect_error
            .as_deref()
            .map(|e| format!(" (first error: {e})"))
            .unwrap_or_default();
        out.push(format!(
            "only {} of {} connections opened{why}",
            c.opened, c.target
        ));
    }
    if let Some(storm) = &report.resume_storm {
        if storm.recovered_after_s.is_none() {
            out.push("not every connection resumed after the kill".into());
        }
    }
    if let Some(soak) = &report.soak {
        if !soak.stable {
            out.push(format!(
                "soak unstable: memory growth {:?}, p99 {:.1} ms -> {:.1} ms",
                soak.rss_growth, soak.p99_first_ms, soak.p99_last_ms
            ));
        }
    }
    out
}

/// The table printed at the end of a run.
pub fn summary(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let c = &report.connections;
    let p = &report.publish;
    let d = &report.delivery;
    let l = &report.latency;
    let s = &report.settings;
    let mut row = |name: &str, value: String| {
        let _ = writeln!(out, "  {name:<22} {value}");
    };
    row(
        "target",
        format!("{} ({})", s.target.name(), s.urls.join(", ")),
    );
    let redis = match s.redis {
        Some(SpawnedRedis::Standalone) => {
            format!("one redis-server ({})", s.redis_nodes.join(", "))
        }
        Some(SpawnedRedis::Cluster {
            primaries,
            replicas_per_primary,
        }) => format!(
            "cluster of {primaries} primaries, {replicas_per_primary} replica(s) each ({})",
            s.redis_nodes.join(", ")
        ),
        None if s.redis_nodes.is_empty() => "not used by the harness".into(),
        None => s.redis_nodes.join(", "),
    };
    row("redis", redis);
    row(
        "scenario",
        format!(
            "{:?}, {} connections, {} topic(s), {} per connection",
            report.scenario, s.connections, s.topics, s.topics_per_conn
        ),
    );
    row(
        "connections",
        format!(
            "{}/{} opened in {:.2} s ({:.0}/s), {} dropped, {} reconnects, {} resumes, {} connect errors",
            c.opened,
            c.target,
            c.connect_s,
            c.connect_rate,
            c.dropped,
            c.reconnects,
            c.resumes,
            c.connect_errors
        ),
    );
    row("publish", format!("offered {:.1}/s, achieved {:.1}/s via {:?}: {} sent, {} stored, {} failed, {} skipped, {} late", p.offered_rate, p.achieved_rate, s.publish_via, p.sent, p.acked, p.failed, p.skipped, p.late));
    row(
        "delivery",
        format!(
            "{} of {} expected, {:.0}/s; lost {}, duplicated {}, out of order {}, gap events {}",
            d.tally.received,
            d.tally.expected,
            d.deliveries_per_s,
            d.tally.lost,
            d.tally.duplicates,
            d.tally.out_of_order,
            d.gap_events
        ),
    );
    row(
        "latency (ms)",
        format!(
            "min {:.2}  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  mean {:.2}  ({} samples)",
            l.min_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms, l.count
        ),
    );
    for proc in &report.processes {
        let per_conn = proc
            .kib_per_connection
            .map(|k| format!(", {k:.1} KiB/connection"))
            .unwrap_or_default();
        let rss = |v: Option<u64>| {
            v.map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "-".into())
        };
        row(
            &proc.name,
            format!(
                "RSS MiB start {} connected {} end {} peak {:.1}{per_conn}; CPU {:.1} s ({:.0}%)",
                rss(proc.rss_kib_start),
                rss(proc.rss_kib_connected),
                rss(proc.rss_kib_end),
                proc.rss_kib_peak as f64 / 1024.0,
                proc.cpu_s,
                proc.cpu_percent
            ),
        );
    }
    if let Some(storm) = &report.resume_storm {
        let recovered = storm
            .recovered_after_s
            .map(|t| format!("{t:.2} s"))
            .unwrap_or_else(|| "never".into());
        row(
            "resume storm",
            format!(
                "killed {} at {:.1} s, {} dropped, all open again after {recovered}",
                storm.killed, storm.killed_at_s, storm.dropped
            ),
        );
    }
    if let Some(soak) = &report.soak {
        let growth = soak
            .rss_growth
            .map(|g| format!("{:+.1}%", g * 100.0))
            .unwrap_or_else(|| "not watched".into());
        row(
            "soak",
            format!(
                "{}: memory {growth}, p99 {:.2} -> {:.2} ms",
                if soak.stable { "stable" } else { "UNSTABLE" },
                soak.p99_first_ms,
                soak.p99_last_ms
            ),
        );
    }
    let verdict = if report.slo.passed {
        "PASS".to_string()
    } else {
        format!("FAIL: {}", report.slo.violations.join("; "))
    };
    row("SLO", verdict);
    out
}
