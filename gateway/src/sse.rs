//! One SSE connection: the preamble, then for each topic a replay from history (when resuming),
//! then live events from the hub, with duplicates dropped by stream id, gap markers turned into
//! control events, keep-alive comments, and an end when the client lags too far or the replica
//! drains.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::select_all;
use futures_util::stream::Stream;
use ssegw_protocol::frame::{self, GapReason};
use ssegw_protocol::{cursor, StreamId, TopicSet};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::StreamConfig;
use crate::hub::{Event, Membership};
use crate::stats::Slot;

/// Events read from history per request while replaying.
const REPLAY_PAGE: usize = 500;
/// Live events gathered into one chunk, at most, when several are ready at once.
const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// How often a connection may fall behind while its replay runs and catch up again from
/// history. Once it has delivered live events, falling behind means the client is too slow.
const MAX_CATCH_UPS: u32 = 3;
/// Longest reconnection delay a draining replica asks of its clients; each gets a random one
/// up to this, so that reconnects spread out.
const DRAIN_RETRY_MAX: Duration = Duration::from_secs(1);
/// Pause between attempts to read history while the bus is unavailable.
const REPLAY_RETRY: Duration = Duration::from_secs(1);

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
    /// This stream's place in the replica's connection count.
    slot: Slot,
    /// Cancelled when the replica starts draining.
    drain: CancellationToken,
    /// Set once draining: the instant this connection closes, picked at random in the window.
    close_at: Option<Pin<Box<Sleep>>>,
    /// Set when the stream ends after the chunk just returned.
    ending: Option<End>,
    preamble: Option<Bytes>,
    catch_ups: u32,
    /// Set once a live event went out since the last replay; a lag after that closes the
    /// connection instead of replaying again.
    live: bool,
    last_write: Instant,
    keepalive: Pin<Box<Sleep>>,
}

/// Why the replica ended a connection's stream.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The replica is shutting down; the client was told to reconnect shortly.
    Drained,
    /// The client fell further behind than its buffer allows.
    Slow,
    /// The topic's channel closed (the hub went away).
    Closed,
}

impl Connection {
    /// `memberships` are ready and in the order of `topics`; `drain` is cancelled when the
    /// replica starts draining.
    pub fn new(
        topics: TopicSet,
        memberships: Vec<Membership>,
        start: Start,
        bus: Arc<Bus>,
        config: Arc<StreamConfig>,
        slot: Slot,
        drain: CancellationToken,
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
        Connection {
            topics,
            streams,
            bus,
            keepalive: Box::pin(tokio::time::sleep_until(now + config.keepalive)),
            config,
            slot,
            drain,
            close_at: None,
            ending: None,
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
        if let Some(end) = self.ending {
            return self.end(end);
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
            Err(end) => self.end(end),
        }
    }

    fn end(&self, end: End) -> Option<Bytes> {
        tracing::debug!(reason = ?end, topics = self.topics.len(), "stream ended");
        let stats = self.slot.stats();
        match end {
            End::Drained => stats.record(&stats.drained),
            End::Slow => stats.record(&stats.slow),
            End::Closed => {}
        }
        None
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
        let page = match Box::pin(self.bus.read(&topic, stream.position, REPLAY_PAGE)).await {
            Ok(page) => page,
            Err(e) => {
                // The client stays connected and the replay resumes when the store is back; the
                // keep-alive written meanwhile notices a client that left.
                tracing::warn!(%topic, error = %e, "history read failed; retrying");
                tokio::time::sleep(REPLAY_RETRY.mul_f64(0.5 + fastrand::f64())).await;
                return Ok(Some(Bytes::from_static(frame::KEEPALIVE)));
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

    /// Waits for the next live event (or keep-alive, or this connection's drain instant);
    /// gathers whatever else is ready.
    async fn live_step(&mut self) -> Result<Option<Bytes>, End> {
        let (index, received) = tokio::select! {
            biased;
            _ = self.drain.cancelled(), if self.close_at.is_none() => {
                let delay = self.config.drain_spread().mul_f64(fastrand::f64());
                self.close_at = Some(Box::pin(tokio::time::sleep(delay)));
                return Ok(None);
            }
            _ = until(&mut self.close_at) => {
                // A short, random reconnection delay, then the end of the stream.
                let retry = DRAIN_RETRY_MAX.min(self.config.retry).mul_f64(fastrand::f64());
                self.ending = Some(End::Drained);
                return Ok(Some(frame::preamble(retry.as_millis() as u64, None)));
            }
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
        let mut out = BytesMut::new();
        // A lone event is handed out as its shared frame, without copying.
        let mut only = None;
        match received {
            Ok(event) => self.take(index, event, &mut out, &mut only),
            Err(RecvError::Lagged(_)) => return self.lagged(index),
            Err(RecvError::Closed) => return Err(End::Closed),
        }
        // Drain what is already queued so that a burst leaves in one write.
        'drain: while out.len() < MAX_CHUNK_BYTES {
            let mut any = false;
            for i in 0..self.streams.len() {
                match self.streams[i].membership.receiver.try_recv() {
                    Ok(event) => {
                        any = true;
                        self.take(i, event, &mut out, &mut only);
                    }
                    Err(TryRecvError::Lagged(_)) => return self.lagged(i),
                    Err(TryRecvError::Closed) => return Err(End::Closed),
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
        let chunk = match only {
            Some(event) => self.frame_of(&event),
            None if out.is_empty() => return Ok(None),
            None => out.freeze(),
        };
        self.live = true;
        Ok(Some(chunk))
    }

    /// Takes one item from topic `index`'s receiver: a new event is recorded as the topic's
    /// position and written (or kept in `only` while it is alone); an event at or before the
    /// position is a duplicate and dropped; a gap marker the connection has not yet passed
    /// becomes the control event and restarts the topic from zero.
    fn take(
        &mut self,
        index: usize,
        event: Arc<Event>,
        out: &mut BytesMut,
        only: &mut Option<Arc<Event>>,
    ) {
        let position = self.streams[index].position;
        let new = match event.gap {
            // A connection whose replay already read past the gap has announced it itself.
            Some(_) => position <= event.id,
            None => event.id > position,
        };
        if !new {
            return;
        }
        // The first event's cursor must not yet include what follows it.
        if let Some(first) = only.take() {
            self.put_event(out, &first);
        }
        let stream = &mut self.streams[index];
        match event.gap {
            Some(reason) => {
                out.put_slice(&frame::gap_event(
                    stream.membership.channel.topic.as_str(),
                    reason,
                ));
                stream.position = StreamId::ZERO;
            }
            None => {
                stream.position = event.id;
                if out.is_empty() {
                    *only = Some(event);
                } else {
                    self.put_event(out, &event);
                }
            }
        }
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

/// Waits for an optional timer; never completes without one.
async fn until(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.await,
        None => std::future::pending().await,
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
    use crate::stats::Stats;

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
            Arc::new(Stats::default()).try_open(1).unwrap(),
            Default::default(),
        );
        let body = connection.into_stream();
        let size = std::mem::size_of_val(&body);
        assert!(size <= 1024, "body stream state is {size} bytes");
    }
}
