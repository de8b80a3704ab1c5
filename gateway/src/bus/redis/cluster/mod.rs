//! Redis Cluster: the command path (`ClusterCommands`, over redis-rs's cluster connections:
//! one that follows `MOVED`/`ASK` and retries by itself, for what may run twice; one that
//! retries nothing, for publishes) and the slot map the subscriber routes topics by. The subscriber (`subscriber`) keeps its own sharded pub/sub connections,
//! one per primary, apart from these command connections: redis-rs's cluster pub/sub loses
//! channels on slot moves and takes an unsolicited `sunsubscribe` for a command's reply.
//!
//! A topic's stream (`ssegw:s:{topic}`, the key `FCALL` declares) and its channel
//! (`ssegw:c:{topic}`) hash to one slot: the topic's own, through its hash tag.

pub(super) mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::Value;
use ssegw_protocol::{StreamId, Topic};

use super::commands::read_cmd;
use super::library::{self, Functions};
use super::reply::{classify, malformed, parse_page, unavailable};
use crate::bus::{BusError, Page};
use crate::config::{ClusterTarget, Durability};
use crate::telemetry::stats::Stats;

/// Redis Cluster's number of hash slots.
pub(super) const SLOTS: u16 = 16384;

/// The slot of a key: CRC16 of its hash tag (the part between the first `{` and the next `}`,
/// when not empty) or of the whole key, modulo 16384.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// The slot of a topic: its keys and channel carry it as their hash tag.
pub(super) fn topic_slot(topic: &Topic) -> u16 {
    slot(topic.as_str().as_bytes())
}

/// A primary's address, `host:port` as the cluster announces it.
pub(super) type NodeAddr = String;

/// Which primary serves each slot, as one node of the cluster answered `CLUSTER SLOTS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct SlotMap {
    /// `(first slot, last slot, primary)`, sorted by first slot.
    ranges: Vec<(u16, u16, NodeAddr)>,
}

impl SlotMap {
    /// The primary that serves `slot`, when any does.
    pub(super) fn owner(&self, slot: u16) -> Option<&NodeAddr> {
        let index = self.ranges.partition_point(|(first, _, _)| *first <= slot);
        let (first, last, node) = self.ranges.get(index.checked_sub(1)?)?;
        (*first <= slot && slot <= *last).then_some(node)
    }

    /// Every primary that serves at least one slot, once each.
    pub(super) fn primaries(&self) -> Vec<NodeAddr> {
        let mut primaries: Vec<NodeAddr> = self.ranges.iter().map(|(_, _, n)| n.clone()).collect();
        primaries.sort();
        primaries.dedup();
        primaries
    }

    /// The slots `node` serves, as `(first, last)` ranges in order.
    pub(super) fn slots_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = (u16, u16)> + 'a {
        self.ranges
            .iter()
            .filter(move |(_, _, n)| n == node)
            .map(|(first, last, _)| (*first, *last))
    }

    /// True when every slot has a primary: otherwise some topics have nowhere to live.
    pub(super) fn covers_all(&self) -> bool {
        let mut next = 0u32;
        for (first, last, _) in &self.ranges {
            if u32::from(*first) != next {
                return false;
            }
            next = u32::from(*last) + 1;
        }
        next == u32::from(SLOTS)
    }

    /// Parses a `CLUSTER SLOTS` reply: `[[first, last, [host, port, id, ...], replicas...], ...]`.
    fn parse(reply: Value) -> Option<SlotMap> {
        let Value::Array(entries) = reply else {
            return None;
        };
        let mut ranges = Vec::new();
        for entry in entries {
            let Value::Array(parts) = entry else {
                return None;
            };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(primary))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return None;
            };
            let host = match primary.first()? {
                Value::BulkString(host) => String::from_utf8(host.clone()).ok()?,
                Value::SimpleString(host) => host.clone(),
                _ => return None,
            };
            let Value::Int(port) = primary.get(1)? else {
                return None;
            };
            let first = u16::try_from(*first).ok().filter(|s| *s < SLOTS)?;
            let last = u16::try_from(*last)
                .ok()
                .filter(|s| *s < SLOTS && *s >= first)?;
            ranges.push((first, last, format!("{host}:{port}")));
        }
        ranges.sort();
        Some(SlotMap { ranges })
    }
}

/// `host` and `port` of a `host:port` the cluster announced (the host may be an IPv6 address).
pub(super) fn split_addr(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

/// Commands to a Redis Cluster: `FCALL`s routed by their topic, the function library loaded on
/// each primary, and the slot map. The connections are made on first use and follow the
/// cluster from then on.
///
/// Two cluster connections: one for everything that may run twice (reads, the slot map,
/// canaries), on which redis-rs follows redirects and retries after errors by itself; and one
/// for publishes, on which it retries nothing. redis-rs sends a command again after a response
/// timeout or a dropped connection, when the command may well have run: a publish would be
/// stored twice, and, resent after its caller was answered 503 and went on, stored after the
/// publishes that followed it. `publish` sends again only what Redis did not run.
pub(super) struct ClusterCommands {
    pub(super) target: ClusterTarget,
    reader: ClusterClient,
    /// Made on first use; redis-rs reconnects its node connections under it.
    reads: tokio::sync::OnceCell<ClusterConnection>,
    writer: ClusterClient,
    writes: tokio::sync::OnceCell<ClusterConnection>,
    /// The library to load (sharded), and the fleet's retention table.
    pub(super) functions: Arc<Functions>,
    /// Where the library version found is shown (`/status`, metrics); `None` for `publish`.
    pub(super) stats: Option<Arc<Stats>>,
    pub(super) timeout: Duration,
}

impl ClusterCommands {
    pub(super) fn new(
        target: ClusterTarget,
        functions: Arc<Functions>,
        timeout: Duration,
    ) -> Result<ClusterCommands, BusError> {
        let client = |retries| {
            let mut builder = ClusterClient::builder(target.seeds.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(retries)
                .min_retry_wait(50)
                .max_retry_wait(500);
            if let Some((insecure, certificates)) = target.tls() {
                builder = builder.tls(if insecure {
                    redis::TlsMode::Insecure
                } else {
                    redis::TlsMode::Secure
                });
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
            }
            builder.build().map_err(unavailable)
        };
        Ok(ClusterCommands {
            // Retries within one read follow MOVED/ASK and a failover in progress; the call's
            // own deadline (`timeout`) bounds them all.
            reader: client(8)?,
            reads: tokio::sync::OnceCell::new(),
            writer: client(0)?,
            writes: tokio::sync::OnceCell::new(),
            target,
            functions,
            stats: None,
            timeout,
        })
    }

    /// The cluster connection for what may run twice, made now if it was not.
    pub(super) async fn connection(&self) -> Result<ClusterConnection, BusError> {
        self.connect(&self.reader, &self.reads).await
    }

    async fn connect(
        &self,
        client: &ClusterClient,
        cell: &tokio::sync::OnceCell<ClusterConnection>,
    ) -> Result<ClusterConnection, BusError> {
        let conn = cell
            .get_or_try_init(|| async {
                match tokio::time::timeout(self.timeout, client.get_async_connection()).await {
                    Err(_) => Err(BusError::Unavailable(
                        "no node of the cluster answered in time".into(),
                    )),
                    Ok(result) => result.map_err(unavailable),
                }
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs one command, to `routing` or where its key routes it, within the Redis timeout.
    pub(super) async fn run(
        &self,
        conn: &mut ClusterConnection,
        cmd: redis::Cmd,
        routing: Option<RoutingInfo>,
    ) -> Result<Value, BusError> {
        let call = async {
            match routing {
                Some(routing) => conn.route_command(cmd, routing).await,
                None => cmd.query_async::<Value>(conn).await,
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(BusError::Unavailable(
                "the Redis cluster did not answer in time".into(),
            )),
            Ok(Err(e)) => Err(classify(e)),
            Ok(Ok(Value::ServerError(e))) => Err(classify(e.into())),
            Ok(Ok(value)) => Ok(value),
        }
    }

    /// Runs `cmd` on the primary that owns `key`'s slot, whether or not `cmd` names the key
    /// (`TIME` of the node that keeps the presence registry).
    pub(super) async fn run_at(&self, key: &str, cmd: redis::Cmd) -> Result<Value, BusError> {
        let mut conn = self.connection().await?;
        let route = Route::new(slot(key.as_bytes()), SlotAddr::Master);
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        self.run(&mut conn, cmd, Some(routing)).await
    }

    /// Runs each command where its key routes it, `CONCURRENT` at a time over the multiplexed
    /// node connections (a replica's presence report, one command per topic; reads of a
    /// request, one per topic); one reply each, in order. The first error fails the call, and
    /// the others may or may not have run. Only for commands that may run twice.
    pub(super) async fn run_each(&self, cmds: Vec<redis::Cmd>) -> Result<Vec<Value>, BusError> {
        use futures_util::stream::{self, StreamExt, TryStreamExt};
        /// Commands in flight at once: enough to keep every node's connection busy, few
        /// enough not to queue thousands in redis-rs.
        const CONCURRENT: usize = 64;
        let conn = self.connection().await?;
        stream::iter(cmds)
            .map(|cmd| {
                let mut conn = conn.clone();
                async move { self.run(&mut conn, cmd, None).await }
            })
            .buffered(CONCURRENT)
            .try_collect()
            .await
    }

    /// Runs an `FCALL` on `topic`'s primary. When a primary answers that it has no library (a
    /// new primary, one restarted empty), the library is loaded on every primary of a fresh
    /// slot map (which one answered is not known: the call may have followed a redirect) and
    /// the call sent once more.
    pub(super) async fn fcall(
        &self,
        conn: &mut ClusterConnection,
        topic: &Topic,
        cmd: &redis::Cmd,
    ) -> Result<Value, BusError> {
        match self.run(conn, cmd.clone(), None).await {
            Err(BusError::Rejected(message)) if message.contains("Function not found") => {
                tracing::info!(%topic, "a Redis cluster primary has no ssegw function library; loading it on every primary");
                for primary in self.slot_map().await?.primaries() {
                    self.load_library_on(&primary).await?;
                }
                match self.run(conn, cmd.clone(), None).await {
                    // Still missing: an outage to retry, never the caller's fault.
                    Err(BusError::Rejected(message)) if message.contains("Function not found") => {
                        Err(BusError::Unavailable(message))
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Runs the publish `FCALL` on `topic`'s primary and, with `durability`, `WAIT`s there for
    /// its replicas; returns the id and how many replicas confirmed. The call is sent again
    /// only when Redis answered that it did not run it (`MOVED`, `ASK`, `TRYAGAIN`,
    /// `CLUSTERDOWN`, `READONLY`, a refused connection, a primary without the library), until
    /// the Redis timeout; a call that may have run and got no answer is an error, never resent.
    pub(super) async fn publish(
        &self,
        topic: &Topic,
        cmd: &redis::Cmd,
        durability: Option<Durability>,
    ) -> Result<(Value, Option<u32>), BusError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut conn = self.connect(&self.writer, &self.writes).await?;
        let mut loaded = false;
        let mut pause = Duration::from_millis(10);
        loop {
            let primary = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                topic_slot(topic),
                SlotAddr::Master,
            )));
            // redis-rs answers within its own response timeout: ours only guards against a
            // call it would hold on to for longer.
            let sent =
                tokio::time::timeout(2 * self.timeout, conn.route_command(cmd.clone(), primary))
                    .await;
            let e = match sent {
                Err(_) => {
                    return Err(BusError::Unavailable(
                        "the Redis cluster did not answer in time".into(),
                    ))
                }
                Ok(Ok(Value::ServerError(e))) => redis::RedisError::from(e),
                Ok(Ok(id)) => {
                    let confirmed = match durability {
                        Some(durability) => Some(self.wait(&mut conn, topic, durability).await),
                        None => None,
                    };
                    return Ok((id, confirmed));
                }
                Ok(Err(e)) => e,
            };
            if matches!(e.retry_method(), redis::RetryMethod::AskRedirect) {
                // The slot is migrating and the stream has left: the call runs on the node
                // importing it, after ASKING on the same connection.
                return self.publish_asking(&e, cmd, durability).await;
            }
            let missing_library = e.detail().is_some_and(|d| d.contains("Function not found"));
            if missing_library && !loaded {
                tracing::info!(%topic, "a Redis cluster primary has no ssegw function library; loading it on every primary");
                for primary in self.slot_map().await?.primaries() {
                    self.load_library_on(&primary).await?;
                }
                loaded = true;
                continue;
            }
            let not_run = missing_library
                || e.is_connection_refusal()
                || matches!(
                    e.retry_method(),
                    redis::RetryMethod::MovedRedirect
                        | redis::RetryMethod::WaitAndRetry
                        | redis::RetryMethod::RefreshSlotsAndRetry
                        | redis::RetryMethod::ReconnectFromInitialConnections
                );
            if !not_run || tokio::time::Instant::now() + pause >= deadline {
                return Err(match classify(e) {
                    // Still missing: an outage to retry, never the caller's fault.
                    BusError::Rejected(message) if message.contains("Function not found") => {
                        BusError::Unavailable(message)
                    }
                    other => other,
                });
            }
            // A redirect made redis-rs read the slot map again; a failover takes a moment.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// The publish during a slot migration, on the importing node named by `ask`: `ASKING`,
    /// the call, and the `WAIT`, on one connection of its own.
    async fn publish_asking(
        &self,
        ask: &redis::RedisError,
        cmd: &redis::Cmd,
        durability: Option<Durability>,
    ) -> Result<(Value, Option<u32>), BusError> {
        let (addr, _) = ask
            .redirect_node()
            .ok_or_else(|| BusError::Unavailable("ASK without a node".into()))?;
        let (host, port) = split_addr(addr)
            .ok_or_else(|| BusError::Unavailable(format!("ASK to {addr}: not host:port")))?;
        let info = self.target.node(host, port).map_err(unavailable)?;
        let mut pipe = redis::pipe();
        pipe.cmd("ASKING").ignore().add_command(cmd.clone());
        if let Some(durability) = durability {
            pipe.cmd("WAIT")
                .arg(durability.replicas)
                .arg(durability.timeout.as_millis() as u64);
        }
        let wait = durability.map_or(Duration::ZERO, |d| d.timeout);
        let call = async {
            let mut conn = redis::Client::open(info)?
                .get_multiplexed_async_connection()
                .await?;
            pipe.query_async::<Vec<Value>>(&mut conn).await
        };
        let mut replies = match tokio::time::timeout(self.timeout + wait, call).await {
            Err(_) => {
                return Err(BusError::Unavailable(format!(
                    "{addr} (importing the slot) did not answer in time"
                )))
            }
            Ok(result) => result.map_err(classify)?.into_iter(),
        };
        let id = replies.next().ok_or_else(malformed)?;
        let confirmed = durability.map(|_| match replies.next() {
            Some(Value::Int(confirmed)) => u32::try_from(confirmed).unwrap_or(0),
            _ => 0,
        });
        Ok((id, confirmed))
    }

    /// `WAIT`s on `topic`'s primary for `durability`'s replicas over `conn`, which carried the
    /// publish to it (the cluster connection talks to each node over one connection, so the
    /// `WAIT` covers the publish's write); how many confirmed, 0 on any failure.
    async fn wait(
        &self,
        conn: &mut ClusterConnection,
        topic: &Topic,
        durability: Durability,
    ) -> u32 {
        let mut wait = redis::cmd("WAIT");
        wait.arg(durability.replicas)
            .arg(durability.timeout.as_millis() as u64);
        // WAIT is sent to every primary unless routed: only the topic's counts.
        let route = Route::new(topic_slot(topic), SlotAddr::Master);
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        match tokio::time::timeout(
            durability.timeout + self.timeout,
            conn.route_command(wait, routing),
        )
        .await
        {
            Ok(Ok(Value::Int(confirmed))) => u32::try_from(confirmed).unwrap_or(0),
            Ok(Ok(other)) => {
                tracing::warn!(reply = ?other, "WAIT for replicas answered oddly");
                0
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %super::reply::explain(&e), "WAIT for replicas failed");
                0
            }
            Err(_) => 0,
        }
    }

    /// Loads (or checks) the library on the primary at `addr`, over a connection of its own:
    /// the cluster connection only reaches the nodes it has seen in its own slot map, and a
    /// primary that just joined may not be one of them yet.
    pub(super) async fn load_library_on(&self, addr: &str) -> Result<(), BusError> {
        let run = self.direct(addr).await?;
        library::ensure(&self.functions, addr, run, |version| {
            self.record_library(version)
        })
        .await
    }

    /// Loads `retention` in the library on the primary at `addr` (`sse-gateway namespace`).
    pub(super) async fn load_retention_on(
        &self,
        addr: &str,
        retention: &ssegw_protocol::retention::Retention,
    ) -> Result<(), BusError> {
        let run = self.direct(addr).await?;
        library::load_retention(&self.functions, addr, run, retention).await
    }

    /// A connection of its own to the node at `addr`, as a function that runs one command on
    /// it within the timeout.
    async fn direct(
        &self,
        addr: &str,
    ) -> Result<
        impl Fn(
                redis::Cmd,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<Value, BusError>> + Send>,
            > + '_,
        BusError,
    > {
        let (host, port) = split_addr(addr)
            .ok_or_else(|| BusError::Unavailable(format!("not host:port: {addr}")))?;
        let info = self.target.node(host, port).map_err(unavailable)?;
        let connect = async {
            redis::Client::open(info)?
                .get_multiplexed_async_connection()
                .await
        };
        let conn = match tokio::time::timeout(self.timeout, connect).await {
            Err(_) => return Err(BusError::Unavailable(format!("{addr}: no answer in time"))),
            Ok(result) => result.map_err(unavailable)?,
        };
        let addr = addr.to_string();
        let timeout = self.timeout;
        Ok(move |cmd: redis::Cmd| {
            let mut conn = conn.clone();
            let addr = addr.clone();
            Box::pin(async move {
                match tokio::time::timeout(timeout, cmd.query_async::<Value>(&mut conn)).await {
                    Err(_) => Err(BusError::Unavailable(format!("{addr}: no answer in time"))),
                    Ok(Err(e)) => Err(classify(e)),
                    Ok(Ok(value)) => Ok(value),
                }
            })
                as std::pin::Pin<
                    Box<dyn std::future::Future<Output = Result<Value, BusError>> + Send>,
                >
        })
    }

    fn record_library(&self, version: u64) {
        if let Some(stats) = &self.stats {
            stats
                .redis_library
                .store(version, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The slot map, as one node of the cluster sees it now.
    pub(super) async fn slot_map(&self) -> Result<SlotMap, BusError> {
        let mut conn = self.connection().await?;
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        let reply = self
            .run(
                &mut conn,
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                Some(routing),
            )
            .await?;
        SlotMap::parse(reply).ok_or_else(malformed)
    }

    /// Reads several topics at once (each on its own primary, concurrently): `count` events
    /// after each position, or only the head where no position is given.
    pub(super) async fn read_many(
        &self,
        requests: &[(&Topic, Option<StreamId>)],
        count: usize,
    ) -> Result<Vec<Page>, BusError> {
        let conn = self.connection().await?;
        let reads = requests.iter().map(|(topic, after)| {
            let mut conn = conn.clone();
            async move {
                let reply = self
                    .fcall(&mut conn, topic, &read_cmd(topic, *after, count))
                    .await?;
                parse_page(reply).ok_or_else(malformed)
            }
        });
        join_all(reads).await.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        for (key, expected) in [
            ("foo", 12182),
            ("bar", 5061),
            ("hello", 866),
            ("{user1000}.following", 3443),
            ("{user1000}.followers", 3443),
            ("foo{}{bar}", 8363),
            ("foo{{bar}}zap", 4015),
            ("foo{bar}{zap}", 5061),
        ] {
            assert_eq!(slot(key.as_bytes()), expected, "{key}");
        }
        let topic = Topic::new("orders.eu").unwrap();
        let stream = ssegw_protocol::script::stream_key(&topic);
        let channel = ssegw_protocol::script::channel(&topic);
        assert_eq!(topic_slot(&topic), slot(stream.as_bytes()));
        assert_eq!(topic_slot(&topic), slot(channel.as_bytes()));
    }

    #[test]
    fn slot_maps_answer_owners_and_coverage() {
        let int = Value::Int;
        let node = |port| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![int(5461), int(10922), node(7001), node(7004)]),
            Value::Array(vec![int(0), int(5460), node(7000)]),
            Value::Array(vec![int(10923), int(16383), node(7002)]),
        ]);
        let map = SlotMap::parse(reply).unwrap();
        assert!(map.covers_all());
        assert_eq!(map.owner(0).unwrap(), "127.0.0.1:7000");
        assert_eq!(map.owner(5461).unwrap(), "127.0.0.1:7001");
        assert_eq!(map.owner(16383).unwrap(), "127.0.0.1:7002");
        assert_eq!(map.primaries().len(), 3);
        let partial = SlotMap {
            ranges: vec![(0, 5460, "a:1".into()), (10923, 16383, "c:3".into())],
        };
        assert!(!partial.covers_all());
        assert_eq!(partial.owner(6000), None);
        assert_eq!(SlotMap::parse(Value::Int(1)), None);
    }
}
