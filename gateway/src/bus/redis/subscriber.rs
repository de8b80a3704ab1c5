//! `Subscriber`: the replica's one pub/sub connection, shared by all its topics. It applies the
//! hub's interest changes in batches, hands every message to the hub, checks the link end to
//! end with canaries, and after a reconnect subscribes and backfills every topic the hub still
//! serves. It runs commands only through `Commands`.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ssegw_protocol::frame::EventType;
use ssegw_protocol::script::{self, ChannelMessage};
use ssegw_protocol::{StreamId, Topic};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::commands::Commands;
use super::endpoint::Endpoint;
use super::reply::unavailable;
use crate::bus::{BusError, Page};
use crate::fanout::event::Event;
use crate::fanout::hub::{Channel, Hub, Interest};

/// Channels per SUBSCRIBE command when many are (re)subscribed at once.
const SUBSCRIBE_BATCH: usize = 1000;
/// Topics per pipelined read when many are brought up to date at once.
const READ_BATCH: usize = 64;
/// Events per topic per read while backfilling after a reconnect.
const BACKFILL_PAGE: usize = 200;
/// How long a topic stays subscribed after its last local subscriber left. A client that comes
/// back within it (a page reload, a dropped connection resuming) costs Redis no SUBSCRIBE and
/// no UNSUBSCRIBE, and the topics left meanwhile are unsubscribed together, a few times per
/// linger, in one command instead of one per connection. Meanwhile the replica receives the
/// topic's events and drops them.
pub(super) const UNSUBSCRIBE_LINGER: Duration = Duration::from_secs(1);

/// Owns the replica's pub/sub connection: applies the hub's interest changes in batches,
/// dispatches every message to the hub, checks the link with canaries, and after a reconnect
/// subscribes and backfills every topic the hub still serves.
pub(super) struct Subscriber {
    /// Where the primary is; the subscriber reconnects when its epoch moves.
    pub(super) endpoint: Arc<Endpoint>,
    pub(super) commands: Commands,
    pub(super) hub: Arc<Hub>,
    pub(super) interest: mpsc::UnboundedReceiver<Interest>,
    pub(super) ready: Arc<AtomicBool>,
    /// This replica's own channel, for canaries.
    pub(super) canary_channel: String,
    pub(super) canary_interval: Duration,
    pub(super) shutdown: CancellationToken,
}

impl Subscriber {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut connected_before = false;
        loop {
            // The epoch this connection belongs to: a later move ends it.
            let mut moves = self.endpoint.watch();
            moves.mark_unchanged();
            let attempt = async {
                let mut conn = self.commands.connection().await?;
                self.commands.load_library(&mut conn).await?;
                let primary = self.endpoint.primary().await?;
                let pubsub = async { redis::Client::open(primary)?.get_async_pubsub().await };
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
                    match self.serve(pubsub, &mut backoff, &mut moves).await {
                        None => return,
                        Some(reason) => reason,
                    }
                }
                Err(e) => e.to_string(),
            };
            if self.ready.swap(false, Ordering::AcqRel) {
                // Streams stay open: once the link is back, each topic is backfilled from
                // the last event delivered.
                tracing::warn!(%reason, redis = %self.endpoint.address(), topics = self.hub.topic_count(), "Redis link lost; not ready");
            } else {
                tracing::warn!(%reason, redis = %self.endpoint.address(), "Redis unavailable");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Serves one pub/sub connection; returns why it ended, or `None` on shutdown.
    async fn serve(
        &mut self,
        pubsub: redis::aio::PubSub,
        backoff: &mut Backoff,
        moves: &mut watch::Receiver<u64>,
    ) -> Option<String> {
        let (mut sink, mut messages) = pubsub.split();
        let mut subscribed = HashSet::new();
        // Topics no local subscriber wants any more, still subscribed until their linger ends.
        let mut leaving: HashMap<Topic, Instant> = HashMap::new();
        let mut linger_ticks = tokio::time::interval(UNSUBSCRIBE_LINGER / 4);
        linger_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                // The primary may be elsewhere now: reconnect to the one the sentinels name,
                // and backfill every topic from there.
                Ok(()) = moves.changed() => return Some("the primary may have moved".into()),
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
                    if let Err(e) = self.apply(&mut sink, &mut subscribed, &mut leaving, batch).await {
                        return Some(e.to_string());
                    }
                }
                _ = linger_ticks.tick(), if !leaving.is_empty() => {
                    if let Err(e) = self.unsubscribe_lingering(&mut sink, &mut subscribed, &mut leaving).await {
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
                    let endpoint = self.endpoint.clone();
                    // A failure shows as a canary that does not arrive. With sentinels the
                    // canary also asks its node's role: a demoted primary still relays
                    // PUBLISH, and must not look healthy.
                    tokio::spawn(async move {
                        if let Ok(mut conn) = commands.connection().await {
                            if endpoint.is_sentinel() {
                                let role = commands.query::<Vec<redis::Value>>(&redis::cmd("ROLE"), &mut conn).await;
                                let primary = matches!(role.as_deref(), Ok([redis::Value::BulkString(r), ..]) if r.as_slice() == b"master");
                                if !primary {
                                    endpoint.moved("the canary's node is not the primary");
                                    return;
                                }
                            }
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
        match event_of(message.get_payload_bytes()) {
            Some(event) => self.hub.dispatch(&topic, event),
            None => tracing::warn!(%topic, "ignoring malformed channel message"),
        }
    }

    /// Applies a batch of interest changes: the topics left start their linger (see
    /// `UNSUBSCRIBE_LINGER`), then the new channels are joined; a topic joined again while it
    /// lingers is still subscribed.
    async fn apply(
        &self,
        sink: &mut redis::aio::PubSubSink,
        subscribed: &mut HashSet<Topic>,
        leaving: &mut HashMap<Topic, Instant>,
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
        let due = Instant::now() + UNSUBSCRIBE_LINGER;
        for topic in leave {
            leaving.insert(topic, due);
        }
        for channel in &join {
            leaving.remove(&channel.topic);
        }
        self.join(sink, subscribed, join).await
    }

    /// Unsubscribes, in one command, the topics whose linger is over and that nobody here
    /// joined again meanwhile.
    async fn unsubscribe_lingering(
        &self,
        sink: &mut redis::aio::PubSubSink,
        subscribed: &mut HashSet<Topic>,
        leaving: &mut HashMap<Topic, Instant>,
    ) -> Result<(), BusError> {
        let now = Instant::now();
        let mut over = Vec::new();
        leaving.retain(|topic, due| {
            if *due > now {
                return true;
            }
            // A join still queued in the interest queue finds the topic subscribed.
            if self.hub.channel(topic).is_none() {
                over.push(topic.clone());
            }
            false
        });
        for topics in over.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<String> = topics.iter().map(script::channel).collect();
            sink.unsubscribe(&names).await.map_err(unavailable)?;
        }
        for topic in &over {
            subscribed.remove(topic);
        }
        Ok(())
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
        catch_up(&self.hub, &self.commands, channels).await
    }
}

/// The event in a channel message. Messages come from the publish function, which checks
/// them; anything else on the channel was sent around it, and is `None`.
pub(super) fn event_of(payload: &[u8]) -> Option<Arc<Event>> {
    let message = ChannelMessage::parse(payload).ok()?;
    if message.mercure {
        return Some(Arc::new(
            Event::mercure(message.id, message.data).traced(message.traceparent),
        ));
    }
    let event = message.event.map(EventType::new).transpose().ok()?;
    Some(Arc::new(
        Event::new(message.id, event.as_ref(), message.data).traced(message.traceparent),
    ))
}

/// Reads several topics' history in one go: what `catch_up` needs of a topology.
pub(super) trait ReadMany {
    /// `count` events after each position, or only the head where no position is given.
    fn read_many(
        &self,
        requests: &[(&Topic, Option<StreamId>)],
        count: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Page>, BusError>> + Send;
}

impl ReadMany for Commands {
    fn read_many(
        &self,
        requests: &[(&Topic, Option<StreamId>)],
        count: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Page>, BusError>> + Send {
        Commands::read_many(self, requests, count)
    }
}

/// Brings channels just subscribed up to date, reading after subscribing so that whatever is
/// published from then on also arrives as a message: a new channel learns its stream's head
/// and turns ready; a channel that was already delivering (before a reconnect, a failover, a
/// slot move) is backfilled from its latest position.
pub(super) async fn catch_up(
    hub: &Hub,
    reader: &impl ReadMany,
    channels: Vec<Arc<Channel>>,
) -> Result<(), BusError> {
    let (delivering, fresh): (Vec<_>, Vec<_>) = channels.into_iter().partition(|c| c.is_ready());
    for batch in fresh.chunks(READ_BATCH) {
        let requests: Vec<_> = batch.iter().map(|c| (&c.topic, None)).collect();
        let pages = reader.read_many(&requests, 0).await?;
        for (channel, page) in batch.iter().zip(pages) {
            channel.set_ready(page.head);
        }
    }
    backfill(hub, reader, delivering).await
}

/// Dispatches what each channel missed: the events after its latest position, or a gap marker
/// and the retained history when those events are gone.
async fn backfill(
    hub: &Hub,
    reader: &impl ReadMany,
    mut pending: Vec<Arc<Channel>>,
) -> Result<(), BusError> {
    let stats = hub.stats();
    stats.add(&stats.backfills, pending.len() as u64);
    while !pending.is_empty() {
        let mut unfinished = Vec::new();
        for batch in pending.chunks(READ_BATCH) {
            let requests: Vec<_> = batch.iter().map(|c| (&c.topic, Some(c.latest()))).collect();
            let pages = reader.read_many(&requests, BACKFILL_PAGE).await?;
            for (channel, page) in batch.iter().zip(pages) {
                if let Some(reason) = page.gap {
                    tracing::warn!(topic = %channel.topic, reason = reason.as_str(), "history lost while the link was down");
                    channel.dispatch_gap(reason);
                }
                if page.entries.len() == BACKFILL_PAGE {
                    unfinished.push(channel.clone());
                }
                let fresh = channel.dispatch_all(page.entries);
                hub.received(channel, &fresh);
            }
        }
        pending = unfinished;
    }
    Ok(())
}

/// The canary schedule: one in flight at a time; the next leaves an interval after the last
/// arrived.
pub(super) struct Canary {
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
pub(super) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(super) fn next_delay(&mut self) -> Duration {
        let cap =
            Duration::from_millis(100 * 2u64.pow(self.attempt.min(6))).min(Duration::from_secs(5));
        self.attempt += 1;
        cap.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    pub(super) fn reset(&mut self) {
        self.attempt = 0;
    }
}
