//! One SSE connection: the preamble, then for each topic a replay from history (when resuming),
//! then live events from the hub, with duplicates dropped by stream id, gap markers turned into
//! control events, keep-alive comments, and an end when the client lags too far, the replica
//! drains or the subscriber's token expires. Keep-alives and the drain arrive through the topic
//! channels like events (see `hub`), so a connection waits on its receivers alone and holds no
//! timer until it drains, unless its token expires.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::broadcast::{RecvError, TryRecvError};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::select_all;
use futures_util::stream::Stream;
use ssegw_protocol::frame::{self, GapReason};
use ssegw_protocol::{cursor, StreamId, TopicSet};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::event::{Delivery, Event};
use super::hub::Membership;
use crate::bus::Bus;
use crate::config::StreamConfig;
use crate::telemetry::stats::Slot;

/// Events read from history per request while replaying.
const REPLAY_PAGE: usize = 500;
/// Replayed events written in one chunk, at most (plus the event that crosses it): a resuming
/// client that reads slowly holds no more than this in actix's write buffer, whatever the size
/// of the events. Events of a page beyond it are dropped and read again, and the connection
/// asks for smaller pages from then on, so large events are not held in memory either.
const REPLAY_CHUNK_BYTES: usize = 256 * 1024;
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
    /// Events asked for per history read: `REPLAY_PAGE`, less once a page did not fit in
    /// `REPLAY_CHUNK_BYTES`.
    page_size: u16,
}

pub struct Connection {
    /// Names the connection in log lines (never in metrics).
    id: uuid::Uuid,
    topics: TopicSet,
    streams: Vec<TopicStream>,
    bus: Arc<Bus>,
    config: Arc<StreamConfig>,
    /// This stream's place in the replica's connection count.
    slot: Slot,
    /// Cancelled when the replica starts draining. Only read when the connection may have
    /// missed the hub's drain marker: at the start and after resubscribing.
    drain: CancellationToken,
    /// When this connection closes, and why: the token's expiry, or once draining an instant
    /// picked at random in the drain window, whichever comes first.
    close_at: Option<(Pin<Box<Sleep>>, End)>,
    /// Set when the stream ends after the chunk just returned.
    ending: Option<End>,
    preamble: Option<Bytes>,
    catch_ups: u32,
    /// Set once a live event went out since the last replay; a lag after that closes the
    /// connection instead of replaying again.
    live: bool,
}

/// Why the replica ended a connection's stream (a native one, or a Mercure subscription's).
#[derive(Debug, Clone, Copy)]
pub(crate) enum End {
    /// The replica is shutting down; the client was told to reconnect shortly.
    Drained,
    /// The client fell further behind than its buffer allows.
    Slow,
    /// The topic's channel closed (the hub went away).
    Closed,
    /// The subscriber's token expired; the client was told so.
    Expired,
}

impl End {
    /// Counts the end in the replica's stats, for this reason (not as the client leaving).
    pub(crate) fn record(self, slot: &mut Slot) {
        slot.ended();
        let stats = slot.stats();
        match self {
            End::Drained => stats.record(&stats.drained),
            End::Slow => stats.record(&stats.slow),
            End::Expired => stats.record(&stats.expired),
            End::Closed => stats.record(&stats.stopped),
        }
    }

    /// The last chunk of a stream ended for this reason, `retry` being `--retry`.
    pub(crate) fn last_chunk(self, retry: Duration) -> Bytes {
        match self {
            // The client's credentials decide whether its reconnect is let in again.
            End::Expired => frame::expired_event(),
            // A short, random reconnection delay, then the end of the stream.
            _ => {
                let retry = DRAIN_RETRY_MAX.min(retry).mul_f64(fastrand::f64());
                frame::preamble(retry.as_millis() as u64, None)
            }
        }
    }
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
        let mut slot = slot;
        slot.start();
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
                page_size: REPLAY_PAGE as u16,
            })
            .collect();
        let mut connection = Connection {
            id: uuid::Uuid::new_v4(),
            topics,
            streams,
            bus,
            config,
            slot,
            drain,
            close_at: None,
            ending: None,
            preamble: Some(preamble),
            catch_ups: 0,
            live: false,
        };
        // Joined after the hub sent its drain marker, the connection must drain all the same.
        connection.check_drain();
        connection
    }

    /// Ends the stream at `expiry` (the token's), unless it ends before.
    pub fn closing_at(mut self, expiry: Option<std::time::SystemTime>) -> Connection {
        if let Some(expiry) = expiry {
            let left = expiry
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            // Beyond what an `Instant` holds, the token outlives the process.
            if let Some(deadline) = tokio::time::Instant::now().checked_add(left) {
                self.close_by(deadline, End::Expired);
            }
        }
        self
    }

    /// The reason to close now, if the closing instant has come.
    fn closing_due(&self) -> Option<End> {
        match &self.close_at {
            Some((timer, reason)) if timer.deadline() <= tokio::time::Instant::now() => {
                Some(*reason)
            }
            _ => None,
        }
    }

    /// The last chunk of a stream the replica closes for `reason`; the stream ends after it.
    fn closing(&mut self, reason: End) -> Bytes {
        self.ending = Some(reason);
        reason.last_chunk(self.config.retry)
    }

    /// Sets the closing instant unless an earlier one is set.
    fn close_by(&mut self, deadline: tokio::time::Instant, reason: End) {
        if let Some((timer, _)) = &self.close_at {
            if timer.deadline() <= deadline {
                return;
            }
        }
        self.close_at = Some((Box::pin(tokio::time::sleep_until(deadline)), reason));
    }

    /// The response body: chunks until the connection ends.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
        futures_util::stream::unfold(self, |mut conn| async move {
            let chunk = conn.next_chunk().await?;
            Some((Ok(chunk), conn))
        })
    }

    /// This connection's id, in its log lines.
    pub fn id(&self) -> uuid::Uuid {
        self.id
    }

    /// The next chunk to write (counted as written), or `None` once the stream has ended.
    /// Cancel-safe: a chunk is made only when the future completes.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        let chunk = self.produce().await?;
        self.slot.stats().record_written(chunk.len());
        Some(chunk)
    }

    /// Whether this connection may become its relay's sink (`hub::Sink`): one topic, live,
    /// nothing waiting in its receiver, nothing to say first, not closing yet.
    pub fn may_sweep(&self) -> bool {
        matches!(&self.streams[..], [only] if !only.replaying && only.membership.receiver.is_empty())
            && self.preamble.is_none()
            && self.ending.is_none()
            && self.closing_due().is_none()
    }

    /// The single topic's membership: what a sink joins and leaves its relay's sweep with.
    pub fn membership(&mut self) -> &mut Membership {
        &mut self.streams[0].membership
    }

    /// The single topic's position: the last event written.
    pub fn position(&self) -> StreamId {
        self.streams[0].position
    }

    /// Continues from `position`, which the relay's sweep reached while it wrote this stream.
    pub fn resume_at(&mut self, position: StreamId) {
        let stream = &mut self.streams[0];
        if position != stream.position {
            stream.position = position;
            // Events went out: falling behind from now on means the client is too slow.
            self.live = true;
        }
    }

    /// Takes one delivery from the relay's sweep that the sweep does not write itself: the
    /// chunk to write at once (if any) and whether the connection must stop being swept (it
    /// starts draining).
    pub fn take_swept(&mut self, delivery: &Delivery) -> Taken {
        let mut chunk = Chunk::default();
        self.take(0, delivery, &mut chunk);
        let events = chunk.events;
        if events > 0 {
            self.live = true;
        }
        Taken {
            events,
            chunk: chunk.finish(),
            // Its task must wait for the new closing instant.
            leave: matches!(delivery, Delivery::Drain),
        }
    }

    /// Ready once the closing instant (the token's expiry, or a drain's) has come; a sink's
    /// task waits on it.
    pub fn poll_closing(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        match &mut self.close_at {
            Some((timer, _)) => timer.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        }
    }

    async fn produce(&mut self) -> Option<Bytes> {
        if let Some(preamble) = self.preamble.take() {
            return Some(preamble);
        }
        if let Some(end) = self.ending {
            return self.end(end);
        }
        let result = loop {
            if self.streams.iter().any(|s| s.replaying) {
                // A replay step does not wait on the closing timer: look at it before each, so
                // that an expired token or a drain ends a long replay too.
                if let Some(reason) = self.closing_due() {
                    break Ok(self.closing(reason));
                }
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

    fn end(&mut self, end: End) -> Option<Bytes> {
        tracing::debug!(connection = %self.id, reason = ?end, topics = self.topics.len(), "stream ended");
        end.record(&mut self.slot);
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
        let page_size = usize::from(stream.page_size);
        // Boxed: the read's state is large and only needed while replaying; inline, it would
        // sit in every idle connection's body future.
        let since = stream.membership.joined;
        let read = self.bus.read(&topic, stream.position, page_size, since);
        let page = match Box::pin(read).await {
            Ok(page) => page,
            Err(e) => {
                // The client stays connected and the replay resumes when the store is back; the
                // keep-alive written meanwhile notices a client that left.
                tracing::warn!(connection = %self.id, %topic, error = %e, "history read failed; retrying");
                tokio::time::sleep(REPLAY_RETRY.mul_f64(0.5 + fastrand::f64())).await;
                return Ok(Some(Bytes::from_static(frame::KEEPALIVE)));
            }
        };
        let mut out = BytesMut::new();
        let stats = self.slot.stats();
        let stream = &mut self.streams[index];
        if let Some(reason) = stream.gap.take().or(page.gap) {
            stats.record(&stats.gaps);
            out.put_slice(&frame::gap_event(topic.as_str(), reason));
            // Retained history restarts the topic: its ids may even be older than the client's.
            stream.position = StreamId::ZERO;
        }
        let (mut delivered, mut taken) = (0, 0);
        for event in &page.entries {
            if out.len() >= REPLAY_CHUNK_BYTES {
                break;
            }
            taken += 1;
            if event.id > self.streams[index].position {
                self.streams[index].position = event.id;
                self.put_event(&mut out, event);
                delivered += 1;
            }
        }
        let stream = &mut self.streams[index];
        if taken < page.entries.len() {
            // The rest is read again, in pages of what fitted this time.
            stream.replaying = true;
            stream.page_size = taken.max(1) as u16;
        } else {
            // A full page: there may be more after it.
            stream.replaying = page.entries.len() == page_size;
        }
        drop(page);
        let stats = self.slot.stats();
        stats.record_delivered(delivered);
        stats.add(&stats.replayed, delivered);
        Ok((!out.is_empty()).then(|| out.freeze()))
    }

    /// Waits for the next delivery (or this connection's drain instant); gathers whatever
    /// else is ready into the same chunk.
    async fn live_step(&mut self) -> Result<Option<Bytes>, End> {
        let (index, received) = tokio::select! {
            biased;
            reason = until(&mut self.close_at) => return Ok(Some(self.closing(reason))),
            next = recv_any(&mut self.streams) => next,
        };
        let mut chunk = Chunk::default();
        match received {
            Ok(delivery) => self.take(index, &delivery, &mut chunk),
            Err(RecvError::Lagged(_)) => return self.lagged(index),
            Err(RecvError::Closed) => return Err(End::Closed),
        }
        // Drain what is already queued so that a burst leaves in one write.
        'drain: while chunk.len() < MAX_CHUNK_BYTES {
            let mut any = false;
            for i in 0..self.streams.len() {
                match self.streams[i].membership.receiver.try_recv() {
                    Ok(delivery) => {
                        any = true;
                        self.take(i, &delivery, &mut chunk);
                    }
                    Err(TryRecvError::Lagged(_)) => return self.lagged(i),
                    Err(TryRecvError::Closed) => return Err(End::Closed),
                    Err(TryRecvError::Empty) => {}
                }
                if chunk.len() >= MAX_CHUNK_BYTES {
                    break 'drain;
                }
            }
            if !any {
                break;
            }
        }
        if chunk.events > 0 {
            self.live = true;
            self.slot.stats().record_delivered(chunk.events);
        }
        Ok(chunk.finish())
    }

    /// Takes one delivery from topic `index`'s receiver into `chunk`.
    fn take(&mut self, index: usize, delivery: &Delivery, chunk: &mut Chunk) {
        match delivery {
            Delivery::Event(event) => self.take_event(index, event, chunk),
            Delivery::Batch(batch) => {
                // The common case: a single-topic connection past none of the batch writes it
                // as it is, shared.
                if self.streams.len() == 1 && batch.first() > self.streams[index].position {
                    self.streams[index].position = batch.last();
                    chunk.push_shared(batch.frames.clone());
                    chunk.events += batch.events.len() as u64;
                } else {
                    for event in &batch.events {
                        self.take_event(index, event, chunk);
                    }
                }
            }
            Delivery::Gap { after, reason } => {
                let stream = &mut self.streams[index];
                // A connection whose replay already read past the gap has announced it itself.
                if stream.position <= *after {
                    let stats = self.slot.stats();
                    stats.record(&stats.gaps);
                    let topic = stream.membership.channel.topic.as_str();
                    chunk.buf().put_slice(&frame::gap_event(topic, *reason));
                    stream.position = StreamId::ZERO;
                }
            }
            Delivery::Keepalive => chunk.keepalive = true,
            Delivery::Drain => self.start_drain(),
        }
    }

    /// A new event (after the topic's position) is recorded as the position and written; an
    /// event at or before it is a duplicate and dropped.
    fn take_event(&mut self, index: usize, event: &Arc<Event>, chunk: &mut Chunk) {
        if event.id <= self.streams[index].position {
            return;
        }
        self.streams[index].position = event.id;
        chunk.events += 1;
        if self.streams.len() == 1 {
            chunk.push_shared(event.frame.clone());
        } else {
            // The cursor covers every topic's position, this event's included.
            self.put_event(chunk.buf(), event);
        }
    }

    /// Picks this connection's closing instant in the drain spread, once.
    fn start_drain(&mut self) {
        if !matches!(self.close_at, Some((_, End::Drained))) {
            let delay = self.config.drain_spread().mul_f64(fastrand::f64());
            self.close_by(tokio::time::Instant::now() + delay, End::Drained);
        }
    }

    fn check_drain(&mut self) {
        if self.drain.is_cancelled() {
            self.start_drain();
        }
    }

    /// A receiver fell further behind than the hub buffers. Before the connection went live
    /// that is its replay's doing: catch up from history. After, the client is too slow.
    fn lagged(&mut self, index: usize) -> Result<Option<Bytes>, End> {
        if self.live || self.catch_ups >= MAX_CATCH_UPS {
            tracing::info!(connection = %self.id, topics = self.topics.len(), "closing slow client");
            return Err(End::Slow);
        }
        self.catch_ups += 1;
        let stream = &mut self.streams[index];
        stream.membership.resubscribe();
        stream.replaying = true;
        // The drain marker may have been among the deliveries skipped.
        self.check_drain();
        Ok(None)
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

/// What a connection made of a delivery handed over by its relay's sweep.
pub struct Taken {
    /// Events in `chunk` (duplicates left out).
    pub events: u64,
    /// What to write, if anything.
    pub chunk: Option<Bytes>,
    /// The replica drains: the connection picked its closing instant, which its task must
    /// wait for, so it stops being a sink.
    pub leave: bool,
}

/// A chunk being gathered for one write. A lone shared frame (an event's or a batch's) is
/// handed out as it is; anything more is copied into one buffer.
#[derive(Default)]
struct Chunk {
    shared: Option<Bytes>,
    copied: BytesMut,
    /// Events that went into the chunk.
    events: u64,
    /// A keep-alive was asked for: written only if nothing else is.
    keepalive: bool,
}

impl Chunk {
    fn push_shared(&mut self, bytes: Bytes) {
        if self.shared.is_none() && self.copied.is_empty() {
            self.shared = Some(bytes);
        } else {
            self.buf().put_slice(&bytes);
        }
    }

    /// The buffer to append to, holding what came before.
    fn buf(&mut self) -> &mut BytesMut {
        if let Some(shared) = self.shared.take() {
            self.copied.put_slice(&shared);
        }
        &mut self.copied
    }

    fn len(&self) -> usize {
        self.shared.as_ref().map_or(0, Bytes::len) + self.copied.len()
    }

    fn finish(self) -> Option<Bytes> {
        match self.shared {
            Some(shared) => Some(shared),
            None if !self.copied.is_empty() => Some(self.copied.freeze()),
            None if self.keepalive => Some(Bytes::from_static(frame::KEEPALIVE)),
            None => None,
        }
    }
}

/// Waits for an optional timer and gives its reason; never completes without one.
async fn until(timer: &mut Option<(Pin<Box<Sleep>>, End)>) -> End {
    match timer {
        Some((timer, reason)) => {
            timer.await;
            *reason
        }
        None => std::future::pending().await,
    }
}

/// The next event of any topic; `recv` is cancel-safe, so losing the race loses nothing.
async fn recv_any(streams: &mut [TopicStream]) -> (usize, Result<Delivery, RecvError>) {
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
pub(crate) mod tests {
    use std::sync::Arc;

    use ssegw_protocol::{StreamId, Topic, TopicSet};

    use super::{Connection, Start};
    use crate::bus::Bus;
    use crate::config::Config;
    use crate::fanout::hub::Hub;
    use crate::telemetry::stats::Stats;

    /// A fresh single-topic connection on the embedded bus, as the subscribe handler builds it.
    pub(crate) fn idle_connection() -> Connection {
        let config = Config::from_flags(["--anonymous-subscribe=*"]).unwrap();
        let (interest_tx, interest_rx) = tokio::sync::mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(16, interest_tx, std::time::Duration::ZERO));
        let bus = Bus::start(
            &config.bus,
            uuid::Uuid::new_v4(),
            hub.clone(),
            interest_rx,
            Default::default(),
        )
        .unwrap();
        let topic = Topic::new("t").unwrap();
        let membership = hub.join(&topic);
        Connection::new(
            TopicSet::new(vec![topic]).unwrap(),
            vec![membership],
            Start::Fresh(vec![StreamId::ZERO]),
            Arc::new(bus),
            Arc::new(config.stream),
            Arc::new(Stats::default()).try_open(1).unwrap(),
            Default::default(),
        )
    }

    /// Every idle connection keeps its body future; large states (a Redis read) must be boxed
    /// so that they cost memory only while in use. Measured figures: BENCHMARKS.md.
    #[tokio::test]
    async fn idle_body_state_stays_small() {
        let body = idle_connection().into_stream();
        let size = std::mem::size_of_val(&body);
        assert!(size <= 1024, "body stream state is {size} bytes");
    }
}
