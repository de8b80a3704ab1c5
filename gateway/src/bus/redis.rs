//! The Redis bus: publishes and reads through the Lua library (`ssegw_publish`, `ssegw_read`),
//! and holds this replica's single pub/sub connection, shared by all its topics. Every event is
//! read from Redis once per replica and framed once, whatever the number of local clients.
//!
//! The pub/sub link is checked end to end by a canary: the replica publishes to its own channel
//! through the command pool and must receive it back within the Redis timeout. When the link
//! fails, streams stay open; after reconnecting, every topic is subscribed again and backfilled
//! from its stream after the last event delivered, so nothing Redis still holds is missed.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use futures_util::StreamExt;
use redis::Value;
use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::script::{self, ChannelMessage, ScriptSettings};
use ssegw_protocol::{StreamId, Topic, Traceparent};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::single_flight::SingleFlight;
use super::{BusError, Page};
use crate::config::BusConfig;
use crate::hub::{Channel, Event, Hub, Interest};

/// Channels per SUBSCRIBE command when many are (re)subscribed at once.
const SUBSCRIBE_BATCH: usize = 1000;
/// Topics per pipelined read when many are brought up to date at once.
const READ_BATCH: usize = 64;
/// Events per topic per read while backfilling after a reconnect.
const BACKFILL_PAGE: usize = 200;

pub struct RedisBus {
    commands: Commands,
    /// True while canaries make the round trip through Redis in time.
    ready: Arc<AtomicBool>,
    /// History reads under way: a caller asking the same page joins one (see `single_flight`).
    reads: SingleFlight<(Topic, StreamId, usize), ReadResult>,
}

type ReadResult = Result<Arc<Page>, BusError>;

impl RedisBus {
    /// Starts the bus of a serving replica: command pool plus the pub/sub subscriber task.
    pub fn start(
        url: &str,
        config: &BusConfig,
        hub: Arc<Hub>,
        interest: mpsc::UnboundedReceiver<Interest>,
        shutdown: CancellationToken,
    ) -> Result<RedisBus, BusError> {
        let bus = RedisBus::connect(
            url,
            config.redis_pool_size,
            config.redis_timeout,
            &config.script,
        )?;
        let subscriber = Subscriber {
            client: redis::Client::open(url).map_err(unavailable)?,
            commands: bus.commands.clone(),
            hub,
            interest,
            ready: bus.ready.clone(),
            canary_channel: format!("ssegw:canary:{}", uuid::Uuid::new_v4()),
            canary_interval: config.canary_interval,
            shutdown,
        };
        tokio::spawn(subscriber.run());
        Ok(bus)
    }

    /// A bus for publishing and reading only (the `publish` command); connects lazily.
    pub fn connect(
        url: &str,
        pool_size: usize,
        timeout: Duration,
        script: &ScriptSettings,
    ) -> Result<RedisBus, BusError> {
        let pool = deadpool_redis::Config::from_url(url)
            .builder()
            .map_err(|e| BusError::Unavailable(e.to_string()))?
            .max_size(pool_size)
            // deadpool waits forever by default; a drained pool must fail like a dead Redis.
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(RedisBus {
            commands: Commands {
                pool,
                library: script::function_library(script).into(),
                timeout,
            },
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
            .arg(topic.as_str())
            .arg(data)
            .arg(event.map_or("", EventType::as_str));
        if let Some(traceparent) = traceparent {
            cmd.arg(traceparent.as_str());
        }
        let id: String = self.commands.fcall(&cmd).await?;
        StreamId::parse(&id).map_err(|_| BusError::Unavailable(format!("unexpected id {id:?}")))
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
        let connect = || async { self.commands.connection().await.map_err(Err) };
        let query = |mut conn: deadpool_redis::Connection| async move {
            let cmd = read_cmd(topic, Some(after), count);
            let reply: Value = self.commands.fcall_on(&mut conn, &cmd).await?;
            parse_page(reply).map(Arc::new).ok_or_else(malformed)
        };
        let key = (topic.clone(), after, count);
        self.reads.run(key, since, connect, query).await
    }

    /// True while the last canary came back in time: the replica receives what is published.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// `FCALL ssegw_read 1 <topic> <after> <count>`; without `after`, only the head is asked for.
fn read_cmd(topic: &Topic, after: Option<StreamId>, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(script::READ_FUNCTION)
        .arg(1)
        .arg(topic.as_str())
        .arg(after.map_or(String::new(), |id| id.to_string()))
        .arg(count);
    cmd
}

fn malformed() -> BusError {
    BusError::Unavailable("malformed ssegw_read reply".into())
}

/// Command-connection work shared by request handlers and the subscriber task.
#[derive(Clone)]
struct Commands {
    pool: Pool,
    library: Arc<str>,
    timeout: Duration,
}

impl Commands {
    async fn connection(&self) -> Result<deadpool_redis::Connection, BusError> {
        self.pool
            .get()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    /// Runs an `FCALL`, loading the library first if Redis lost it (a restart without
    /// persistence, `FUNCTION FLUSH`).
    async fn fcall<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BusError> {
        let mut conn = self.connection().await?;
        self.fcall_on(&mut conn, cmd).await
    }

    async fn fcall_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut deadpool_redis::Connection,
        cmd: &redis::Cmd,
    ) -> Result<T, BusError> {
        match self.query(cmd, conn).await {
            Err(BusError::Rejected(msg)) if msg.contains("Function not found") => {
                self.load_library(conn).await?;
                self.query(cmd, conn).await
            }
            other => other,
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        conn: &mut deadpool_redis::Connection,
    ) -> Result<T, BusError> {
        match tokio::time::timeout(self.timeout, cmd.query_async(conn)).await {
            Err(_) => Err(BusError::Unavailable("Redis did not answer in time".into())),
            Ok(Err(e)) => Err(classify(e)),
            Ok(Ok(value)) => Ok(value),
        }
    }

    async fn load_library(&self, conn: &mut deadpool_redis::Connection) -> Result<(), BusError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(&*self.library);
        self.query::<String>(&cmd, conn).await.map(drop)
    }

    /// Reads several topics in one pipelined round trip: `count` events after each position,
    /// or only the head where no position is given.
    async fn read_many(
        &self,
        requests: &[(&Topic, Option<StreamId>)],
        count: usize,
    ) -> Result<Vec<Page>, BusError> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        for (topic, after) in requests {
            pipe.add_command(read_cmd(topic, *after, count));
        }
        let replies: Vec<Value> =
            match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
                Err(_) => return Err(BusError::Unavailable("Redis did not answer in time".into())),
                Ok(result) => result.map_err(classify)?,
            };
        replies
            .into_iter()
            .map(parse_page)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(malformed)
    }
}

/// Owns the replica's pub/sub connection: applies the hub's interest changes in batches,
/// dispatches every message to the hub, checks the link with canaries, and after a reconnect
/// subscribes and backfills every topic the hub still serves.
struct Subscriber {
    client: redis::Client,
    commands: Commands,
    hub: Arc<Hub>,
    interest: mpsc::UnboundedReceiver<Interest>,
    ready: Arc<AtomicBool>,
    /// This replica's own channel, for canaries.
    canary_channel: String,
    canary_interval: Duration,
    shutdown: CancellationToken,
}

impl Subscriber {
    async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut connected_before = false;
        loop {
            let attempt = async {
                let mut conn = self.commands.connection().await?;
                self.commands.load_library(&mut conn).await?;
                let pubsub = self.client.get_async_pubsub();
                match tokio::time::timeout(self.commands.timeout, pubsub).await {
                    Err(_) => Err(BusError::Unavailable("pub/sub connect timed out".into())),
                    Ok(result) => result.map_err(unavailable),
                }
            };
            let pubsub = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = attempt => result,
            };
            let reason = match pubsub {
                Ok(pubsub) => {
                    if connected_before {
                        let stats = self.hub.stats();
                        stats.record(&stats.redis_reconnects);
                    }
                    connected_before = true;
                    match self.serve(pubsub, &mut backoff).await {
                        None => return,
                        Some(reason) => reason,
                    }
                }
                Err(e) => e.to_string(),
            };
            if self.ready.swap(false, Ordering::AcqRel) {
                // Streams stay open: once the link is back, each topic is backfilled from
                // the last event delivered.
                tracing::warn!(%reason, topics = self.hub.topic_count(), "Redis link lost; not ready");
            } else {
                tracing::warn!(%reason, "Redis unavailable");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Serves one pub/sub connection; returns why it ended, or `None` on shutdown.
    async fn serve(&mut self, pubsub: redis::aio::PubSub, backoff: &mut Backoff) -> Option<String> {
        let (mut sink, mut messages) = pubsub.split();
        let mut subscribed = HashSet::new();
        if let Err(e) = sink.subscribe(&self.canary_channel).await {
            return Some(e.to_string());
        }
        // Channels the hub serves from before this connection: subscribed again and
        // backfilled. Pub/sub messages queue up meanwhile; those already backfilled are
        // dropped as duplicates when dispatched.
        let channels = self.hub.channels();
        if let Err(e) = self.join(&mut sink, &mut subscribed, channels).await {
            return Some(e.to_string());
        }
        let mut canary = Canary::new(self.canary_interval, self.commands.timeout);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                message = messages.next() => match message {
                    Some(message) if message.get_channel_name() == self.canary_channel => {
                        if let Some(rtt) = canary.arrived(message.get_payload_bytes()) {
                            self.hub.stats().canary_rtt.record(rtt.as_secs_f64(), &[]);
                            if !self.ready.swap(true, Ordering::AcqRel) {
                                tracing::info!(topics = subscribed.len(), "Redis link verified; ready");
                                backoff.reset();
                            }
                        }
                    }
                    Some(message) => self.dispatch(&message),
                    None => return Some("pub/sub connection closed".into()),
                },
                Some(first) = self.interest.recv() => {
                    let mut batch = vec![first];
                    while let Ok(more) = self.interest.try_recv() {
                        batch.push(more);
                    }
                    if let Err(e) = self.apply(&mut sink, &mut subscribed, batch).await {
                        return Some(e.to_string());
                    }
                }
                _ = canary.timer.as_mut() => {
                    if canary.in_flight {
                        return Some(format!("canary not received within {:?}", self.commands.timeout));
                    }
                    let seq = canary.send();
                    let commands = self.commands.clone();
                    let mut publish = redis::cmd("PUBLISH");
                    publish.arg(&self.canary_channel).arg(seq);
                    // A failure shows as a canary that does not arrive.
                    tokio::spawn(async move {
                        if let Ok(mut conn) = commands.connection().await {
                            let _ = commands.query::<i64>(&publish, &mut conn).await;
                        }
                    });
                }
            }
        }
    }

    fn dispatch(&self, message: &redis::Msg) {
        let Some(topic) = script::topic_of_channel(message.get_channel_name()) else {
            return;
        };
        // Messages come from the publish function, which checks them; anything else on the
        // channel was sent around it.
        let message = ChannelMessage::parse(message.get_payload_bytes())
            .ok()
            .and_then(|m| {
                let event = m.event.map(EventType::new).transpose().ok()?;
                Some(Event::new(m.id, event.as_ref(), m.data).traced(m.traceparent))
            });
        match message {
            Some(event) => self.hub.dispatch(&topic, Arc::new(event)),
            None => tracing::warn!(%topic, "ignoring malformed channel message"),
        }
    }

    /// Applies a batch of interest changes: one UNSUBSCRIBE for the topics left, then the new
    /// channels are joined.
    async fn apply(
        &self,
        sink: &mut redis::aio::PubSubSink,
        subscribed: &mut HashSet<Topic>,
        batch: Vec<Interest>,
    ) -> Result<(), BusError> {
        // Later changes to a topic override earlier ones in the same batch.
        let mut wanted: HashMap<Topic, Option<Arc<Channel>>> = HashMap::new();
        for interest in batch {
            match interest {
                Interest::Subscribe(channel) => wanted.insert(channel.topic.clone(), Some(channel)),
                Interest::Unsubscribe(topic) => wanted.insert(topic, None),
            };
        }
        let leave: Vec<Topic> = wanted
            .iter()
            .filter(|(topic, channel)| channel.is_none() && subscribed.contains(*topic))
            .map(|(topic, _)| topic.clone())
            .collect();
        // Channels already replaced or removed again need nothing.
        let join: Vec<Arc<Channel>> = wanted
            .into_values()
            .flatten()
            .filter(|c| {
                self.hub
                    .channel(&c.topic)
                    .is_some_and(|now| Arc::ptr_eq(&now, c))
            })
            .collect();
        if !leave.is_empty() {
            let names: Vec<String> = leave.iter().map(script::channel).collect();
            sink.unsubscribe(&names).await.map_err(unavailable)?;
            for topic in &leave {
                subscribed.remove(topic);
            }
        }
        self.join(sink, subscribed, join).await
    }

    /// Subscribes the channels not yet subscribed on this connection, then brings each up to
    /// date: a new channel learns its stream's head and turns ready; a channel that was
    /// already delivering (before a reconnect) is backfilled from its latest position.
    async fn join(
        &self,
        sink: &mut redis::aio::PubSubSink,
        subscribed: &mut HashSet<Topic>,
        channels: Vec<Arc<Channel>>,
    ) -> Result<(), BusError> {
        let new: Vec<String> = channels
            .iter()
            .filter(|c| !subscribed.contains(&c.topic))
            .map(|c| script::channel(&c.topic))
            .collect();
        for names in new.chunks(SUBSCRIBE_BATCH) {
            sink.subscribe(names).await.map_err(unavailable)?;
        }
        subscribed.extend(channels.iter().map(|c| c.topic.clone()));
        // Read after subscribing: whatever is published from now on also arrives as a message.
        let (delivering, fresh): (Vec<_>, Vec<_>) =
            channels.into_iter().partition(|c| c.is_ready());
        for batch in fresh.chunks(READ_BATCH) {
            let requests: Vec<_> = batch.iter().map(|c| (&c.topic, None)).collect();
            let pages = self.commands.read_many(&requests, 0).await?;
            for (channel, page) in batch.iter().zip(pages) {
                channel.set_ready(page.head);
            }
        }
        self.backfill(delivering).await
    }

    /// Dispatches what each channel missed: the events after its latest position, or a gap
    /// marker and the retained history when those events are gone.
    async fn backfill(&self, mut pending: Vec<Arc<Channel>>) -> Result<(), BusError> {
        let stats = self.hub.stats();
        stats.add(&stats.backfills, pending.len() as u64);
        while !pending.is_empty() {
            let mut unfinished = Vec::new();
            for batch in pending.chunks(READ_BATCH) {
                let requests: Vec<_> = batch.iter().map(|c| (&c.topic, Some(c.latest()))).collect();
                let pages = self.commands.read_many(&requests, BACKFILL_PAGE).await?;
                for (channel, page) in batch.iter().zip(pages) {
                    if let Some(reason) = page.gap {
                        tracing::warn!(topic = %channel.topic, reason = reason.as_str(), "history lost while the link was down");
                        channel.dispatch_gap(reason);
                    }
                    if page.entries.len() == BACKFILL_PAGE {
                        unfinished.push(channel.clone());
                    }
                    let fresh = channel.dispatch_all(page.entries);
                    self.hub.received(channel, &fresh);
                }
            }
            pending = unfinished;
        }
        Ok(())
    }
}

/// The canary schedule: one in flight at a time; the next leaves an interval after the last
/// arrived.
struct Canary {
    /// Until the next send, or while one is in flight, until it is overdue.
    timer: Pin<Box<Sleep>>,
    in_flight: bool,
    /// When the one in flight left.
    sent: Instant,
    seq: u64,
    interval: Duration,
    timeout: Duration,
}

impl Canary {
    /// The first canary leaves at once.
    fn new(interval: Duration, timeout: Duration) -> Canary {
        Canary {
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            in_flight: false,
            sent: Instant::now(),
            seq: 0,
            interval,
            timeout,
        }
    }

    /// Records a send; returns the payload to publish.
    fn send(&mut self) -> u64 {
        self.seq += 1;
        self.in_flight = true;
        self.sent = Instant::now();
        self.timer.as_mut().reset(Instant::now() + self.timeout);
        self.seq
    }

    /// The round trip, when `payload` is the canary in flight.
    fn arrived(&mut self, payload: &[u8]) -> Option<Duration> {
        if !self.in_flight || payload != self.seq.to_string().as_bytes() {
            return None;
        }
        self.in_flight = false;
        self.timer.as_mut().reset(Instant::now() + self.interval);
        Some(self.sent.elapsed())
    }
}

/// Exponential backoff with jitter, from 100 ms up to 5 s.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let cap =
            Duration::from_millis(100 * 2u64.pow(self.attempt.min(6))).min(Duration::from_secs(5));
        self.attempt += 1;
        cap.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn unavailable(e: redis::RedisError) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// Errors raised by the Lua library (`ERR ssegw: ...`) and missing functions are answers, not
/// outages.
fn classify(e: redis::RedisError) -> BusError {
    let detail = e.detail().unwrap_or_default();
    if let Some(reason) = detail.strip_prefix("ssegw: ") {
        BusError::Rejected(reason.to_string())
    } else if detail.contains("Function not found") {
        BusError::Rejected(detail.to_string())
    } else {
        unavailable(e)
    }
}

fn as_text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// `{status, head, entries}` as returned by `ssegw_read`.
fn parse_page(reply: Value) -> Option<Page> {
    let Value::Array(mut items) = reply else {
        return None;
    };
    if items.len() != 3 {
        return None;
    }
    let Value::Array(raw_entries) = items.pop()? else {
        return None;
    };
    let gap = match as_text(&items[0])? {
        "ok" => None,
        "trimmed" => Some(GapReason::Trimmed),
        "lost" => Some(GapReason::Lost),
        _ => return None,
    };
    let head = StreamId::parse(as_text(&items[1])?).ok()?;
    let entries = raw_entries
        .iter()
        .map(parse_entry)
        .collect::<Option<Vec<_>>>()?;
    Some(Page { gap, head, entries })
}

/// `[id, [field, value, ...]]` with fields `d` (data) and optionally `e` (event type) and `t`
/// (traceparent).
fn parse_entry(entry: &Value) -> Option<Arc<Event>> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let id = StreamId::parse(as_text(parts.first()?)?).ok()?;
    let Value::Array(fields) = parts.get(1)? else {
        return None;
    };
    let (mut data, mut event, mut traceparent) = (None, None, None);
    for pair in fields.chunks(2) {
        match (pair.first(), pair.get(1)) {
            (Some(key), Some(Value::BulkString(value))) => match as_text(key)? {
                "d" => data = Some(value.as_slice()),
                // Checked as the publish function would: an entry written around it must not
                // forge SSE fields. An invalid type is dropped and the data delivered.
                "e" => {
                    event = std::str::from_utf8(value)
                        .ok()
                        .and_then(|e| EventType::new(e).ok());
                    if event.is_none() {
                        tracing::warn!(%id, "ignoring an invalid event type in a stream entry");
                    }
                }
                "t" => {
                    traceparent = std::str::from_utf8(value)
                        .ok()
                        .and_then(|t| Traceparent::new(t).ok());
                }
                _ => {}
            },
            _ => return None,
        }
    }
    Some(Arc::new(
        Event::new(id, event.as_ref(), data?).traced(traceparent),
    ))
}
