//! What flows from the bus through the hub to the streams and the sweep: an `Event` framed
//! once per replica, a `Batch` of events gathered during the write-coalescing delay, and the
//! `Delivery` a topic's channel carries. Plain data: no I/O, no channels, no locks.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::mercure::update::{self, Update};
use ssegw_protocol::{frame, StreamId, Traceparent};

/// One event, framed once per replica and shared by every local subscriber of its topic.
#[derive(Debug)]
pub struct Event {
    pub id: StreamId,
    /// `event:` and `data:` lines and the terminating blank line, without the `id:` line.
    pub body: Bytes,
    /// `id: <stream id>` followed by `body`: the complete frame for single-topic connections.
    pub frame: Bytes,
    /// The publisher's trace context, when it gave one.
    pub traceparent: Option<Traceparent>,
    /// A Mercure update of the hub's log, decoded once per replica; `frame` is then its
    /// Mercure frame. `None` for native events.
    pub mercure: Option<Arc<Update>>,
}

impl Event {
    /// Frames an event. Payloads that are not UTF-8 (possible through a raw `FCALL`) are
    /// decoded lossily, as a browser would.
    pub fn new(id: StreamId, event: Option<&EventType>, data: &[u8]) -> Event {
        let body = frame::event_body(event, &String::from_utf8_lossy(data));
        let frame = frame::with_id(&id.to_string(), &body);
        Event {
            id,
            body,
            frame,
            traceparent: None,
            mercure: None,
        }
    }

    /// An entry of the Mercure hub's log: the update decoded from its `blob` and framed as the
    /// Mercure hub frames it. A blob that does not decode (written around the publish
    /// function) makes an event without an update, which no Mercure subscriber receives.
    pub fn mercure(id: StreamId, blob: &[u8]) -> Event {
        match update::decode(blob) {
            Ok(update) => {
                let frame = update.frame();
                Event {
                    id,
                    body: frame.clone(),
                    frame,
                    traceparent: None,
                    mercure: Some(Arc::new(update)),
                }
            }
            Err(_) => {
                tracing::warn!(%id, "ignoring a malformed Mercure update in the hub's log");
                Event {
                    id,
                    body: Bytes::new(),
                    frame: Bytes::new(),
                    traceparent: None,
                    mercure: None,
                }
            }
        }
    }

    /// The same event, carrying the publisher's trace context.
    pub fn traced(mut self, traceparent: Option<Traceparent>) -> Event {
        self.traceparent = traceparent;
        self
    }
}

/// Events of one topic gathered during the write-coalescing delay, in stream order.
#[derive(Debug)]
pub struct Batch {
    /// Never empty.
    pub events: Vec<Arc<Event>>,
    /// Every event's frame, joined: what a single-topic connection writes for the batch.
    pub frames: Bytes,
}

impl Batch {
    pub(crate) fn new(events: Vec<Arc<Event>>) -> Batch {
        let mut frames = BytesMut::with_capacity(events.iter().map(|e| e.frame.len()).sum());
        for event in &events {
            frames.extend_from_slice(&event.frame);
        }
        Batch {
            events,
            frames: frames.freeze(),
        }
    }

    pub fn first(&self) -> StreamId {
        self.events[0].id
    }

    pub fn last(&self) -> StreamId {
        self.events[self.events.len() - 1].id
    }
}

/// What a topic's channel carries to its subscribers; cloned once per receiver, so cheap.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Event>),
    Batch(Arc<Batch>),
    /// The replica found the topic's history after `after` gone (a backfill after a
    /// reconnect); what follows may have any ids, so the topic restarts from zero.
    Gap {
        after: StreamId,
        reason: GapReason,
    },
    /// Nothing went out on the channel for a keep-alive interval.
    Keepalive,
    /// The replica is draining: each connection closes at its own instant.
    Drain,
}
