//! `ssegw-publish-bench`: how fast a gateway replica publishes over HTTP, one event per request
//! or in NDJSON batches, and what that costs its CPU. Closed loop: `--connections` keep-alive
//! connections, each with `--pipeline` requests outstanding, each request `--batch` events
//! (1: `application/json`; more: `application/x-ndjson`), on `--topics` topics, for
//! `--duration`. Reports events and requests per second and, with `--pid`, the replica's CPU
//! time per event (from /proc). Nobody needs to subscribe: this is the publish path alone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use ssegw_loadtest::http1;
use ssegw_loadtest::procstat;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(
    name = "ssegw-publish-bench",
    about = "Publishes over HTTP as fast as a replica takes it"
)]
struct Cli {
    /// The replica's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests outstanding per connection (HTTP/1.1 pipelining).
    #[arg(long, default_value_t = 4)]
    pipeline: usize,
    /// Events per request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 1000)]
    topics: usize,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 64)]
    data_bytes: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The replica's process id: report its CPU time per event.
    #[arg(long)]
    pid: Option<u32>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Arc::new(Cli::parse());
    if cli.batch == 0 || cli.connections == 0 || cli.pipeline == 0 || cli.topics == 0 {
        bail!("--batch, --connections, --pipeline and --topics must be at least 1");
    }
    let events = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let before = cli.pid.and_then(procstat::sample);
    let start = Instant::now();
    let deadline = start + cli.duration;
    let workers: Vec<_> = (0..cli.connections)
        .map(|c| {
            let (cli, events, requests) = (cli.clone(), events.clone(), requests.clone());
            tokio::spawn(async move { connection(&cli, c, deadline, &events, &requests).await })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = cli.pid.and_then(procstat::sample);
    let (events, requests) = (
        events.load(Ordering::Relaxed),
        requests.load(Ordering::Relaxed),
    );
    println!(
        "batch {}: {:.0} events/s, {:.0} requests/s ({} events in {:.1} s, {} connections x {} pipelined)",
        cli.batch,
        events as f64 / elapsed,
        requests as f64 / elapsed,
        events,
        elapsed,
        cli.connections,
        cli.pipeline
    );
    if let (Some(before), Some(after)) = (before, after) {
        let cpu = after.cpu_s - before.cpu_s;
        println!(
            "replica CPU: {:.0} % of a core, {:.1} µs per event",
            100.0 * cpu / elapsed,
            cpu * 1e6 / events.max(1) as f64
        );
    }
    Ok(())
}

/// One connection: keeps `pipeline` requests outstanding until the deadline, then collects the
/// answers still owed. Any answer but a 200 stops the run with what the gateway said.
async fn connection(
    cli: &Cli,
    index: usize,
    deadline: Instant,
    events: &AtomicU64,
    requests: &AtomicU64,
) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(cli.addr)
        .await
        .with_context(|| format!("cannot connect to {}", cli.addr))?;
    stream.set_nodelay(true)?;
    let data = "x".repeat(cli.data_bytes);
    let mut next_topic = index;
    let request = |next_topic: &mut usize| {
        let mut body = String::new();
        for _ in 0..cli.batch {
            body.push_str(&format!(
                r#"{{"topic":"bench{}","data":"{data}"}}"#,
                *next_topic % cli.topics
            ));
            body.push('\n');
            *next_topic += cli.connections;
        }
        let kind = if cli.batch == 1 {
            "application/json"
        } else {
            "application/x-ndjson"
        };
        format!(
            "POST /publish HTTP/1.1\r\nHost: bench\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut owed = 0;
    for _ in 0..cli.pipeline {
        stream
            .write_all(request(&mut next_topic).as_bytes())
            .await?;
        owed += 1;
    }
    let mut buf = Vec::with_capacity(64 * 1024);
    while owed > 0 {
        while let Some((status, body, used)) = http1::parse_sized_response(&buf)? {
            if status != 200 {
                bail!(
                    "the gateway answered {status}: {}",
                    String::from_utf8_lossy(body)
                );
            }
            buf.drain(..used);
            owed -= 1;
            events.fetch_add(cli.batch as u64, Ordering::Relaxed);
            requests.fetch_add(1, Ordering::Relaxed);
            if Instant::now() < deadline {
                stream
                    .write_all(request(&mut next_topic).as_bytes())
                    .await?;
                owed += 1;
            }
        }
        if owed > 0 && stream.read_buf(&mut buf).await? == 0 {
            bail!("the gateway closed the connection");
        }
    }
    Ok(())
}
