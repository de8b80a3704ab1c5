//! `sse-gateway publish`: one event from a shell, straight into Redis (the same `FCALL` any
//! service uses) or, without a Redis URL, through a gateway's `POST /publish`; and
//! `sse-gateway namespace`: the fleet's retention table in Redis, shown or changed.

use anyhow::{bail, Context};
use ssegw_protocol::frame::EventType;
use ssegw_protocol::{StreamId, Topic, Traceparent};
use tracing::Instrument;

use crate::bus::{Publish, RedisBus};
use crate::config::{NamespaceAction, NamespaceArgs, NamespaceTarget, PublishArgs};
use crate::telemetry;
use ssegw_protocol::retention::{Limits, Retention};
use ssegw_protocol::script::IdempotencyKey;

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
    let key = args
        .idempotency_key
        .as_deref()
        .map(IdempotencyKey::new)
        .transpose()
        .context("invalid --idempotency-key")?;
    anyhow::ensure!(
        args.idempotency_window >= std::time::Duration::from_secs(1),
        "--idempotency-window must be at least 1s"
    );
    let publish = Publish {
        topic: &topic,
        event: event.as_ref(),
        data: &args.data,
        traceparent: traceparent.as_ref(),
        idempotency: key.as_ref().map(|key| (key, args.idempotency_window)),
    };
    match args.redis.target()? {
        Some(target) => {
            let seed = args.retention.limits()?;
            let bus = RedisBus::connect(&target, 2, args.redis_timeout, seed, true)?;
            if key.is_some() {
                // A library from before version 4 would take the key for an unknown argument
                // and store a repeat again: make sure Redis has this version's (or a newer).
                bus.refresh_retention().await?;
            }
            Ok(bus.publish(&publish).await?)
        }
        None => {
            let token = args.token.as_ref().map(|t| t.0.as_str());
            publish_http(&args.url, token, &publish).await
        }
    }
}

async fn publish_http(
    base: &str,
    token: Option<&str>,
    publish: &Publish<'_>,
) -> anyhow::Result<StreamId> {
    let Publish {
        topic,
        event,
        data,
        traceparent,
        idempotency,
    } = *publish;
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
    // The window is the gateway's (--idempotency-window there).
    if let Some((key, _)) = idempotency {
        request = request.insert_header(("idempotency-key", key.as_str()));
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

/// `sse-gateway namespace list|set|unset`: prints the table (after the change) as JSON.
pub async fn namespace(args: NamespaceArgs) -> anyhow::Result<serde_json::Value> {
    // `list` only reads: it loads no library (`install` false) where there is none yet.
    let connect = |target: &NamespaceTarget, install: bool| -> anyhow::Result<RedisBus> {
        let redis = target.redis.target()?.context(
            "the retention table lives in Redis: give --redis-url, --redis-sentinels or \
             --redis-cluster",
        )?;
        Ok(RedisBus::connect(
            &redis,
            2,
            target.redis_timeout,
            Limits::default(),
            install,
        )?)
    };
    let retention = match args.action {
        NamespaceAction::List(target) => connect(&target, false)?.refresh_retention().await?,
        NamespaceAction::Set(set) => {
            let bus = connect(&set.target, true)?;
            if let Some(prefix) = &set.prefix {
                ssegw_protocol::retention::check_prefix(prefix)?;
            }
            bus.change_retention(|retention, generation| {
                let current = match &set.prefix {
                    None => *retention.default_limits(),
                    Some(prefix) => retention
                        .namespaces()
                        .find(|(p, _)| p == prefix)
                        .map_or(*retention.default_limits(), |(_, l)| *l),
                };
                let limits = Limits {
                    max_len: set.max_len.unwrap_or(current.max_len),
                    ttl_secs: set.ttl.map_or(current.ttl_secs, |ttl| ttl.as_secs()),
                    max_data_bytes: set.max_event_bytes.unwrap_or(current.max_data_bytes),
                };
                retention
                    .set(set.prefix.as_deref(), limits, generation)
                    .map_err(|e| e.to_string())
            })
            .await?
        }
        NamespaceAction::Unset { prefix, target } => {
            connect(&target, true)?
                .change_retention(|retention, generation| {
                    if retention.remove(&prefix, generation) {
                        Ok(())
                    } else {
                        Err(format!("there is no namespace {prefix:?}"))
                    }
                })
                .await?
        }
    };
    Ok(retention_json(&retention))
}

/// The table as `/status` and `sse-gateway namespace` show it.
pub fn retention_json(retention: &Retention) -> serde_json::Value {
    let limits = |l: &Limits| {
        serde_json::json!({
            "max_len": l.max_len,
            "ttl_seconds": l.ttl_secs,
            "max_event_bytes": l.max_data_bytes,
        })
    };
    let namespaces: serde_json::Map<String, serde_json::Value> = retention
        .namespaces()
        .map(|(prefix, l)| (prefix.to_string(), limits(l)))
        .collect();
    serde_json::json!({
        "generation": retention.generation(),
        "default": limits(retention.default_limits()),
        "namespaces": namespaces,
    })
}
