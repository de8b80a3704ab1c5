//! `AppState`: what every handler and page shares, built once per replica outside the
//! `HttpServer` factory; and the replica's `/status` document.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::bus::Bus;
use crate::config::{PresenceConfig, PublishConfig, StreamConfig};
use crate::fanout::hub::Hub;
use crate::telemetry::stats::Stats;
use crate::telemetry::Metrics;

/// Shared by every worker; built once, outside the `HttpServer` factory.
pub struct AppState {
    /// Names this replica in Redis and in `/status`.
    pub replica: uuid::Uuid,
    pub hub: Arc<Hub>,
    pub bus: Arc<Bus>,
    /// `--presence-interval`; `None`: presence is off (`/presence` answers 404).
    pub presence: Option<PresenceConfig>,
    pub stream: Arc<StreamConfig>,
    pub publish: Arc<PublishConfig>,
    pub stats: Arc<Stats>,
    pub auth: Arc<Auth>,
    /// Cancelled when the replica starts draining.
    pub drain: CancellationToken,
    /// Places for `/status/stream` responses (`pages::MAX_STATUS_STREAMS`). Each response holds
    /// one until it ends; when none is left, the request gets a 503. They are not event streams
    /// and do not count under `--max-connections`, but they must not be unbounded either.
    pub status_streams: Arc<tokio::sync::Semaphore>,
    /// Behind `/metrics`, and the OTLP push when configured.
    pub metrics: Arc<Metrics>,
    /// The Mercure hub, with `--mercure true`.
    pub mercure: Option<Arc<crate::mercure::Mercure>>,
}

/// This replica's counters and state, as JSON: the body of `/status`, and of each event of
/// `/status/stream`.
pub fn status_json(state: &AppState) -> serde_json::Value {
    let mut body = state.stats.to_json();
    body["replica"] = state.replica.to_string().into();
    body["topics"] = state.hub.topic_count().into();
    body["ready"] = (state.bus.is_ready() && !state.drain.is_cancelled()).into();
    body["bus"] = state.bus.describe().into();
    // The retention publishes are held to: the fleet's table in Redis as last read (`null`
    // until it was), or the embedded bus's flags.
    body["retention"] = state.bus.retention().map_or(serde_json::Value::Null, |r| {
        crate::publisher::retention_json(&r)
    });
    body
}
