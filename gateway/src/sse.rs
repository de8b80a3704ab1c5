//! One SSE connection: the preamble, then for each topic a replay from history (when resuming),
//! then live events from the hub, with duplicates dropped by stream id, keep-alive comments,
//! and an end when the client lags too far, the replica loses Redis, or it shuts down.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::select_all;
use futures_util::stream::Stream;
use ssegw_protocol::frame::{self, GapReason};
use ssegw_protocol::{cursor, StreamId, TopicSet};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::StreamConfig;
use crate::hub::{Event, Membership};

/// Events read from history per request while replaying.
const REPLAY_PAGE: usize = 500;
/// Live events gathered into one chunk, at most, when several are ready at once.
const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// How often a connection may fall behind while its replay runs and catch up again from
/// history. Once it has delivered live events, falling behind means the client is too slow.
const MAX_CATCH_UPS: u32 = 3;

/// Where a new connection starts.
pub enum Start {
    /// No `Last-Event-ID`: live events after each topic's baseline position.
    Fresh(Vec<StreamId>),
    /// Resume after these positions (one per topic).
    Resume(Vec<StreamId>),
    /// The id could not be decoded for these topics: announce a gap and replay all history.
    Invalid,
}

struct TopicStream {
    membership: Membership,
    /// The last event delivered (or the position resumed from); history is read after it, and
    /// live events at or before it are duplicates and dropped.
    position: StreamId,
    replaying: bool,
    /// A gap to announce before the next event of this topic.
    gap: Option<GapReason>,
}

pub struct Connection {
    topics: TopicSet,
    streams: Vec<TopicStream>,
    bus: Arc<Bus>,
    config: Arc<StreamConfig>,
    shutdown: CancellationToken,
    /// Cancelled when the hub closes every membership (this replica lost its subscription).
    closed: CancellationToken,
    preamble: Option<Bytes>,
    catch_ups: u32,
    /// Set once a live event went out since the last replay; a lag after that closes the
    /// connection instead of replaying again.
    live: bool,
    last_write: Instant,
    keepalive: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// Why a connection's stream ended (logged once).
#[derive(Debug, Clone, Copy)]
enum End {
    Shutdown,
    Slow,
    BusLost,
}

impl Connection {
    /// `memberships` are ready and in the order of `topics`.
    pub fn new(
        topics: TopicSet,
        memberships: Vec<Membership>,
        start: Start,
        bus: Arc<Bus>,
        config: Arc<StreamConfig>,
        shutdown: CancellationToken,
    ) -> Connection {
        let retry_ms = config.retry.as_millis() as u64;
        let (positions, replay, gap, preamble) = match start {
            Start::Fresh(baselines) => {
                // The baseline id lets the client resume without loss even if it drops before
                // its first event.
                let id = cursor::encode(&topics, &baselines);
                let preamble = frame::preamble(retry_ms, Some(&id));
                (baselines, false, None, preamble)
            }
            Start::Resume(positions) => (positions, true, None, frame::preamble(retry_ms, None)),
            Start::Invalid => (
                vec![StreamId::ZERO; topics.len()],
                true,
                Some(GapReason::InvalidId),
                frame::preamble(retry_ms, None),
            ),
        };
        let streams: Vec<TopicStream> = memberships
            .into_iter()
            .zip(positions)
            .map(|(membership, position)| TopicStream {
                membership,
                position,
                replaying: replay,
                gap,
            })
            .collect();
        let now = Instant::now();
        let closed = streams[0].membership.closed.clone();
        Connection {
            topics,
            streams,
            closed,
            bus,
            keepalive: Box::pin(tokio::time::sleep_until(now + config.keepalive)),
            config,
            shutdown,
            preamble: Some(preamble),
            catch_ups: 0,
            live: false,
            last_write: now,
        }
    }

    /// The response body: chunks until the connection ends.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
        futures_util::stream::unfold(self, |mut conn| async move {
            let chunk = conn.next_chunk().await?;
            conn.last_write = Instant::now();
            Some((Ok(chunk), conn))
        })
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(preamble) = self.preamble.take() {
            return Some(preamble);
        }
        let result = loop {
            if self.streams.iter().any(|s| s.replaying) {
                match self.replay_step().await {
                    Ok(Some(chunk)) => break Ok(chunk),
                    Ok(None) => continue,
                    Err(end) => break Err(end),
                }
            }
            match self.live_step().await {
                Ok(Some(chunk)) => break Ok(chunk),
                Ok(None) => continue,
                Err(end) => break Err(end),
            }
        };
        match result {
            Ok(chunk) => Some(chunk),
            Err(end) => {
                tracing::debug!(reason = ?end, topics = self.topics.len(), "stream ended");
                None
            }
        }
    }

    /// Reads one page of history for the first topic still replaying.
    async fn replay_step(&mut self) -> Result<Option<Bytes>, End> {
        let index = self
            .streams
            .iter()
            .position(|s| s.replaying)
            .expect("one is replaying");
        let stream = &self.streams[index];
        let topic = stream.membership.channel.topic.clone();
        // Boxed: the read's state is large and only needed while replaying; inline, it would
        // sit in every idle connection's body future.
        let read = Box::pin(self.bus.read(&topic, stream.position, REPLAY_PAGE));
        let page = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(End::Shutdown),
            page = read => page,
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(%topic, error = %e, "history read failed; ending stream so the client resumes");
                return Err(End::BusLost);
            }
        };
        let mut out = BytesMut::new();
        let stream = &mut self.streams[index];
        if let Some(reason) = stream.gap.take().or(page.gap) {
            out.put_slice(&frame::gap_event(topic.as_str(), reason));
            // Retained history restarts the topic: its ids may even be older than the client's.
            stream.position = StreamId::ZERO;
        }
        stream.replaying = page.entries.len() == REPLAY_PAGE;
        for event in &page.entries {
            if event.id > self.streams[index].position {
                self.streams[index].position = event.id;
                self.put_event(&mut out, event);
            }
        }
        Ok((!out.is_empty()).then(|| out.freeze()))
    }

    /// Waits for the next live event (or keep-alive); gathers whatever else is ready.
    async fn live_step(&mut self) -> Result<Option<Bytes>, End> {
        let (index, received) = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Err(End::Shutdown),
            _ = self.closed.cancelled() => return Err(End::BusLost),
            _ = &mut self.keepalive => {
                let due = self.last_write + self.config.keepalive;
                if Instant::now() >= due {
                    self.keepalive.as_mut().reset(Instant::now() + self.config.keepalive);
                    return Ok(Some(Bytes::from_static(frame::KEEPALIVE)));
                }
                // Written since the timer was set: wait for the rest of the interval only.
                self.keepalive.as_mut().reset(due);
                return Ok(None);
            }
            next = recv_any(&mut self.streams) => next,
        };
        let event = match received {
            Ok(event) => event,
            Err(RecvError::Lagged(_)) => return self.lagged(index),
            Err(RecvError::Closed) => return Err(End::BusLost),
        };
        let mut out = BytesMut::new();
        let mut only = None;
        if event.id > self.streams[index].position {
            self.streams[index].position = event.id;
            only = Some(event);
        }
        // Drain what is already queued so that a burst leaves in one write.
        'drain: while out.len() < MAX_CHUNK_BYTES {
            let mut any = false;
            for i in 0..self.streams.len() {
                match self.streams[i].membership.receiver.try_recv() {
                    Ok(event) => {
                        any = true;
                        if event.id <= self.streams[i].position {
                            continue;
                        }
                        // The first event's cursor must not yet include this event's position.
                        if let Some(first) = only.take() {
                            self.put_event(&mut out, &first);
                        }
                        self.streams[i].position = event.id;
                        self.put_event(&mut out, &event);
                    }
                    Err(TryRecvError::Lagged(_)) => return self.lagged(i),
                    Err(TryRecvError::Closed) => return Err(End::BusLost),
                    Err(TryRecvError::Empty) => {}
                }
                if out.len() >= MAX_CHUNK_BYTES {
                    break 'drain;
                }
            }
            if !any {
                break;
            }
        }
        if let Some(event) = only {
            // A single event: hand out the shared frame without copying it.
            self.live = true;
            return Ok(Some(self.frame_of(&event)));
        }
        self.live |= !out.is_empty();
        Ok((!out.is_empty()).then(|| out.freeze()))
    }

    /// A receiver fell further behind than the hub buffers. Before the connection went live
    /// that is its replay's doing: catch up from history. After, the client is too slow.
    fn lagged(&mut self, index: usize) -> Result<Option<Bytes>, End> {
        if self.live || self.catch_ups >= MAX_CATCH_UPS {
            tracing::info!(topics = self.topics.len(), "closing slow client");
            return Err(End::Slow);
        }
        self.catch_ups += 1;
        let stream = &mut self.streams[index];
        stream.membership.resubscribe();
        stream.replaying = true;
        Ok(None)
    }

    fn frame_of(&self, event: &Event) -> Bytes {
        if self.streams.len() == 1 {
            return event.frame.clone();
        }
        let mut out = BytesMut::with_capacity(event.body.len() + 64);
        self.put_event(&mut out, event);
        out.freeze()
    }

    /// Appends `event`, already recorded as its topic's position, with this connection's id:
    /// the stream id for one topic, the cursor over all topics' positions otherwise.
    fn put_event(&self, out: &mut BytesMut, event: &Event) {
        if self.streams.len() == 1 {
            out.put_slice(&event.frame);
            return;
        }
        let positions: Vec<StreamId> = self.streams.iter().map(|s| s.position).collect();
        frame::put_id(out, &cursor::encode(&self.topics, &positions));
        out.put_slice(&event.body);
    }
}

/// The next event of any topic; `recv` is cancel-safe, so losing the race loses nothing.
async fn recv_any(streams: &mut [TopicStream]) -> (usize, Result<Arc<Event>, RecvError>) {
    if let [only] = streams {
        return (0, only.membership.receiver.recv().await);
    }
    let receivers = streams
        .iter_mut()
        .map(|s| Box::pin(s.membership.receiver.recv()));
    let (result, index, _) = select_all(receivers).await;
    (index, result)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ssegw_protocol::{StreamId, Topic, TopicSet};

    use super::{Connection, Start};
    use crate::bus::Bus;
    use crate::config::Config;
    use crate::hub::Hub;

    /// Every idle connection keeps its body future; large states (a Redis read) must be boxed
    /// so that they cost memory only while in use. Measured figures: BENCHMARKS.md.
    #[tokio::test]
    async fn idle_body_state_stays_small() {
        let config = Config::from_flags::<_, &str>([]).unwrap();
        let (interest_tx, interest_rx) = tokio::sync::mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(16, interest_tx));
        let bus = Bus::start(&config.bus, hub.clone(), interest_rx, Default::default()).unwrap();
        let topic = Topic::new("t").unwrap();
        let membership = hub.join(&topic);
        let connection = Connection::new(
            TopicSet::new(vec![topic]).unwrap(),
            vec![membership],
            Start::Fresh(vec![StreamId::ZERO]),
            Arc::new(bus),
            Arc::new(config.stream),
            Default::default(),
        );
        let body = connection.into_stream();
        let size = std::mem::size_of_val(&body);
        assert!(size <= 1024, "body stream state is {size} bytes");
    }
}
