//! The bus: where events are published, stored and received, and where the fleet's presence
//! counts are kept. Two implementations with the same semantics (ids, history, gap detection):
//! Redis for a fleet of replicas (`redis`), and an embedded in-memory bus for a single node
//! (`memory`); concurrent reads of one history page share one call (`single_flight`); what
//! presence means, apart from where it is kept, is `presence`. Only this module talks to
//! Redis. It hands each event to the hub once and never touches a client's stream or parses
//! HTTP.

mod memory;
pub mod presence;
mod redis;
mod single_flight;

use std::sync::Arc;
use std::time::Instant;

use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::retention::Retention;
use ssegw_protocol::script::IdempotencyKey;
use ssegw_protocol::{StreamId, Topic, Traceparent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::BusConfig;
use crate::fanout::event::Event;
use crate::fanout::hub::{Hub, Interest};

pub use self::memory::MemoryBus;
pub use self::presence::TopicPresence;
pub use self::redis::RedisBus;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The store could not be reached or did not answer in time.
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    /// The publish logic refused the event; the message says why.
    #[error("{0}")]
    Rejected(String),
    /// The event is larger than its namespace accepts.
    #[error("{0}")]
    TooLarge(String),
    /// The idempotency key was used for another event on this topic within the window.
    #[error("{0}")]
    KeyReused(String),
    /// The primary stored the event, but fewer replicas than `--publish-replicas` confirmed
    /// it in time: a failover may yet lose it, and a retry may store it twice.
    #[error(
        "event {id} is stored on the Redis primary, but only {acknowledged} of {wanted} replicas \
         confirmed it in time: it may or may not survive a failover, and publishing it again \
         may store it twice"
    )]
    Unconfirmed {
        id: StreamId,
        acknowledged: u32,
        wanted: u32,
    },
}

/// One event to publish. Its `Debug` leaves the data out.
#[derive(Clone, Copy)]
pub struct Publish<'a> {
    pub topic: &'a Topic,
    pub event: Option<&'a EventType>,
    pub data: &'a str,
    pub traceparent: Option<&'a Traceparent>,
    /// With a key, a repeat of this publish on this topic within the window returns the first
    /// publish's id and stores and delivers nothing; the key with another event is refused.
    pub idempotency: Option<(&'a IdempotencyKey, std::time::Duration)>,
}

impl std::fmt::Debug for Publish<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publish")
            .field("topic", self.topic)
            .field("event", &self.event)
            .field("data_bytes", &self.data.len())
            .field(
                "idempotency",
                &self.idempotency.map(|(k, w)| (k.as_str(), w)),
            )
            .finish()
    }
}

/// A change of the Mercure hub's active-subscriptions registry (`mercure::subscriptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackOp {
    /// Subscriptions that started on this replica.
    Add,
    /// Subscriptions that ended on this replica.
    Del,
    /// Subscriptions of a replica found dead, ended by another; nothing if it beat since.
    Reap,
    /// This replica's last subscriptions, as it stops: it leaves the registry.
    Leave,
}

impl TrackOp {
    fn as_str(self) -> &'static str {
        match self {
            TrackOp::Add => "add",
            TrackOp::Del => "del",
            TrackOp::Reap => "reap",
            TrackOp::Leave => "leave",
        }
    }
}

/// One subscription in a registry change: its id (the field), its document, and the update
/// (id and encoding) that announces the change when it changes the registry.
#[derive(Debug, Clone, Copy)]
pub struct Tracked<'a> {
    pub field: &'a str,
    pub doc: &'a str,
    pub update_id: &'a str,
    pub blob: &'a [u8],
}

/// The subscriptions registry's documents, as a listing read them.
#[derive(Debug, Default)]
pub struct Listing {
    /// The log's last entry then (`StreamId::ZERO` when it had none): what changes when the
    /// registry does.
    pub position: StreamId,
    /// The id of that entry's update, `earliest` when there is none.
    pub last_event_id: String,
    /// The subscriptions' documents, as stored.
    pub documents: Vec<String>,
}

/// What a replica's heartbeat in the registry answered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// The replica was not alive in the registry before this beat: new, or found dead (and
    /// maybe reaped) while it could not beat. It stores its subscriptions again.
    pub rejoined: bool,
    /// A dead replica and some of its subscriptions (field, document), to reap.
    pub dead: Option<(String, Vec<(String, String)>)>,
}

/// A page of a topic's history, read after a position.
#[derive(Debug)]
pub struct Page {
    /// Set when events after the requested position are no longer retained; `entries` then
    /// start at the oldest retained event.
    pub gap: Option<GapReason>,
    /// The stream's newest id (`0-0` when it does not exist).
    pub head: StreamId,
    pub entries: Vec<Arc<Event>>,
}

pub enum Bus {
    Redis(RedisBus),
    Memory(MemoryBus),
}

impl Bus {
    /// Starts the bus that `config` names, feeding `hub` and serving its `interest` queue until
    /// `shutdown`; `replica` names this replica in Redis. Never fails on an unreachable Redis:
    /// the replica stays not-ready and retries.
    pub fn start(
        config: &BusConfig,
        replica: uuid::Uuid,
        hub: Arc<Hub>,
        interest: mpsc::UnboundedReceiver<Interest>,
        shutdown: CancellationToken,
    ) -> Result<Bus, BusError> {
        Ok(match &config.redis {
            Some(target) => Bus::Redis(RedisBus::start(
                target, config, replica, hub, interest, shutdown,
            )?),
            None => Bus::Memory(MemoryBus::start(config, hub, interest, shutdown)),
        })
    }

    /// Stores and publishes one event; returns its id.
    pub async fn publish(&self, publish: &Publish<'_>) -> Result<StreamId, BusError> {
        match self {
            Bus::Redis(bus) => bus.publish(publish).await,
            Bus::Memory(bus) => bus.publish(publish),
        }
    }

    /// Stores and publishes several events in order, in one round trip to Redis (one per
    /// shard in a cluster); one result per event, in the same order. Not atomic: when Redis
    /// fails part-way, the events before the failure may be stored.
    pub async fn publish_many(&self, publishes: &[Publish<'_>]) -> Vec<Result<StreamId, BusError>> {
        match self {
            Bus::Redis(bus) => bus.publish_many(publishes).await,
            Bus::Memory(bus) => publishes.iter().map(|p| bus.publish(p)).collect(),
        }
    }

    /// Appends a Mercure update (`blob`, encoded, whose id is `update_id`) to the hub's log
    /// `log` and publishes it; returns its log entry's id.
    pub async fn mercure_publish(
        &self,
        log: &Topic,
        update_id: &str,
        blob: &[u8],
        traceparent: Option<&Traceparent>,
    ) -> Result<StreamId, BusError> {
        match self {
            Bus::Redis(bus) => bus.mercure_publish(log, update_id, blob, traceparent).await,
            Bus::Memory(bus) => bus.mercure_publish(log, blob),
        }
    }

    /// The log entry of the Mercure update `update_id` (its first occurrence), if the log
    /// still holds it.
    pub async fn mercure_find(
        &self,
        log: &Topic,
        update_id: &str,
    ) -> Result<Option<StreamId>, BusError> {
        match self {
            Bus::Redis(bus) => bus.mercure_find(log, update_id).await,
            Bus::Memory(bus) => Ok(bus.mercure_find(log, update_id)),
        }
    }

    /// Applies `op` to the active-subscriptions registry for `replica`'s `items`, publishing on
    /// the log `log` the update of each item whose state it changes; returns how many it
    /// published. Safe to repeat: an item added or removed twice announces it once. An `Add`
    /// lists the replica for `ttl` if it was not listed.
    pub async fn mercure_track(
        &self,
        log: &Topic,
        replica: &str,
        op: TrackOp,
        ttl: std::time::Duration,
        items: &[Tracked<'_>],
    ) -> Result<u64, BusError> {
        match self {
            Bus::Redis(bus) => bus.mercure_track(log, replica, op, ttl, items).await,
            Bus::Memory(bus) => bus.mercure_track(log, op, items),
        }
    }

    /// `replica`'s heartbeat in the registry: alive for `ttl` more; with up to `count`
    /// subscriptions of a dead replica to reap. The embedded bus has no other replica.
    pub async fn mercure_beat(
        &self,
        log: &Topic,
        replica: &str,
        ttl: std::time::Duration,
        count: usize,
    ) -> Result<Beat, BusError> {
        match self {
            Bus::Redis(bus) => bus.mercure_beat(log, replica, ttl, count).await,
            Bus::Memory(_) => Ok(Beat::default()),
        }
    }

    /// The listed subscriptions' documents (only the one with the id `only`, if given), and
    /// the log's last update at that instant.
    pub async fn mercure_subscriptions(
        &self,
        log: &Topic,
        only: Option<&str>,
    ) -> Result<Listing, BusError> {
        match self {
            Bus::Redis(bus) => bus.mercure_subscriptions(log, only).await,
            Bus::Memory(bus) => Ok(bus.mercure_subscriptions(log, only)),
        }
    }

    /// The retention table publishes are held to: the fleet's, as last read from Redis
    /// (`None` before it was), or the embedded bus's, from the flags.
    pub fn retention(&self) -> Option<Arc<Retention>> {
        match self {
            Bus::Redis(bus) => bus.retention(),
            Bus::Memory(bus) => Some(bus.retention()),
        }
    }

    /// Reads up to `count` events after `after` (`StreamId::ZERO`: from the oldest retained),
    /// as Redis had them at some instant after `since`.
    pub async fn read(
        &self,
        topic: &Topic,
        after: StreamId,
        count: usize,
        since: Instant,
    ) -> Result<Arc<Page>, BusError> {
        match self {
            Bus::Redis(bus) => bus.read(topic, after, count, since).await,
            Bus::Memory(bus) => Ok(Arc::new(bus.read(topic, after, count))),
        }
    }

    /// The `count` newest events of `topic`, in stream order.
    pub async fn newest(&self, topic: &Topic, count: usize) -> Result<Vec<Arc<Event>>, BusError> {
        match self {
            Bus::Redis(bus) => bus.newest(topic, count).await,
            Bus::Memory(bus) => Ok(bus.newest(topic, count)),
        }
    }

    /// Each of `topics`' subscribers: over the fleet's live presence reports, or on the
    /// embedded bus this node's, counted now.
    pub async fn presence(&self, topics: &[Topic]) -> Result<Vec<TopicPresence>, BusError> {
        match self {
            Bus::Redis(bus) => bus.presence(topics).await,
            Bus::Memory(bus) => Ok(bus.presence(topics)),
        }
    }

    /// Stops reporting presence and removes this replica's reports: the last step of a
    /// graceful stop, once its streams are closed.
    pub async fn withdraw_presence(&self) {
        if let Bus::Redis(bus) = self {
            bus.withdraw_presence().await;
        }
    }

    /// True when the replica receives events: for Redis, its canaries make the round trip.
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Redis(bus) => bus.is_ready(),
            Bus::Memory(_) => true,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Bus::Redis(_) => "redis",
            Bus::Memory(_) => "embedded",
        }
    }
}

/// The gap rule shared by both implementations (the Lua `read` function applies the same):
/// a position is behind the retained history when something newer than it was trimmed, and
/// belongs to a lost history when it is ahead of the stream, or older than a stream that never
/// trimmed anything.
pub(crate) fn gap_for(
    after: StreamId,
    head: StreamId,
    max_deleted: StreamId,
    first: Option<StreamId>,
) -> Option<GapReason> {
    if after < max_deleted {
        Some(GapReason::Trimmed)
    } else if after > head
        || (max_deleted == StreamId::ZERO
            && after != StreamId::ZERO
            && first.is_some_and(|first| after < first))
    {
        Some(GapReason::Lost)
    } else {
        None
    }
}
