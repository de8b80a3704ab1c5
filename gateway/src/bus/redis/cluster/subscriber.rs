//! `ClusterSubscriber`: this replica's sharded pub/sub over a Redis Cluster. One connection
//! per primary (`Link`), never one per topic; each topic is subscribed (`SSUBSCRIBE`) on the
//! primary that owns its slot, and every (re)subscription is followed by a backfill from the
//! topic's stream after the last event delivered. The slot map is asked again whenever it may
//! have changed: a link lost, an unsolicited `sunsubscribe` (Redis sends one for each channel
//! whose slot left the node: a migration, a failover), a subscription unconfirmed in time.
//!
//! The subscription state is driven by what the server pushes (`ssubscribe`, `sunsubscribe`,
//! `smessage`), never by which reply redis-rs matched to which command: an unsolicited
//! `sunsubscribe` can be taken as the reply to a pending command. A topic's events are
//! dispatched only from the link its subscription was confirmed on, so they stay in stream
//! order, and whatever a link missed is read back from the stream.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_routing::{self, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{PushInfo, PushKind, Value};
use ssegw_protocol::{script, Topic};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{slot, split_addr, topic_slot, ClusterCommands, NodeAddr, SlotMap, SLOTS};
use crate::bus::redis::reply::unavailable;
use crate::bus::redis::subscriber::{catch_up, event_of, Backoff, ReadMany};
use crate::bus::{BusError, Page};
use crate::fanout::event::Event;
use crate::fanout::hub::{Channel, Hub, Interest};

/// Channels per pipelined burst of `SSUBSCRIBE`s (one channel each: every topic has a slot of
/// its own, and one `SSUBSCRIBE` may only name channels of one slot).
const SUBSCRIBE_BATCH: usize = 1000;
/// How often the slot map is asked again when nothing suggested a change: this finds a primary
/// that joined without taking slots from anything this replica subscribed.
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// The canaries' and pending subscriptions' clock.
const TICK: Duration = Duration::from_millis(100);

impl ReadMany for ClusterCommands {
    fn read_many(
        &self,
        requests: &[(&Topic, Option<ssegw_protocol::StreamId>)],
        count: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Page>, BusError>> + Send {
        ClusterCommands::read_many(self, requests, count)
    }
}

pub(in crate::bus::redis) struct ClusterSubscriber {
    pub(in crate::bus::redis) commands: Arc<ClusterCommands>,
    pub(in crate::bus::redis) hub: Arc<Hub>,
    pub(in crate::bus::redis) interest: mpsc::UnboundedReceiver<Interest>,
    pub(in crate::bus::redis) ready: Arc<AtomicBool>,
    /// Unique to this replica: its canary channels are named after it.
    pub(in crate::bus::redis) replica: String,
    pub(in crate::bus::redis) canary_interval: Duration,
    pub(in crate::bus::redis) shutdown: CancellationToken,
}

/// What the server pushed on one link, tagged with the link it came from. Sent by redis-rs's
/// connection task for each link (without blocking it: the channel is unbounded, and the
/// subscriber drains it continuously); received by the subscriber's loop.
type Pushed = (u64, PushInfo);

/// Tags a link's pushes with the link's id.
struct Tagged {
    link: u64,
    sender: mpsc::UnboundedSender<Pushed>,
}

impl redis::aio::AsyncPushSender for Tagged {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        self.sender
            .send((self.link, info))
            .map_err(|_| redis::aio::SendError)
    }
}

/// What the subscriber's own tasks report back: a link connected (or not), a burst of
/// subscribe commands that failed. Sent by tasks the loop spawns; received by the loop.
enum Report {
    Connected {
        addr: NodeAddr,
        link: u64,
        result: Result<MultiplexedConnection, BusError>,
    },
    /// Commands sent on a link failed (a stale slot map answers `MOVED`): the map is asked
    /// again, and whatever is still unconfirmed there is routed anew.
    CommandFailed { link: u64, reason: String },
}

/// One sharded pub/sub connection to a primary.
struct Link {
    id: u64,
    /// The link's `SSUBSCRIBE`s and `SUNSUBSCRIBE`s, in the order they must reach Redis (a
    /// topic left and joined again must not be joined first). Sent by the subscriber's loop;
    /// received by the link's sender task (`send_in_order`), which ends when the link is
    /// dropped. Unbounded: the loop must never wait on Redis to queue a command, and the
    /// commands are bounded by the topics the hub serves.
    commands: mpsc::UnboundedSender<(&'static str, Vec<String>)>,
    /// This replica's canary channel on the primary: one whose slot the primary owns.
    canary_channel: String,
    canary: Canary,
    /// Topics whose `SUNSUBSCRIBE` was sent and not yet confirmed: their `sunsubscribe` is
    /// expected, not a sign that the slot moved.
    leaving: HashSet<Topic>,
}

/// Where a topic is subscribed.
struct Route {
    node: NodeAddr,
    link: u64,
    /// The server confirmed the subscription (`ssubscribe` pushed): events come from here.
    confirmed: bool,
    /// When the `SSUBSCRIBE` was sent, while unconfirmed.
    sent: Instant,
}

/// The canary of one link: one in flight at a time, the next an interval after the last
/// arrived.
struct Canary {
    /// The canary channel's subscription is confirmed: canaries can be sent.
    subscribed: bool,
    /// When its `SSUBSCRIBE` was sent: a link that cannot confirm it in time is dropped.
    asked: Instant,
    seq: u64,
    /// When the one in flight left.
    in_flight: Option<Instant>,
    next: Instant,
    /// A canary came back since the link was made.
    verified: bool,
}

struct State {
    map: SlotMap,
    /// The map is to be asked again at `next_refresh` (soon after something suggested a
    /// change; every `REFRESH_INTERVAL` otherwise).
    next_refresh: Instant,
    refresh_backoff: Backoff,
    links: HashMap<NodeAddr, Link>,
    /// Links being made, by the id they will have.
    connecting: HashMap<NodeAddr, u64>,
    /// Primaries that took over slots while the replica was ready (a failover, a new node),
    /// and until when their link counts as healthy before its first canary returns: a
    /// handover between reachable nodes is not an outage.
    grace: HashMap<NodeAddr, Instant>,
    next_link: u64,
    /// Every topic the hub serves that is subscribed or being subscribed somewhere.
    routes: HashMap<Topic, Route>,
    /// Topics the hub serves that are subscribed nowhere: their primary is unknown or
    /// unreachable, or their slot just moved.
    homeless: HashSet<Topic>,
    /// Topics confirmed on their link, waiting for their backfill, with the events their link
    /// pushed meanwhile (dispatched after the backfill, so that no event overtakes it).
    catching_up: HashMap<Topic, Vec<Arc<Event>>>,
    ready: bool,
    /// When the routes were last scanned for subscriptions unconfirmed in time.
    stale_scan: Instant,
}

impl ClusterSubscriber {
    pub(in crate::bus::redis) async fn run(mut self) {
        let (push_sender, mut pushes) = mpsc::unbounded_channel::<Pushed>();
        let (report_sender, mut reports) = mpsc::unbounded_channel::<Report>();
        let mut state = State {
            map: SlotMap::default(),
            next_refresh: Instant::now(),
            refresh_backoff: Backoff::default(),
            links: HashMap::new(),
            connecting: HashMap::new(),
            grace: HashMap::new(),
            next_link: 0,
            routes: HashMap::new(),
            homeless: HashSet::new(),
            catching_up: HashMap::new(),
            ready: false,
            stale_scan: Instant::now(),
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if Instant::now() >= state.next_refresh {
                self.refresh(&mut state, &push_sender, &report_sender).await;
            }
            self.update_readiness(&mut state);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                Some(first) = pushes.recv() => {
                    self.on_push(&mut state, first);
                    while let Ok(more) = pushes.try_recv() {
                        self.on_push(&mut state, more);
                    }
                    self.finish_catching_up(&mut state).await;
                }
                Some(first) = self.interest.recv() => {
                    let mut batch = vec![first];
                    while let Ok(more) = self.interest.try_recv() {
                        batch.push(more);
                    }
                    self.apply(&mut state, batch);
                    self.finish_catching_up(&mut state).await;
                }
                Some(report) = reports.recv() => self.on_report(&mut state, report, &report_sender),
                _ = tick.tick() => self.on_tick(&mut state),
                _ = tokio::time::sleep_until(state.next_refresh) => {}
            }
        }
    }

    /// Ready while every slot has a primary and every primary's canary came back in time (or
    /// the primary just took over from a reachable one, and its first canary is not due yet).
    fn update_readiness(&self, state: &mut State) {
        let primaries = state.map.primaries();
        let now = Instant::now();
        let missing: Vec<&NodeAddr> = primaries
            .iter()
            .filter(|p| {
                let verified = state.links.get(*p).is_some_and(|l| l.canary.verified);
                let handover = state.grace.get(*p).is_some_and(|until| now < *until)
                    && (state.links.contains_key(*p) || state.connecting.contains_key(*p));
                !(verified || handover)
            })
            .collect();
        let ready = state.map.covers_all() && missing.is_empty();
        if ready != state.ready {
            state.ready = ready;
            self.ready.store(ready, Ordering::Release);
            if ready {
                tracing::info!(
                    primaries = primaries.len(),
                    topics = state.routes.len(),
                    "Redis cluster links verified on every primary; ready"
                );
            } else {
                tracing::warn!(
                    unverified = ?missing,
                    covers_all_slots = state.map.covers_all(),
                    "a Redis cluster shard is unreachable or unverified; not ready"
                );
            }
        }
    }

    /// Asks the cluster for its slot map, drops links to nodes that are no longer primaries,
    /// moves topics whose slot changed primary, makes links to new primaries, and routes every
    /// topic that has nowhere to live.
    async fn refresh(
        &self,
        state: &mut State,
        pushes: &mpsc::UnboundedSender<Pushed>,
        reports: &mpsc::UnboundedSender<Report>,
    ) {
        let map = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            map = self.commands.slot_map() => map,
        };
        let map = match map {
            Ok(map) if !map.primaries().is_empty() => map,
            Ok(_) => {
                tracing::warn!("the Redis cluster serves no slots yet");
                state.next_refresh = Instant::now() + state.refresh_backoff.next_delay();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Redis cluster's slot map");
                state.next_refresh = Instant::now() + state.refresh_backoff.next_delay();
                return;
            }
        };
        if map != state.map {
            tracing::info!(primaries = ?map.primaries(), covers_all_slots = map.covers_all(), "Redis cluster slot map");
            if state.ready {
                let known = state.map.primaries();
                let until = Instant::now() + self.commands.timeout;
                for primary in map.primaries() {
                    if !known.contains(&primary) {
                        state.grace.insert(primary, until);
                    }
                }
            }
            state.grace.retain(|_, until| Instant::now() < *until);
        }
        let changed = map != state.map;
        state.map = map;
        // Until everything is back in place, the map is asked again soon: the node that
        // answered may not have heard of the change yet (gossip takes a moment).
        let settled = state.ready
            && state.homeless.is_empty()
            && state.routes.values().all(|r| r.confirmed)
            && state.connecting.is_empty();
        if changed || settled {
            state.refresh_backoff.reset();
        }
        state.next_refresh = Instant::now()
            + if settled {
                REFRESH_INTERVAL
            } else {
                state.refresh_backoff.next_delay()
            };
        let primaries: HashSet<NodeAddr> = state.map.primaries().into_iter().collect();
        let gone: Vec<NodeAddr> = state
            .links
            .keys()
            .filter(|addr| !primaries.contains(*addr))
            .cloned()
            .collect();
        for addr in gone {
            self.drop_link(state, &addr, "the node is no longer a primary");
        }
        // Topics whose slot is served elsewhere now: leave the old primary (when it still
        // lets us know) and find the new one.
        let moved: Vec<Topic> = state
            .routes
            .iter()
            .filter(|(topic, route)| state.map.owner(topic_slot(topic)) != Some(&route.node))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in moved {
            let route = state.routes.remove(&topic).expect("listed above");
            state.catching_up.remove(&topic);
            if let Some(link) = state.links.get_mut(&route.node) {
                link.leaving.insert(topic.clone());
                send(link, "SUNSUBSCRIBE", vec![script::channel(&topic)]);
            }
            state.homeless.insert(topic);
        }
        // A canary channel whose slot moved away is replaced by one the node still owns; one
        // the node let go of is subscribed again.
        for (addr, link) in state.links.iter_mut() {
            let owned = state.map.owner(slot(link.canary_channel.as_bytes())) == Some(addr);
            if owned && link.canary.subscribed {
                continue;
            }
            if let Some(channel) = canary_channel(&self.replica, &state.map, addr) {
                link.canary_channel = channel;
                link.canary.subscribed = false;
                link.canary.in_flight = None;
                link.canary.asked = Instant::now();
                send(link, "SSUBSCRIBE", vec![link.canary_channel.clone()]);
            }
        }
        for addr in primaries {
            if !state.links.contains_key(&addr) && !state.connecting.contains_key(&addr) {
                self.connect(state, addr, pushes, reports);
            }
        }
        self.route_homeless(state);
    }

    /// Makes a link to the primary at `addr` in a task of its own (checking its function
    /// library first); the outcome comes back as a `Report::Connected`.
    fn connect(
        &self,
        state: &mut State,
        addr: NodeAddr,
        pushes: &mpsc::UnboundedSender<Pushed>,
        reports: &mpsc::UnboundedSender<Report>,
    ) {
        state.next_link += 1;
        let link = state.next_link;
        state.connecting.insert(addr.clone(), link);
        let commands = self.commands.clone();
        let tagged = Tagged {
            link,
            sender: pushes.clone(),
        };
        let reports = reports.clone();
        tokio::spawn(async move {
            let result = async {
                commands.load_library_on(&addr).await?;
                let (host, port) = split_addr(&addr)
                    .ok_or_else(|| BusError::Unavailable(format!("not host:port: {addr}")))?;
                let info = commands.target.node(host, port).map_err(unavailable)?;
                // RESP3: pushes arrive apart from replies, through `tagged`.
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(redis::ProtocolVersion::RESP3);
                let info = info.set_redis_settings(settings);
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(commands.timeout))
                    .set_response_timeout(Some(commands.timeout))
                    .set_push_sender(tagged);
                let client = redis::Client::open(info).map_err(unavailable)?;
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(unavailable)
            }
            .await;
            let _ = reports.send(Report::Connected { addr, link, result });
        });
    }

    fn on_report(
        &self,
        state: &mut State,
        report: Report,
        reports: &mpsc::UnboundedSender<Report>,
    ) {
        match report {
            Report::Connected { addr, link, result } => {
                if state.connecting.get(&addr) != Some(&link) {
                    return;
                }
                state.connecting.remove(&addr);
                let conn = match result {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(node = %addr, error = %e, "cannot reach a Redis cluster primary");
                        state.grace.remove(&addr);
                        self.soon_refresh(state);
                        return;
                    }
                };
                let Some(canary_channel) = canary_channel(&self.replica, &state.map, &addr) else {
                    // The node lost its slots while we connected.
                    self.soon_refresh(state);
                    return;
                };
                let (commands, queued) = mpsc::unbounded_channel();
                tokio::spawn(send_in_order(link, conn, queued, reports.clone()));
                let link = Link {
                    id: link,
                    commands,
                    canary_channel,
                    canary: Canary {
                        subscribed: false,
                        asked: Instant::now(),
                        seq: 0,
                        in_flight: None,
                        next: Instant::now(),
                        verified: false,
                    },
                    leaving: HashSet::new(),
                };
                send(&link, "SSUBSCRIBE", vec![link.canary_channel.clone()]);
                tracing::info!(node = %addr, "sharded pub/sub link to a Redis cluster primary");
                state.links.insert(addr, link);
                self.route_homeless(state);
            }
            Report::CommandFailed { link, reason } => {
                let Some(addr) = state
                    .links
                    .iter()
                    .find(|(_, l)| l.id == link)
                    .map(|(addr, _)| addr.clone())
                else {
                    return;
                };
                tracing::warn!(node = %addr, %reason, "a sharded pub/sub command failed; asking the cluster for its slot map again");
                // Whatever is unconfirmed there is routed anew once the map is read.
                let unconfirmed: Vec<Topic> = state
                    .routes
                    .iter()
                    .filter(|(_, r)| r.link == link && !r.confirmed)
                    .map(|(t, _)| t.clone())
                    .collect();
                for topic in unconfirmed {
                    state.routes.remove(&topic);
                    state.homeless.insert(topic);
                }
                self.soon_refresh(state);
            }
        }
    }

    /// Subscribes every homeless topic that the hub still serves on its slot's primary, where
    /// a link to it is up.
    fn route_homeless(&self, state: &mut State) {
        let mut bursts: HashMap<NodeAddr, Vec<Topic>> = HashMap::new();
        for topic in std::mem::take(&mut state.homeless) {
            if self.hub.channel(&topic).is_none() {
                continue;
            }
            match state.map.owner(topic_slot(&topic)) {
                Some(node) if state.links.contains_key(node) => {
                    bursts.entry(node.clone()).or_default().push(topic);
                }
                _ => {
                    state.homeless.insert(topic);
                }
            }
        }
        for (node, topics) in bursts {
            let link = state.links.get_mut(&node).expect("checked above");
            for topics in topics.chunks(SUBSCRIBE_BATCH) {
                let channels = topics.iter().map(script::channel).collect();
                send(link, "SSUBSCRIBE", channels);
            }
            for topic in topics {
                state.routes.insert(
                    topic,
                    Route {
                        node: node.clone(),
                        link: link.id,
                        confirmed: false,
                        sent: Instant::now(),
                    },
                );
            }
        }
    }

    /// Applies the hub's interest changes: new topics are routed; topics nobody here follows
    /// any more are left.
    fn apply(&self, state: &mut State, batch: Vec<Interest>) {
        // Later changes to a topic override earlier ones in the same batch.
        let mut wanted: HashMap<Topic, bool> = HashMap::new();
        for interest in batch {
            match interest {
                Interest::Subscribe(channel) => wanted.insert(channel.topic.clone(), true),
                Interest::Unsubscribe(topic) => wanted.insert(topic, false),
            };
        }
        let mut leave: HashMap<NodeAddr, Vec<String>> = HashMap::new();
        for (topic, join) in wanted {
            let served = self.hub.channel(&topic).is_some();
            if join && served {
                match state.routes.get(&topic) {
                    None => {
                        state.homeless.insert(topic);
                    }
                    // The topic was left and joined again before its subscription went: the
                    // new channel is brought up to date on the subscription in place.
                    Some(route) if route.confirmed => {
                        state.catching_up.entry(topic).or_default();
                    }
                    // Its confirmation will bring whichever channel is current up to date.
                    Some(_) => {}
                }
            } else if !served {
                state.homeless.remove(&topic);
                state.catching_up.remove(&topic);
                if let Some(route) = state.routes.remove(&topic) {
                    if let Some(link) = state.links.get_mut(&route.node) {
                        link.leaving.insert(topic.clone());
                        leave
                            .entry(route.node)
                            .or_default()
                            .push(script::channel(&topic));
                    }
                }
            }
        }
        for (node, channels) in leave {
            let link = state.links.get_mut(&node).expect("checked above");
            for channel in channels {
                send(link, "SUNSUBSCRIBE", vec![channel]);
            }
        }
        self.route_homeless(state);
    }

    /// Handles one push from a link: a confirmation, a server-initiated `sunsubscribe`, a
    /// message, or the link's end.
    fn on_push(&self, state: &mut State, (link_id, push): Pushed) {
        let Some(addr) = state
            .links
            .iter()
            .find(|(_, l)| l.id == link_id)
            .map(|(addr, _)| addr.clone())
        else {
            // A link dropped already: its subscriptions are routed elsewhere and backfilled.
            return;
        };
        let channel = push.data.first().and_then(text).unwrap_or_default();
        match push.kind {
            PushKind::Disconnection => {
                self.drop_link(state, &addr, "the connection closed");
                self.soon_refresh(state);
            }
            PushKind::SSubscribe => {
                let link = state.links.get_mut(&addr).expect("found above");
                if channel == link.canary_channel {
                    link.canary.subscribed = true;
                    return;
                }
                let Some(topic) = script::topic_of_channel(&channel) else {
                    return;
                };
                if let Some(route) = state.routes.get_mut(&topic) {
                    if route.link == link_id && !route.confirmed {
                        route.confirmed = true;
                        state.catching_up.entry(topic).or_default();
                    }
                }
            }
            PushKind::SUnsubscribe => {
                let link = state.links.get_mut(&addr).expect("found above");
                if channel == link.canary_channel {
                    // The canary channel's slot left the node: pick another at the refresh
                    // (and drop the link if none is confirmed in time).
                    link.canary.subscribed = false;
                    link.canary.in_flight = None;
                    link.canary.asked = Instant::now();
                    self.soon_refresh(state);
                    return;
                }
                let Some(topic) = script::topic_of_channel(&channel) else {
                    return;
                };
                if link.leaving.remove(&topic) {
                    return;
                }
                if state.routes.get(&topic).is_some_and(|r| r.link == link_id) {
                    // Redis let go of the channel: its slot moved (a migration, a failover).
                    tracing::info!(%topic, node = %addr, "Redis moved the topic's slot; subscribing it where it lives now");
                    state.routes.remove(&topic);
                    state.catching_up.remove(&topic);
                    state.homeless.insert(topic);
                    self.soon_refresh(state);
                }
            }
            PushKind::SMessage => {
                let payload = match push.data.get(1) {
                    Some(Value::BulkString(payload)) => payload.as_slice(),
                    _ => return,
                };
                let link = state.links.get_mut(&addr).expect("found above");
                if channel == link.canary_channel {
                    if link.canary.in_flight.is_some()
                        && payload == link.canary.seq.to_string().as_bytes()
                    {
                        let sent = link.canary.in_flight.take().expect("checked");
                        self.hub
                            .stats()
                            .canary_rtt
                            .record(sent.elapsed().as_secs_f64(), &[]);
                        link.canary.verified = true;
                        link.canary.next = Instant::now() + self.canary_interval;
                    }
                    return;
                }
                let Some(topic) = script::topic_of_channel(&channel) else {
                    return;
                };
                let Some(event) = event_of(payload) else {
                    tracing::warn!(%topic, "ignoring malformed channel message");
                    return;
                };
                // Only the link the topic's subscription was confirmed on delivers it, in
                // stream order; what any other link had is read back from the stream.
                if !state
                    .routes
                    .get(&topic)
                    .is_some_and(|r| r.link == link_id && r.confirmed)
                {
                    return;
                }
                match state.catching_up.get_mut(&topic) {
                    Some(held) => held.push(event),
                    None => self.hub.dispatch(&topic, event),
                }
            }
            _ => {}
        }
    }

    /// Backfills every topic confirmed since the last call, then dispatches the events their
    /// links pushed meanwhile (the backfill's duplicates are dropped by the channel). A topic
    /// whose read fails is routed anew.
    async fn finish_catching_up(&self, state: &mut State) {
        if state.catching_up.is_empty() {
            return;
        }
        let held = std::mem::take(&mut state.catching_up);
        let channels: Vec<Arc<Channel>> = held
            .keys()
            .filter_map(|topic| self.hub.channel(topic))
            .collect();
        let outcome = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            outcome = catch_up(&self.hub, &*self.commands, channels) => outcome,
        };
        match outcome {
            Ok(()) => {
                for (topic, events) in held {
                    for event in events {
                        self.hub.dispatch(&topic, event);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, topics = held.len(), "cannot read topics' history after subscribing; subscribing them again");
                // Subscribed again once routed: the new confirmation starts a new read.
                for topic in held.into_keys() {
                    state.routes.remove(&topic);
                    state.homeless.insert(topic);
                }
                self.soon_refresh(state);
            }
        }
    }

    /// Sends canaries that are due, drops links whose canary is overdue, and routes anew
    /// subscriptions that were not confirmed in time.
    fn on_tick(&self, state: &mut State) {
        let timeout = self.commands.timeout;
        let now = Instant::now();
        let overdue: Vec<NodeAddr> = state
            .links
            .iter()
            .filter(|(_, l)| {
                l.canary.in_flight.is_some_and(|sent| now - sent > timeout)
                    || (!l.canary.subscribed && now - l.canary.asked > timeout)
            })
            .map(|(addr, _)| addr.clone())
            .collect();
        for addr in overdue {
            self.drop_link(
                state,
                &addr,
                &format!("canary not subscribed or not received within {timeout:?}"),
            );
            self.soon_refresh(state);
        }
        for link in state.links.values_mut() {
            if !link.canary.subscribed || link.canary.in_flight.is_some() || now < link.canary.next
            {
                continue;
            }
            link.canary.seq += 1;
            link.canary.in_flight = Some(now);
            let mut publish = redis::cmd("SPUBLISH");
            publish.arg(&link.canary_channel).arg(link.canary.seq);
            let commands = self.commands.clone();
            // Routed by the canary channel's slot, which this link's primary owns: the cluster
            // connection follows a `MOVED` should its own map be older than ours.
            let route =
                cluster_routing::Route::new(slot(link.canary_channel.as_bytes()), SlotAddr::Master);
            let node = Some(RoutingInfo::SingleNode(
                SingleNodeRoutingInfo::SpecificNode(route),
            ));
            // Through the command path to this link's primary: a failure shows as a canary that
            // does not arrive.
            tokio::spawn(async move {
                if let Ok(mut conn) = commands.connection().await {
                    let _ = commands.run(&mut conn, publish, node).await;
                }
            });
        }
        // Scanning every route is linear in the topics: once per Redis timeout is enough to
        // find those unconfirmed for longer.
        if now - state.stale_scan < timeout {
            return;
        }
        state.stale_scan = now;
        let stale: Vec<Topic> = state
            .routes
            .iter()
            .filter(|(_, r)| !r.confirmed && now - r.sent > timeout)
            .map(|(t, _)| t.clone())
            .collect();
        if !stale.is_empty() {
            tracing::warn!(
                topics = stale.len(),
                "sharded subscriptions unconfirmed in time; routing them again"
            );
            for topic in stale {
                state.routes.remove(&topic);
                state.homeless.insert(topic);
            }
            self.soon_refresh(state);
        }
    }

    /// Forgets the link to `addr`; its topics have nowhere to live until routed again.
    fn drop_link(&self, state: &mut State, addr: &NodeAddr, why: &str) {
        let Some(link) = state.links.remove(addr) else {
            return;
        };
        tracing::warn!(node = %addr, %why, "lost the sharded pub/sub link to a Redis cluster primary");
        let stats = self.hub.stats();
        stats.record(&stats.redis_reconnects);
        let orphans: Vec<Topic> = state
            .routes
            .iter()
            .filter(|(_, r)| r.link == link.id)
            .map(|(t, _)| t.clone())
            .collect();
        for topic in orphans {
            state.routes.remove(&topic);
            state.catching_up.remove(&topic);
            state.homeless.insert(topic);
        }
    }

    /// Asks for the slot map again soon: at once, or after a backoff when it was asked a
    /// moment ago.
    fn soon_refresh(&self, state: &mut State) {
        let soon = Instant::now() + state.refresh_backoff.next_delay();
        if soon < state.next_refresh {
            state.next_refresh = soon;
        }
    }
}

/// Queues `command` (`SSUBSCRIBE` or `SUNSUBSCRIBE`) once per channel on the link: the
/// confirmations come back as pushes; a failure is reported.
fn send(link: &Link, command: &'static str, channels: Vec<String>) {
    // The sender task is gone only with the link's connection: its topics are routed anew.
    let _ = link.commands.send((command, channels));
}

/// Sends a link's queued commands one pipeline after the other, each once per channel, so that
/// they reach Redis in the order they were queued; reports a failure.
async fn send_in_order(
    link: u64,
    mut conn: MultiplexedConnection,
    mut queued: mpsc::UnboundedReceiver<(&'static str, Vec<String>)>,
    reports: mpsc::UnboundedSender<Report>,
) {
    while let Some((command, channels)) = queued.recv().await {
        let mut pipe = redis::pipe();
        for channel in &channels {
            pipe.cmd(command).arg(channel);
        }
        if let Err(e) = conn.send_packed_commands(&pipe, 0, channels.len()).await {
            let _ = reports.send(Report::CommandFailed {
                link,
                reason: super::super::reply::explain(&e),
            });
        }
    }
}

/// A canary channel for this replica whose slot `node` owns, `ssegw:canary:{<tag>}:<replica>`;
/// `None` if it owns none. (It was `{<replica>:<n>}` for the first `n` below 100,000 that hashed
/// there: about one slot in a hundred has no such `n` for a given replica, and a replica whose
/// node served only such a slot made no link to it and stayed not ready.)
fn canary_channel(replica: &str, map: &SlotMap, node: &NodeAddr) -> Option<String> {
    let served: usize = map
        .slots_of(node)
        .map(|(first, last)| usize::from(last - first) + 1)
        .sum();
    // One of the node's slots, the replica's own pick among them (so that replicas' canaries
    // spread over the node's slots rather than all moving when its first one does).
    let mut pick = usize::from(slot(replica.as_bytes())) % served.max(1);
    for (first, last) in map.slots_of(node) {
        let count = usize::from(last - first) + 1;
        if pick < count {
            let chosen = first + u16::try_from(pick).ok()?;
            return Some(format!(
                "ssegw:canary:{{{}}}:{replica}",
                slot_tags()[usize::from(chosen)]
            ));
        }
        pick -= count;
    }
    None
}

/// For every slot, a tag of one to three letters or digits whose slot it is: as a channel's
/// hash tag it puts the channel on any slot wanted, however few slots a node serves (a node
/// that has just joined may serve one). Found once, by trying the tags in order: those of up
/// to three characters cover every slot.
fn slot_tags() -> &'static [String] {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    TAGS.get_or_init(|| {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = tags.len();
        let mut tag = Vec::with_capacity(3);
        for length in 1..=3u32 {
            for mut n in 0..ALPHABET.len().pow(length) {
                tag.clear();
                for _ in 0..length {
                    tag.push(ALPHABET[n % ALPHABET.len()]);
                    n /= ALPHABET.len();
                }
                let entry = &mut tags[usize::from(slot(&tag))];
                if entry.is_empty() {
                    *entry = String::from_utf8_lossy(&tag).into_owned();
                    missing -= 1;
                    if missing == 0 {
                        return tags;
                    }
                }
            }
        }
        tags
    })
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_tag() {
        for (at, tag) in slot_tags().iter().enumerate() {
            assert!(!tag.is_empty() && tag.len() <= 3, "slot {at}: {tag:?}");
            assert_eq!(usize::from(slot(tag.as_bytes())), at, "{tag:?}");
        }
    }

    /// Whichever single slot a node serves, each replica's canary channel is on it; with more
    /// slots, on one of them; with none, there is none.
    #[test]
    fn a_canary_channel_on_a_node_of_one_slot() {
        let replicas = [
            "7f1e3c52-2b7e-4e0a-9f55-3f7c2d1a9b10",
            "0b9d4a61-5c2f-4f6e-8d3a-1e2f3a4b5c6d",
        ];
        let node = "10.0.0.4:6379".to_string();
        let other = "10.0.0.5:6379".to_string();
        for alone in 0..SLOTS {
            let mut ranges = Vec::new();
            if alone > 0 {
                ranges.push((0, alone - 1, other.clone()));
            }
            ranges.push((alone, alone, node.clone()));
            if alone < SLOTS - 1 {
                ranges.push((alone + 1, SLOTS - 1, other.clone()));
            }
            let map = SlotMap { ranges };
            for replica in replicas {
                let channel = canary_channel(replica, &map, &node).expect("a channel");
                assert_eq!(slot(channel.as_bytes()), alone, "{channel}");
                assert!(channel.starts_with("ssegw:canary:{") && channel.ends_with(replica));
            }
        }
        let map = SlotMap {
            ranges: vec![
                (0, 99, node.clone()),
                (100, 16000, other.clone()),
                (16001, SLOTS - 1, node.clone()),
            ],
        };
        for replica in replicas {
            let channel = canary_channel(replica, &map, &node).expect("a channel");
            assert_eq!(
                map.owner(slot(channel.as_bytes())),
                Some(&node),
                "{channel}"
            );
        }
        assert_eq!(
            canary_channel(replicas[0], &map, &"10.0.0.9:6379".to_string()),
            None
        );
    }
}
