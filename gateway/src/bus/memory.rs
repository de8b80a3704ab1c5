//! The embedded bus: history and fan-out in this process, for a single node without Redis.
//! Same ids, retention and gap semantics as the Redis bus; nothing survives a restart. Its
//! presence is the hub's own counts, read when asked.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::retention::{Limits, Retention};
use ssegw_protocol::script::IdempotencyKey;
use ssegw_protocol::{StreamId, Topic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::presence::TopicPresence;
use super::{gap_for, BusError, Listing, Page, Publish, TrackOp, Tracked};
use crate::config::BusConfig;
use crate::fanout::event::Event;
use crate::fanout::hub::{Hub, Interest};

pub struct MemoryBus {
    logs: Arc<Mutex<HashMap<Topic, Log>>>,
    /// The flags' retention, its default alone: the embedded bus has no namespaces.
    retention: Arc<Retention>,
    /// Idempotency records: the first publish's id and a fingerprint of its event, until the
    /// deadline; dropped as they expire.
    first_publishes: Mutex<HashMap<(Topic, IdempotencyKey), FirstPublish>>,
    /// The Mercure hub's active subscriptions: id to document. Held while their updates are
    /// appended, so that a listing and the log's last update agree.
    mercure_subscriptions: Mutex<BTreeMap<String, String>>,
    hub: Arc<Hub>,
}

struct FirstPublish {
    id: StreamId,
    fingerprint: u64,
    until: Instant,
}

/// One topic's history, shaped like a Redis stream.
struct Log {
    entries: VecDeque<Arc<Event>>,
    head: StreamId,
    max_deleted: StreamId,
    touched: Instant,
}

impl MemoryBus {
    pub fn start(
        config: &BusConfig,
        hub: Arc<Hub>,
        mut interest: mpsc::UnboundedReceiver<Interest>,
        shutdown: CancellationToken,
    ) -> MemoryBus {
        let bus = MemoryBus {
            logs: Arc::new(Mutex::new(HashMap::new())),
            retention: Arc::new(Retention::new(config.retention_seed, 0)),
            first_publishes: Mutex::new(HashMap::new()),
            mercure_subscriptions: Mutex::new(BTreeMap::new()),
            hub,
        };
        let logs = bus.logs.clone();
        let ttl = Duration::from_secs(config.retention_seed.ttl_secs);
        tokio::spawn(async move {
            // Every topic is "subscribed" at once: events reach the hub straight from `publish`.
            let mut sweep = tokio::time::interval(ttl.min(Duration::from_secs(60)));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    Some(interest) = interest.recv() => {
                        if let Interest::Subscribe(channel) = interest {
                            let head = live_log(&mut logs.lock().expect("logs poisoned"), &channel.topic, ttl)
                                .map_or(StreamId::ZERO, |log| log.head);
                            channel.set_ready(head);
                        }
                    }
                    _ = sweep.tick() => {
                        logs.lock().expect("logs poisoned").retain(|_, log| log.touched.elapsed() < ttl);
                    }
                }
            }
        });
        bus
    }

    pub fn retention(&self) -> Arc<Retention> {
        self.retention.clone()
    }

    fn limits(&self) -> &Limits {
        self.retention.default_limits()
    }

    pub fn publish(&self, publish: &Publish<'_>) -> Result<StreamId, BusError> {
        let Publish {
            topic,
            event,
            data,
            traceparent,
            idempotency,
        } = *publish;
        if data.is_empty() {
            return Err(BusError::Rejected("data must not be empty".into()));
        }
        if data.len() > self.limits().max_data_bytes {
            return Err(BusError::TooLarge(format!(
                "data is larger than {} bytes",
                self.limits().max_data_bytes
            )));
        }
        // Held until the event is stored, so that concurrent repeats store it once.
        let mut first_publishes = self.first_publishes.lock().expect("records poisoned");
        let record = match idempotency {
            None => None,
            Some((key, window)) => {
                let now = Instant::now();
                first_publishes.retain(|_, first| first.until > now);
                let fingerprint = {
                    use std::hash::{Hash, Hasher};
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    (event.map(EventType::as_str), data).hash(&mut hasher);
                    hasher.finish()
                };
                let slot = (topic.clone(), key.clone());
                if let Some(first) = first_publishes.get(&slot) {
                    if first.fingerprint != fingerprint {
                        return Err(BusError::KeyReused(format!(
                            "idempotency key already used for another event on this topic (id {})",
                            first.id
                        )));
                    }
                    return Ok(first.id);
                }
                Some((slot, fingerprint, now + window))
            }
        };
        let id = self.append(topic, |id| {
            Event::new(id, event, data.as_bytes()).traced(traceparent.cloned())
        });
        if let Some((slot, fingerprint, until)) = record {
            first_publishes.insert(
                slot,
                FirstPublish {
                    id,
                    fingerprint,
                    until,
                },
            );
        }
        Ok(id)
    }

    /// Stores the event `make` builds for the next id of `topic`'s log, keeps the retention and
    /// hands it to the hub; returns the id.
    fn append(&self, topic: &Topic, make: impl FnOnce(StreamId) -> Event) -> StreamId {
        let ttl = Duration::from_secs(self.limits().ttl_secs);
        let mut logs = self.logs.lock().expect("logs poisoned");
        if live_log(&mut logs, topic, ttl).is_none() {
            logs.insert(
                topic.clone(),
                Log {
                    entries: VecDeque::new(),
                    head: StreamId::ZERO,
                    max_deleted: StreamId::ZERO,
                    touched: Instant::now(),
                },
            );
        }
        let log = logs.get_mut(topic).expect("inserted above");
        let id = next_id(log.head, log.head == StreamId::ZERO);
        let event = Arc::new(make(id));
        log.entries.push_back(event.clone());
        log.head = id;
        log.touched = Instant::now();
        while log.entries.len() as u64 > self.limits().max_len {
            let trimmed = log.entries.pop_front().expect("longer than max_len");
            log.max_deleted = trimmed.id;
        }
        // Dispatched under the lock so that each topic's events reach the hub in id order.
        self.hub.dispatch(topic, event);
        id
    }

    /// Appends a Mercure update to the hub's log `log`, as `ssegw_m_publish` does.
    pub fn mercure_publish(&self, log: &Topic, blob: &[u8]) -> Result<StreamId, BusError> {
        if blob.len() > self.limits().max_data_bytes {
            return Err(BusError::TooLarge(format!(
                "update is larger than {} bytes",
                self.limits().max_data_bytes
            )));
        }
        Ok(self.append(log, |id| Event::mercure(id, blob)))
    }

    /// `ssegw_m_track` on one node: each item whose state `op` changes is stored or removed and
    /// its update appended. Every update is checked before anything changes.
    pub fn mercure_track(
        &self,
        log: &Topic,
        op: TrackOp,
        items: &[Tracked<'_>],
    ) -> Result<u64, BusError> {
        let max = self.limits().max_data_bytes;
        if let Some(item) = items.iter().find(|i| i.blob.len() > max) {
            return Err(BusError::TooLarge(format!(
                "the update of subscription {} is larger than {max} bytes",
                item.field
            )));
        }
        let mut subscriptions = self
            .mercure_subscriptions
            .lock()
            .expect("subscriptions poisoned");
        let mut published = 0;
        for item in items {
            let changed = match op {
                TrackOp::Add => subscriptions
                    .insert(item.field.to_string(), item.doc.to_string())
                    .is_none(),
                TrackOp::Del | TrackOp::Reap | TrackOp::Leave => {
                    subscriptions.remove(item.field).is_some()
                }
            };
            if changed {
                self.append(log, |id| Event::mercure(id, item.blob));
                published += 1;
            }
        }
        Ok(published)
    }

    /// The subscriptions' documents (only the one with the id `only`, if given) and the log's
    /// last update.
    pub fn mercure_subscriptions(&self, log: &Topic, only: Option<&str>) -> Listing {
        let subscriptions = self
            .mercure_subscriptions
            .lock()
            .expect("subscriptions poisoned");
        let ttl = Duration::from_secs(self.limits().ttl_secs);
        let last = live_log(&mut self.logs.lock().expect("logs poisoned"), log, ttl)
            .and_then(|log| log.entries.back().cloned());
        Listing {
            position: last.as_ref().map_or(StreamId::ZERO, |event| event.id),
            last_event_id: last
                .and_then(|event| event.mercure.as_ref().map(|u| u.id.to_string()))
                .unwrap_or_else(|| ssegw_protocol::mercure::update::EARLIEST.to_string()),
            documents: match only {
                Some(id) => subscriptions.get(id).into_iter().cloned().collect(),
                None => subscriptions.values().cloned().collect(),
            },
        }
    }

    /// The entry of the first retained occurrence of the Mercure update `update_id`, as
    /// `ssegw_m_find` finds it (here by a scan: the embedded bus serves one node).
    pub fn mercure_find(&self, log: &Topic, update_id: &str) -> Option<StreamId> {
        let ttl = Duration::from_secs(self.limits().ttl_secs);
        let mut logs = self.logs.lock().expect("logs poisoned");
        live_log(&mut logs, log, ttl)?
            .entries
            .iter()
            .find(|e| e.mercure.as_ref().is_some_and(|u| u.id == update_id))
            .map(|e| e.id)
    }

    pub fn read(&self, topic: &Topic, after: StreamId, count: usize) -> Page {
        let ttl = Duration::from_secs(self.limits().ttl_secs);
        let mut logs = self.logs.lock().expect("logs poisoned");
        let Some(log) = live_log(&mut logs, topic, ttl) else {
            let gap = (after != StreamId::ZERO).then_some(GapReason::Lost);
            return Page {
                gap,
                head: StreamId::ZERO,
                entries: Vec::new(),
            };
        };
        let first = log.entries.front().map(|e| e.id);
        let gap = gap_for(after, log.head, log.max_deleted, first);
        let start = match gap {
            None => log.entries.partition_point(|e| e.id <= after),
            Some(_) => 0,
        };
        Page {
            gap,
            head: log.head,
            entries: log
                .entries
                .iter()
                .skip(start)
                .take(count)
                .cloned()
                .collect(),
        }
    }
}

impl MemoryBus {
    /// The `count` newest events of `topic`, in stream order.
    pub fn newest(&self, topic: &Topic, count: usize) -> Vec<Arc<Event>> {
        let ttl = Duration::from_secs(self.limits().ttl_secs);
        let mut logs = self.logs.lock().expect("logs poisoned");
        let Some(log) = live_log(&mut logs, topic, ttl) else {
            return Vec::new();
        };
        let skip = log.entries.len().saturating_sub(count);
        log.entries.iter().skip(skip).cloned().collect()
    }

    /// Each topic's subscribers on this node, counted now.
    pub fn presence(&self, topics: &[Topic]) -> Vec<TopicPresence> {
        topics
            .iter()
            .map(|topic| {
                let subscribers = self.hub.channel(topic).map_or(0, |c| c.members() as u64);
                TopicPresence {
                    subscribers,
                    replicas: u32::from(subscribers > 0),
                    age: (subscribers > 0).then_some(Duration::ZERO),
                }
            })
            .collect()
    }
}

/// The topic's log unless it expired (then it is removed, as Redis would have).
fn live_log<'a>(
    logs: &'a mut HashMap<Topic, Log>,
    topic: &Topic,
    ttl: Duration,
) -> Option<&'a mut Log> {
    if logs
        .get(topic)
        .is_some_and(|log| log.touched.elapsed() >= ttl)
    {
        logs.remove(topic);
    }
    logs.get_mut(topic)
}

/// Redis's id rule: the wall clock in milliseconds, with a sequence within one millisecond and
/// never going backwards. A new log starts after the current millisecond, as the Lua publish
/// logic does, so that its ids are greater than those of any log it replaces.
fn next_id(head: StreamId, new_log: bool) -> StreamId {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if new_log {
        StreamId::new(now + 1, 0)
    } else if now > head.ms {
        StreamId::new(now, 0)
    } else {
        StreamId::new(head.ms, head.seq + 1)
    }
}
