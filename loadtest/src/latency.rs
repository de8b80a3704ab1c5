//! Publish-to-receive latency: an HDR histogram in microseconds, its compact form for sending
//! between processes, and the summary the report prints.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies above this (10 minutes) are recorded as this.
const MAX_US: u64 = 600_000_000;

#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            hist: Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"),
        }
    }
}

/// Recorded values and their counts; what a worker sends its parent each interval.
pub type Buckets = Vec<(u64, u64)>;

impl Latency {
    pub fn record(&mut self, micros: u64) {
        self.hist.saturating_record(micros.clamp(1, MAX_US));
    }

    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    pub fn reset(&mut self) {
        self.hist.reset();
    }

    pub fn to_buckets(&self) -> Buckets {
        self.hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    pub fn add_buckets(&mut self, buckets: &Buckets) {
        for &(value, count) in buckets {
            let _ = self.hist.record_n(value.clamp(1, MAX_US), count);
        }
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |quantile: f64| ms(self.hist.value_at_quantile(quantile));
        LatencySummary {
            count: self.hist.len(),
            mean_ms: self.hist.mean() / 1000.0,
            min_ms: if self.hist.is_empty() {
                0.0
            } else {
                ms(self.hist.min())
            },
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: ms(self.hist.max()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    /// The fastest delivery: what every event costs before the fan-out itself (publish, Redis,
    /// the replica's bus), as the percentiles add the fan-out's spread.
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_carry_the_distribution() {
        let mut a = Latency::default();
        (1..=1000).for_each(|ms| a.record(ms * 1000));
        let mut b = Latency::default();
        b.add_buckets(&a.to_buckets());
        assert_eq!(a.summary(), b.summary());
        let s = b.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p99_ms - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() < 1.0, "{s:?}");
    }
}
