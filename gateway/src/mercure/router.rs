//! Routes the Mercure hub's log to the subscriptions of one worker thread. The thread's
//! `Router` is the log topic's one member there: it matches each update against an index of
//! its subscriptions' selectors (exact topics in a map, URI templates tried one by one, `*`
//! always) and hands the update only to those it matches and, for a private update, whose
//! token allows it. A subscription thus waits for its own updates only: updates it would
//! filter out never wake it, and never make it lag. No I/O; it lives while its thread has
//! subscriptions.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use slab::Slab;
use ssegw_protocol::mercure::selector::Selector;
use ssegw_protocol::Topic;
use tokio::sync::{mpsc, Notify};

use super::subscribe::Filter;
use crate::fanout::broadcast::RecvError;
use crate::fanout::event::{Delivery, Event};
use crate::fanout::hub::{Channel, Hub, Membership};

/// How far a router may fall behind the log before its subscriptions must catch up from the
/// log themselves (each reading and decoding history pages: dear at high rates). A router does
/// little per update, so it falls behind only in bursts; the queue holds only what it has yet
/// to read.
const ROUTER_BUFFER: usize = 8192;

thread_local! {
    /// This thread's router, while it has subscriptions.
    static ROUTER: RefCell<Option<Rc<Router>>> = const { RefCell::new(None) };
}

/// One subscription's end: the deliveries routed to it, in log order, and whether some were
/// dropped because it let `receiver` fill up (it must then catch up from the log). Leaves
/// the index on drop.
pub struct Subscription {
    /// Bounded by the hub's capacity (`--client-buffer`): the router never waits for a
    /// subscription; when it is full, the router drops what follows and sets `lagged`.
    pub receiver: mpsc::Receiver<Delivery>,
    pub lagged: Rc<Cell<bool>>,
    /// Set with `lagged` when the router itself fell behind the log: not the client's doing.
    pub router_lagged: Rc<Cell<bool>>,
    key: usize,
    router: Rc<Router>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.router.remove(self.key);
    }
}

struct Entry {
    sender: mpsc::Sender<Delivery>,
    filter: Rc<Filter>,
    lagged: Rc<Cell<bool>>,
    router_lagged: Rc<Cell<bool>>,
    /// Something went to it since the last keep-alive tick.
    sent: Cell<bool>,
}

#[derive(Default)]
struct Index {
    entries: Slab<Entry>,
    /// Exact selectors: the topic, and the entries that name it.
    exact: HashMap<Box<str>, Vec<usize>>,
    /// URI templates, each with its entry.
    templates: Vec<(Selector, usize)>,
    /// Entries with a `*` selector.
    any: Vec<usize>,
}

pub struct Router {
    /// Borrowed only by the synchronous calls below, never across an `.await`.
    index: RefCell<Index>,
    /// Told when the last subscription left: the router's task then ends.
    emptied: Notify,
    channel: Arc<Channel>,
}

/// Registers a subscription with `filter` on this thread's router of `log`, starting the
/// router if the thread has none. Returns the subscription and the log's channel (to wait
/// until it is ready: what the log delivers from then on reaches the subscription).
pub fn subscribe(
    hub: &Arc<Hub>,
    log: &Topic,
    filter: Rc<Filter>,
    keepalive: Duration,
) -> (Subscription, Arc<Channel>) {
    let router = ROUTER.with(|current| {
        let mut current = current.borrow_mut();
        current
            .get_or_insert_with(|| {
                let membership = hub.join_buffered(log, ROUTER_BUFFER.max(hub.capacity()));
                let router = Rc::new(Router {
                    index: RefCell::default(),
                    emptied: Notify::new(),
                    channel: membership.channel.clone(),
                });
                tokio::task::spawn_local(route(membership, router.clone(), keepalive));
                router
            })
            .clone()
    });
    let (sender, receiver) = mpsc::channel(hub.capacity());
    let lagged = Rc::new(Cell::new(false));
    let router_lagged = Rc::new(Cell::new(false));
    let key = router.insert(Entry {
        sender,
        filter,
        lagged: lagged.clone(),
        router_lagged: router_lagged.clone(),
        sent: Cell::new(false),
    });
    let channel = router.channel.clone();
    (
        Subscription {
            receiver,
            lagged,
            router_lagged,
            key,
            router,
        },
        channel,
    )
}

impl Router {
    fn insert(&self, entry: Entry) -> usize {
        let mut index = self.index.borrow_mut();
        let selectors = entry.filter.selectors.clone();
        let key = index.entries.insert(entry);
        for selector in selectors {
            if selector.as_str() == "*" {
                index.any.push(key);
            } else if selector.is_template() {
                index.templates.push((selector, key));
            } else {
                index
                    .exact
                    .entry(selector.as_str().into())
                    .or_default()
                    .push(key);
            }
        }
        key
    }

    fn remove(&self, key: usize) {
        let mut index = self.index.borrow_mut();
        // Gone already if the router ended first.
        let Some(entry) = index.entries.try_remove(key) else {
            return;
        };
        for selector in &entry.filter.selectors {
            if let Some(keys) = index.exact.get_mut(selector.as_str()) {
                keys.retain(|&k| k != key);
                if keys.is_empty() {
                    index.exact.remove(selector.as_str());
                }
            }
        }
        index.templates.retain(|&(_, k)| k != key);
        index.any.retain(|&k| k != key);
        if index.entries.is_empty() {
            self.emptied.notify_one();
        }
    }

    /// Hands `delivery` to the subscriptions it is for.
    fn route(&self, delivery: &Delivery) {
        match delivery {
            Delivery::Event(event) => self.route_event(event),
            Delivery::Batch(batch) => {
                for event in &batch.events {
                    self.route_event(event);
                }
            }
            // A gap in the log, a keep-alive of an idle log, the drain: for every one.
            other => {
                let index = self.index.borrow();
                for (_, entry) in &index.entries {
                    send(entry, other.clone());
                }
            }
        }
    }

    fn route_event(&self, event: &Arc<Event>) {
        let Some(update) = &event.mercure else {
            return;
        };
        let index = self.index.borrow();
        let mut keys: Vec<usize> = Vec::new();
        for topic in &update.topics {
            if let Some(named) = index.exact.get(topic.as_str()) {
                keys.extend(named);
            }
        }
        for (template, key) in &index.templates {
            if update.topics.iter().any(|topic| template.matches(topic)) {
                keys.push(*key);
            }
        }
        keys.extend(&index.any);
        // Once per subscription, however many of its selectors and the update's topics match.
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let entry = &index.entries[key];
            if update.private && !entry.filter.allows_private(update) {
                continue;
            }
            send(entry, Delivery::Event(event.clone()));
        }
    }

    /// Every keep-alive interval: a keep-alive to each subscription that was sent nothing
    /// since the last one, so that its connection is never silent for two intervals, however
    /// busy the log is with updates for others.
    fn keepalive(&self) {
        let index = self.index.borrow();
        for (_, entry) in &index.entries {
            if !entry.sent.replace(false) {
                send(entry, Delivery::Keepalive);
                entry.sent.set(false);
            }
        }
    }

    /// The router fell behind the log: every subscription catches up from the log itself.
    fn all_lagged(&self) {
        let index = self.index.borrow();
        for (_, entry) in &index.entries {
            lag(entry);
        }
    }
}

/// Never waits: a full subscription is marked lagged and sent nothing more until it caught up.
fn send(entry: &Entry, delivery: Delivery) {
    if entry.lagged.get() {
        return;
    }
    match entry.sender.try_send(delivery) {
        Ok(()) => entry.sent.set(true),
        // It has deliveries to read: it sees the mark once it has read them.
        Err(mpsc::error::TrySendError::Full(_)) => entry.lagged.set(true),
        // Its stream is ending.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Marks a subscription lagged, and wakes it: one waiting on an empty channel would
/// otherwise wait for a delivery that never comes (nothing is sent to a lagged one).
fn lag(entry: &Entry) {
    entry.router_lagged.set(true);
    if !entry.lagged.get() {
        // A keep-alive wakes it (or the channel is full and it is busy anyway).
        let _ = entry.sender.try_send(Delivery::Keepalive);
        entry.lagged.set(true);
    }
}

/// The router's task: the log topic's deliveries to the subscriptions, keep-alives, until the
/// last subscription leaves (or the hub goes away).
async fn route(mut membership: Membership, router: Rc<Router>, keepalive: Duration) {
    let mut ticks = tokio::time::interval(keepalive);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = router.emptied.notified() => {
                if router.index.borrow().entries.is_empty() {
                    break;
                }
            }
            _ = ticks.tick() => router.keepalive(),
            delivery = membership.receiver.recv() => match delivery {
                Ok(delivery) => router.route(&delivery),
                Err(RecvError::Lagged(_)) => {
                    membership.resubscribe();
                    router.all_lagged();
                }
                Err(RecvError::Closed) => break,
            },
        }
    }
    // In the same turn as the check above: a subscription that comes after starts a new router.
    ROUTER.with(|current| {
        let mut current = current.borrow_mut();
        if current.as_ref().is_some_and(|r| Rc::ptr_eq(r, &router)) {
            *current = None;
        }
    });
    // Subscriptions left when the hub closed see their channel end.
    let mut index = router.index.borrow_mut();
    index.entries.clear();
    index.exact.clear();
    index.templates.clear();
    index.any.clear();
}
