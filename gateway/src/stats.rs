//! Counters of what this replica does, shared by every worker: read by `/status` and by the
//! connection limit.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Stats {
    /// SSE streams open now.
    open: AtomicUsize,
    /// SSE streams opened since start.
    pub opened: AtomicU64,
    /// Streams closed because the client fell too far behind.
    pub slow: AtomicU64,
    /// Streams closed by a drain.
    pub drained: AtomicU64,
    /// Streams closed because the subscriber's token expired.
    pub expired: AtomicU64,
    /// Requests refused with 401 (no or an invalid token).
    pub unauthorized: AtomicU64,
    /// Requests refused with 403 (a token or anonymous access that does not grant the topic).
    pub forbidden: AtomicU64,
    /// Subscriptions refused because the replica was at its connection limit.
    pub rejected: AtomicU64,
    /// Streams opened with a `Last-Event-ID` (header or query): clients resuming here.
    pub resumed: AtomicU64,
    /// `ssegw-gap` control events sent.
    pub gaps: AtomicU64,
    /// Events written to clients, replayed or live. The status page derives the delivery rate
    /// from it. Every connection adds to it once per chunk it writes, so it sits on a cache
    /// line of its own rather than next to the counters read on every new connection.
    delivered: Padded,
}

/// A counter alone on its cache line (128 bytes: two lines on x86, one on Apple's cores).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Stats {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new stream unless `max` are open already; the stream is counted until the slot
    /// is dropped.
    pub fn try_open(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.record(&self.opened);
        Some(Slot(self.clone()))
    }

    pub fn record(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `events` written to a client.
    pub fn record_delivered(&self, events: u64) {
        if events > 0 {
            self.delivered.0.fetch_add(events, Ordering::Relaxed);
        }
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.0.load(Ordering::Relaxed)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "connections": self.open(),
            "connections_opened": get(&self.opened),
            "slow_disconnects": get(&self.slow),
            "drained": get(&self.drained),
            "expired": get(&self.expired),
            "unauthorized": get(&self.unauthorized),
            "forbidden": get(&self.forbidden),
            "rejected_at_limit": get(&self.rejected),
            "resumed": get(&self.resumed),
            "gaps_sent": get(&self.gaps),
            "events_delivered": self.delivered(),
        })
    }
}

/// One open stream's place in the count.
#[derive(Debug)]
pub struct Slot(Arc<Stats>);

impl Slot {
    pub fn stats(&self) -> &Stats {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_limit_and_free_on_drop() {
        let stats = Arc::new(Stats::default());
        let a = stats.try_open(2).unwrap();
        let _b = stats.try_open(2).unwrap();
        assert!(stats.try_open(2).is_none());
        drop(a);
        assert!(stats.try_open(2).is_some());
        assert_eq!(stats.opened.load(Ordering::Relaxed), 3);
        assert_eq!(stats.open(), 1, "the temporary slot was dropped");
    }
}
