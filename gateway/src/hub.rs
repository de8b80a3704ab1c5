//! The local fan-out: one broadcast channel per topic that has subscribers on this replica.
//! The hub does no I/O. It tells the bus which topics it needs through the `Interest` queue,
//! and the bus feeds it every event exactly once, already framed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::{frame, StreamId, Topic};
use tokio::sync::{broadcast, mpsc, watch};

/// One event, framed once per replica and shared by every local subscriber of its topic; or a
/// marker that the replica found part of the topic's history gone while it was cut off.
#[derive(Debug)]
pub struct Event {
    /// The event's stream id; for a gap marker, the last position delivered before the gap.
    pub id: StreamId,
    /// `event:` and `data:` lines and the terminating blank line, without the `id:` line.
    pub body: Bytes,
    /// `id: <stream id>` followed by `body`: the complete frame for single-topic connections.
    pub frame: Bytes,
    /// Set on gap markers (whose body and frame are empty).
    pub gap: Option<GapReason>,
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
            gap: None,
        }
    }

    /// A gap marker: events after `after` were lost for `reason`.
    fn gap(after: StreamId, reason: GapReason) -> Event {
        Event {
            id: after,
            body: Bytes::new(),
            frame: Bytes::new(),
            gap: Some(reason),
        }
    }
}

/// A change of this replica's interest in a topic, sent by the hub to the bus.
#[derive(Debug)]
pub enum Interest {
    /// The first local subscriber joined: subscribe, then call [`Channel::set_ready`].
    Subscribe(Arc<Channel>),
    /// The last local subscriber left.
    Unsubscribe(Topic),
}

/// The per-topic state shared by the hub, the bus and the topic's subscribers.
#[derive(Debug)]
pub struct Channel {
    pub topic: Topic,
    /// Every event of the topic, in stream order. The capacity bounds how far one subscriber may
    /// fall behind: a receiver that lags further sees `Lagged` and its connection is closed.
    sender: broadcast::Sender<Arc<Event>>,
    state: Mutex<ChannelState>,
    /// Becomes true once the bus has subscribed the topic and knows its head position; joiners
    /// wait on it before they read history, so nothing published after the read is missed.
    ready: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct ChannelState {
    members: usize,
    /// The newest position this replica knows for the topic: the stream head read when it was
    /// subscribed, or the last event dispatched since, whichever is newer. The bus backfills
    /// from here after a reconnect.
    latest: StreamId,
}

impl Channel {
    /// Marks the topic subscribed, with `head` the stream's last id as read after subscribing.
    pub fn set_ready(&self, head: StreamId) {
        let mut state = self.state.lock().expect("channel state poisoned");
        state.latest = state.latest.max(head);
        drop(state);
        self.ready.send_replace(true);
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    pub fn latest(&self) -> StreamId {
        self.state.lock().expect("channel state poisoned").latest
    }

    /// Delivers an event to the topic's local subscribers, unless it is not newer than the
    /// latest one: the same event can come both from a backfill and from pub/sub. Callers
    /// dispatch each topic's events in stream order.
    pub fn dispatch(&self, event: Arc<Event>) {
        let mut state = self.state.lock().expect("channel state poisoned");
        if event.id <= state.latest {
            return;
        }
        state.latest = event.id;
        // An error only means no receiver exists at this instant.
        let _ = self.sender.send(event);
    }

    /// Tells the topic's subscribers that events after the latest position are gone (found by
    /// a backfill after a reconnect). The history that follows may have any ids, so the
    /// channel starts over from zero.
    pub fn dispatch_gap(&self, reason: GapReason) {
        let mut state = self.state.lock().expect("channel state poisoned");
        let marker = Arc::new(Event::gap(state.latest, reason));
        state.latest = StreamId::ZERO;
        let _ = self.sender.send(marker);
    }
}

/// The local fan-out of one replica.
pub struct Hub {
    channels: Mutex<HashMap<Topic, Arc<Channel>>>,
    /// To the bus; unbounded because every message stands for one channel created or removed,
    /// so its length is bounded by subscriber churn, and the bus drains it in batches.
    interest: mpsc::UnboundedSender<Interest>,
    capacity: usize,
}

impl Hub {
    /// `capacity` is the number of events a subscriber may lag behind on one topic.
    pub fn new(capacity: usize, interest: mpsc::UnboundedSender<Interest>) -> Hub {
        Hub {
            channels: Mutex::new(HashMap::new()),
            interest,
            capacity,
        }
    }

    /// Joins `topic`, creating its channel (and asking the bus to subscribe) when this is the
    /// first local subscriber.
    pub fn join(self: &Arc<Self>, topic: &Topic) -> Membership {
        let mut channels = self.channels.lock().expect("hub poisoned");
        let channel = channels.entry(topic.clone()).or_insert_with(|| {
            let channel = Arc::new(Channel {
                topic: topic.clone(),
                sender: broadcast::channel(self.capacity).0,
                state: Mutex::new(ChannelState::default()),
                ready: watch::channel(false).0,
            });
            // A send error means the bus is gone (shutdown); joiners then time out waiting.
            let _ = self.interest.send(Interest::Subscribe(channel.clone()));
            channel
        });
        let channel = channel.clone();
        let mut state = channel.state.lock().expect("channel state poisoned");
        state.members += 1;
        let receiver = channel.sender.subscribe();
        drop(state);
        drop(channels);
        Membership {
            hub: self.clone(),
            channel,
            receiver,
        }
    }

    /// Delivers an event to the topic's local subscribers; a topic nobody here follows is
    /// dropped. Callers dispatch each topic's events in stream order.
    pub fn dispatch(&self, topic: &Topic, event: Arc<Event>) {
        if let Some(channel) = self.channel(topic) {
            channel.dispatch(event);
        }
    }

    pub fn channel(&self, topic: &Topic) -> Option<Arc<Channel>> {
        self.channels
            .lock()
            .expect("hub poisoned")
            .get(topic)
            .cloned()
    }

    /// Every channel with local subscribers: what the bus subscribes again after a reconnect.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.channels
            .lock()
            .expect("hub poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Number of topics with local subscribers.
    pub fn topic_count(&self) -> usize {
        self.channels.lock().expect("hub poisoned").len()
    }

    fn leave(&self, channel: &Arc<Channel>) {
        let mut channels = self.channels.lock().expect("hub poisoned");
        let mut state = channel.state.lock().expect("channel state poisoned");
        state.members -= 1;
        if state.members == 0 {
            drop(state);
            channels.remove(&channel.topic);
            let _ = self
                .interest
                .send(Interest::Unsubscribe(channel.topic.clone()));
        }
    }
}

/// One subscriber's place in a topic; leaving happens on drop.
pub struct Membership {
    hub: Arc<Hub>,
    pub channel: Arc<Channel>,
    pub receiver: broadcast::Receiver<Arc<Event>>,
}

impl Membership {
    /// Waits until the topic is subscribed at the bus; returns the position from which this
    /// member receives every event through `receiver`.
    pub async fn ready(&self) -> StreamId {
        let mut ready = self.channel.ready.subscribe();
        // The sender lives in `self.channel`, so the wait cannot fail.
        let _ = ready.wait_for(|ready| *ready).await;
        self.channel.latest()
    }

    /// Starts receiving again at the newest event, after this member lagged too far behind.
    pub fn resubscribe(&mut self) {
        self.receiver = self.receiver.resubscribe();
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    fn event(ms: u64) -> Arc<Event> {
        Arc::new(Event::new(StreamId::new(ms, 0), None, b"x"))
    }

    #[test]
    fn subscribes_on_first_join_and_unsubscribes_after_last_leave() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(8, tx));
        let a = hub.join(&topic("t"));
        let b = hub.join(&topic("t"));
        assert!(matches!(rx.try_recv(), Ok(Interest::Subscribe(c)) if c.topic == topic("t")));
        assert!(
            rx.try_recv().is_err(),
            "second join must not subscribe again"
        );
        drop(a);
        assert!(rx.try_recv().is_err());
        drop(b);
        assert!(matches!(rx.try_recv(), Ok(Interest::Unsubscribe(t)) if t == topic("t")));
        assert_eq!(hub.topic_count(), 0);
    }

    #[test]
    fn dispatch_reaches_members_once_with_shared_bytes() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(8, tx));
        let mut a = hub.join(&topic("t"));
        let mut b = hub.join(&topic("t"));
        let mut other = hub.join(&topic("u"));
        hub.dispatch(&topic("t"), event(7));
        let (ea, eb) = (
            a.receiver.try_recv().unwrap(),
            b.receiver.try_recv().unwrap(),
        );
        assert!(Arc::ptr_eq(&ea, &eb));
        assert_eq!(ea.frame, &b"id: 7-0\ndata: x\n\n"[..]);
        assert!(other.receiver.try_recv().is_err());
        assert_eq!(a.channel.latest(), StreamId::new(7, 0));
    }

    #[tokio::test]
    async fn ready_reports_the_newest_known_position() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(8, tx));
        let m = hub.join(&topic("t"));
        hub.dispatch(&topic("t"), event(3));
        m.channel.set_ready(StreamId::new(2, 0));
        assert_eq!(m.ready().await, StreamId::new(3, 0));
    }

    #[test]
    fn dispatch_drops_events_already_delivered() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(8, tx));
        let mut m = hub.join(&topic("t"));
        for ms in [3, 2, 3, 4] {
            m.channel.dispatch(event(ms));
        }
        let got: Vec<u64> = std::iter::from_fn(|| m.receiver.try_recv().ok())
            .map(|e| e.id.ms)
            .collect();
        assert_eq!(got, [3, 4]);
    }

    #[test]
    fn a_gap_marker_carries_the_last_position_and_restarts_the_channel() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(8, tx));
        let mut m = hub.join(&topic("t"));
        m.channel.dispatch(event(9));
        m.channel.dispatch_gap(GapReason::Lost);
        // A new history may start with smaller ids; it is delivered all the same.
        m.channel.dispatch(event(5));
        let got: Vec<(u64, Option<GapReason>)> = std::iter::from_fn(|| m.receiver.try_recv().ok())
            .map(|e| (e.id.ms, e.gap))
            .collect();
        assert_eq!(got, [(9, None), (9, Some(GapReason::Lost)), (5, None)]);
        assert_eq!(m.channel.latest(), StreamId::new(5, 0));
    }
}
