//! One run, start to end: spawn the fleet (with `--spawn`), start the shards of connections
//! (in this process or in workers), wait until they are open, publish open-loop for
//! `--duration` while the scenario does its part (churn, a kill), stop, let every connection
//! catch up, reconcile what was received with what was stored, and build the report.
//! Everything started here is stopped on every way out: the fleet and the workers are killed
//! when dropped.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{self, FromShard, ShardPlan, ShardReport, ShardResult, Tick, ToShard, Totals};
use crate::config::{Plan, PublishVia, Scenario};
use crate::fleet::{Fleet, RedisAddr};
use crate::latency::Latency;
use crate::layout::Layout;
use crate::payload;
use crate::procstat::{self, ProcSample};
use crate::publisher::{self, Counters, Outcome, PublishPlan, Via};
use crate::report::{
    self, Connections, Delivery, Interval, ProcessReport, Publish, Report, ResumeStorm, Settings,
    Slo, Soak,
};
use crate::target::Target;
use crate::tracking::{self, AckLog, Tally};
use crate::worker::{self, Worker};

/// A process whose memory and CPU the report records.
struct Watch {
    name: String,
    pid: u32,
    /// Sample the process with its children (nginx: master and workers).
    with_children: bool,
    /// Connections it serves (gateways) or holds (harness processes), for KiB per connection.
    connections: Option<u64>,
    start: Option<(Instant, ProcSample)>,
    connected: Option<ProcSample>,
    last: Option<(Instant, ProcSample)>,
    peak_kib: u64,
}

impl Watch {
    fn new(name: impl Into<String>, pid: u32, connections: Option<u64>) -> Watch {
        Watch {
            name: name.into(),
            pid,
            with_children: false,
            connections,
            start: None,
            connected: None,
            last: None,
            peak_kib: 0,
        }
    }

    /// Samples the process; `None` (keeping the last sample) once it is gone.
    fn sample(&mut self) -> Option<ProcSample> {
        let sample = if self.with_children {
            procstat::sample_tree(self.pid)?
        } else {
            procstat::sample(self.pid)?
        };
        let now = Instant::now();
        self.start.get_or_insert((now, sample));
        self.last = Some((now, sample));
        self.peak_kib = self.peak_kib.max(sample.peak_kib);
        Some(sample)
    }

    fn report(&self) -> ProcessReport {
        let (cpu_s, cpu_percent) = match (self.start, self.last) {
            (Some((t0, s0)), Some((t1, s1))) => {
                let cpu = s1.cpu_s - s0.cpu_s;
                let wall = (t1 - t0).as_secs_f64();
                (cpu, if wall > 0.0 { cpu / wall * 100.0 } else { 0.0 })
            }
            _ => (0.0, 0.0),
        };
        let kib_per_connection = match (self.start, self.connected, self.connections) {
            (Some((_, start)), Some(connected), Some(n)) if n > 0 => {
                Some((connected.rss_kib as f64 - start.rss_kib as f64) / n as f64)
            }
            _ => None,
        };
        ProcessReport {
            name: self.name.clone(),
            pid: self.pid,
            rss_kib_start: self.start.map(|(_, s)| s.rss_kib),
            rss_kib_connected: self.connected.map(|s| s.rss_kib),
            rss_kib_end: self.last.map(|(_, s)| s.rss_kib),
            rss_kib_peak: self.peak_kib,
            kib_per_connection,
            cpu_s,
            cpu_percent,
        }
    }
}

/// What the shards reported, merged.
struct Aggregate {
    /// The latest tick of each shard (gauges and running totals).
    last: Vec<Tick>,
    interval_delivered: u64,
    interval_latency: Latency,
    total_latency: Latency,
    /// Which shards have ticked in the current interval.
    ticked: Vec<bool>,
    results: Vec<Option<ShardResult>>,
}

impl Aggregate {
    /// Merges a report; true when every shard has ticked since the interval began.
    fn apply(&mut self, report: ShardReport) -> bool {
        match report.message {
            FromShard::Tick(tick) => {
                let mut latency = Latency::default();
                latency.add_buckets(&tick.latency);
                self.interval_latency.merge(&latency);
                self.total_latency.merge(&latency);
                self.interval_delivered += tick.delivered;
                self.last[report.shard] = tick;
                self.ticked[report.shard] = true;
                if self.ticked.iter().all(|&t| t) {
                    self.ticked.fill(false);
                    return true;
                }
                false
            }
            FromShard::Done(result) => {
                self.results[report.shard] = Some(result);
                false
            }
        }
    }

    fn connected(&self) -> u64 {
        self.last.iter().map(|t| t.connected).sum()
    }

    fn opened(&self) -> u64 {
        self.last.iter().map(|t| t.opened).sum()
    }

    fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for tick in &self.last {
            totals += tick.totals;
        }
        totals
    }

    fn done(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Publishing,
    /// Publishing stopped; waiting for the replies still in flight.
    Stopping,
    /// Shards are waiting for stragglers.
    Draining,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Publishing => "publishing",
            Phase::Stopping => "stopping",
            Phase::Draining => "draining",
        }
    }
}

/// The resume storm as it unfolds.
struct Storm {
    killed: String,
    /// When the kill was done, µs since the epoch (the clock of `Tick::all_open_at_us`).
    at_us: u64,
    killed_at_s: f64,
    dropped_before: u64,
    reconnects_before: u64,
    recovered_after_s: Option<f64>,
}

pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    let a = &plan.args;
    let run_id = format!("{:08x}", fastrand::u32(..));
    let started_at_unix_s = payload::now_us() / 1_000_000;
    let mut fleet = match (a.spawn, &plan.servers, plan.redis) {
        (Some(n), Some(servers), Some(redis)) => {
            let log_dir = std::env::temp_dir().join(format!("ssegw-loadtest-{run_id}"));
            Some(Fleet::start(n, servers, redis, log_dir).await?)
        }
        _ => None,
    };
    let urls = fleet
        .as_ref()
        .map(Fleet::urls)
        .unwrap_or_else(|| a.urls.clone());
    let redis_addr = a
        .redis_url
        .clone()
        .map(RedisAddr::Url)
        .or_else(|| fleet.as_ref().map(|f| f.redis_addr.clone()));
    let layout = Layout {
        run_id: run_id.clone(),
        topics: plan.topics,
        topics_per_conn: a.topics_per_conn,
        urls: urls.clone(),
        source_addrs: plan.source_addrs.clone(),
    };
    let n = a.connections;
    let per_gateway = n.div_ceil(urls.len() as u64);

    let shards = n.div_ceil(a.conns_per_process) as usize;
    let per_shard = n.div_ceil(shards as u64);
    let mut watches = vec![Watch::new(
        "harness",
        std::process::id(),
        (shards == 1).then_some(n),
    )];
    if let Some(fleet) = &fleet {
        for (name, pid) in fleet.redis.processes() {
            watches.push(Watch::new(name, pid, None));
        }
        for replica in &fleet.replicas {
            let mut watch = Watch::new(replica.name.clone(), replica.pid, Some(per_gateway));
            watch.with_children = replica.with_children;
            watches.push(watch);
        }
    }
    for &pid in &a.watch_pids {
        watches.push(Watch::new(format!("pid-{pid}"), pid, Some(per_gateway)));
    }

    // Every shard (task or worker bridge) sends its ticks and its result here, the run loop
    // receives; a shard waits when it is full (the loop is never long away).
    let (report_tx, mut report_rx) = mpsc::channel::<ShardReport>(256);
    let mut commands = Vec::new();
    let mut workers: Vec<Worker> = Vec::new();
    let shard_plans: Vec<ShardPlan> = (0..shards)
        .map(|shard| {
            let first = shard as u64 * per_shard;
            ShardPlan {
                shard,
                target: a.target,
                layout: layout.clone(),
                first,
                count: per_shard.min(n - first),
                connect_rate: a.connect_rate / shards as f64,
                // N connections each closing after L on average close N / L per second.
                churn_mean_lifetime_ms: plan
                    .churn_rate
                    .map(|rate| (n as f64 / rate * 1000.0).max(1.0) as u64),
                interval_ms: a.interval.as_millis().max(1) as u64,
                threads: a.threads,
            }
        })
        .collect();
    for watch in &mut watches {
        watch.sample();
    }
    for shard_plan in shard_plans {
        // The shard side of `commands`: `Finish` once, so a small buffer is plenty.
        let (command_tx, command_rx) = mpsc::channel(4);
        commands.push(command_tx);
        if shards == 1 {
            let reports = report_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = client::run_shard(shard_plan, command_rx, reports).await {
                    eprintln!("ssegw-loadtest: connections failed: {e:#}");
                }
            });
        } else {
            let shard = shard_plan.shard;
            let worker = worker::spawn(&shard_plan, command_rx, report_tx.clone()).await?;
            // No per-connection figure for a worker: it starts with no baseline to subtract.
            let mut watch = Watch::new(format!("worker-{shard}"), worker.pid(), None);
            watch.sample();
            watches.push(watch);
            workers.push(worker);
        }
    }
    // Only the shards hold senders now: the channel closes if they all end.
    drop(report_tx);

    let progress = progress_bar();
    let t0 = Instant::now();
    let t0_us = payload::now_us();
    let mut agg = Aggregate {
        last: vec![Tick::default(); shards],
        interval_delivered: 0,
        interval_latency: Latency::default(),
        total_latency: Latency::default(),
        ticked: vec![false; shards],
        results: (0..shards).map(|_| None).collect(),
    };
    let mut phase = Phase::Connecting;
    let mut connect_s = None;
    let counters = Arc::new(Counters::default());
    let stop_publishing = CancellationToken::new();
    let mut publisher: Option<JoinHandle<anyhow::Result<Outcome>>> = None;
    let mut outcome: Option<Outcome> = None;
    let mut publish_start = t0;
    let mut storm: Option<Storm> = None;
    let mut rows: Vec<Interval> = Vec::new();
    let mut last_row = (t0, 0u64);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        let now = Instant::now();
        match phase {
            Phase::Connecting if agg.opened() >= n || now >= t0 + a.connect_timeout => {
                let all_open_at_us = agg.last.iter().map(|t| t.all_open_at_us).max().unwrap_or(0);
                connect_s = Some(if agg.opened() >= n && all_open_at_us > t0_us {
                    (all_open_at_us - t0_us) as f64 / 1e6
                } else {
                    (now - t0).as_secs_f64()
                });
                for watch in &mut watches {
                    watch.connected = watch.sample();
                }
                publish_start = now;
                phase = Phase::Publishing;
                if a.rate > 0.0 {
                    let via = match (plan.publish_via, &redis_addr) {
                        _ if a.target == Target::Reference => Via::Go {
                            url: urls[0].clone(),
                            count: (a.rate * a.duration.as_secs_f64()).round() as u64,
                        },
                        (PublishVia::Redis, Some(addr)) => Via::Redis(addr.clone()),
                        _ => Via::Http {
                            urls: urls.clone(),
                            lanes: a.publish_conns,
                            target: a.target,
                        },
                    };
                    let publish_plan = PublishPlan {
                        rate: a.rate,
                        via,
                        max_in_flight: a.max_in_flight,
                        padding: a.payload_bytes,
                    };
                    let (layout, counters, stop) =
                        (layout.clone(), counters.clone(), stop_publishing.clone());
                    publisher = Some(tokio::spawn(async move {
                        publisher::run(publish_plan, &layout, counters, stop).await
                    }));
                }
            }
            Phase::Publishing => {
                if let (Some(kill_at), None) = (plan.kill_at, &storm) {
                    if now >= publish_start + kill_at {
                        let at_us = payload::now_us();
                        let killed = kill_one(&plan, fleet.as_mut()).await?;
                        storm = Some(Storm {
                            killed,
                            at_us,
                            killed_at_s: (now - t0).as_secs_f64(),
                            dropped_before: agg.totals().dropped,
                            reconnects_before: agg.totals().reconnects,
                            recovered_after_s: None,
                        });
                    }
                }
                if now >= publish_start + a.duration {
                    stop_publishing.cancel();
                    phase = Phase::Stopping;
                }
            }
            Phase::Stopping if publisher.is_none() => {
                let last: Vec<_> = match &outcome {
                    Some(o) => o.logs.iter().map(AckLog::last).collect(),
                    None => vec![None; plan.topics as usize],
                };
                for command in &commands {
                    let finish = ToShard::Finish {
                        last: last.clone(),
                        drain_ms: a.drain.as_millis() as u64,
                    };
                    command
                        .send(finish)
                        .await
                        .context("a shard of connections is gone")?;
                }
                phase = Phase::Draining;
            }
            Phase::Draining if agg.done() => break,
            _ => {}
        }
        let deadline = match phase {
            Phase::Connecting => t0 + a.connect_timeout,
            Phase::Publishing => {
                let end = publish_start + a.duration;
                match (plan.kill_at, &storm) {
                    (Some(at), None) => end.min(publish_start + at),
                    _ => end,
                }
            }
            _ => now + Duration::from_secs(3600),
        };
        tokio::select! {
            report = report_rx.recv() => {
                let Some(report) = report else {
                    bail!("the connections ended before the run did");
                };
                // The shards' ticks are the clock: a row closes once each shard has reported
                // since the last one, so no interval catches one shard's tick twice or not at all.
                if agg.apply(report) {
                    let row = interval_row(&mut agg, &mut watches, &counters, t0, &mut last_row, phase);
                    progress.set_message(progress_line(&row, n, &agg.totals()));
                    rows.push(row);
                }
                if let Some(storm) = &mut storm {
                    if storm.recovered_after_s.is_none()
                        && agg.totals().reconnects > storm.reconnects_before
                        && agg.connected() >= n
                    {
                        let all_open_at_us = agg.last.iter().map(|t| t.all_open_at_us).max().unwrap_or(0);
                        storm.recovered_after_s = Some(all_open_at_us.saturating_sub(storm.at_us) as f64 / 1e6);
                    }
                }
            }
            result = async { publisher.as_mut().expect("checked").await }, if publisher.is_some() && phase == Phase::Stopping => {
                publisher = None;
                outcome = Some(result.context("publisher panicked")??);
            }
            _ = tokio::time::sleep_until(deadline) => {}
            _ = &mut ctrl_c => bail!("interrupted"),
        }
    }
    progress.finish_and_clear();
    for watch in &mut watches {
        watch.sample();
    }
    let processes: Vec<ProcessReport> = watches.iter().map(Watch::report).collect();
    if let Some(fleet) = fleet.take() {
        fleet.stop();
    }
    drop(workers);

    let outcome = outcome.unwrap_or(Outcome {
        logs: vec![AckLog::default(); plan.topics as usize],
        first_error: None,
        elapsed: Duration::ZERO,
    });
    let publish_s = outcome.elapsed.as_secs_f64();
    let per_s = |count: u64| {
        if publish_s > 0.0 {
            count as f64 / publish_s
        } else {
            0.0
        }
    };
    let mut tally = Tally::default();
    let mut connections_with_loss = 0;
    let mut caught_up = true;
    for result in agg.results.iter().flatten() {
        caught_up &= result.caught_up;
        for conn in &result.conns {
            let mut conn_tally = Tally::default();
            for track in &conn.tracks {
                conn_tally += tracking::reconcile(track, &outcome.logs[track.topic as usize]);
            }
            connections_with_loss += u64::from(conn_tally.lost > 0);
            tally += conn_tally;
        }
    }
    let totals = agg.totals();
    let opened = agg
        .results
        .iter()
        .flatten()
        .flat_map(|r| &r.conns)
        .filter(|c| c.opened)
        .count() as u64;
    let connect_s = connect_s.unwrap_or_default();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let soak =
        (a.scenario == Scenario::Soak).then(|| soak_verdict(&rows, &watches, a.max_rss_growth));
    let mut report = Report {
        scenario: a.scenario,
        run_id,
        started_at_unix_s,
        settings: Settings {
            target: a.target,
            connections: n,
            topics: plan.topics,
            topics_per_conn: a.topics_per_conn,
            urls,
            spawn: a.spawn,
            redis: plan.redis,
            redis_nodes: match &redis_addr {
                Some(RedisAddr::Url(url)) => vec![url.clone()],
                Some(RedisAddr::Cluster(seeds)) => seeds.clone(),
                None => Vec::new(),
            },
            publish_via: plan.publish_via,
            rate: a.rate,
            duration_s: a.duration.as_secs_f64(),
            connect_rate: a.connect_rate,
            payload_bytes: a.payload_bytes,
            churn_rate: plan.churn_rate,
            client_processes: shards,
            source_addrs: plan.source_addrs.iter().map(ToString::to_string).collect(),
        },
        connections: Connections {
            target: n,
            opened,
            connect_s,
            connect_rate: if connect_s > 0.0 {
                opened as f64 / connect_s
            } else {
                0.0
            },
            reconnects: totals.reconnects,
            resumes: totals.resumes,
            connect_errors: totals.connect_errors,
            dropped: totals.dropped,
            first_connect_error: agg.last.iter().find_map(|t| t.first_connect_error.clone()),
        },
        publish: Publish {
            offered_rate: a.rate,
            achieved_rate: per_s(load(&counters.acked)),
            sent: load(&counters.sent),
            acked: load(&counters.acked),
            failed: load(&counters.failed),
            skipped: load(&counters.skipped),
            late: load(&counters.late),
            first_error: outcome.first_error.clone(),
        },
        delivery: Delivery {
            tally,
            gap_events: totals.gap_events,
            unknown_events: totals.unknown_events,
            connections_with_loss,
            caught_up,
            deliveries_per_s: per_s(tally.received),
        },
        latency: agg.total_latency.summary(),
        processes,
        resume_storm: storm.map(|s| ResumeStorm {
            killed: s.killed,
            killed_at_s: s.killed_at_s,
            dropped: totals.dropped - s.dropped_before,
            recovered_after_s: s.recovered_after_s,
        }),
        soak,
        intervals: rows,
        slo: Slo {
            max_p99_ms: a.max_p99_ms,
            max_loss: a.max_loss,
            allow_duplicates: a.allow_duplicates,
            violations: Vec::new(),
            passed: true,
        },
    };
    report.slo.violations = report::violations(&plan, &report);
    report.slo.passed = report.slo.violations.is_empty();
    Ok(report)
}

/// Kills a replica the way the plan says; returns what was killed.
async fn kill_one(plan: &Plan, fleet: Option<&mut Fleet>) -> anyhow::Result<String> {
    if let Some(fleet) = fleet {
        let replica = &mut fleet.replicas[plan.args.kill_replica];
        replica.kill();
        return Ok(format!("{} ({}, SIGKILL)", replica.name, replica.url));
    }
    let command = plan
        .args
        .kill_cmd
        .as_deref()
        .context("nothing to kill with")?;
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .await?;
    if !status.success() {
        bail!("--kill-cmd {command:?} failed: {status}");
    }
    Ok(format!("--kill-cmd {command:?}"))
}

/// Closes the current interval: rates and latency since the last row, and a memory sample.
fn interval_row(
    agg: &mut Aggregate,
    watches: &mut [Watch],
    counters: &Counters,
    t0: Instant,
    last: &mut (Instant, u64),
    phase: Phase,
) -> Interval {
    let now = Instant::now();
    let dt = (now - last.0).as_secs_f64().max(1e-3);
    let acked = counters.acked.load(Ordering::Relaxed);
    let latency = agg.interval_latency.summary();
    let row = Interval {
        t_s: (now - t0).as_secs_f64(),
        phase: phase.name(),
        connected: agg.connected(),
        published_per_s: (acked - last.1) as f64 / dt,
        delivered_per_s: agg.interval_delivered as f64 / dt,
        p50_ms: latency.p50_ms,
        p99_ms: latency.p99_ms,
        max_ms: latency.max_ms,
        rss_kib: watches
            .iter_mut()
            .map(|w| w.sample().map(|s| s.rss_kib))
            .collect(),
    };
    *last = (now, acked);
    agg.interval_delivered = 0;
    agg.interval_latency.reset();
    row
}

/// Soak: memory of the watched gateways (or of everything watched, without any) and latency
/// in the last quarter of the publishing period against the first.
fn soak_verdict(rows: &[Interval], watches: &[Watch], max_growth: f64) -> Soak {
    let publishing: Vec<&Interval> = rows.iter().filter(|r| r.phase == "publishing").collect();
    let quarter = (publishing.len() / 4).max(1);
    let (first, last) = (
        &publishing[..quarter.min(publishing.len())],
        &publishing[publishing.len().saturating_sub(quarter)..],
    );
    let gateways: Vec<usize> = watches
        .iter()
        .enumerate()
        .filter(|(_, w)| w.name.starts_with("replica-") || w.name.starts_with("pid-"))
        .map(|(i, _)| i)
        .collect();
    let memory = |rows: &[&Interval]| -> Option<f64> {
        let sums: Vec<f64> = rows
            .iter()
            .map(|r| {
                gateways
                    .iter()
                    .filter_map(|&i| r.rss_kib.get(i).copied().flatten())
                    .sum::<u64>() as f64
            })
            .collect();
        (!sums.is_empty()).then(|| sums.iter().sum::<f64>() / sums.len() as f64)
    };
    let rss_growth = match (gateways.is_empty(), memory(first), memory(last)) {
        (false, Some(a), Some(b)) if a > 0.0 => Some(b / a - 1.0),
        _ => None,
    };
    let median_p99 = |rows: &[&Interval]| {
        let mut p99s: Vec<f64> = rows
            .iter()
            .filter(|r| r.delivered_per_s > 0.0)
            .map(|r| r.p99_ms)
            .collect();
        p99s.sort_by(f64::total_cmp);
        p99s.get(p99s.len() / 2).copied().unwrap_or(0.0)
    };
    let (p99_first_ms, p99_last_ms) = (median_p99(first), median_p99(last));
    let latency_stable = p99_last_ms <= (2.0 * p99_first_ms).max(p99_first_ms + 10.0);
    let memory_stable = rss_growth.is_none_or(|g| g <= max_growth);
    Soak {
        stable: latency_stable && memory_stable,
        rss_growth,
        p99_first_ms,
        p99_last_ms,
    }
}

/// A spinner with one line of figures, drawn only when stdout is a terminal.
fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if std::io::stdout().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(250));
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

fn progress_line(row: &Interval, target: u64, totals: &Totals) -> String {
    format!(
        "{:<10} conns {}/{target}  pub {:.0}/s  deliv {:.0}/s  p50 {:.1} ms  p99 {:.1} ms  reconnects {}  gaps {}",
        row.phase, row.connected, row.published_per_s, row.delivered_per_s, row.p50_ms, row.p99_ms, totals.reconnects, totals.gap_events
    )
}
