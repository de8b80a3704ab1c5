//! The Redis bus: publishes and reads through the Lua library (`ssegw_publish`, `ssegw_read`),
//! and holds this replica's single pub/sub connection, shared by all its topics. Every event is
//! read from Redis once per replica and framed once, whatever the number of local clients.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use futures_util::StreamExt;
use redis::Value;
use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::script::{self, ChannelMessage};
use ssegw_protocol::{StreamId, Topic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{BusError, Page};
use crate::config::BusConfig;
use crate::hub::{Channel, Event, Hub, Interest};

pub struct RedisBus {
    commands: Commands,
    /// True while the pub/sub connection is up.
    subscribed: Arc<AtomicBool>,
}

impl RedisBus {
    /// Starts the bus of a serving replica: command pool plus the pub/sub subscriber task.
    pub fn start(
        url: &str,
        config: &BusConfig,
        hub: Arc<Hub>,
        interest: mpsc::UnboundedReceiver<Interest>,
        shutdown: CancellationToken,
    ) -> Result<RedisBus, BusError> {
        let bus = RedisBus::connect(url, config)?;
        let subscriber = Subscriber {
            client: redis::Client::open(url).map_err(unavailable)?,
            commands: bus.commands.clone(),
            hub,
            interest,
            subscribed: bus.subscribed.clone(),
            shutdown,
        };
        tokio::spawn(subscriber.run());
        Ok(bus)
    }

    /// A bus for publishing and reading only (the `publish` command); connects lazily.
    pub fn connect(url: &str, config: &BusConfig) -> Result<RedisBus, BusError> {
        let timeout = config.redis_timeout;
        let pool = deadpool_redis::Config::from_url(url)
            .builder()
            .map_err(|e| BusError::Unavailable(e.to_string()))?
            .max_size(config.redis_pool_size)
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
                library: script::function_library(&config.script).into(),
                timeout,
            },
            subscribed: Arc::new(AtomicBool::new(false)),
        })
    }

    pub async fn publish(
        &self,
        topic: &Topic,
        event: Option<&EventType>,
        data: &str,
    ) -> Result<StreamId, BusError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::PUBLISH_FUNCTION)
            .arg(1)
            .arg(topic.as_str())
            .arg(data);
        if let Some(event) = event {
            cmd.arg(event.as_str());
        }
        let id: String = self.commands.fcall(&cmd).await?;
        StreamId::parse(&id).map_err(|_| BusError::Unavailable(format!("unexpected id {id:?}")))
    }

    pub async fn read(
        &self,
        topic: &Topic,
        after: StreamId,
        count: usize,
    ) -> Result<Page, BusError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script::READ_FUNCTION)
            .arg(1)
            .arg(topic.as_str())
            .arg(after.to_string())
            .arg(count);
        let reply: Value = self.commands.fcall(&cmd).await?;
        parse_page(reply).ok_or_else(|| BusError::Unavailable("malformed ssegw_read reply".into()))
    }

    pub async fn is_ready(&self) -> bool {
        if !self.subscribed.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut conn) = self.commands.connection().await else {
            return false;
        };
        self.commands
            .query::<String>(&redis::cmd("PING"), &mut conn)
            .await
            .is_ok()
    }
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
        match self.query(cmd, &mut conn).await {
            Err(BusError::Rejected(msg)) if msg.contains("Function not found") => {
                self.load_library(&mut conn).await?;
                self.query(cmd, &mut conn).await
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

    /// The current head position of each topic's stream, in one pipelined round trip.
    async fn heads(&self, topics: &[&Topic]) -> Result<Vec<StreamId>, BusError> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        for topic in topics {
            pipe.cmd("FCALL")
                .arg(script::READ_FUNCTION)
                .arg(1)
                .arg(topic.as_str())
                .arg("")
                .arg(0);
        }
        let replies: Vec<Value> =
            match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
                Err(_) => return Err(BusError::Unavailable("Redis did not answer in time".into())),
                Ok(result) => result.map_err(classify)?,
            };
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::Array(items) => items
                    .get(1)
                    .and_then(as_text)
                    .and_then(|t| StreamId::parse(t).ok()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| BusError::Unavailable("malformed ssegw_read reply".into()))
    }
}

/// Owns the replica's pub/sub connection: applies the hub's interest changes in batches and
/// dispatches every message to the hub.
struct Subscriber {
    client: redis::Client,
    commands: Commands,
    hub: Arc<Hub>,
    interest: mpsc::UnboundedReceiver<Interest>,
    subscribed: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

impl Subscriber {
    async fn run(mut self) {
        let mut backoff = Backoff::default();
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
                    tracing::info!("subscribed to Redis");
                    backoff.reset();
                    match self.serve(pubsub).await {
                        None => return,
                        Some(reason) => reason,
                    }
                }
                Err(e) => e.to_string(),
            };
            self.subscribed.store(false, Ordering::Release);
            // Pub/sub messages sent while the link is down are gone. The replica cannot vouch for
            // its open streams any more, so it ends them; clients resume from the stream history.
            if self.hub.topic_count() > 0 {
                tracing::warn!(%reason, "Redis subscription lost; closing streams so clients resume from history");
            } else {
                tracing::warn!(%reason, "Redis unavailable");
            }
            self.hub.close_all();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Serves one pub/sub connection; returns why it ended, or `None` on shutdown.
    async fn serve(&mut self, pubsub: redis::aio::PubSub) -> Option<String> {
        let (mut sink, mut messages) = pubsub.split();
        let mut subscribed = HashSet::new();
        // Channels created before this connection existed were closed with the previous one;
        // only the interest queue describes what is needed now.
        self.subscribed.store(true, Ordering::Release);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                message = messages.next() => match message {
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
            }
        }
    }

    fn dispatch(&self, message: &redis::Msg) {
        let Some(topic) = script::topic_of_channel(message.get_channel_name()) else {
            return;
        };
        match ChannelMessage::parse(message.get_payload_bytes()) {
            Ok(m) => self
                .hub
                .dispatch(&topic, Arc::new(Event::new(m.id, m.event, m.data))),
            Err(_) => tracing::warn!(%topic, "ignoring malformed channel message"),
        }
    }

    /// Applies a batch of interest changes: one UNSUBSCRIBE and one SUBSCRIBE for the whole
    /// batch, then the head position of every newly needed topic in one pipeline.
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
        // Channels the hub already closed again (a lost connection) need nothing.
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
        let new: Vec<String> = join
            .iter()
            .filter(|c| !subscribed.contains(&c.topic))
            .map(|c| script::channel(&c.topic))
            .collect();
        if !new.is_empty() {
            sink.subscribe(&new).await.map_err(unavailable)?;
            subscribed.extend(join.iter().map(|c| c.topic.clone()));
        }
        if !join.is_empty() {
            let topics: Vec<&Topic> = join.iter().map(|c| &c.topic).collect();
            let heads = self.commands.heads(&topics).await?;
            for (channel, head) in join.iter().zip(heads) {
                channel.set_ready(head);
            }
        }
        Ok(())
    }
}

/// Exponential backoff with full jitter, from 100 ms up to 5 s.
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
    let entries = raw_entries
        .iter()
        .map(parse_entry)
        .collect::<Option<Vec<_>>>()?;
    Some(Page { gap, entries })
}

/// `[id, [field, value, ...]]` with fields `d` (data) and optionally `e` (event type).
fn parse_entry(entry: &Value) -> Option<Arc<Event>> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let id = StreamId::parse(as_text(parts.first()?)?).ok()?;
    let Value::Array(fields) = parts.get(1)? else {
        return None;
    };
    let (mut data, mut event) = (None, None);
    for pair in fields.chunks(2) {
        match (pair.first(), pair.get(1)) {
            (Some(key), Some(Value::BulkString(value))) => match as_text(key)? {
                "d" => data = Some(value.as_slice()),
                "e" => event = std::str::from_utf8(value).ok(),
                _ => {}
            },
            _ => return None,
        }
    }
    Some(Arc::new(Event::new(id, event, data?)))
}
