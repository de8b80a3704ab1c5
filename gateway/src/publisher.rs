//! `sse-gateway publish`: one event from a shell, straight into Redis (the same `FCALL` any
//! service uses) or, without a Redis URL, through a gateway's `POST /publish`.

use anyhow::{bail, Context};
use ssegw_protocol::frame::EventType;
use ssegw_protocol::{StreamId, Topic, Traceparent};
use tracing::Instrument;

use crate::bus::RedisBus;
use crate::config::PublishArgs;
use crate::telemetry;

/// Publishes the event in a `publish` span (exported when OTLP is configured), whose trace
/// context travels with the event; returns its id.
pub async fn publish(args: PublishArgs) -> anyhow::Result<StreamId> {
    let span = tracing::info_span!("publish", otel.kind = "producer", messaging.destination.name = %args.topic);
    let traceparent = telemetry::publish_context(&span, None);
    publish_in_span(args, traceparent).instrument(span).await
}

async fn publish_in_span(
    args: PublishArgs,
    traceparent: Option<Traceparent>,
) -> anyhow::Result<StreamId> {
    let topic =
        Topic::new(&args.topic).with_context(|| format!("invalid topic {:?}", args.topic))?;
    let event = args
        .event
        .as_deref()
        .filter(|e| !e.is_empty())
        .map(EventType::new)
        .transpose()
        .context("invalid event type")?;
    match args.redis.target()? {
        Some(target) => {
            let script = args.retention.script_settings()?;
            let bus = RedisBus::connect(&target, 2, args.redis_timeout, &script, true)?;
            Ok(bus
                .publish(&topic, event.as_ref(), &args.data, traceparent.as_ref())
                .await?)
        }
        None => {
            let token = args.token.as_ref().map(|t| t.0.as_str());
            let event = event.as_ref();
            publish_http(
                &args.url,
                token,
                traceparent.as_ref(),
                &topic,
                event,
                &args.data,
            )
            .await
        }
    }
}

async fn publish_http(
    base: &str,
    token: Option<&str>,
    traceparent: Option<&Traceparent>,
    topic: &Topic,
    event: Option<&EventType>,
    data: &str,
) -> anyhow::Result<StreamId> {
    let url = format!("{}/publish", base.trim_end_matches('/'));
    let body = serde_json::json!({
        "topic": topic.as_str(),
        "data": data,
        "event": event.map(EventType::as_str),
    });
    let mut request = awc::Client::default().post(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(traceparent) = traceparent {
        request = request.insert_header(("traceparent", traceparent.as_str()));
    }
    let mut response = request
        .send_json(&body)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
    let reply: serde_json::Value = response
        .json()
        .await
        .with_context(|| format!("unreadable answer from {url}"))?;
    if !response.status().is_success() {
        bail!(
            "{url} answered {}: {}",
            response.status(),
            reply["error"].as_str().unwrap_or("?")
        );
    }
    let id = reply["id"].as_str().context("answer without id")?;
    StreamId::parse(id).with_context(|| format!("answer with invalid id {id:?}"))
}
