//! The command line, parsed and checked once into a `Plan`. Bad flags exit with status 2 and a
//! message before anything starts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::http1::BaseUrl;
use crate::target::Target;

#[derive(Parser, Debug)]
#[command(
    name = "ssegw-loadtest",
    version,
    about = "Load-test harness for sse-gateway: opens SSE connections, publishes open-loop, \
             measures latency and checks that nothing is lost, repeated or reordered",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Hidden>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Hidden {
    /// Internal: one shard of connections, driven by a parent harness over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every connection on one hot topic (unless --topics says otherwise).
    Fanout,
    /// One topic per connection (unless --topics says otherwise), events spread over them.
    ManyTopics,
    /// Connections constantly closing and resuming (--churn-rate per second).
    Churn,
    /// Kill a replica (SIGKILL) under load; every client must resume elsewhere, nothing lost.
    ResumeStorm,
    /// A long run; memory and latency sampled every interval must stay stable.
    Soak,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishVia {
    /// `FCALL ssegw_publish` on Redis (--redis-url, or the spawned Redis).
    Redis,
    /// `POST /publish` on the gateways.
    Http,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    #[arg(long, value_enum, default_value = "fanout")]
    pub scenario: Scenario,
    /// The server under test: the gateway, or a baseline to compare it with.
    #[arg(long, value_enum, default_value = "gateway")]
    pub target: Target,
    /// Server base URL; repeat for several (connections are spread round-robin).
    #[arg(long = "url", value_name = "URL")]
    pub urls: Vec<String>,
    /// Start a local redis-server and this many replicas of the target, and test those.
    #[arg(long, value_name = "N")]
    pub spawn: Option<usize>,
    /// Server binary for --spawn [default: `sse-gateway`, or `ssegw-baseline` for --target
    /// actix, next to this executable]. nchan runs the `nginx` found on PATH.
    #[arg(long, value_name = "PATH")]
    pub gateway_bin: Option<PathBuf>,
    /// Extra argument for every spawned gateway or actix replica; repeat for several (e.g.
    /// --gateway-arg=--workers=1).
    #[arg(long = "gateway-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Redis to publish to with FCALL [default with --spawn: the spawned one].
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// With --spawn: start a local Redis Cluster of P primaries instead of one redis-server,
    /// give the replicas --redis-cluster, and publish with FCALL on the primary of each
    /// topic's slot (--publish-via redis).
    #[arg(long, value_name = "P")]
    pub redis_cluster: Option<usize>,
    /// With --redis-cluster: replicas of each primary. On a machine of few cores a replica
    /// re-runs each write its primary runs and takes CPU the primaries would use, so the
    /// default measures primaries only.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub redis_cluster_replicas: usize,
    /// How to publish [default: redis when a Redis URL is known, else http].
    #[arg(long, value_enum)]
    pub publish_via: Option<PublishVia>,
    /// SSE connections to open.
    #[arg(short = 'c', long, default_value_t = 100)]
    pub connections: u64,
    /// Topics in the run [default: 1; many-topics: one per connection].
    #[arg(long, value_name = "K")]
    pub topics: Option<u32>,
    /// Topics each connection subscribes to (consecutive topics, wrapping around).
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub topics_per_conn: u32,
    /// New connections per second.
    #[arg(long, value_name = "PER_S", default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// Events per second, in total over all topics (0: connections only, e.g. idle memory).
    #[arg(long, value_name = "PER_S", default_value_t = 10.0)]
    pub rate: f64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// After publishing stops, longest wait for every connection to see the last events.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Longest wait for all connections to open before publishing starts.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Padding bytes added to every event's data.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Publishes awaiting a reply, at most; an event due beyond that is skipped and counted.
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Pipelined HTTP connections used by --publish-via http.
    #[arg(long, default_value_t = 4)]
    pub publish_conns: usize,
    /// churn: connections closed (and resumed) per second [default: a tenth of them].
    #[arg(long, value_name = "PER_S")]
    pub churn_rate: Option<f64>,
    /// resume-storm: when to kill, after publishing started [default: a third of --duration].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub kill_at: Option<Duration>,
    /// resume-storm with --spawn: the replica to kill.
    #[arg(long, default_value_t = 0)]
    pub kill_replica: usize,
    /// resume-storm without --spawn: shell command that kills a replica.
    #[arg(long, value_name = "CMD")]
    pub kill_cmd: Option<String>,
    /// Local addresses to bind client sockets to, round-robin, e.g. 127.0.0.1,127.0.0.2
    /// (each gives ~28,000 ephemeral ports per gateway) [default: against gateways on
    /// loopback (--spawn, or 127.x.x.x / localhost URLs) with more than 12,000 connections to
    /// one of them, 127.0.0.1..127.0.0.N, 12,000 connections per address and gateway at most;
    /// otherwise the kernel's choice].
    #[arg(long, value_delimiter = ',', value_name = "IP,...")]
    pub source_addrs: Vec<IpAddr>,
    /// Connections per process; more than this are spread over worker processes.
    #[arg(long, default_value_t = 15_000)]
    pub conns_per_process: u64,
    /// Runtime threads per harness process.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also record memory and CPU of this process (a gateway not started by --spawn); repeat
    /// for several.
    #[arg(long = "watch-pid", value_name = "PID")]
    pub watch_pids: Vec<u32>,
    /// Sampling interval for progress, time series, memory and CPU.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Write the JSON report here.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
    /// Write an SVG chart of latency percentiles and throughput over time here.
    #[arg(long, value_name = "PATH")]
    pub chart: Option<PathBuf>,
    /// SLO: fail when p99 latency exceeds this.
    #[arg(long, value_name = "MS")]
    pub max_p99_ms: Option<f64>,
    /// SLO: lost events allowed: a count (5), a fraction (0.001) or a percentage (0.1%).
    #[arg(long, default_value = "0", value_parser = parse_loss)]
    pub max_loss: LossBudget,
    /// Do not fail on duplicated or out-of-order events.
    #[arg(long)]
    pub allow_duplicates: bool,
    /// soak: fail when replica memory grows more than this fraction from the first to the
    /// last quarter of the run.
    #[arg(long, default_value_t = 0.25)]
    pub max_rss_growth: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossBudget {
    Count(u64),
    Fraction(f64),
}

impl LossBudget {
    pub fn allows(&self, lost: u64, expected: u64) -> bool {
        match *self {
            LossBudget::Count(n) => lost <= n,
            LossBudget::Fraction(f) => lost as f64 <= f * expected as f64,
        }
    }
}

fn parse_loss(text: &str) -> Result<LossBudget, String> {
    let bad = || format!("{text:?} is not a count, fraction or percentage");
    if let Some(percent) = text.strip_suffix('%') {
        let p: f64 = percent.trim().parse().map_err(|_| bad())?;
        return (0.0..=100.0)
            .contains(&p)
            .then_some(LossBudget::Fraction(p / 100.0))
            .ok_or_else(bad);
    }
    if text.contains('.') {
        let f: f64 = text.parse().map_err(|_| bad())?;
        return (0.0..=1.0)
            .contains(&f)
            .then_some(LossBudget::Fraction(f))
            .ok_or_else(bad);
    }
    text.parse().map(LossBudget::Count).map_err(|_| bad())
}

/// The Redis that `--spawn` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpawnedRedis {
    /// One `redis-server`.
    Standalone,
    /// A Redis Cluster (`--redis-cluster P`), slots split evenly over the primaries.
    Cluster {
        primaries: usize,
        replicas_per_primary: usize,
    },
}

/// What `--spawn` starts besides Redis, one per replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Servers {
    /// `sse-gateway --listen ADDR --redis-url URL ARGS...`
    Gateway { bin: PathBuf, args: Vec<String> },
    /// `ssegw-baseline --listen ADDR ARGS...` (it needs no Redis).
    Actix { bin: PathBuf, args: Vec<String> },
    /// `../shared/bench/floor`'s `floor PORT ARGS...` (`ARGS`: its number of writers).
    Reference { bin: PathBuf, args: Vec<String> },
    /// `nginx` with the nchan module, from a generated configuration.
    Nchan { nginx: PathBuf, module: PathBuf },
}

/// A checked run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub args: RunArgs,
    pub topics: u32,
    pub publish_via: PublishVia,
    /// Set for --spawn.
    pub servers: Option<Servers>,
    /// Set for --spawn.
    pub redis: Option<SpawnedRedis>,
    pub churn_rate: Option<f64>,
    pub kill_at: Option<Duration>,
    pub source_addrs: Vec<IpAddr>,
}

/// Connections from one loopback source address to one gateway, at most, when the harness picks
/// the source addresses. Linux's `connect` looks for a free ephemeral port among those of one
/// parity first, half the range (14,116 of the default 32768-60999); once they are taken by
/// connections to the same gateway, every further `connect` searches all of them before it
/// tries the other half, about a millisecond each here: 15,000 connections from one address
/// opened at 3,000 to 5,800 per second whatever the rate asked, and at 9,854 per second from
/// two. This stays below that half, with room for reconnections that overlap a close.
const CONNS_PER_SOURCE_AND_GATEWAY: u64 = 12_000;

impl RunArgs {
    /// Checks the flags; the message names what is wrong.
    pub fn into_plan(self) -> Result<Plan, String> {
        let a = &self;
        if a.urls.is_empty() && a.spawn.is_none() {
            return Err("give --url (one or more gateways) or --spawn N".into());
        }
        if !a.urls.is_empty() && a.spawn.is_some() {
            return Err("--url and --spawn exclude each other".into());
        }
        for url in &a.urls {
            BaseUrl::parse(url).map_err(|e| format!("--url: {e}"))?;
        }
        if a.spawn == Some(0) {
            return Err("--spawn needs at least one replica".into());
        }
        if a.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        let topics = a.topics.unwrap_or(match a.scenario {
            Scenario::ManyTopics => u32::try_from(a.connections)
                .map_err(|_| "too many connections for one topic each")?,
            _ => 1,
        });
        if topics == 0 {
            return Err("--topics must be at least 1".into());
        }
        if a.topics_per_conn == 0 || a.topics_per_conn > topics || a.topics_per_conn > 256 {
            return Err(format!(
                "--topics-per-conn must be between 1 and min(--topics, 256) = {}",
                topics.min(256)
            ));
        }
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number"))
            }
        };
        positive("--connect-rate", a.connect_rate)?;
        if !(a.rate.is_finite() && a.rate >= 0.0) {
            return Err("--rate must be zero or more".into());
        }
        if a.duration.is_zero() || a.interval.is_zero() {
            return Err("--duration and --interval must be more than zero".into());
        }
        if a.max_in_flight == 0
            || a.publish_conns == 0
            || a.threads == 0
            || a.conns_per_process == 0
        {
            return Err("--max-in-flight, --publish-conns, --threads and --conns-per-process must be at least 1".into());
        }
        if let Some(p99) = a.max_p99_ms {
            if !(p99.is_finite() && p99 >= 0.0) {
                return Err("--max-p99-ms must be zero or more".into());
            }
        }
        check_target(a)?;
        let publish_via = match (a.publish_via, a.redis_url.is_some() || a.spawn.is_some()) {
            _ if a.target != Target::Gateway => PublishVia::Http,
            (Some(PublishVia::Redis), false) => {
                return Err("--publish-via redis needs --redis-url or --spawn".into())
            }
            (Some(via), _) => via,
            (None, true) => PublishVia::Redis,
            (None, false) => PublishVia::Http,
        };
        let redis = spawned_redis(a)?;
        let servers = match a.spawn {
            Some(_) => Some(spawned_servers(a)?),
            None => None,
        };
        let churn_rate = match a.scenario {
            Scenario::Churn => {
                let rate = a.churn_rate.unwrap_or(a.connections as f64 / 10.0);
                positive("--churn-rate", rate)?;
                Some(rate)
            }
            _ if a.churn_rate.is_some() => {
                return Err("--churn-rate applies to --scenario churn".into())
            }
            _ => None,
        };
        let kill_at = match a.scenario {
            Scenario::ResumeStorm => {
                match (a.spawn, &a.kill_cmd) {
                    (Some(n), None) if n >= 2 && a.kill_replica < n => {}
                    (Some(n), None) if n < 2 => {
                        return Err(
                            "resume-storm needs --spawn 2 or more (one to kill, one to resume on)"
                                .into(),
                        )
                    }
                    (Some(_), None) => {
                        return Err("--kill-replica is not one of the spawned replicas".into())
                    }
                    (None, Some(_)) if a.urls.len() >= 2 => {}
                    (None, Some(_)) => {
                        return Err("resume-storm with --kill-cmd needs two --url or more".into())
                    }
                    (None, None) => return Err("resume-storm needs --spawn N or --kill-cmd".into()),
                    (Some(_), Some(_)) => {
                        return Err("--kill-cmd is for gateways not spawned by the harness".into())
                    }
                }
                let at = a.kill_at.unwrap_or(a.duration / 3);
                if at >= a.duration {
                    return Err("--kill-at must fall within --duration".into());
                }
                Some(at)
            }
            _ if a.kill_at.is_some() || a.kill_cmd.is_some() => {
                return Err("--kill-at and --kill-cmd apply to --scenario resume-storm".into())
            }
            _ => None,
        };
        if !(a.max_rss_growth.is_finite() && a.max_rss_growth >= 0.0) {
            return Err("--max-rss-growth must be zero or more".into());
        }
        let source_addrs = if a.source_addrs.is_empty() {
            loopback_sources(a)
        } else {
            a.source_addrs.clone()
        };
        Ok(Plan {
            topics,
            publish_via,
            servers,
            redis,
            churn_rate,
            kill_at,
            source_addrs,
            args: self,
        })
    }
}

/// Source addresses 127.0.0.1..127.0.0.N for connections to gateways on loopback, enough that
/// none has more than `CONNS_PER_SOURCE_AND_GATEWAY` connections to one gateway (after a resume
/// storm's kill, too); none (the kernel's choice) when one address is enough, or when a gateway
/// is elsewhere: a loopback source cannot reach it.
fn loopback_sources(a: &RunArgs) -> Vec<IpAddr> {
    let on_loopback = a.spawn.is_some() || a.urls.iter().all(|url| is_loopback_url(url));
    let mut gateways = a.spawn.unwrap_or(a.urls.len()).max(1) as u64;
    if a.scenario == Scenario::ResumeStorm && gateways > 1 {
        // The killed replica's clients crowd onto the others.
        gateways -= 1;
    }
    let per_gateway = a.connections.div_ceil(gateways);
    let n = per_gateway.div_ceil(CONNS_PER_SOURCE_AND_GATEWAY).min(254) as u8;
    if !on_loopback || n < 2 {
        return Vec::new();
    }
    (1..=n).map(|i| IpAddr::from([127, 0, 0, i])).collect()
}

/// Whether `url`'s host is an IPv4 loopback address or `localhost` (not looked up: a name that
/// resolves there is not recognised, and `--source-addrs` remains for it).
fn is_loopback_url(url: &str) -> bool {
    let Ok(base) = BaseUrl::parse(url) else {
        return false;
    };
    let host = base
        .authority
        .rsplit_once(':')
        .map_or(base.authority.as_str(), |(host, _)| host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The limits of a baseline target: it is measured on fan-out only, with one topic per
/// connection, and publishes over HTTP.
fn check_target(a: &RunArgs) -> Result<(), String> {
    if a.target == Target::Gateway {
        return Ok(());
    }
    let target = a.target.name();
    if !matches!(a.scenario, Scenario::Fanout | Scenario::ManyTopics) {
        return Err(format!(
            "--target {target} supports --scenario fanout and many-topics only: churn, \
             resume-storm and soak need clients to resume with Last-Event-ID and be sent what \
             they missed, which only the gateway offers"
        ));
    }
    if a.topics_per_conn != 1 {
        return Err(format!(
            "--target {target} serves one topic per connection: drop --topics-per-conn"
        ));
    }
    if a.publish_via.is_some() || a.redis_url.is_some() {
        return Err(format!(
            "--target {target} is published to over HTTP; --publish-via and --redis-url are \
             for the gateway"
        ));
    }
    if a.target == Target::Reference {
        check_reference(a)?;
    }
    if a.target == Target::Nchan && (a.gateway_bin.is_some() || !a.gateway_args.is_empty()) {
        return Err(
            "--target nchan runs nginx from PATH with a generated configuration: drop \
             --gateway-bin and --gateway-arg"
                .into(),
        );
    }
    Ok(())
}

/// What `../shared/bench/floor` can be asked: one server, one topic, its own frames, and a
/// whole number of events a second.
fn check_reference(a: &RunArgs) -> Result<(), String> {
    if a.scenario != Scenario::Fanout {
        return Err(
            "--target reference sends every event to every connection: use --scenario fanout"
                .into(),
        );
    }
    if a.spawn.map_or(a.urls.len() != 1, |n| n != 1) {
        return Err("--target reference is one server: --spawn 1, or one --url".into());
    }
    if a.spawn.is_some() && a.gateway_bin.is_none() {
        return Err(format!(
            "--target reference --spawn 1 needs --gateway-bin: {REFERENCE_BUILD}"
        ));
    }
    if a.payload_bytes > 0 {
        return Err("--target reference sends its own frames: drop --payload-bytes".into());
    }
    if a.rate.fract() != 0.0 {
        return Err("--target reference publishes a whole number of events a second".into());
    }
    Ok(())
}

/// How to build `../shared/bench/floor`, said where it is missing.
const REFERENCE_BUILD: &str = "build ../shared/bench/floor (cargo build --release --locked \
     --manifest-path ../shared/bench/floor/Cargo.toml --target-dir /tmp/floor) and pass \
     --gateway-bin /tmp/floor/release/floor";

/// The Redis --spawn starts, if it does: `--redis-cluster` needs --spawn and the gateway,
/// and takes the place of a Redis URL.
fn spawned_redis(a: &RunArgs) -> Result<Option<SpawnedRedis>, String> {
    let Some(primaries) = a.redis_cluster else {
        if a.redis_cluster_replicas > 0 {
            return Err("--redis-cluster-replicas needs --redis-cluster".into());
        }
        return Ok(a.spawn.map(|_| SpawnedRedis::Standalone));
    };
    if a.spawn.is_none() {
        return Err("--redis-cluster starts a local cluster: it needs --spawn N".into());
    }
    if a.target != Target::Gateway {
        return Err(format!(
            "--redis-cluster is for the gateway, not --target {}",
            a.target.name()
        ));
    }
    if a.redis_url.is_some() {
        return Err("--redis-cluster and --redis-url exclude each other".into());
    }
    if !(1..=usize::from(ssegw_testkit::SLOTS)).contains(&primaries) {
        return Err("--redis-cluster needs between 1 and 16384 primaries".into());
    }
    Ok(Some(SpawnedRedis::Cluster {
        primaries,
        replicas_per_primary: a.redis_cluster_replicas,
    }))
}

/// What --spawn starts for the target, with every binary found and checked.
fn spawned_servers(a: &RunArgs) -> Result<Servers, String> {
    let binary = |name: &str, package: &str| match &a.gateway_bin {
        Some(path) if path.is_file() => Ok(path.clone()),
        Some(path) => Err(format!("--gateway-bin {}: no such file", path.display())),
        None => sibling(name).ok_or(format!(
            "no {name} binary next to ssegw-loadtest: build it (cargo build --release -p \
             {package}) or pass --gateway-bin"
        )),
    };
    Ok(match a.target {
        Target::Gateway => Servers::Gateway {
            bin: binary("sse-gateway", "sse-gateway")?,
            args: a.gateway_args.clone(),
        },
        Target::Mercure => Servers::Gateway {
            bin: binary("sse-gateway", "sse-gateway")?,
            args: [
                "--mercure=true".to_string(),
                format!("--mercure-jwt-secret={}", crate::target::MERCURE_SECRET),
                "--mercure-anonymous=true".to_string(),
            ]
            .into_iter()
            .chain(a.gateway_args.iter().cloned())
            .collect(),
        },
        Target::Actix => Servers::Actix {
            bin: binary("ssegw-baseline", "ssegw-loadtest")?,
            args: a.gateway_args.clone(),
        },
        Target::Floor => Servers::Actix {
            bin: binary("ssegw-floor", "ssegw-loadtest")?,
            args: a.gateway_args.clone(),
        },
        Target::Reference => Servers::Reference {
            bin: binary("floor", "floor")?,
            args: a.gateway_args.clone(),
        },
        Target::Nchan => {
            let missing = "--target nchan needs nginx with the nchan module \
                           (apt-get install nginx libnginx-mod-nchan)";
            let nginx = find_nginx().ok_or(format!("{missing}: no nginx on PATH"))?;
            let module = find_nchan_module().ok_or(format!(
                "{missing}: no ngx_nchan_module.so in {}",
                NGINX_MODULE_DIRS.join(", ")
            ))?;
            Servers::Nchan { nginx, module }
        }
    })
}

/// `name` in the directory of this executable (cargo puts every binary of the workspace in
/// the same target directory).
fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live one level deeper, in `deps/`.
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// `nginx` on PATH, or in the sbin directories a non-root PATH may lack.
fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

/// Where distributions put dynamic nginx modules (Debian: the first).
const NGINX_MODULE_DIRS: [&str; 3] = [
    "/usr/lib/nginx/modules",
    "/usr/lib64/nginx/modules",
    "/usr/local/nginx/modules",
];

fn find_nchan_module() -> Option<PathBuf> {
    NGINX_MODULE_DIRS
        .iter()
        .map(|dir| Path::new(dir).join("ngx_nchan_module.so"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `flags` is the command line after the program name, split on whitespace.
    fn plan(flags: &str) -> Result<Plan, String> {
        let args = std::iter::once("ssegw-loadtest").chain(flags.split_whitespace());
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        cli.run.into_plan()
    }

    fn check_error(flags: &str, expected: &str) {
        let error = plan(flags).expect_err("flags should be refused");
        assert!(error.contains(expected), "{flags:?}: {error}");
    }

    #[test]
    fn refuses_bad_combinations() {
        check_error("", "give --url");
        check_error("--url https://x", "only http://");
        check_error(
            "--url http://a:1 --topics 2 --topics-per-conn 3",
            "--topics-per-conn",
        );
        check_error("--url http://a:1 --connect-rate 0", "--connect-rate");
        check_error("--url http://a:1 --publish-via redis", "needs --redis-url");
        check_error(
            "--url http://a:1 --scenario resume-storm",
            "needs --spawn N or --kill-cmd",
        );
        check_error(
            "--url http://a:1 --churn-rate 5",
            "applies to --scenario churn",
        );
        check_error("--url http://a:1 --max-loss 2%x", "not a count");
        check_error("--url http://a:1 --max-loss 1.5", "not a count");
    }

    #[test]
    fn scenario_defaults() {
        let p = plan("--url http://a:1 -c 50 --scenario many-topics").unwrap();
        assert_eq!((p.topics, p.publish_via), (50, PublishVia::Http));
        let p = plan("--url http://a:1 --redis-url redis://x --scenario churn -c 100").unwrap();
        assert_eq!(
            (p.topics, p.publish_via, p.churn_rate),
            (1, PublishVia::Redis, Some(10.0))
        );
    }

    #[test]
    fn loopback_gateways_get_enough_source_addresses() {
        let sources = |flags: &str| plan(flags).unwrap().source_addrs;
        let none: Vec<IpAddr> = Vec::new();
        let loopback =
            |n: u8| -> Vec<IpAddr> { (1..=n).map(|i| IpAddr::from([127, 0, 0, i])).collect() };
        // One address is the kernel's own choice: nothing to bind.
        assert_eq!(sources("--url http://127.0.0.1:1 -c 12000"), none);
        assert_eq!(sources("--url http://127.0.0.1:1 -c 12001"), loopback(2));
        assert_eq!(sources("--url http://localhost:1 -c 45000"), loopback(4));
        // Counted per gateway: two gateways take 24,000 from one address.
        assert_eq!(
            sources("--url http://127.0.0.1:1 --url http://127.0.0.1:2 -c 24000"),
            none
        );
        // Spawned replicas listen on 127.0.0.1 (any existing file stands in for the binary).
        assert_eq!(sources("--spawn 3 --gateway-bin /bin/sh -c 30000"), none);
        // After a resume storm's kill, two replicas hold 15,000 each.
        let storm = "--spawn 3 --gateway-bin /bin/sh --scenario resume-storm -c 30000";
        assert_eq!(sources(storm), loopback(2));
        assert_eq!(
            sources("--spawn 1 --gateway-bin /bin/sh -c 15000"),
            loopback(2)
        );
        // A gateway elsewhere cannot be reached from 127.0.0.x.
        assert_eq!(sources("--url http://10.0.0.5:8080 -c 45000"), none);
        assert_eq!(
            sources("--url http://127.0.0.1:1 --url http://gw.example:80 -c 45000"),
            none
        );
        // Given addresses are used as given.
        assert_eq!(
            sources("--url http://10.0.0.5:8080 -c 45000 --source-addrs 10.0.0.7,10.0.0.8"),
            vec![IpAddr::from([10, 0, 0, 7]), IpAddr::from([10, 0, 0, 8])]
        );
    }

    #[test]
    fn the_reference_is_one_server_with_one_topic() {
        check_error(
            "--url http://a:1 --target reference --scenario many-topics",
            "use --scenario fanout",
        );
        check_error(
            "--url http://a:1 --url http://b:1 --target reference",
            "one server",
        );
        check_error("--spawn 2 --target reference", "one server");
        check_error("--spawn 1 --target reference", "pass --gateway-bin");
        check_error(
            "--url http://a:1 --target reference --payload-bytes 10",
            "drop --payload-bytes",
        );
        check_error(
            "--url http://a:1 --target reference --rate 2.5",
            "whole number",
        );
        let p = plan("--url http://a:1 --target reference --rate 50 -c 100").unwrap();
        assert_eq!((p.topics, p.publish_via), (1, PublishVia::Http));
        let exe = std::env::current_exe().unwrap();
        let bin = exe.display().to_string();
        let p = plan(&format!(
            "--spawn 1 --target reference --gateway-bin {bin} --gateway-arg=2"
        ))
        .unwrap();
        assert_eq!(
            p.servers,
            Some(Servers::Reference {
                bin: exe,
                args: vec!["2".into()]
            })
        );
    }

    #[test]
    fn baseline_targets_take_fanout_and_many_topics_only() {
        for target in ["actix", "nchan"] {
            let flags = |rest: &str| format!("--url http://a:1 --target {target} {rest}");
            for scenario in ["churn", "resume-storm", "soak"] {
                check_error(
                    &flags(&format!("--scenario {scenario}")),
                    "need clients to resume with Last-Event-ID",
                );
            }
            check_error(
                &flags("--topics 4 --topics-per-conn 2"),
                "one topic per connection",
            );
            check_error(&flags("--publish-via redis"), "over HTTP");
            check_error(&flags("--redis-url redis://x"), "over HTTP");
            let p = plan(&flags("--scenario many-topics -c 20")).unwrap();
            assert_eq!(
                (p.args.target.name(), p.topics, p.publish_via),
                (target, 20, PublishVia::Http)
            );
            assert!(p.servers.is_none());
        }
        check_error(
            "--spawn 1 --target nchan --gateway-arg=--workers=1",
            "drop --gateway-bin and --gateway-arg",
        );
        check_error(
            "--spawn 1 --target actix --gateway-bin /nonexistent",
            "no such file",
        );
        assert!(Target::Gateway.resumes() && !Target::Nchan.resumes());
    }

    #[test]
    fn spawned_redis_cluster() {
        let redis = |flags: &str| plan(flags).unwrap().redis;
        assert_eq!(redis("--url http://a:1"), None);
        assert_eq!(
            redis("--spawn 1 --gateway-bin /bin/sh"),
            Some(SpawnedRedis::Standalone)
        );
        let p = plan("--spawn 2 --gateway-bin /bin/sh --redis-cluster 3").unwrap();
        assert_eq!(
            (p.redis, p.publish_via),
            (
                Some(SpawnedRedis::Cluster {
                    primaries: 3,
                    replicas_per_primary: 0
                }),
                PublishVia::Redis
            )
        );
        assert_eq!(
            redis("--spawn 1 --gateway-bin /bin/sh --redis-cluster 2 --redis-cluster-replicas 1"),
            Some(SpawnedRedis::Cluster {
                primaries: 2,
                replicas_per_primary: 1
            })
        );
        let p = plan("--spawn 1 --gateway-bin /bin/sh --redis-cluster 1 --publish-via http");
        assert_eq!(p.unwrap().publish_via, PublishVia::Http);
        check_error("--url http://a:1 --redis-cluster 3", "needs --spawn N");
        check_error(
            "--spawn 1 --gateway-bin /bin/sh --redis-cluster-replicas 1",
            "needs --redis-cluster",
        );
        check_error(
            "--spawn 1 --gateway-bin /bin/sh --redis-cluster 0",
            "between 1 and 16384",
        );
        check_error(
            "--spawn 1 --gateway-bin /bin/sh --redis-cluster 3 --redis-url redis://x",
            "exclude each other",
        );
        check_error(
            "--spawn 1 --target actix --redis-cluster 3",
            "for the gateway",
        );
    }

    #[test]
    fn loss_budgets() {
        assert_eq!(parse_loss("0"), Ok(LossBudget::Count(0)));
        assert_eq!(parse_loss("0.01"), Ok(LossBudget::Fraction(0.01)));
        assert_eq!(parse_loss("1%"), Ok(LossBudget::Fraction(0.01)));
        assert!(LossBudget::Fraction(0.01).allows(1, 100));
        assert!(!LossBudget::Count(0).allows(1, 100));
    }
}
