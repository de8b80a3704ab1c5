//! Telemetry: logs through `tracing` (text or JSON lines, levels from `SSEGW_LOG`/`RUST_LOG`),
//! traces exported over OTLP when an endpoint is configured, and metrics, always in the
//! Prometheus registry behind `/metrics` and also pushed over OTLP when configured. With no
//! endpoint nothing is exported and no span is built for export. Metric attributes are
//! low-cardinality: never a topic, a client or a connection.
//!
//! The counters live in `stats` (bumped on the hot paths, atomics only) and are read by
//! `metrics` when collected. Telemetry observes and never decides: nothing here changes what a
//! client receives.

use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use ssegw_protocol::Traceparent;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub mod metrics;
pub mod stats;

pub use metrics::Metrics;

/// What to export, read once from the standard `OTEL_*` variables and `SSEGW_LOG*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Spans go to an OTLP endpoint.
    pub traces: bool,
    /// Metrics are pushed to an OTLP endpoint (they are on `/metrics` regardless).
    pub metrics: bool,
    /// `OTEL_SERVICE_NAME`, else `sse-gateway`.
    pub service_name: String,
    /// Log lines as JSON (`SSEGW_LOG_FORMAT=json`).
    pub json_logs: bool,
    /// The log filter (`SSEGW_LOG`, else `RUST_LOG`, else `info`).
    pub log_filter: String,
}

impl TelemetryConfig {
    /// Reads the settings through `lookup` (the process environment in the binary). OTLP goes
    /// over HTTP with protobuf; asking for another protocol is an error, not a silent no-op.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<TelemetryConfig, String> {
        let set = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let disabled = set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let signal = |signal: &str, exporter_var: &str| -> Result<bool, String> {
            let exporter = set(exporter_var).unwrap_or_else(|| "otlp".into());
            if exporter == "none" || disabled {
                return Ok(false);
            }
            if exporter != "otlp" {
                return Err(format!(
                    "{exporter_var}={exporter:?}: only otlp or none is supported"
                ));
            }
            for var in [
                format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"),
                "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
            ] {
                if let Some(protocol) = set(&var) {
                    if protocol != "http/protobuf" {
                        return Err(format!(
                            "{var}={protocol:?}: the gateway exports OTLP over http/protobuf \
                             only (collectors listen for it on port 4318)"
                        ));
                    }
                    break;
                }
            }
            Ok(
                set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).is_some()
                    || set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some(),
            )
        };
        Ok(TelemetryConfig {
            traces: signal("TRACES", "OTEL_TRACES_EXPORTER")?,
            metrics: signal("METRICS", "OTEL_METRICS_EXPORTER")?,
            service_name: set("OTEL_SERVICE_NAME").unwrap_or_else(|| "sse-gateway".into()),
            json_logs: set("SSEGW_LOG_FORMAT").as_deref() == Some("json"),
            log_filter: set("SSEGW_LOG")
                .or_else(|| set("RUST_LOG"))
                .unwrap_or_else(|| "info".into()),
        })
    }

    pub(crate) fn resource(&self) -> Resource {
        // The builder reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME itself.
        Resource::builder()
            .with_service_name(self.service_name.clone())
            .build()
    }
}

/// The process's logging and trace export; flushes pending spans when dropped.
pub struct ProcessTelemetry {
    tracer: Option<SdkTracerProvider>,
}

impl Drop for ProcessTelemetry {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            let _ = tracer.shutdown();
        }
    }
}

/// Installs the global `tracing` subscriber: the log formatter, filtered by the log level, and
/// when traces are exported the OpenTelemetry layer, filtered on its own so that a quiet log
/// (`SSEGW_LOG=warn`) does not switch the gateway's spans off. Once per process (`main`).
pub fn init_process(config: &TelemetryConfig) -> Result<ProcessTelemetry, String> {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::{Layer, Registry};
    let filter = EnvFilter::try_new(&config.log_filter)
        .map_err(|e| format!("log filter {:?}: {e}", config.log_filter))?;
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();
    let tracer = if config.traces {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| format!("OTLP trace exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(config.resource())
            .build();
        // The gateway's own spans (`publish`, `deliver`), whatever the log level.
        let spans = Targets::new().with_target("sse_gateway", tracing::Level::INFO);
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("sse-gateway"))
                .with_filter(spans)
                .boxed(),
        );
        Some(provider)
    } else {
        None
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // The current span's fields (request and connection ids, the trace id) go into each line.
    let logs = if config.json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    layers.push(logs);
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| format!("logging: {e}"))?;
    Ok(ProcessTelemetry { tracer })
}

/// The trace context to store with an event published in `span`: the span's own when it is
/// exported, else the one the publisher sent (so that replicas that export can still link to
/// it), else none.
pub fn publish_context(span: &tracing::Span, sent: Option<&Traceparent>) -> Option<Traceparent> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        return Traceparent::new(&format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        ))
        .ok();
    }
    sent.cloned()
}

/// Makes the span a child of the caller's trace, when the request carried a valid
/// `traceparent`.
pub fn continue_trace(span: &tracing::Span, sent: Option<&Traceparent>) {
    if let Some(sent) = sent {
        let _ = span.set_parent(remote_context(sent));
    }
}

/// Records this replica's delivery of one event as a span linked to the publish, with the
/// number of local recipients: one span per event and replica, never one per recipient.
pub fn delivery_span(
    traceparent: &Traceparent,
    topic: &ssegw_protocol::Topic,
    id: ssegw_protocol::StreamId,
    recipients: usize,
) {
    let Some(publish) = linked_context(traceparent) else {
        return;
    };
    let span = tracing::info_span!(
        "deliver",
        otel.kind = "consumer",
        messaging.destination.name = %topic,
        messaging.message.id = %id,
        recipients = recipients as u64,
    );
    span.add_link(publish);
}

/// The remote span a delivery links to.
pub fn linked_context(traceparent: &Traceparent) -> Option<SpanContext> {
    let span_context = remote_context(traceparent).span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// The OpenTelemetry context a `traceparent` stands for.
fn remote_context(traceparent: &Traceparent) -> opentelemetry::Context {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// How long ago, by this machine's clock, Redis assigned `ms` (an id's milliseconds).
pub fn since_publish(ms: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<TelemetryConfig, String> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TelemetryConfig::from_lookup(|k| vars.get(k).cloned())
    }

    #[test]
    fn reads_the_standard_variables() {
        let none = config(&[]).unwrap();
        assert!(!none.traces && !none.metrics);
        assert_eq!(none.service_name, "sse-gateway");
        assert_eq!(none.log_filter, "info");
        let all = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).unwrap();
        assert!(all.traces && all.metrics);
        let traces = config(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        )])
        .unwrap();
        assert!(traces.traces && !traces.metrics);
        let no_metrics = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_SERVICE_NAME", "edge-gw"),
        ])
        .unwrap();
        assert!(no_metrics.traces && !no_metrics.metrics);
        assert_eq!(no_metrics.service_name, "edge-gw");
        let disabled = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ])
        .unwrap();
        assert!(!disabled.traces && !disabled.metrics);
        let grpc = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        assert!(grpc.unwrap_err().contains("http/protobuf only"));
        let zipkin = config(&[("OTEL_TRACES_EXPORTER", "zipkin")]);
        assert!(zipkin.unwrap_err().contains("only otlp or none"));
        let logs = config(&[("RUST_LOG", "debug"), ("SSEGW_LOG_FORMAT", "json")]).unwrap();
        assert_eq!((logs.log_filter.as_str(), logs.json_logs), ("debug", true));
        let ours = config(&[("RUST_LOG", "debug"), ("SSEGW_LOG", "warn")]).unwrap();
        assert_eq!(ours.log_filter, "warn");
    }

    #[test]
    fn the_publish_context_falls_back_to_the_senders() {
        let sent =
            Traceparent::new("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        // No OpenTelemetry layer here: the span has no context of its own.
        let span = tracing::info_span!("publish");
        assert_eq!(publish_context(&span, Some(&sent)), Some(sent.clone()));
        assert_eq!(publish_context(&span, None), None);
        let linked = linked_context(&sent).unwrap();
        assert_eq!(linked.trace_id().to_string(), sent.trace_id());
        assert_eq!(linked.span_id().to_string(), sent.span_id());
    }
}
