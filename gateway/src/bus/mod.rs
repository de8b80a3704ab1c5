//! The bus: where events are published, stored and received. Two implementations with the same
//! semantics (ids, history, gap detection): Redis for a fleet of replicas (`redis`), and an
//! embedded in-memory bus for a single node (`memory`); concurrent reads of one history page
//! share one call (`single_flight`). Only this module talks to Redis. It hands each event to
//! the hub once and never touches a client's stream or parses HTTP.

mod memory;
mod redis;
mod single_flight;

use std::sync::Arc;
use std::time::Instant;

use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::{StreamId, Topic, Traceparent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::BusConfig;
use crate::fanout::event::Event;
use crate::fanout::hub::{Hub, Interest};

pub use self::memory::MemoryBus;
pub use self::redis::RedisBus;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The store could not be reached or did not answer in time.
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    /// The publish logic refused the event; the message says why.
    #[error("{0}")]
    Rejected(String),
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
    /// `shutdown`. Never fails on an unreachable Redis: the replica stays not-ready and retries.
    pub fn start(
        config: &BusConfig,
        hub: Arc<Hub>,
        interest: mpsc::UnboundedReceiver<Interest>,
        shutdown: CancellationToken,
    ) -> Result<Bus, BusError> {
        Ok(match &config.redis {
            Some(target) => Bus::Redis(RedisBus::start(target, config, hub, interest, shutdown)?),
            None => Bus::Memory(MemoryBus::start(config, hub, interest, shutdown)),
        })
    }

    /// Stores and publishes one event; returns its id.
    pub async fn publish(
        &self,
        topic: &Topic,
        event: Option<&EventType>,
        data: &str,
        traceparent: Option<&Traceparent>,
    ) -> Result<StreamId, BusError> {
        match self {
            Bus::Redis(bus) => bus.publish(topic, event, data, traceparent).await,
            Bus::Memory(bus) => bus.publish(topic, event, data, traceparent),
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
