//! The local fan-out: one broadcast channel per topic that has subscribers on this replica.
//! The hub does no I/O of its own. It tells the bus which topics it needs through the `Interest`
//! queue, and the bus feeds it every event exactly once, already framed. Its timers
//! (`Hub::run_timers`) send keep-alives on idle channels and, with a write-coalescing delay,
//! release the events gathered during the delay as one batch, so a connection is woken and
//! written once per batch. Connections therefore hold no timer of their own. A worker thread's
//! relay hands each delivery to the caught-up streams of that thread in one sweep (`sweep`),
//! without waking them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;
use std::time::Duration;

use ssegw_protocol::frame::GapReason;
use ssegw_protocol::{StreamId, Topic};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::broadcast;
use super::event::{Batch, Delivery, Event};
use super::sweep::{self, Sink, SinkKey};
use crate::telemetry::{self, stats::Stats};

/// A change of this replica's interest in a topic, sent by the hub to the bus.
#[derive(Debug)]
pub enum Interest {
    /// The first local subscriber joined: subscribe, then call [`Channel::set_ready`].
    Subscribe(Arc<Channel>),
    /// The last local subscriber left.
    Unsubscribe(Topic),
}

/// Members of a topic that receive from its channel directly; later ones go through their
/// thread's relay.
const DIRECT_MEMBERS: usize = 8;

/// A channel waiting for its coalescing delay to end, and when it ends.
type Flush = (Instant, Arc<Channel>);

/// The per-topic state shared by the hub, the bus and the topic's subscribers.
#[derive(Debug)]
pub struct Channel {
    pub topic: Topic,
    /// Every delivery of the topic, in stream order. The capacity bounds how far one
    /// subscriber may fall behind: a receiver that lags further sees `Lagged` and its
    /// connection is closed.
    sender: broadcast::Sender<Delivery>,
    state: Mutex<ChannelState>,
    /// Becomes true once the bus has subscribed the topic and knows its head position; joiners
    /// wait on it (woken by `became_ready`) before they read history, so nothing published
    /// after the read is missed. Not a `watch`: that costs some 360 bytes a topic.
    ready: AtomicBool,
    became_ready: Notify,
    /// With a write-coalescing delay: the delay, and where the channel asks to be flushed.
    coalesce: Option<(Duration, mpsc::UnboundedSender<Flush>)>,
}

#[derive(Debug, Default)]
struct ChannelState {
    members: usize,
    /// The newest position this replica knows for the topic: the stream head read when it was
    /// subscribed, or the last event dispatched since, whichever is newer. The bus backfills
    /// from here after a reconnect.
    latest: StreamId,
    /// Events waiting for the end of the coalescing delay.
    pending: Vec<Arc<Event>>,
    /// Something went out since the last keep-alive tick.
    active: bool,
}

impl Channel {
    /// Marks the topic subscribed, with `head` the stream's last id as read after subscribing.
    pub fn set_ready(&self, head: StreamId) {
        let mut state = self.lock();
        state.latest = state.latest.max(head);
        drop(state);
        self.ready.store(true, Ordering::Release);
        self.became_ready.notify_waiters();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Waits until the topic is subscribed at the bus; returns the newest position known then:
    /// whoever receives the topic's deliveries from before this call misses nothing after it.
    pub async fn wait_ready(&self) -> StreamId {
        loop {
            let notified = self.became_ready.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before looking, so that `set_ready` after the look wakes this wait.
            notified.as_mut().enable();
            if self.is_ready() {
                break;
            }
            notified.await;
        }
        self.latest()
    }

    pub fn latest(&self) -> StreamId {
        self.lock().latest
    }

    /// This replica's connections on the topic.
    pub fn members(&self) -> usize {
        self.lock().members
    }

    /// Delivers an event to the topic's local subscribers (at the end of the coalescing delay,
    /// if one is set), unless it is not newer than the latest one: the same event can come both
    /// from a backfill and from pub/sub. Callers dispatch each topic's events in stream order.
    /// Returns whether the event was new.
    pub fn dispatch(self: &Arc<Self>, event: Arc<Event>) -> bool {
        let mut state = self.lock();
        if event.id <= state.latest {
            return false;
        }
        state.latest = event.id;
        match &self.coalesce {
            None => self.send(&mut state, Delivery::Event(event)),
            Some(_) => self.hold(&mut state, [event]),
        }
        true
    }

    /// Delivers a run of events in stream order (a backfill page after a reconnect) as one
    /// batch, leaving out those not newer than the latest: a long outage's backlog then takes a
    /// few places in each subscriber's buffer instead of overflowing it.
    /// Returns the events that were new.
    pub fn dispatch_all(self: &Arc<Self>, events: Vec<Arc<Event>>) -> Vec<Arc<Event>> {
        let mut state = self.lock();
        let mut fresh = Vec::with_capacity(events.len());
        for event in events {
            if event.id > state.latest {
                state.latest = event.id;
                fresh.push(event);
            }
        }
        if fresh.is_empty() {
            return fresh;
        }
        self.hold(&mut state, fresh.iter().cloned());
        if self.coalesce.is_none() {
            self.release(&mut state);
        }
        fresh
    }

    /// Adds events to those pending; with a coalescing delay, the first of them asks for the
    /// flush at the end of the delay.
    fn hold(
        self: &Arc<Self>,
        state: &mut ChannelState,
        events: impl IntoIterator<Item = Arc<Event>>,
    ) {
        if let (true, Some((delay, flushes))) = (state.pending.is_empty(), &self.coalesce) {
            // The flusher is gone only when the hub is: nobody would receive anyway.
            let _ = flushes.send((Instant::now() + *delay, self.clone()));
        }
        state.pending.extend(events);
    }

    /// Tells the topic's subscribers that events after the latest position are gone (found by
    /// a backfill after a reconnect). The history that follows may have any ids, so the
    /// channel starts over from zero.
    pub fn dispatch_gap(&self, reason: GapReason) {
        let mut state = self.lock();
        self.release(&mut state);
        let after = std::mem::take(&mut state.latest);
        self.send(&mut state, Delivery::Gap { after, reason });
    }

    /// Sends the events gathered during the coalescing delay.
    fn flush(&self) {
        let mut state = self.lock();
        self.release(&mut state);
    }

    /// A keep-alive, unless something went out since the last call.
    fn keepalive(&self) {
        let mut state = self.lock();
        if !std::mem::take(&mut state.active) && state.pending.is_empty() {
            // An error only means no receiver exists at this instant.
            let _ = self.sender.send(Delivery::Keepalive);
        }
    }

    fn drain(&self) {
        let mut state = self.lock();
        self.release(&mut state);
        self.send(&mut state, Delivery::Drain);
    }

    fn release(&self, state: &mut ChannelState) {
        let delivery = match state.pending.len() {
            0 => return,
            1 => Delivery::Event(state.pending.pop().expect("one pending")),
            _ => Delivery::Batch(Arc::new(Batch::new(std::mem::take(&mut state.pending)))),
        };
        self.send(state, delivery);
    }

    /// Sends under the state lock, so that deliveries keep the order of the calls.
    fn send(&self, state: &mut ChannelState, delivery: Delivery) {
        state.active = true;
        // An error only means no receiver exists at this instant.
        let _ = self.sender.send(delivery);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        self.state.lock().expect("channel state poisoned")
    }
}

/// The local fan-out of one replica.
pub struct Hub {
    channels: Mutex<HashMap<Topic, Arc<Channel>>>,
    /// To the bus; unbounded because every message stands for one channel created or removed,
    /// so its length is bounded by subscriber churn, and the bus drains it in batches.
    interest: mpsc::UnboundedSender<Interest>,
    capacity: usize,
    /// With a write-coalescing delay: the delay and the queue of channels to flush, in
    /// deadline order (every channel waits the same delay).
    coalesce: Option<(Duration, mpsc::UnboundedSender<Flush>)>,
    /// The other end of that queue, taken by `run_timers`.
    flushes: Mutex<Option<mpsc::UnboundedReceiver<Flush>>>,
    observer: Observer,
}

/// What the hub reports about each event that reaches the replica: counts and lag into
/// `stats`, and with `trace_deliveries` a delivery span for events that carry their
/// publisher's trace context. Recording a span is no I/O: an exporter thread sends it.
#[derive(Default)]
pub struct Observer {
    pub stats: Arc<Stats>,
    pub trace_deliveries: bool,
}

impl Hub {
    /// `capacity` is the number of deliveries a subscriber may lag behind on one topic;
    /// `coalesce` is the write-coalescing delay (zero: none), effective once `run_timers` runs.
    pub fn new(
        capacity: usize,
        interest: mpsc::UnboundedSender<Interest>,
        coalesce: Duration,
    ) -> Hub {
        let (coalesce, flushes) = if coalesce.is_zero() {
            (None, None)
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some((coalesce, tx)), Some(rx))
        };
        Hub {
            channels: Mutex::new(HashMap::new()),
            interest,
            capacity,
            coalesce,
            flushes: Mutex::new(flushes),
            observer: Observer::default(),
        }
    }

    /// The hub, reporting to `observer`.
    pub fn observed_by(mut self, observer: Observer) -> Hub {
        self.observer = observer;
        self
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.observer.stats
    }

    /// The deliveries a subscriber may lag behind on one topic (`--client-buffer`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reports new events of `channel`, once each: the caller leaves out duplicates (a backfill
    /// and pub/sub may both bring one).
    pub fn received(&self, channel: &Channel, events: &[Arc<Event>]) {
        let stats = &self.observer.stats;
        stats.add(&stats.events_received, events.len() as u64);
        for event in events {
            let lag = telemetry::since_publish(event.id.ms).as_secs_f64();
            stats.lag.record(lag, &[]);
            if let (true, Some(traceparent)) = (self.observer.trace_deliveries, &event.traceparent)
            {
                telemetry::delivery_span(traceparent, &channel.topic, event.id, channel.members());
            }
        }
    }

    /// Sends a keep-alive every `keepalive` on each channel that was idle meanwhile, and
    /// flushes coalesced events when their delay is over. Runs until dropped.
    pub async fn run_timers(self: Arc<Self>, keepalive: Duration) {
        let flushes = self.flushes.lock().expect("hub poisoned").take();
        let keepalives = async {
            let mut ticks = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                for channel in self.channels() {
                    channel.keepalive();
                }
            }
        };
        let flusher = async {
            let Some(mut flushes) = flushes else {
                return std::future::pending().await;
            };
            while let Some((due, channel)) = flushes.recv().await {
                tokio::time::sleep_until(due).await;
                channel.flush();
            }
        };
        tokio::join!(keepalives, flusher);
    }

    /// Tells every connection that the replica is draining.
    pub fn drain(&self) {
        for channel in self.channels() {
            channel.drain();
        }
    }

    /// Joins `topic`, creating its channel (and asking the bus to subscribe) when this is the
    /// first local subscriber.
    pub fn join(self: &Arc<Self>, topic: &Topic) -> Membership {
        self.join_buffered(topic, self.capacity)
    }

    /// `join`, with a channel that lets its members fall `capacity` deliveries behind if this
    /// join creates it (the Mercure hub's log, whose one member per thread routes it to many
    /// subscriptions). The queue holds only what a member has yet to read.
    pub fn join_buffered(self: &Arc<Self>, topic: &Topic, capacity: usize) -> Membership {
        let mut channels = self.channels.lock().expect("hub poisoned");
        let channel = channels.entry(topic.clone()).or_insert_with(|| {
            let channel = Arc::new(Channel {
                topic: topic.clone(),
                sender: broadcast::channel(capacity).0,
                state: Mutex::new(ChannelState::default()),
                ready: AtomicBool::new(false),
                became_ready: Notify::new(),
                coalesce: self.coalesce.clone(),
            });
            // A send error means the bus is gone (shutdown); joiners then time out waiting.
            let _ = self.interest.send(Interest::Subscribe(channel.clone()));
            channel
        });
        let channel = channel.clone();
        let mut state = channel.state.lock().expect("channel state poisoned");
        state.members += 1;
        // A topic with few members here is received directly: a relay would cost a second
        // buffer (memory, with many small topics) for few wakes saved.
        let relayed = (state.members > DIRECT_MEMBERS)
            .then(|| Relay::join(&channel, self.capacity, &self.observer.stats))
            .flatten();
        let (relay, receiver) = match relayed {
            Some((relay, receiver)) => (Some(relay), receiver),
            None => (None, channel.sender.subscribe()),
        };
        drop(state);
        drop(channels);
        Membership {
            joined: std::time::Instant::now(),
            hub: self.clone(),
            channel,
            receiver,
            _relay: relay,
        }
    }

    /// Delivers an event to the topic's local subscribers; a topic nobody here follows is
    /// dropped. Callers dispatch each topic's events in stream order.
    pub fn dispatch(&self, topic: &Topic, event: Arc<Event>) {
        if let Some(channel) = self.channel(topic) {
            if channel.dispatch(event.clone()) {
                self.received(&channel, std::slice::from_ref(&event));
            }
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

    /// Each topic with local subscribers and how many: what the replica reports for presence.
    pub fn member_counts(&self) -> Vec<(Topic, u64)> {
        let channels = self.channels.lock().expect("hub poisoned");
        channels
            .iter()
            .map(|(topic, channel)| (topic.clone(), channel.members() as u64))
            .filter(|(_, members)| *members > 0)
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

/// A topic's deliveries relayed to one runtime thread (an HTTP worker) and fanned out there.
/// The bus dispatches on another thread, and waking a task of a tokio current-thread runtime
/// from outside costs a syscall; through the relay, the channel wakes one task per worker and
/// the worker reaches its own connections locally: the caught-up ones in one sweep
/// (`sweep`), without a wake-up each, the others through the relay's broadcast.
struct Relay {
    /// Names this relay's sweep (`sweep`).
    id: u64,
    topic: Topic,
    /// The relay task holds the only strong sender: if the task ends, the thread's receivers
    /// see `Closed`.
    sender: broadcast::WeakSender<Delivery>,
    /// The thread whose sinks the relay serves: set only on a current-thread runtime, where the
    /// relay task runs on the thread that started it.
    sweeps: Option<ThreadId>,
    task: tokio::task::AbortHandle,
}

thread_local! {
    /// This thread's relays, by topic; an entry lives while a member on this thread holds it.
    static RELAYS: RefCell<HashMap<Topic, Weak<Relay>>> = RefCell::new(HashMap::new());
}

/// Relay ids, unique in the process.
static RELAY_IDS: AtomicU64 = AtomicU64::new(0);

impl Relay {
    /// This thread's relay of `channel` (started if needed) and a receiver of it; `None`
    /// outside a tokio runtime.
    fn join(
        channel: &Channel,
        capacity: usize,
        stats: &Arc<Stats>,
    ) -> Option<(Arc<Relay>, broadcast::Receiver<Delivery>)> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        RELAYS
            .try_with(|relays| {
                let mut relays = relays.borrow_mut();
                let existing = relays.get(&channel.topic).and_then(Weak::upgrade);
                if let Some(relay) = existing {
                    if let Some(sender) = relay.sender.upgrade() {
                        let receiver = sender.subscribe();
                        return (relay, receiver);
                    }
                }
                let (sender, receiver) = broadcast::channel(capacity);
                let id = RELAY_IDS.fetch_add(1, Ordering::Relaxed);
                let sweeps = (runtime.runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::CurrentThread)
                    .then(|| std::thread::current().id());
                let relay = Arc::new(Relay {
                    id,
                    topic: channel.topic.clone(),
                    sender: sender.downgrade(),
                    sweeps,
                    task: runtime
                        .spawn(relay(id, channel.sender.subscribe(), sender, stats.clone()))
                        .abort_handle(),
                });
                relays.insert(channel.topic.clone(), Arc::downgrade(&relay));
                (relay, receiver)
            })
            .ok()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = RELAYS.try_with(|relays| {
            if let Ok(mut relays) = relays.try_borrow_mut() {
                if relays
                    .get(&self.topic)
                    .is_some_and(|relay| relay.strong_count() == 0)
                {
                    relays.remove(&self.topic);
                }
            }
        });
    }
}

/// Forwards a channel's deliveries to one thread: to its receivers, then to its sweep. What
/// queued up while the last sweep ran goes out together, consecutive events as one batch, so a
/// thread that falls behind catches up with fewer, larger writes. Ends, releasing the sweep and
/// closing the receivers (their connections end and resume elsewhere), if the thread fell
/// further behind than the channel buffers, or when the channel closes.
async fn relay(
    id: u64,
    mut from: broadcast::Receiver<Delivery>,
    to: broadcast::Sender<Delivery>,
    stats: Arc<Stats>,
) {
    'relay: while let Ok(first) = from.recv().await {
        let mut queued = vec![first];
        while !queued.is_empty() {
            while queued.len() < MAX_GATHERED {
                match from.try_recv() {
                    Ok(delivery) => queued.push(delivery),
                    Err(broadcast::TryRecvError::Empty) => break,
                    Err(_) => break 'relay,
                }
            }
            let round = gathered(std::mem::take(&mut queued));
            let last = round.len() - 1;
            let mut meanwhile = Meanwhile::new(&mut from, &mut queued);
            for (i, delivery) in round.into_iter().enumerate() {
                // Receivers first: a stream the sweep lets go of gets a receiver after this
                // send, so it gets this delivery from the sweep and the later ones from its
                // receiver. An error only means no receiver exists at this instant.
                let _ = to.send(delivery.clone());
                sweep::start(id, delivery, &stats);
                loop {
                    // The round's last delivery may take in what arrives meanwhile: those come
                    // next in the channel. The relay sends them on afterwards, in order.
                    let mut more = || meanwhile.take();
                    let more =
                        (i == last).then_some(&mut more as &mut dyn FnMut() -> Option<Delivery>);
                    if sweep::step(id, &to, more, sweep::STREAMS_PER_STEP) {
                        break;
                    }
                    // A long round pauses: the worker's other tasks (requests, other topics,
                    // streams writing for themselves) get their turn. A stream that leaves the
                    // sweep meanwhile is written its part of the round as it leaves.
                    tokio::task::yield_now().await;
                }
            }
            if meanwhile.fell_behind {
                break 'relay;
            }
            if !queued.is_empty() {
                // Between two groups of deliveries, too, the thread's other tasks get their
                // turn, so a topic that never goes quiet starves nothing.
                tokio::task::yield_now().await;
            }
        }
    }
    sweep::release(id, &to);
}

/// What a relay takes from its channel while it sweeps (`sweep::step`'s `more`): each delivery
/// is also queued, to be sent on to the thread's receivers after the sweep.
struct Meanwhile<'a> {
    from: &'a mut broadcast::Receiver<Delivery>,
    queued: &'a mut Vec<Delivery>,
    /// The channel dropped deliveries before the relay read them. From then on nothing more is
    /// taken: the next delivery held lies past the hole, and a run grown with it would move
    /// swept streams past events they never got. The relay ends after the sweep, and its
    /// streams resume from where they are.
    fell_behind: bool,
}

impl<'a> Meanwhile<'a> {
    fn new(from: &'a mut broadcast::Receiver<Delivery>, queued: &'a mut Vec<Delivery>) -> Self {
        Meanwhile {
            from,
            queued,
            fell_behind: false,
        }
    }

    /// The next delivery waiting in the channel, if any (and none once the relay fell behind).
    fn take(&mut self) -> Option<Delivery> {
        if self.fell_behind {
            return None;
        }
        match self.from.try_recv() {
            Ok(next) => {
                self.queued.push(next.clone());
                Some(next)
            }
            Err(broadcast::TryRecvError::Empty) => None,
            Err(_) => {
                self.fell_behind = true;
                None
            }
        }
    }
}

/// Deliveries a relay takes from its channel for one round of sweeps, at most.
const MAX_GATHERED: usize = 256;

/// `queued` in order, with each run of consecutive events (and batches) joined into one batch,
/// and keep-alives left out when an event goes out anyway.
fn gathered(queued: Vec<Delivery>) -> Vec<Delivery> {
    let any_event = queued
        .iter()
        .any(|d| matches!(d, Delivery::Event(_) | Delivery::Batch(_)));
    let mut out = Vec::with_capacity(queued.len());
    let mut run = Vec::new();
    for delivery in queued {
        match delivery {
            Delivery::Event(_) | Delivery::Batch(_) => run.push(delivery),
            Delivery::Keepalive if any_event => {}
            other => {
                out.extend(joined(std::mem::take(&mut run)));
                out.push(other);
            }
        }
    }
    out.extend(joined(run));
    out
}

/// A run of events and batches as one delivery.
fn joined(run: Vec<Delivery>) -> Option<Delivery> {
    if run.len() <= 1 {
        return run.into_iter().next();
    }
    let mut events = Vec::new();
    for delivery in run {
        match delivery {
            Delivery::Event(event) => events.push(event),
            Delivery::Batch(batch) => events.extend(batch.events.iter().cloned()),
            _ => unreachable!("a run holds events and batches only"),
        }
    }
    Some(Delivery::Batch(Arc::new(Batch::new(events))))
}

/// One subscriber's place in a topic; leaving happens on drop.
pub struct Membership {
    hub: Arc<Hub>,
    pub channel: Arc<Channel>,
    pub receiver: broadcast::Receiver<Delivery>,
    /// When `receiver` started receiving: a history read issued after it, with what the
    /// receiver gets, misses nothing.
    pub joined: std::time::Instant,
    /// Keeps this thread's relay of the topic running.
    _relay: Option<Arc<Relay>>,
}

impl Membership {
    /// Waits until the topic is subscribed at the bus; returns the position from which this
    /// member receives every event through `receiver`.
    pub async fn ready(&self) -> StreamId {
        self.channel.wait_ready().await
    }

    /// Starts receiving again at the newest event, after this member lagged too far behind.
    pub fn resubscribe(&mut self) {
        self.receiver = self.receiver.resubscribe();
        self.joined = std::time::Instant::now();
    }

    /// Receives from `receiver` from now on (a relay's, given to a sink it let go of).
    pub fn rejoin(&mut self, receiver: broadcast::Receiver<Delivery>) {
        self.receiver = receiver;
    }

    /// Makes a stream one of those this thread's relay of the topic writes to in its sweep
    /// (see `sweep::insert`), from `position` on. Only a member with nothing left in its
    /// receiver may: the sweep's first delivery is the one after those. `None` where no relay
    /// of this thread serves the topic.
    pub fn sweep_into(
        &self,
        fd: std::os::fd::RawFd,
        chunked: bool,
        position: StreamId,
        sink: Rc<dyn Sink>,
    ) -> Option<SinkKey> {
        let relay = self._relay.as_ref()?;
        if relay.sweeps != Some(std::thread::current().id())
            || relay.sender.upgrade().is_none()
            || !self.receiver.is_empty()
        {
            return None;
        }
        sweep::insert(relay.id, fd, chunked, position, sink)
    }

    /// Takes a stream out of the sweep (one the relay did not let go of) and receives from the
    /// relay again, from its next delivery on. Returns where the sweep left it.
    pub fn leave_sweep(&mut self, key: SinkKey) -> Option<sweep::Left> {
        let left = sweep::remove(key);
        // Everything the relay sent while the stream was in the sweep went to it there (or,
        // in a paused round, as it left).
        self.receiver = self.receiver.resubscribe();
        left
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

    fn hub(coalesce: Duration) -> Arc<Hub> {
        let (tx, _rx) = mpsc::unbounded_channel();
        Arc::new(Hub::new(8, tx, coalesce))
    }

    /// A delivery as text: an event id, a batch of ids, a marker.
    fn text(delivery: Delivery) -> String {
        match delivery {
            Delivery::Event(e) => e.id.to_string(),
            Delivery::Batch(b) => {
                let ids: Vec<String> = b.events.iter().map(|e| e.id.to_string()).collect();
                format!("[{}]", ids.join(" "))
            }
            Delivery::Gap { after, reason } => format!("gap {} after {after}", reason.as_str()),
            Delivery::Keepalive => "keepalive".into(),
            Delivery::Drain => "drain".into(),
        }
    }

    /// What the member has received so far, as text.
    fn received(m: &mut Membership) -> Vec<String> {
        std::iter::from_fn(|| m.receiver.try_recv().ok())
            .map(text)
            .collect()
    }

    #[test]
    fn subscribes_on_first_join_and_unsubscribes_after_last_leave() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(8, tx, Duration::ZERO));
        let a = hub.join(&topic("t"));
        let b = hub.join(&topic("t"));
        assert!(matches!(rx.try_recv(), Ok(Interest::Subscribe(c)) if c.topic == topic("t")));
        assert!(
            rx.try_recv().is_err(),
            "second join must not subscribe again"
        );
        drop(a);
        assert!(rx.try_recv().is_err());
        let _c = hub.join(&topic("u"));
        assert!(matches!(rx.try_recv(), Ok(Interest::Subscribe(c)) if c.topic == topic("u")));
        let mut counts = hub.member_counts();
        counts.sort();
        assert_eq!(counts, [(topic("t"), 1), (topic("u"), 1)]);
        drop(b);
        assert!(matches!(rx.try_recv(), Ok(Interest::Unsubscribe(t)) if t == topic("t")));
        assert_eq!(hub.member_counts(), [(topic("u"), 1)]);
        drop(_c);
        assert_eq!(hub.topic_count(), 0);
    }

    #[test]
    fn dispatch_reaches_members_once_with_shared_bytes() {
        let hub = hub(Duration::ZERO);
        let mut a = hub.join(&topic("t"));
        let mut b = hub.join(&topic("t"));
        let mut other = hub.join(&topic("u"));
        hub.dispatch(&topic("t"), event(7));
        let (Ok(Delivery::Event(ea)), Ok(Delivery::Event(eb))) =
            (a.receiver.try_recv(), b.receiver.try_recv())
        else {
            panic!("both members must receive the event");
        };
        assert!(Arc::ptr_eq(&ea, &eb));
        assert_eq!(ea.frame, &b"id: 7-0\ndata: x\n\n"[..]);
        assert!(other.receiver.try_recv().is_err());
        assert_eq!(a.channel.latest(), StreamId::new(7, 0));
    }

    #[test]
    fn a_topic_holds_a_backlog_only_while_a_member_lags() {
        // Capacity 8 (see `hub`).
        let hub = hub(Duration::ZERO);
        let mut fast = hub.join(&topic("t"));
        let mut slow = hub.join(&topic("t"));
        let channel = fast.channel.clone();
        for ms in 1..=5 {
            hub.dispatch(&topic("t"), event(ms));
            assert_eq!(received(&mut fast), [format!("{ms}-0")]);
        }
        assert_eq!(channel.sender.len(), 5, "the slow member's backlog");
        for ms in 6..=20 {
            hub.dispatch(&topic("t"), event(ms));
            assert!(channel.sender.len() <= 8, "never more than the buffer");
            assert_eq!(received(&mut fast), [format!("{ms}-0")]);
        }
        assert!(matches!(
            slow.receiver.try_recv(),
            Err(broadcast::TryRecvError::Lagged(12))
        ));
        let caught_up = received(&mut slow);
        assert_eq!(caught_up.first().map(String::as_str), Some("13-0"));
        assert_eq!(caught_up.len(), 8);
        assert_eq!(channel.sender.len(), 0, "nothing held once both have read");
        hub.dispatch(&topic("t"), event(21));
        assert_eq!(channel.sender.len(), 1);
        drop(slow);
        assert_eq!(
            channel.sender.len(),
            1,
            "the fast member has yet to read it"
        );
        assert_eq!(received(&mut fast), ["21-0"]);
        assert_eq!(channel.sender.len(), 0);
    }

    #[tokio::test]
    async fn ready_reports_the_newest_known_position() {
        let hub = hub(Duration::ZERO);
        let m = hub.join(&topic("t"));
        hub.dispatch(&topic("t"), event(3));
        m.channel.set_ready(StreamId::new(2, 0));
        assert_eq!(m.ready().await, StreamId::new(3, 0));
    }

    #[test]
    fn dispatch_drops_events_already_delivered() {
        let hub = hub(Duration::ZERO);
        let mut m = hub.join(&topic("t"));
        for ms in [3, 2, 3, 4] {
            m.channel.dispatch(event(ms));
        }
        assert_eq!(received(&mut m), ["3-0", "4-0"]);
    }

    #[test]
    fn a_gap_marker_carries_the_last_position_and_restarts_the_channel() {
        let hub = hub(Duration::ZERO);
        let mut m = hub.join(&topic("t"));
        m.channel.dispatch(event(9));
        m.channel.dispatch_gap(GapReason::Lost);
        // A new history may start with smaller ids; it is delivered all the same.
        m.channel.dispatch(event(5));
        assert_eq!(received(&mut m), ["9-0", "gap lost after 9-0", "5-0"]);
        assert_eq!(m.channel.latest(), StreamId::new(5, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn coalescing_gathers_events_of_the_delay_into_one_batch() {
        let hub = hub(Duration::from_millis(5));
        tokio::spawn(hub.clone().run_timers(Duration::from_secs(60)));
        let mut m = hub.join(&topic("t"));
        for ms in [1, 2, 2, 3] {
            m.channel.dispatch(event(ms));
        }
        tokio::time::sleep(Duration::from_millis(4)).await;
        assert!(received(&mut m).is_empty(), "released before the delay");
        tokio::time::sleep(Duration::from_millis(2)).await;
        // A batch of one is sent as a plain event.
        m.channel.dispatch(event(4));
        tokio::time::sleep(Duration::from_millis(6)).await;
        assert_eq!(received(&mut m), ["[1-0 2-0 3-0]", "4-0"]);
        m.channel.dispatch(event(5));
        m.channel.dispatch(event(6));
        // A gap or a drain releases what is pending first, keeping the order.
        m.channel.dispatch_gap(GapReason::Trimmed);
        hub.drain();
        // Let the thread's relay forward them.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            received(&mut m),
            ["[5-0 6-0]", "gap trimmed after 6-0", "drain"]
        );
    }

    #[test]
    fn a_backfill_page_goes_out_as_one_batch_without_what_was_delivered() {
        let hub = hub(Duration::ZERO);
        let mut m = hub.join(&topic("t"));
        m.channel.dispatch(event(2));
        m.channel
            .dispatch_all(vec![event(1), event(2), event(3), event(4)]);
        m.channel.dispatch_all(vec![event(4)]);
        m.channel.dispatch_all(vec![event(5)]);
        assert_eq!(received(&mut m), ["2-0", "[3-0 4-0]", "5-0"]);
        assert_eq!(m.channel.latest(), StreamId::new(5, 0));
    }

    #[test]
    fn a_batch_joins_its_frames() {
        let batch = Batch::new(vec![event(1), event(2)]);
        assert_eq!(
            batch.frames,
            &b"id: 1-0\ndata: x\n\nid: 2-0\ndata: x\n\n"[..]
        );
        assert_eq!(
            (batch.first(), batch.last()),
            (StreamId::new(1, 0), StreamId::new(2, 0))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keepalives_go_only_to_channels_idle_for_an_interval() {
        let hub = hub(Duration::ZERO);
        tokio::spawn(hub.clone().run_timers(Duration::from_secs(10)));
        let mut busy = hub.join(&topic("busy"));
        let mut idle = hub.join(&topic("idle"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        busy.channel.dispatch(event(1));
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(received(&mut busy), ["1-0"]);
        assert_eq!(received(&mut idle), ["keepalive"]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(received(&mut busy), ["keepalive"]);
        assert_eq!(received(&mut idle), ["keepalive"]);
    }

    /// `gathered` as text: event ids, batches of ids, markers.
    fn gathered_text(queued: Vec<Delivery>) -> Vec<String> {
        gathered(queued).into_iter().map(text).collect()
    }

    #[test]
    fn a_sweep_takes_in_what_arrives_meanwhile_until_the_relay_falls_behind() {
        let (tx, mut from) = broadcast::channel(2);
        let mut queued = Vec::new();
        let mut meanwhile = Meanwhile::new(&mut from, &mut queued);
        assert!(meanwhile.take().is_none());
        tx.send(Delivery::Event(event(1))).unwrap();
        let taken = meanwhile
            .take()
            .map(|d| matches!(d, Delivery::Event(e) if e.id.ms == 1));
        assert_eq!(taken, Some(true));
        // Five more into a channel of two: the relay lost three of them.
        for ms in 2..=6 {
            tx.send(Delivery::Event(event(ms))).unwrap();
        }
        assert!(meanwhile.take().is_none());
        assert!(meanwhile.fell_behind);
        // Events 5 and 6 are still held, but lie past the hole: taking them in would move the
        // swept streams past 2 to 4.
        assert!(meanwhile.take().is_none());
        assert!(meanwhile.take().is_none());
        assert_eq!(
            queued.len(),
            1,
            "only what was taken before the hole is sent on"
        );
    }

    #[test]
    fn a_relay_joins_what_queued_up_into_batches_in_order() {
        let batch = |ms: &[u64]| {
            Delivery::Batch(Arc::new(Batch::new(ms.iter().map(|&m| event(m)).collect())))
        };
        let gap = Delivery::Gap {
            after: StreamId::new(4, 0),
            reason: GapReason::Lost,
        };
        for (queued, expected) in [
            (vec![Delivery::Event(event(1))], vec!["1-0"]),
            (vec![Delivery::Keepalive], vec!["keepalive"]),
            (
                vec![
                    Delivery::Event(event(1)),
                    Delivery::Keepalive,
                    batch(&[2, 3]),
                    Delivery::Event(event(4)),
                ],
                vec!["[1-0 2-0 3-0 4-0]"],
            ),
            (
                vec![
                    Delivery::Event(event(3)),
                    Delivery::Event(event(4)),
                    gap,
                    Delivery::Event(event(1)),
                    Delivery::Drain,
                    Delivery::Keepalive,
                ],
                vec!["[3-0 4-0]", "gap lost after 4-0", "1-0", "drain"],
            ),
        ] {
            assert_eq!(gathered_text(queued), expected);
        }
    }

    fn relays_on_this_thread() -> usize {
        RELAYS.with(|relays| relays.borrow().len())
    }

    #[tokio::test]
    async fn a_thread_relays_each_topic_once_while_it_has_members() {
        let hub = hub(Duration::ZERO);
        let mut direct: Vec<Membership> =
            (0..DIRECT_MEMBERS).map(|_| hub.join(&topic("t"))).collect();
        assert_eq!(
            relays_on_this_thread(),
            0,
            "the first members receive directly"
        );
        let mut a = hub.join(&topic("t"));
        let mut b = hub.join(&topic("t"));
        assert_eq!(relays_on_this_thread(), 1);
        assert_eq!(
            a.channel.sender.receiver_count(),
            DIRECT_MEMBERS + 1,
            "one relay, not one per member"
        );
        hub.dispatch(&topic("t"), event(1));
        tokio::task::yield_now().await;
        for m in direct.iter_mut().chain([&mut a, &mut b]) {
            assert_eq!(received(m), ["1-0"]);
        }
        drop((a, b));
        assert_eq!(relays_on_this_thread(), 0);
        // A later member starts a new relay.
        let mut c = hub.join(&topic("t"));
        hub.dispatch(&topic("t"), event(2));
        tokio::task::yield_now().await;
        assert_eq!(received(&mut c), ["2-0"]);
        assert_eq!(relays_on_this_thread(), 1);
    }

    #[tokio::test]
    async fn a_relay_that_falls_behind_closes_its_receivers() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(16, tx, Duration::ZERO));
        let _direct: Vec<Membership> = (0..DIRECT_MEMBERS).map(|_| hub.join(&topic("t"))).collect();
        let mut m = hub.join(&topic("t"));
        // The relay has no chance to run: more than the buffer is dispatched at once.
        for ms in 1..=40 {
            hub.dispatch(&topic("t"), event(ms));
        }
        tokio::task::yield_now().await;
        assert!(matches!(
            m.receiver.recv().await,
            Err(broadcast::RecvError::Closed)
        ));
    }
}
