//! The replica's metrics: the Prometheus registry behind `/metrics` and, when an endpoint is
//! configured, an OTLP push. The counters themselves live in `stats`; this module only
//! registers them as observable instruments, read when collected.

use std::sync::Arc;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

use super::stats::Stats;
use super::TelemetryConfig;

/// One replica's metrics: the Prometheus registry behind `/metrics` and, when configured, an
/// OTLP push. Counters are read from `Stats` when collected, so the hot paths only bump
/// atomics. Shut down (a last push) when dropped.
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

impl Drop for Metrics {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

impl Metrics {
    /// Builds the meter provider; `Stats::new` takes its meter for the histograms, then
    /// `observe` registers the counters.
    pub fn new(config: &TelemetryConfig) -> Result<Metrics, String> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .without_target_info()
            .build()
            .map_err(|e| format!("Prometheus exporter: {e}"))?;
        let mut builder = SdkMeterProvider::builder()
            .with_reader(prometheus)
            .with_resource(config.resource());
        if config.metrics {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .build()
                .map_err(|e| format!("OTLP metric exporter: {e}"))?;
            // The interval comes from OTEL_METRIC_EXPORT_INTERVAL (default 60 s).
            builder = builder.with_reader(PeriodicReader::builder(exporter).build());
        }
        Ok(Metrics {
            registry,
            provider: builder.build(),
        })
    }

    pub fn meter(&self) -> Meter {
        self.provider.meter("sse-gateway")
    }

    /// Registers the instruments that read `stats` when collected.
    pub fn observe(&self, stats: &Arc<Stats>) {
        let meter = self.meter();
        let counter = |name: &'static str, description: &'static str, read: fn(&Stats) -> u64| {
            let stats = stats.clone();
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |observer| observer.observe(read(&stats), &[]))
                .build();
        };
        counter("ssegw.connections.opened", "SSE streams opened", |s| {
            s.get(&s.opened)
        });
        counter(
            "ssegw.events.received",
            "Events this replica received from Redis (pub/sub and backfills)",
            |s| s.get(&s.events_received),
        );
        counter(
            "ssegw.frames.delivered",
            "Events written to clients, live or replayed",
            Stats::delivered,
        );
        counter(
            "ssegw.frames.swept",
            "Events written by a worker's sweep of its caught-up streams (part of delivered)",
            |s| s.get(&s.swept),
        );
        counter(
            "ssegw.bytes.written",
            "Bytes of SSE frames written to clients",
            Stats::bytes_written,
        );
        counter(
            "ssegw.resume.requests",
            "Streams opened with a Last-Event-ID",
            |s| s.get(&s.resumed),
        );
        counter(
            "ssegw.replayed.events",
            "Events replayed from history to resuming clients",
            |s| s.get(&s.replayed),
        );
        counter(
            "ssegw.redis.reconnects",
            "Times the pub/sub link to Redis was re-established",
            |s| s.get(&s.redis_reconnects),
        );
        counter(
            "ssegw.redis.backfills",
            "Topics caught up from their streams after a pub/sub gap",
            |s| s.get(&s.backfills),
        );
        let library = stats.clone();
        meter
            .u64_observable_gauge("ssegw.function_library.mismatch")
            .with_description(
                "1 while Redis holds another version of the ssegw function library than this replica's",
            )
            .with_callback(move |observer| observer.observe(library.library_mismatch() as u64, &[]))
            .build();
        let closed = stats.clone();
        meter
            .u64_observable_counter("ssegw.connections.closed")
            .with_description("SSE streams closed, by reason")
            .with_callback(move |observer| {
                for (reason, value) in closed.closed_by_reason() {
                    observer.observe(value, &[KeyValue::new("reason", reason)]);
                }
            })
            .build();
        let refused = stats.clone();
        meter
            .u64_observable_counter("ssegw.connections.refused")
            .with_description("Subscriptions refused, by reason")
            .with_callback(move |observer| {
                for (reason, value) in refused.refused_by_reason() {
                    observer.observe(value, &[KeyValue::new("reason", reason)]);
                }
            })
            .build();
        let control = stats.clone();
        meter
            .u64_observable_counter("ssegw.control.events")
            .with_description("Control events sent to clients, by kind")
            .with_callback(move |observer| {
                for (kind, value) in control.control_events() {
                    observer.observe(value, &[KeyValue::new("kind", kind)]);
                }
            })
            .build();
        let open = stats.clone();
        meter
            .i64_observable_up_down_counter("ssegw.connections.open")
            .with_description("SSE streams open now")
            .with_callback(move |observer| observer.observe(open.open() as i64, &[]))
            .build();
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> Result<String, String> {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}
