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
//! (a sharded pub/sub link per primary). Both use `library` to load the function library,
//! `reply` to read Redis's answers, and `presence` for the replica's presence reports.

mod cluster;
mod commands;
mod endpoint;
mod library;
mod presence;
mod reply;
mod subscriber;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use ssegw_protocol::frame::EventType;
use ssegw_protocol::retention::{Limits, Retention};
use ssegw_protocol::script;
use ssegw_protocol::{StreamId, Topic, Traceparent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::presence::TopicPresence;
use super::single_flight::SingleFlight;
use super::{Beat, BusError, Listing, Page, Publish, TrackOp, Tracked};
use crate::config::{BusConfig, Durability, RedisTarget, Topology};
use crate::fanout::event::Event;
use crate::fanout::hub::{Hub, Interest};
use cluster::subscriber::ClusterSubscriber;
use cluster::ClusterCommands;
use commands::{newest_cmd, range_cmd, read_cmd, Commands, Pools};
use endpoint::Endpoint;
use library::Functions;
use reply::{malformed, parse_newest, parse_page, parse_range, text_reply};
use subscriber::Subscriber;

pub struct RedisBus {
    backend: Backend,
    /// `--publish-replicas`: a publish waits for this many replicas.
    durability: Option<Durability>,
    /// True while canaries make the round trip through Redis in time.
    ready: Arc<AtomicBool>,
    /// History reads under way: a caller asking the same page joins one (see `single_flight`).
    reads: SingleFlight<(Topic, StreamId, usize), ReadResult>,
    /// The presence report task of a serving replica with `--presence-interval`.
    presence: Option<presence::Presence>,
    /// `--redis-timeout`.
    timeout: Duration,
}

type ReadResult = Result<Arc<Page>, BusError>;

/// Where commands go.
#[derive(Clone)]
enum Backend {
    /// One primary: a fixed address, or the one the sentinels name.
    Single(Commands),
    /// The primaries of a Redis Cluster, each topic on the one owning its slot.
    Cluster(Arc<ClusterCommands>),
}

impl RedisBus {
    /// Starts the bus of a serving replica: command connections plus the pub/sub subscriber
    /// task (and, with sentinels, the watch of their `+switch-master`), and with
    /// `--presence-interval` the presence reports. `replica` names it in Redis (its canary
    /// channel, its presence reports).
    pub fn start(
        target: &RedisTarget,
        config: &BusConfig,
        replica: uuid::Uuid,
        hub: Arc<Hub>,
        interest: mpsc::UnboundedReceiver<Interest>,
        shutdown: CancellationToken,
    ) -> Result<RedisBus, BusError> {
        let mut bus = RedisBus::connect(
            target,
            config.redis_pool_size,
            config.redis_timeout,
            config.retention_seed,
            config.install_functions,
        )?;
        if let Backend::Single(commands) = &mut bus.backend {
            commands.stats = Some(hub.stats().clone());
        }
        if let Backend::Cluster(commands) = &mut bus.backend {
            Arc::get_mut(commands).expect("not shared yet").stats = Some(hub.stats().clone());
        }
        tokio::spawn(refresh_retention(bus.backend.clone(), shutdown.clone()));
        bus.presence = config.presence.map(|presence| {
            presence::Presence::start(
                bus.backend.clone(),
                hub.clone(),
                presence,
                replica.to_string(),
                &shutdown,
            )
        });
        match &mut bus.backend {
            Backend::Single(commands) => {
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
        retention_seed: Limits,
        install_functions: bool,
    ) -> Result<RedisBus, BusError> {
        let backend = match target.topology() {
            Topology::Cluster(cluster) => {
                // A cluster's events travel on sharded channels, within their topic's shard.
                let functions = Arc::new(Functions::new(retention_seed, true, install_functions));
                Backend::Cluster(Arc::new(ClusterCommands::new(
                    cluster.clone(),
                    functions,
                    timeout,
                )?))
            }
            Topology::Standalone(_) | Topology::Sentinel(_) => {
                let endpoint = Arc::new(Endpoint::new(target.clone(), timeout));
                Backend::Single(Commands {
                    pools: Arc::new(Pools::new(endpoint, pool_size, timeout)),
                    functions: Arc::new(Functions::new(retention_seed, false, install_functions)),
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
            presence: None,
            timeout,
        })
    }

    /// The `FCALL ssegw_publish` of one event. With an idempotency key, the record's key is
    /// declared too: in a cluster migrating the topic's slot, Redis then runs the call only
    /// where both keys are (or answers `TRYAGAIN`, and nothing ran).
    fn publish_cmd(publish: &Publish<'_>) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::PUBLISH_FUNCTION);
        match publish.idempotency {
            None => cmd.arg(1),
            Some(_) => cmd.arg(2),
        };
        // The stream key: during a cluster slot migration, Redis runs the call where the
        // stream is (see `read_cmd`).
        cmd.arg(script::stream_key(publish.topic));
        if let Some((key, _)) = publish.idempotency {
            cmd.arg(script::idempotency_key(publish.topic, key));
        }
        cmd.arg(publish.data)
            .arg(publish.event.map_or("", EventType::as_str))
            .arg(publish.traceparent.map_or("", Traceparent::as_str));
        if let Some((key, window)) = publish.idempotency {
            cmd.arg(key.as_str()).arg(window.as_secs().max(1));
        }
        cmd
    }

    pub async fn publish(&self, publish: &Publish<'_>) -> Result<StreamId, BusError> {
        let cmd = Self::publish_cmd(publish);
        self.run_publish(publish.topic, &cmd).await
    }

    /// Runs a publish `FCALL` on `topic`'s primary, with the durability `--publish-replicas`
    /// asks for (never resent once it may have run); returns the id it answered.
    async fn run_publish(&self, topic: &Topic, cmd: &redis::Cmd) -> Result<StreamId, BusError> {
        let (id, confirmed): (String, Option<u32>) = match (&self.backend, self.durability) {
            (Backend::Single(commands), None) => (commands.fcall(cmd).await?, None),
            (Backend::Single(commands), Some(durability)) => {
                let (id, confirmed) = commands.fcall_confirmed(cmd, durability).await?;
                (id, Some(confirmed))
            }
            (Backend::Cluster(commands), durability) => {
                let (id, confirmed) = commands.publish(topic, cmd, durability).await?;
                (text_reply(id)?, confirmed)
            }
        };
        self.confirmed(&id, confirmed)
    }

    /// The id of a publish, or `Unconfirmed` when fewer replicas than `--publish-replicas`
    /// confirmed it.
    fn confirmed(&self, id: &str, confirmed: Option<u32>) -> Result<StreamId, BusError> {
        let id = StreamId::parse(id)
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

    /// Several publishes in order. On one primary: one pipeline on one connection (and one
    /// `WAIT` after it for `--publish-replicas`). In a cluster: each topic's publishes in
    /// order, the topics side by side on the multiplexed connection.
    pub async fn publish_many(&self, publishes: &[Publish<'_>]) -> Vec<Result<StreamId, BusError>> {
        match &self.backend {
            Backend::Single(commands) => {
                let cmds: Vec<_> = publishes.iter().map(Self::publish_cmd).collect();
                match commands.fcall_many(&cmds, self.durability).await {
                    Err(e) => publishes.iter().map(|_| Err(e.clone())).collect(),
                    Ok((replies, confirmed)) => replies
                        .into_iter()
                        .map(|reply| reply.and_then(|id| self.confirmed(&id, confirmed)))
                        .collect(),
                }
            }
            Backend::Cluster(_) => {
                let mut by_topic: std::collections::HashMap<&Topic, Vec<usize>> =
                    std::collections::HashMap::new();
                for (i, publish) in publishes.iter().enumerate() {
                    by_topic.entry(publish.topic).or_default().push(i);
                }
                let runs = by_topic.into_values().map(|indices| async move {
                    let mut results = Vec::with_capacity(indices.len());
                    for i in indices {
                        results.push((i, self.publish(&publishes[i]).await));
                    }
                    results
                });
                let mut results: Vec<Option<Result<StreamId, BusError>>> =
                    publishes.iter().map(|_| None).collect();
                for (i, result) in futures_util::future::join_all(runs)
                    .await
                    .into_iter()
                    .flatten()
                {
                    results[i] = Some(result);
                }
                results
                    .into_iter()
                    .map(|r| r.expect("every publish ran"))
                    .collect()
            }
        }
    }

    /// The fleet's retention table as last read from Redis; `None` before it was.
    pub fn retention(&self) -> Option<Arc<Retention>> {
        match &self.backend {
            Backend::Single(commands) => commands.functions.retention(),
            Backend::Cluster(commands) => commands.functions.retention(),
        }
    }

    /// Reads the fleet's retention table from every primary, and brings the newest to any that
    /// holds an older one (see `library::Functions`); the newest is what `retention` answers.
    pub async fn refresh_retention(&self) -> Result<Retention, BusError> {
        self.backend.refresh_library().await?;
        self.retention()
            .map(|r| (*r).clone())
            .ok_or_else(|| BusError::Unavailable("no retention table in Redis".into()))
    }

    /// Changes the fleet's retention (`sse-gateway namespace`): reads the newest table from
    /// every primary, applies `change` as a new generation, and loads the result on every
    /// primary. Answers the new table.
    pub async fn change_retention(
        &self,
        change: impl FnOnce(&mut Retention, u64) -> Result<(), String>,
    ) -> Result<Retention, BusError> {
        let mut retention = self.refresh_retention().await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let generation = now.max(retention.generation() + 1);
        change(&mut retention, generation).map_err(BusError::Rejected)?;
        match &self.backend {
            Backend::Single(commands) => commands.load_retention(&retention).await?,
            Backend::Cluster(commands) => {
                for primary in commands.slot_map().await?.primaries() {
                    commands.load_retention_on(&primary, &retention).await?;
                }
            }
        }
        Ok(retention)
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
                let query = |shared: commands::Shared| async move {
                    if after != StreamId::ZERO {
                        let range = range_cmd(topic, after, count);
                        let reply: Value = commands.fcall_shared(shared.clone(), &range).await?;
                        if let Some(page) = parse_range(reply, after)? {
                            return Ok(Arc::new(page));
                        }
                    }
                    let cmd = read_cmd(topic, Some(after), count);
                    let reply: Value = commands.fcall_shared(shared, &cmd).await?;
                    parse_page(reply).map(Arc::new).ok_or_else(malformed)
                };
                self.reads.run(key, since, connect, query).await
            }
            Backend::Cluster(commands) => {
                let connect = || async { commands.connection().await.map_err(Err) };
                let query = |mut conn| async move {
                    if after != StreamId::ZERO {
                        let range = range_cmd(topic, after, count);
                        let reply = commands.fcall(&mut conn, topic, &range).await?;
                        if let Some(page) = parse_range(reply, after)? {
                            return Ok(Arc::new(page));
                        }
                    }
                    let cmd = read_cmd(topic, Some(after), count);
                    let reply = commands.fcall(&mut conn, topic, &cmd).await?;
                    parse_page(reply).map(Arc::new).ok_or_else(malformed)
                };
                self.reads.run(key, since, connect, query).await
            }
        }
    }

    /// The `count` newest events of `topic`, in stream order (`GET /history` without a
    /// position).
    pub async fn newest(&self, topic: &Topic, count: usize) -> Result<Vec<Arc<Event>>, BusError> {
        let cmd = newest_cmd(topic, count);
        let reply = match &self.backend {
            Backend::Single(commands) => commands.fcall::<Value>(&cmd).await?,
            Backend::Cluster(commands) => {
                let mut conn = commands.connection().await?;
                commands.run(&mut conn, cmd, None).await?
            }
        };
        parse_newest(reply)
    }

    /// Appends a Mercure update (its encoded `blob`) to the hub's log `log`, indexes its id and
    /// publishes it: `FCALL ssegw_m_publish`, with the native publish's durability and its rule
    /// of never resending what may have run. Returns the log entry's id.
    pub async fn mercure_publish(
        &self,
        log: &Topic,
        update_id: &str,
        blob: &[u8],
        traceparent: Option<&Traceparent>,
    ) -> Result<StreamId, BusError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::MERCURE_PUBLISH_FUNCTION)
            .arg(4)
            .arg(&script::mercure_keys(log))
            .arg(update_id)
            .arg(blob)
            .arg(traceparent.map_or("", Traceparent::as_str));
        self.run_publish(log, &cmd).await
    }

    /// The log entry of the Mercure update `update_id` (its first occurrence), if the log
    /// still holds it: `FCALL ssegw_m_find`.
    pub async fn mercure_find(
        &self,
        log: &Topic,
        update_id: &str,
    ) -> Result<Option<StreamId>, BusError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::MERCURE_FIND_FUNCTION)
            .arg(4)
            .arg(&script::mercure_keys(log))
            .arg(update_id);
        let reply: String = match &self.backend {
            Backend::Single(commands) => commands.fcall(&cmd).await?,
            Backend::Cluster(commands) => {
                let mut conn = commands.connection().await?;
                text_reply(commands.fcall(&mut conn, log, &cmd).await?)?
            }
        };
        if reply.is_empty() {
            return Ok(None);
        }
        StreamId::parse(&reply)
            .map(Some)
            .map_err(|_| BusError::Unavailable(format!("unexpected entry id {reply:?}")))
    }

    /// Runs a Mercure registry call (its keys all in the log's slot) and returns the answer.
    async fn mercure_call(&self, log: &Topic, cmd: &redis::Cmd) -> Result<Value, BusError> {
        match &self.backend {
            Backend::Single(commands) => commands.fcall(cmd).await,
            Backend::Cluster(commands) => {
                let mut conn = commands.connection().await?;
                commands.fcall(&mut conn, log, cmd).await
            }
        }
    }

    /// `FCALL ssegw_m_track`. Resent as any read may be: repeating it changes nothing.
    pub async fn mercure_track(
        &self,
        log: &Topic,
        replica: &str,
        op: TrackOp,
        ttl: std::time::Duration,
        items: &[Tracked<'_>],
    ) -> Result<u64, BusError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::MERCURE_TRACK_FUNCTION)
            .arg(6)
            .arg(&script::mercure_keys(log))
            .arg(script::MERCURE_SUBSCRIPTIONS)
            .arg(script::mercure_replica_key(replica))
            .arg(op.as_str())
            .arg(ttl.as_millis() as u64);
        for item in items {
            cmd.arg(item.field)
                .arg(item.doc)
                .arg(item.update_id)
                .arg(item.blob);
        }
        match self.mercure_call(log, &cmd).await? {
            Value::Int(published) => Ok(published.max(0) as u64),
            other => Err(BusError::Unavailable(format!(
                "unexpected ssegw_m_track reply {other:?}"
            ))),
        }
    }

    /// `FCALL ssegw_m_beat`.
    pub async fn mercure_beat(
        &self,
        log: &Topic,
        replica: &str,
        ttl: std::time::Duration,
        count: usize,
    ) -> Result<Beat, BusError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::MERCURE_BEAT_FUNCTION)
            .arg(1)
            .arg(script::MERCURE_SUBSCRIPTIONS)
            .arg(replica)
            .arg(ttl.as_millis() as u64)
            .arg(count);
        let reply = reply::text_list(self.mercure_call(log, &cmd).await?)?;
        reply::parse_beat(reply)
    }

    /// `FCALL ssegw_m_subscriptions`.
    pub async fn mercure_subscriptions(
        &self,
        log: &Topic,
        only: Option<&str>,
    ) -> Result<Listing, BusError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::MERCURE_SUBSCRIPTIONS_FUNCTION)
            .arg(2)
            .arg(script::stream_key(log))
            .arg(script::MERCURE_SUBSCRIPTIONS);
        if let Some(id) = only {
            cmd.arg(id);
        }
        let mut reply = reply::text_list(self.mercure_call(log, &cmd).await?)?.into_iter();
        let (Some(position), Some(last_event_id)) = (reply.next(), reply.next()) else {
            return Err(reply::malformed());
        };
        let position = if position.is_empty() {
            StreamId::ZERO
        } else {
            StreamId::parse(&position).map_err(|_| reply::malformed())?
        };
        Ok(Listing {
            position,
            last_event_id,
            documents: reply.collect(),
        })
    }

    /// The fleet's subscribers of each of `topics`, from the replicas' live presence reports.
    pub async fn presence(&self, topics: &[Topic]) -> Result<Vec<TopicPresence>, BusError> {
        presence::read(&self.backend, topics).await
    }

    /// Stops this replica's presence reports and removes them from Redis (a graceful stop),
    /// waiting a second at most (it takes a round trip): a Redis that does not answer must not
    /// hold up the exit, and the reports expire anyway.
    pub async fn withdraw_presence(&self) {
        if let Some(presence) = &self.presence {
            presence
                .withdraw(self.timeout.min(Duration::from_secs(1)))
                .await;
        }
    }

    /// True while the last canary came back in time: the replica receives what is published.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

impl Backend {
    /// Checks the library on every primary (`library::ensure`): loads it where it is missing
    /// or older, and reads the fleet's retention table.
    async fn refresh_library(&self) -> Result<(), BusError> {
        match self {
            Backend::Single(commands) => {
                let mut conn = commands.connection().await?;
                commands.load_library(&mut conn).await
            }
            Backend::Cluster(commands) => {
                for primary in commands.slot_map().await?.primaries() {
                    commands.load_library_on(&primary).await?;
                }
                Ok(())
            }
        }
    }
}

/// How often a serving replica reads the fleet's retention table again: a change made with
/// `sse-gateway namespace` reaches `/status` and the HTTP size checks within this time (Redis
/// applies it to the next publish at once).
const RETENTION_REFRESH: Duration = Duration::from_secs(5);

/// Reads the retention table every `RETENTION_REFRESH` until `shutdown`; a failure is logged
/// and tried again at the next tick (the canaries report outages).
async fn refresh_retention(backend: Backend, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RETENTION_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = backend.refresh_library().await {
            tracing::debug!(error = %e, "cannot read the retention table from Redis");
        }
    }
}
