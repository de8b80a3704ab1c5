//! The Redis bus: publishes and reads through the Lua library (`ssegw_publish`, `ssegw_read`),
//! and holds this replica's pub/sub connections, shared by all its topics: one to a single
//! primary, or one to each primary of a Redis Cluster. Every event is read from Redis once per
//! replica and framed once, whatever the number of local clients.
//!
//! Each pub/sub link is checked end to end by a canary: the replica publishes to its own
//! channel through the command connections and must receive it back within the Redis timeout.
//! When a link fails, streams stay open; once it is back, every topic it carried is subscribed
//! again and backfilled from its stream after the last event delivered, so nothing Redis still
//! holds is missed.
//!
//! For one primary: `endpoint` names it (one address, or whichever node the sentinels name),
//! `commands` holds the command connections to it, `subscriber` the pub/sub connection and its
//! canary. For a cluster: `cluster` (its command path and slot map) and `cluster::subscriber`
//! (a sharded pub/sub link per primary). Both use `library` to load the function library and
//! `reply` to read Redis's answers.

mod cluster;
mod commands;
mod endpoint;
mod library;
mod reply;
mod subscriber;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use ssegw_protocol::frame::EventType;
use ssegw_protocol::script::{self, ScriptSettings};
use ssegw_protocol::{StreamId, Topic, Traceparent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::single_flight::SingleFlight;
use super::{BusError, Page};
use crate::config::{BusConfig, Durability, RedisTarget, Topology};
use crate::fanout::hub::{Hub, Interest};
use cluster::subscriber::ClusterSubscriber;
use cluster::ClusterCommands;
use commands::{read_cmd, Commands, Pools};
use endpoint::Endpoint;
use reply::{malformed, parse_page};
use subscriber::Subscriber;

pub struct RedisBus {
    backend: Backend,
    /// `--publish-replicas`: a publish waits for this many replicas.
    durability: Option<Durability>,
    /// True while canaries make the round trip through Redis in time.
    ready: Arc<AtomicBool>,
    /// History reads under way: a caller asking the same page joins one (see `single_flight`).
    reads: SingleFlight<(Topic, StreamId, usize), ReadResult>,
}

type ReadResult = Result<Arc<Page>, BusError>;

/// Where commands go.
enum Backend {
    /// One primary: a fixed address, or the one the sentinels name.
    Single(Commands),
    /// The primaries of a Redis Cluster, each topic on the one owning its slot.
    Cluster(Arc<ClusterCommands>),
}

impl RedisBus {
    /// Starts the bus of a serving replica: command connections plus the pub/sub subscriber
    /// task (and, with sentinels, the watch of their `+switch-master`).
    pub fn start(
        target: &RedisTarget,
        config: &BusConfig,
        hub: Arc<Hub>,
        interest: mpsc::UnboundedReceiver<Interest>,
        shutdown: CancellationToken,
    ) -> Result<RedisBus, BusError> {
        let mut bus = RedisBus::connect(
            target,
            config.redis_pool_size,
            config.redis_timeout,
            &config.script,
            config.install_functions,
        )?;
        let replica = uuid::Uuid::new_v4();
        match &mut bus.backend {
            Backend::Single(commands) => {
                commands.stats = Some(hub.stats().clone());
                let endpoint = commands.pools.endpoint().clone();
                tokio::spawn(endpoint.clone().watch_switches(shutdown.clone()));
                let subscriber = Subscriber {
                    endpoint,
                    commands: commands.clone(),
                    hub,
                    interest,
                    ready: bus.ready.clone(),
                    canary_channel: format!("ssegw:canary:{replica}"),
                    canary_interval: config.canary_interval,
                    shutdown,
                };
                tokio::spawn(subscriber.run());
            }
            Backend::Cluster(commands) => {
                Arc::get_mut(commands).expect("not shared yet").stats = Some(hub.stats().clone());
                let subscriber = ClusterSubscriber {
                    commands: commands.clone(),
                    hub,
                    interest,
                    ready: bus.ready.clone(),
                    replica: replica.to_string(),
                    canary_interval: config.canary_interval,
                    shutdown,
                };
                tokio::spawn(subscriber.run());
            }
        }
        Ok(bus)
    }

    /// A bus for publishing and reading only (the `publish` command); connects lazily.
    pub fn connect(
        target: &RedisTarget,
        pool_size: usize,
        timeout: Duration,
        script: &ScriptSettings,
        install_functions: bool,
    ) -> Result<RedisBus, BusError> {
        let backend = match target.topology() {
            Topology::Cluster(cluster) => {
                // A cluster's events travel on sharded channels, within their topic's shard.
                let script = ScriptSettings {
                    sharded: true,
                    ..*script
                };
                Backend::Cluster(Arc::new(ClusterCommands::new(
                    cluster.clone(),
                    script::function_library(&script).into(),
                    script.channels(),
                    install_functions,
                    timeout,
                )?))
            }
            Topology::Standalone(_) | Topology::Sentinel(_) => {
                let endpoint = Arc::new(Endpoint::new(target.clone(), timeout));
                Backend::Single(Commands {
                    pools: Arc::new(Pools::new(endpoint, pool_size, timeout)),
                    library: script::function_library(script).into(),
                    channels: script.channels(),
                    install_functions,
                    stats: None,
                    timeout,
                })
            }
        };
        Ok(RedisBus {
            durability: target.durability(),
            backend,
            ready: Arc::new(AtomicBool::new(false)),
            reads: SingleFlight::new(),
        })
    }

    pub async fn publish(
        &self,
        topic: &Topic,
        event: Option<&EventType>,
        data: &str,
        traceparent: Option<&Traceparent>,
    ) -> Result<StreamId, BusError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::PUBLISH_FUNCTION)
            .arg(1)
            // The stream key: during a cluster slot migration, Redis runs the call where the
            // stream is (see `read_cmd`).
            .arg(script::stream_key(topic))
            .arg(data)
            .arg(event.map_or("", EventType::as_str));
        if let Some(traceparent) = traceparent {
            cmd.arg(traceparent.as_str());
        }
        let (id, confirmed): (String, Option<u32>) = match (&self.backend, self.durability) {
            (Backend::Single(commands), None) => (commands.fcall(&cmd).await?, None),
            (Backend::Single(commands), Some(durability)) => {
                let (id, confirmed) = commands.fcall_confirmed(&cmd, durability).await?;
                (id, Some(confirmed))
            }
            (Backend::Cluster(commands), durability) => {
                let (id, confirmed) = commands.publish(topic, &cmd, durability).await?;
                (text_reply(id)?, confirmed)
            }
        };
        let id = StreamId::parse(&id)
            .map_err(|_| BusError::Unavailable(format!("unexpected id {id:?}")))?;
        match (self.durability, confirmed) {
            (Some(durability), Some(acknowledged)) if acknowledged < durability.replicas => {
                Err(BusError::Unconfirmed {
                    id,
                    acknowledged,
                    wanted: durability.replicas,
                })
            }
            _ => Ok(id),
        }
    }

    /// Reads up to `count` events after `after` as Redis had them after `since`, sharing the
    /// Redis call with concurrent callers asking the same.
    pub async fn read(
        &self,
        topic: &Topic,
        after: StreamId,
        count: usize,
        since: std::time::Instant,
    ) -> ReadResult {
        let key = (topic.clone(), after, count);
        match &self.backend {
            Backend::Single(commands) => {
                let connect = || async { commands.shared().await.map_err(Err) };
                let query = |shared| async move {
                    let cmd = read_cmd(topic, Some(after), count);
                    let reply: Value = commands.fcall_shared(shared, &cmd).await?;
                    parse_page(reply).map(Arc::new).ok_or_else(malformed)
                };
                self.reads.run(key, since, connect, query).await
            }
            Backend::Cluster(commands) => {
                let connect = || async { commands.connection().await.map_err(Err) };
                let query = |mut conn| async move {
                    let cmd = read_cmd(topic, Some(after), count);
                    let reply = commands.fcall(&mut conn, topic, &cmd).await?;
                    parse_page(reply).map(Arc::new).ok_or_else(malformed)
                };
                self.reads.run(key, since, connect, query).await
            }
        }
    }

    /// True while the last canary came back in time: the replica receives what is published.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// The id a publish answered, as text.
fn text_reply(value: Value) -> Result<String, BusError> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| malformed()),
        Value::SimpleString(text) => Ok(text),
        other => Err(BusError::Unavailable(format!("unexpected reply {other:?}"))),
    }
}
