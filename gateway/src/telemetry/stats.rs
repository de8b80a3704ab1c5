//! Counters of what this replica does, shared by every worker: read by `/status`, by the
//! connection limit, and by the metrics (`telemetry::Metrics` reads them when collected, so the
//! hot paths only bump atomics). The two histograms record into the replica's meter.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use opentelemetry::metrics::{Histogram, Meter};

pub struct Stats {
    /// SSE streams open now.
    open: AtomicUsize,
    /// SSE streams opened since start.
    pub opened: AtomicU64,
    /// Streams closed because the client fell too far behind.
    pub slow: AtomicU64,
    /// Streams closed by a drain.
    pub drained: AtomicU64,
    /// Streams closed because the subscriber's token expired (each after an `ssegw-expired`).
    pub expired: AtomicU64,
    /// Streams the client ended (or that ended without the replica closing them).
    pub client_left: AtomicU64,
    /// Streams ended because the replica stopped.
    pub stopped: AtomicU64,
    /// Requests refused with 401 (no or an invalid token).
    pub unauthorized: AtomicU64,
    /// Requests refused with 403 (a token or anonymous access that does not grant the topic).
    pub forbidden: AtomicU64,
    /// Subscriptions refused because the replica was at its connection limit.
    pub rejected: AtomicU64,
    /// Subscriptions refused because the replica was draining.
    pub refused_draining: AtomicU64,
    /// Subscriptions refused because a topic could not be subscribed in time (Redis away).
    pub refused_unavailable: AtomicU64,
    /// Streams opened with a `Last-Event-ID` (header or query): clients resuming here.
    pub resumed: AtomicU64,
    /// Events replayed from history to resuming (or catching-up) clients.
    pub replayed: AtomicU64,
    /// `ssegw-gap` control events sent.
    pub gaps: AtomicU64,
    /// Events this replica received from Redis (pub/sub and backfills) or, embedded, published.
    pub events_received: AtomicU64,
    /// Times the pub/sub link was established again after it was lost.
    pub redis_reconnects: AtomicU64,
    /// The version of the `ssegw` function library found in Redis at the last (re)connect
    /// (0: none, or one older than versions); differs from `LIBRARY_VERSION` during a rolling
    /// upgrade.
    pub redis_library: AtomicU64,
    /// Topics caught up from their streams after a reconnect.
    pub backfills: AtomicU64,
    /// Events written by a relay's sweep (`sweep`), counted in `delivered` too: the share of
    /// deliveries that woke no connection task.
    pub swept: AtomicU64,
    /// Events and bytes written to clients. The status page derives the delivery rate from
    /// them. Every connection adds to them on each write, so they sit on a cache line of their
    /// own rather than next to the counters read on every new connection.
    hot: Hot,
    /// From an event's publish (its id's milliseconds, Redis's clock) to its dispatch to this
    /// replica's connections, in seconds; once per event and replica.
    pub lag: Histogram<f64>,
    /// Round trip of the pub/sub canary through Redis, in seconds.
    pub canary_rtt: Histogram<f64>,
}

/// Counters alone on their cache line (128 bytes: two lines on x86, one on Apple's cores).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Hot {
    delivered: AtomicU64,
    bytes: AtomicU64,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_json().to_string())
    }
}

impl Default for Stats {
    /// Counters whose histograms record nowhere (unit tests).
    fn default() -> Stats {
        use opentelemetry::metrics::MeterProvider;
        Stats::new(&opentelemetry::metrics::noop::NoopMeterProvider::new().meter("ssegw"))
    }
}

impl Stats {
    /// Whether Redis holds another version of the function library than this replica's.
    pub fn library_mismatch(&self) -> bool {
        let found = self.redis_library.load(Ordering::Relaxed);
        found != 0 && found != ssegw_protocol::script::LIBRARY_VERSION
    }

    /// Counters at zero; the histograms record into `meter`.
    pub fn new(meter: &Meter) -> Stats {
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build()
        };
        Stats {
            open: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            client_left: AtomicU64::new(0),
            stopped: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            refused_draining: AtomicU64::new(0),
            refused_unavailable: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            events_received: AtomicU64::new(0),
            redis_reconnects: AtomicU64::new(0),
            redis_library: AtomicU64::new(0),
            backfills: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            hot: Hot::default(),
            lag: seconds(
                "ssegw.delivery.lag",
                "From an event's publish to its dispatch to this replica's connections",
            ),
            canary_rtt: seconds(
                "ssegw.redis.canary.rtt",
                "Round trip of the pub/sub canary through Redis",
            ),
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a place under the connection limit unless `max` are taken already; it is held
    /// until the slot is dropped. The stream counts as opened once it starts (`Slot::start`).
    pub fn try_open(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            stats: self.clone(),
            started: false,
            ended: false,
        })
    }

    pub fn record(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts `events` written to a client.
    pub fn record_delivered(&self, events: u64) {
        self.add(&self.hot.delivered, events);
    }

    /// Counts bytes written to a client.
    pub fn record_written(&self, bytes: usize) {
        self.add(&self.hot.bytes, bytes as u64);
    }

    pub fn delivered(&self) -> u64 {
        self.get(&self.hot.delivered)
    }

    pub fn bytes_written(&self) -> u64 {
        self.get(&self.hot.bytes)
    }

    /// Streams closed, by the reason a metric names.
    pub fn closed_by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("client_left", self.get(&self.client_left)),
            ("slow", self.get(&self.slow)),
            ("drained", self.get(&self.drained)),
            ("auth_expired", self.get(&self.expired)),
            ("stopped", self.get(&self.stopped)),
        ]
    }

    /// Subscriptions (and publishes, for the auth reasons) refused, by reason.
    pub fn refused_by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("limit", self.get(&self.rejected)),
            ("draining", self.get(&self.refused_draining)),
            ("unavailable", self.get(&self.refused_unavailable)),
            ("unauthorized", self.get(&self.unauthorized)),
            ("forbidden", self.get(&self.forbidden)),
        ]
    }

    /// Control events sent, by kind.
    pub fn control_events(&self) -> [(&'static str, u64); 2] {
        [
            ("gap", self.get(&self.gaps)),
            ("expired", self.get(&self.expired)),
        ]
    }

    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "connections": self.open(),
            "connections_opened": get(&self.opened),
            "slow_disconnects": get(&self.slow),
            "drained": get(&self.drained),
            "expired": get(&self.expired),
            "client_left": get(&self.client_left),
            "unauthorized": get(&self.unauthorized),
            "forbidden": get(&self.forbidden),
            "rejected_at_limit": get(&self.rejected),
            "resumed": get(&self.resumed),
            "replayed": get(&self.replayed),
            "gaps_sent": get(&self.gaps),
            "events_received": get(&self.events_received),
            "events_delivered": self.delivered(),
            "events_swept": get(&self.swept),
            "bytes_written": self.bytes_written(),
            "redis_reconnects": get(&self.redis_reconnects),
            "backfills": get(&self.backfills),
            "function_library": {
                "replica": ssegw_protocol::script::LIBRARY_VERSION,
                "redis": get(&self.redis_library),
            },
        })
    }
}

/// One stream's place under the connection limit. Every stream that started is counted as
/// opened and, when its slot is dropped, as closed: for the reason the replica recorded when
/// it ended the stream (`ended`), else as closed by its client. So opened = closed + open.
#[derive(Debug)]
pub struct Slot {
    stats: Arc<Stats>,
    started: bool,
    ended: bool,
}

impl Slot {
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The stream starts: counted as opened.
    pub fn start(&mut self) {
        if !self.started {
            self.started = true;
            self.stats.record(&self.stats.opened);
        }
    }

    /// The replica ends the stream; the caller counts the reason.
    pub fn ended(&mut self) {
        self.ended = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        if self.started && !self.ended {
            self.stats.record(&self.stats.client_left);
        }
    }
}

/// Histogram buckets for latencies in seconds: 1 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_limit_and_free_on_drop() {
        let stats = Arc::new(Stats::default());
        let mut a = stats.try_open(2).unwrap();
        a.start();
        let mut b = stats.try_open(2).unwrap();
        b.start();
        assert!(stats.try_open(2).is_none());
        drop(a);
        // Taken and given back before its stream started: neither opened nor closed.
        assert!(stats.try_open(2).is_some());
        assert_eq!(stats.get(&stats.opened), 2);
        assert_eq!(stats.open(), 1, "the temporary slot was dropped");
        assert_eq!(
            stats.get(&stats.client_left),
            1,
            "one started slot dropped unended"
        );
        b.ended();
        drop(b);
        assert_eq!(stats.get(&stats.client_left), 1, "ended by the replica");
        assert_eq!(stats.open(), 0);
    }
}
