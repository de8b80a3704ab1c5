//! `ssegw-resubscribe`: what (re)subscribing many sharded channels costs one Redis node, for the
//! key-layout decision in BENCHMARKS.md (2026-12-03, Redis Cluster): one `SSUBSCRIBE` per topic
//! channel, each in its own slot (what a gateway replica sends after reconnecting), against
//! `SSUBSCRIBE`s of many channels that share one slot (a partition scheme). Also `skew`: how
//! evenly partition hash tags and per-topic tags fall on equal primaries, computed, no server.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use ssegw_testkit::{slot_of, SLOTS};

#[derive(Parser)]
#[command(
    name = "ssegw-resubscribe",
    about = "Measures what (re)subscribing N sharded channels costs one Redis node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Subscribe N channels on one node over one RESP3 connection, pipelined, and report the
    /// wall time until every confirmation came back and the node's CPU (INFO cpu) meanwhile.
    /// The node must own every slot the channels hash to: a cluster of one primary.
    Subscribe {
        /// The node, HOST:PORT.
        #[arg(long)]
        node: String,
        /// Channels to subscribe.
        #[arg(long)]
        channels: usize,
        #[arg(long, value_enum)]
        layout: Layout,
        /// shared-slot: channels per SSUBSCRIBE command.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Times to repeat, each on a new connection (the node drops the last one's
        /// subscriptions when it closes).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// For P partitions tagged {0}..{P-1} and {p0}..{p(P-1)}, and for per-topic tags, how many
    /// fall on each of K primaries owning equal contiguous slot ranges: max over mean.
    Skew,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// `SSUBSCRIBE ssegw:c:{lt.rs.I}`: one command per channel, each in its topic's own slot,
    /// as the gateway does.
    PerTopic,
    /// `SSUBSCRIBE ssegw:c:{p7}:lt.rs.I ...`: `--batch` channels per command, all in one slot.
    SharedSlot,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Subscribe {
            node,
            channels,
            layout,
            batch,
            rounds,
        } => {
            if channels == 0 || batch == 0 {
                bail!("--channels and --batch must be at least 1");
            }
            for round in 1..=rounds {
                let r = subscribe_round(&node, channels, layout, batch)?;
                println!(
                    "round {round}: {channels} channels, {} commands: wall {:.3} s, node CPU \
                     {:.3} s ({:.2} µs per channel), node memory {:+.1} MiB ({:.0} B per channel)",
                    r.commands,
                    r.wall.as_secs_f64(),
                    r.cpu_s,
                    r.cpu_s * 1e6 / channels as f64,
                    r.memory_bytes as f64 / (1024.0 * 1024.0),
                    r.memory_bytes as f64 / channels as f64,
                );
            }
            Ok(())
        }
        Command::Skew => {
            skew();
            Ok(())
        }
    }
}

struct Round {
    commands: usize,
    wall: Duration,
    cpu_s: f64,
    memory_bytes: i64,
}

fn subscribe_round(
    node: &str,
    channels: usize,
    layout: Layout,
    batch: usize,
) -> anyhow::Result<Round> {
    let mut info = TcpStream::connect(node).with_context(|| format!("cannot connect to {node}"))?;
    let mut info_reader = BufReader::new(info.try_clone()?);
    let mut stream = TcpStream::connect(node)?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(1 << 16, stream.try_clone()?);
    // RESP3, as a gateway's links speak it: confirmations come as pushes.
    let mut parser = redis::Parser::new();
    stream.write_all(&command(&["HELLO", "3"]))?;
    parser.parse_value(&mut reader)?;

    let names: Vec<String> = (0..channels)
        .map(|i| match layout {
            Layout::PerTopic => format!("ssegw:c:{{lt.rs.{i}}}"),
            Layout::SharedSlot => format!("ssegw:c:{{p7}}:lt.rs.{i}"),
        })
        .collect();
    let mut buffer = Vec::new();
    let mut commands = 0;
    let per_command = match layout {
        Layout::PerTopic => 1,
        Layout::SharedSlot => batch,
    };
    for chunk in names.chunks(per_command) {
        let mut args = vec!["SSUBSCRIBE"];
        args.extend(chunk.iter().map(String::as_str));
        buffer.extend_from_slice(&command(&args));
        commands += 1;
    }

    let (cpu0, memory0) = node_stats(&mut info, &mut info_reader)?;
    let start = Instant::now();
    // The writer runs beside the reader, as a pipelined client's would: the node answers while
    // commands still arrive, and neither side's socket buffer fills.
    let mut writer = stream.try_clone()?;
    let writing = std::thread::spawn(move || writer.write_all(&buffer));
    let mut confirmed = 0;
    while confirmed < channels {
        match parser.parse_value(&mut reader)? {
            redis::Value::Push {
                kind: redis::PushKind::SSubscribe,
                ..
            } => confirmed += 1,
            redis::Value::ServerError(e) => bail!("the node refused a subscription: {e:?}"),
            other => bail!("unexpected reply {other:?}"),
        }
    }
    let wall = start.elapsed();
    writing.join().expect("writer thread")?;
    let (cpu1, memory1) = node_stats(&mut info, &mut info_reader)?;
    drop(reader);
    drop(stream);
    // Let the node drop this connection's subscriptions before the next round measures.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Round {
        commands,
        wall,
        cpu_s: cpu1 - cpu0,
        memory_bytes: memory1 - memory0,
    })
}

/// The node's CPU (`used_cpu_sys + used_cpu_user`, seconds) and `used_memory` (bytes).
fn node_stats(
    info: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
) -> anyhow::Result<(f64, i64)> {
    info.write_all(&command(&["INFO", "ALL"]))?;
    let redis::Value::BulkString(text) = redis::Parser::new().parse_value(reader)? else {
        bail!("INFO answered no text");
    };
    let text = String::from_utf8_lossy(&text);
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("INFO has no {name}"))
    };
    let cpu = field("used_cpu_sys")?.trim().parse::<f64>()?
        + field("used_cpu_user")?.trim().parse::<f64>()?;
    let memory = field("used_memory")?.trim().parse()?;
    Ok((cpu, memory))
}

/// A command as the node reads it.
fn command(args: &[&str]) -> Vec<u8> {
    redis::cmd(args[0]).arg(&args[1..]).get_packed_command()
}

/// Which of `nodes` equal contiguous slot ranges `slot` falls in, as a cluster is usually
/// first split (redis-cli --cluster create, the testkit).
fn node_of(slot: u16, nodes: usize) -> usize {
    usize::from(slot) * nodes / usize::from(SLOTS)
}

/// Max over mean of `keys` per node, and the counts.
fn spread<'a>(keys: impl Iterator<Item = &'a str>, nodes: usize) -> (f64, Vec<usize>) {
    let mut counts = vec![0usize; nodes];
    for key in keys {
        counts[node_of(slot_of(key), nodes)] += 1;
    }
    let total: usize = counts.iter().sum();
    let mean = total as f64 / nodes as f64;
    let max = *counts.iter().max().unwrap_or(&0) as f64;
    (max / mean, counts)
}

fn skew() {
    println!("| tags | primaries | per primary | max / mean |");
    println!("|---|---|---|---|");
    for partitions in [16, 64, 128] {
        for (style, format) in [
            ("{0}..", (|i| format!("{{{i}}}")) as fn(usize) -> String),
            ("{p0}..", |i| format!("{{p{i}}}")),
        ] {
            let keys: Vec<String> = (0..partitions).map(format).collect();
            for nodes in [3, 10] {
                let (ratio, counts) = spread(keys.iter().map(String::as_str), nodes);
                println!("| {partitions} partitions {style} | {nodes} | {counts:?} | {ratio:.2} |");
            }
        }
    }
    for topics in [1_000, 100_000] {
        // Topic names as the load tester makes them, one run's.
        let keys: Vec<String> = (0..topics)
            .map(|i| format!("ssegw:c:{{lt.3f9a01c2.{i}}}"))
            .collect();
        for nodes in [3, 10] {
            let (ratio, counts) = spread(keys.iter().map(String::as_str), nodes);
            println!("| {topics} topics, a tag each | {nodes} | {counts:?} | {ratio:.3} |");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_split_evenly_over_nodes() {
        assert_eq!(node_of(0, 3), 0);
        assert_eq!(node_of(5461, 3), 0);
        assert_eq!(node_of(5462, 3), 1);
        assert_eq!(node_of(16383, 3), 2);
        let (ratio, counts) = spread(["{a}", "{b}", "{c}"].into_iter(), 1);
        assert_eq!((ratio, counts), (1.0, vec![3]));
    }
}
