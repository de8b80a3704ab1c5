//! The API's handlers: `GET /events` (subscribe), `POST /publish`, `/healthz`, `/readyz`,
//! `/status` and `/metrics`, and the parsing of their input (`SubscribeRequest`,
//! `PublishBody`); `subscriber_grant`, which also authorizes the reads of `/presence` and
//! `/history`. Every input is validated here, before the hub or the bus is touched.

use std::convert::Infallible;
use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use bytes::Bytes;
use serde::Deserialize;
use ssegw_protocol::frame::EventType;
use ssegw_protocol::retention::Retention;
use ssegw_protocol::script::IdempotencyKey;
use ssegw_protocol::{cursor, StreamId, Topic, TopicSet, Traceparent};
use tracing::Instrument;

use super::error::ApiError;
use super::handoff::Handoff;
use super::state::{status_json, AppState};
use crate::auth::{Action, Grant};
use crate::bus::Publish;
use crate::config::Redacted;
use crate::fanout::sse::{Connection, Start};
use crate::telemetry;
use crate::telemetry::stats::Slot;

/// The parsed query of `GET /events`.
#[derive(Debug)]
pub struct SubscribeRequest {
    pub topics: TopicSet,
    pub last_event_id: Option<String>,
    /// The `access_token` query parameter, if sent.
    pub access_token: Option<Redacted>,
}

impl SubscribeRequest {
    /// `topic=` (repeatable), `lastEventId=` and `access_token=` from the query; a non-empty
    /// `Last-Event-ID` header (what browsers send on reconnect) wins over the query parameter.
    pub fn parse(
        query: &str,
        header_id: Option<&[u8]>,
        max_topics: usize,
    ) -> Result<SubscribeRequest, ApiError> {
        // Distinct topics count against the limit; a repeated one is the same subscription.
        let mut topics = std::collections::BTreeSet::new();
        let mut query_id = None;
        let mut access_token = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "topic" => {
                    topics.insert(topic_param(&value)?);
                }
                "lastEventId" if !value.is_empty() => query_id = Some(value.into_owned()),
                "access_token" if !value.is_empty() => {
                    access_token = Some(Redacted(value.into_owned()))
                }
                _ => {}
            }
            if topics.len() > max_topics {
                return Err(ApiError::bad_request(format!(
                    "too many topics: at most {max_topics} per connection"
                )));
            }
        }
        let topics = TopicSet::new(topics.into_iter().collect()).ok_or_else(|| {
            ApiError::bad_request("missing topic: add ?topic=<name> (repeatable)")
        })?;
        // A header that is not text cannot be a valid id; it resumes as an invalid id.
        let header_id = header_id
            .filter(|h| !h.is_empty())
            .map(|h| String::from_utf8_lossy(h).into_owned());
        Ok(SubscribeRequest {
            topics,
            last_event_id: header_id.or(query_id),
            access_token,
        })
    }
}

pub(super) async fn events(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let request = SubscribeRequest::parse(
        req.query_string(),
        req.headers().get("last-event-id").map(|h| h.as_bytes()),
        state.stream.max_topics,
    )?;
    let grant = subscriber_grant(
        &req,
        request.access_token.as_ref(),
        request.topics.iter(),
        &state,
    )?;
    let slot = open_slot(&state)?;
    let memberships: Vec<_> = request.topics.iter().map(|t| state.hub.join(t)).collect();
    let ready = async {
        let mut baselines = Vec::with_capacity(memberships.len());
        for membership in &memberships {
            baselines.push(membership.ready().await);
        }
        baselines
    };
    let Ok(baselines) = tokio::time::timeout(state.stream.subscribe_timeout, ready).await else {
        state.stats.record(&state.stats.refused_unavailable);
        return Err(ApiError::unavailable(
            "gateway is not subscribed to Redis, retry later",
        ));
    };
    if request.last_event_id.is_some() {
        state.stats.record(&state.stats.resumed);
    }
    let start = match &request.last_event_id {
        None => Start::Fresh(baselines),
        Some(id) => match cursor::decode(&request.topics, id) {
            Ok(positions) => Start::Resume(positions),
            Err(e) => {
                tracing::debug!(error = %e, "unusable Last-Event-ID");
                Start::Invalid
            }
        },
    };
    let closes_at = state.auth.closes_at(&grant);
    let connection = Connection::new(
        request.topics,
        memberships,
        start,
        state.bus.clone(),
        state.stream.clone(),
        slot,
        state.drain.clone(),
    )
    .closing_at(closes_at);
    let mut response = HttpResponse::Ok();
    response
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"));
    // HTTP/1.0 has no chunks: its stream ends with the connection. HTTP/2 streams share their
    // connection, so they stay with actix.
    let chunked = match req.version() {
        actix_web::http::Version::HTTP_10 => Some(false),
        actix_web::http::Version::HTTP_11 => Some(true),
        _ => None,
    };
    match (req.conn_data::<Handoff>(), chunked) {
        (Some(handoff), Some(chunked)) => {
            handoff.park(connection, chunked);
            if chunked {
                response.insert_header((header::TRANSFER_ENCODING, "chunked"));
            }
            // actix-http, told to send no body of its own (no chunking, an empty stream) and to
            // close, writes the head and hands the socket over.
            let mut response = response
                .force_close()
                .streaming(futures_util::stream::empty::<Result<Bytes, Infallible>>());
            response.head_mut().no_chunking(true);
            Ok(response)
        }
        _ => Ok(response.streaming(connection.into_stream())),
    }
}

/// A stream's place under `--max-connections`, or the 503 that says why there is none (the
/// replica drains, or is full): for `GET /events` and the Mercure hub's subscriptions.
pub(crate) fn open_slot(state: &AppState) -> Result<Slot, ApiError> {
    if state.drain.is_cancelled() {
        state.stats.record(&state.stats.refused_draining);
        return Err(ApiError::unavailable(
            "gateway is shutting down, retry later",
        ));
    }
    state
        .stats
        .try_open(state.stream.max_connections)
        .ok_or_else(|| {
            state.stats.record(&state.stats.rejected);
            ApiError::unavailable(format!(
                "gateway is at its limit of {} connections, retry later",
                state.stream.max_connections
            ))
        })
}

/// Checks a subscriber's token (or anonymous access) against every one of `topics`, the token
/// taken from where subscribers may send it (the header, `access_token`, the cookie): for
/// `GET /events`, and for the reads authorized as subscribing is (`/presence`, `/history`).
pub(super) fn subscriber_grant<'a>(
    req: &HttpRequest,
    access_token: Option<&Redacted>,
    topics: impl IntoIterator<Item = &'a Topic>,
    state: &AppState,
) -> Result<Grant, ApiError> {
    let auth = &state.auth;
    let query_token = access_token.map(|s| s.0.as_str());
    auth.subscriber_token(req, query_token)
        .and_then(|token| auth.authorize(Action::Subscribe, token.as_deref(), topics))
        .map_err(|e| ApiError::auth(e, &state.stats))
}

/// A topic a client named (a query's `topic`, a publish's field) as a `Topic`, or the 400
/// that says why not: the same for every route.
pub(super) fn topic_param(value: &str) -> Result<Topic, ApiError> {
    let topic = Topic::new(value)
        .map_err(|e| ApiError::bad_request(format!("invalid topic {}: {e}", quote(value))))?;
    // The Mercure hub's log is read and written through /.well-known/mercure only: its
    // entries hold private updates.
    if ssegw_protocol::mercure::update::is_reserved(topic.as_str()) {
        return Err(ApiError::bad_request(format!(
            "invalid topic {}: topics starting with {} are reserved to the gateway",
            quote(value),
            ssegw_protocol::mercure::update::RESERVED_TOPIC_PREFIX
        )));
    }
    Ok(topic)
}

/// A client's value in an error message: quoted, and cut short when long.
pub(super) fn quote(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes)", &value[..end], value.len()),
    }
}

/// The JSON body of `POST /publish`, as sent: an object with these members only. Its `Debug`
/// leaves the data out: payloads stay out of logs.
pub struct PublishBody {
    pub topic: String,
    /// A string is sent as is; any other JSON value is sent as its compact JSON text.
    pub data: serde_json::Value,
    pub event: Option<String>,
}

impl std::fmt::Debug for PublishBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishBody")
            .field("topic", &self.topic)
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PublishRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishRequest")
            .field("topic", &self.topic)
            .field("event", &self.event)
            .field("data_bytes", &self.data.len())
            .finish()
    }
}

impl<'de> Deserialize<'de> for PublishBody {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Members {
            topic: String,
            data: serde_json::Value,
            #[serde(default)]
            event: Option<String>,
        }

        /// Derived struct deserializers also take arrays (`["t", "d"]`); only an object is a
        /// publish body.
        struct ObjectOnly;

        impl<'de> serde::de::Visitor<'de> for ObjectOnly {
            type Value = Members;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"an object {"topic": ..., "data": ..., "event": ...}"#)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Members, A::Error> {
                Members::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        let members = deserializer.deserialize_map(ObjectOnly)?;
        Ok(PublishBody {
            topic: members.topic,
            data: members.data,
            event: members.event,
        })
    }
}

/// A checked publish request; its `Debug` leaves the data out.
pub struct PublishRequest {
    pub topic: Topic,
    pub event: Option<EventType>,
    pub data: String,
}

impl PublishBody {
    /// Checks the body as the Lua publish function would, so that bad input is a 4xx here
    /// instead of a round trip to Redis; the data's size against `retention`, the fleet's
    /// table as this replica last read it (Redis checks the current one again).
    pub fn validate(self, retention: &Retention) -> Result<PublishRequest, ApiError> {
        let topic = topic_param(&self.topic)?;
        let event = match self.event.as_deref() {
            None | Some("") => None,
            Some(name) => Some(EventType::new(name).map_err(|e| {
                ApiError::bad_request(format!("invalid event {}: {e}", quote(name)))
            })?),
        };
        let data = match self.data {
            serde_json::Value::String(text) => text,
            serde_json::Value::Null => return Err(ApiError::bad_request("data must not be null")),
            value => value.to_string(),
        };
        if data.is_empty() {
            return Err(ApiError::bad_request(
                "data must not be empty (browsers do not dispatch events without data)",
            ));
        }
        let max_event_bytes = retention.limits_for(topic.as_str()).1.max_data_bytes;
        if data.len() > max_event_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("data is larger than {max_event_bytes} bytes"),
            ));
        }
        Ok(PublishRequest { topic, event, data })
    }
}

/// What `POST /publish` answers.
enum Published {
    One(StreamId),
    /// A batch: one id per event, in order.
    Many(Vec<StreamId>),
}

/// `POST /publish`, in a span of its own: a child of the caller's `traceparent` when it sent
/// one, whose trace context is stored with the event so that every replica's delivery links
/// back to it. Its log lines carry the request id and the trace id.
///
/// `application/json`: one event. `application/x-ndjson`: a batch, one event per line, checked
/// as a whole before any is published (a bad line refuses the batch and names the line), then
/// published in order in one round trip to Redis.
pub(super) async fn publish(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let request_id = request_id(&req);
    let sent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| Traceparent::new(t.trim()).ok());
    let span = tracing::info_span!(
        "publish",
        otel.kind = "server",
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        messaging.destination.name = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, sent.as_ref());
    let traceparent = telemetry::publish_context(&span, sent.as_ref());
    if let Some(traceparent) = &traceparent {
        span.record("trace_id", traceparent.trace_id());
    }
    let publish = async {
        let batch =
            match req.mime_type() {
                Ok(Some(mime)) if mime.essence_str() == "application/json" => false,
                Ok(Some(mime)) if mime.essence_str() == "application/x-ndjson" => true,
                _ => return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Content-Type must be application/json (one event) or application/x-ndjson \
                     (a batch, one event per line)",
                )),
            };
        let key = match req.headers().get("idempotency-key") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|key| IdempotencyKey::new(key).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid Idempotency-Key: 1 to 255 bytes of printable ASCII without \
                             spaces",
                        )
                    })?,
            ),
        };
        let retention = state.bus.retention().unwrap_or_else(|| {
            // Before the fleet's table was read: this replica's own flag.
            let seed = ssegw_protocol::retention::Limits {
                max_data_bytes: state.stream.max_event_bytes,
                ..Default::default()
            };
            Arc::new(Retention::new(seed, 0))
        });
        // JSON escaping can grow data up to six-fold (`\u0000`); sizes are checked after.
        let per_event = retention.max_data_bytes() * 6 + 4096;
        let limit = if batch {
            per_event
                .saturating_mul(state.publish.batch_max)
                .min(MAX_BATCH_BODY)
        } else {
            per_event
        };
        let body = read_body(payload, limit).await?;
        // Only the header: a cookie would let any page the user visits publish in their name.
        let token = crate::auth::bearer(&req).map_err(|e| ApiError::auth(e, &state.stats))?;
        let window = state.publish.idempotency_window;
        if !batch {
            let request = serde_json::from_slice::<PublishBody>(&body)
                .map_err(|e| ApiError::bad_request(format!("invalid publish body: {e}")))?
                .validate(&retention)?;
            tracing::Span::current().record("messaging.destination.name", request.topic.as_str());
            state
                .auth
                .authorize(Action::Publish, token.as_deref(), [&request.topic])
                .map_err(|e| ApiError::auth(e, &state.stats))?;
            let id = state
                .bus
                .publish(&Publish {
                    topic: &request.topic,
                    event: request.event.as_ref(),
                    data: &request.data,
                    traceparent: traceparent.as_ref(),
                    idempotency: key.as_ref().map(|key| (key, window)),
                })
                .await?;
            tracing::debug!(%id, "published");
            return Ok(Published::One(id));
        }
        let requests = parse_batch(&body, &retention, state.publish.batch_max)?;
        state
            .auth
            .authorize(
                Action::Publish,
                token.as_deref(),
                requests.iter().map(|r| &r.topic),
            )
            .map_err(|e| ApiError::auth(e, &state.stats))?;
        // A batch's key covers each event by its place: `<key>/<line>`, so that the same batch
        // sent again is published once.
        let keys = match &key {
            None => Vec::new(),
            Some(key) => (1..=requests.len())
                .map(|n| IdempotencyKey::new(&format!("{key}/{n}")))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    ApiError::bad_request(
                        "Idempotency-Key is too long for a batch: each event's key, <key>/<n>, \
                         must fit in 255 bytes",
                    )
                })?,
        };
        let publishes: Vec<Publish> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| Publish {
                topic: &r.topic,
                event: r.event.as_ref(),
                data: &r.data,
                traceparent: traceparent.as_ref(),
                idempotency: keys.get(i).map(|key| (key, window)),
            })
            .collect();
        let results = state.bus.publish_many(&publishes).await;
        if results.iter().all(Result::is_ok) {
            tracing::debug!(events = results.len(), "published a batch");
            return Ok(Published::Many(results.into_iter().flatten().collect()));
        }
        Err(batch_error(results))
    };
    let result: Result<Published, ApiError> = publish.instrument(span).await;
    let mut response = match result {
        // Written out rather than through a `serde_json::Value`: a stream id is digits and one
        // `-`, nothing to escape, and this runs once per event.
        Ok(Published::One(id)) => HttpResponse::Ok()
            .content_type(header::ContentType::json())
            .body(format!(r#"{{"id":"{id}"}}"#)),
        Ok(Published::Many(ids)) => {
            let ids: Vec<String> = ids.iter().map(StreamId::to_string).collect();
            HttpResponse::Ok().json(serde_json::json!({ "ids": ids }))
        }
        Err(e) => e.error_response(),
    };
    if let Ok(value) = header::HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), value);
    }
    Ok(response)
}

/// Largest batch body read, whatever `--publish-batch-max` allows.
const MAX_BATCH_BODY: usize = 64 << 20;

/// Reads the request body, refusing it with 413 as soon as it passes `limit` bytes.
pub(crate) async fn read_body(
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("could not read publish body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("publish body is larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The events of an NDJSON batch, each checked as a single publish is; blank lines are
/// skipped. The first bad line refuses the whole batch, named by its number.
fn parse_batch(
    body: &[u8],
    retention: &Retention,
    max: usize,
) -> Result<Vec<PublishRequest>, ApiError> {
    let mut requests = Vec::new();
    for (n, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if requests.len() == max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a batch holds at most {max} events"),
            ));
        }
        let at_line =
            |e: ApiError| ApiError::new(e.status(), format!("line {}: {}", n + 1, e.message()));
        let request = serde_json::from_slice::<PublishBody>(line)
            .map_err(|e| ApiError::bad_request(format!("invalid publish body: {e}")))
            .and_then(|body| body.validate(retention))
            .map_err(at_line)?;
        requests.push(request);
    }
    if requests.is_empty() {
        return Err(ApiError::bad_request(
            "empty batch: send one JSON object per line",
        ));
    }
    Ok(requests)
}

/// A batch that Redis answered only in part: the status of its first failure, and each
/// event's outcome in order (`{"id": ...}` or `{"error": ...}`), so that the client knows
/// which were stored.
fn batch_error(results: Vec<Result<StreamId, crate::bus::BusError>>) -> ApiError {
    let first = results
        .iter()
        .find_map(|r| r.as_ref().err().cloned())
        .expect("a failure");
    let first = ApiError::from(first);
    let failed = results.iter().filter(|r| r.is_err()).count();
    let message = format!(
        "{failed} of {} events were not published (the first: {}); `results` says which were",
        results.len(),
        first.message()
    );
    let outcomes: Vec<serde_json::Value> = results
        .into_iter()
        .map(|r| match r {
            Ok(id) => serde_json::json!({ "id": id.to_string() }),
            Err(e) => serde_json::json!({ "error": ApiError::from(e).message() }),
        })
        .collect();
    ApiError::new(first.status(), message).with_results(outcomes)
}

/// The caller's `X-Request-Id` when it is a short token, else a new one: a random (v4) UUID
/// from fastrand, not from the operating system's generator, which costs a system call per
/// request. It only ties log lines together, so it need not be unpredictable.
fn request_id(req: &HttpRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
                .into_uuid()
                .to_string()
        })
}

/// This replica's metrics in the Prometheus text format.
pub(super) async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    match state.metrics.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(e) => {
            tracing::error!(error = %e, "cannot render the metrics");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot render the metrics",
            )
            .error_response()
        }
    }
}

pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "alive" }))
}

pub(super) async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let bus = state.bus.describe();
    let status = if state.drain.is_cancelled() {
        "draining"
    } else if !state.bus.is_ready() {
        "not ready"
    } else {
        return HttpResponse::Ok().json(serde_json::json!({ "status": "ready", "bus": bus }));
    };
    HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": status, "bus": bus }))
}

pub(super) async fn status(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(status_json(&state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(query: &str, header: Option<&str>, expected: Result<(&[&str], Option<&str>), &str>) {
        let got = SubscribeRequest::parse(query, header.map(str::as_bytes), 3);
        match (got, expected) {
            (Ok(req), Ok((topics, id))) => {
                let names: Vec<&str> = req.topics.iter().map(Topic::as_str).collect();
                assert_eq!(names, topics, "{query}");
                assert_eq!(req.last_event_id.as_deref(), id, "{query}");
            }
            (Err(e), Err(part)) => assert!(e.message().contains(part), "{query}: {}", e.message()),
            (got, _) => panic!("{query}: unexpected {got:?}"),
        }
    }

    #[test]
    fn parses_subscribe_queries() {
        check("topic=a", None, Ok((&["a"], None)));
        check("topic=b&topic=a&topic=b", None, Ok((&["a", "b"], None)));
        check("topic=a&lastEventId=5-0", None, Ok((&["a"], Some("5-0"))));
        check(
            "topic=a&lastEventId=5-0",
            Some("6-0"),
            Ok((&["a"], Some("6-0"))),
        );
        check("topic=a&lastEventId=", Some(""), Ok((&["a"], None)));
        check("topic=orders%2Eeu&x=1", None, Ok((&["orders.eu"], None)));
        check("", None, Err("missing topic"));
        check("topic=", None, Err("must not be empty"));
        check("topic=a%7Bb%7D", None, Err("invalid topic"));
        check(
            "topic=a&topic=b&topic=c&topic=d",
            None,
            Err("too many topics"),
        );
        check("topic=a&topic=a&topic=a&topic=a", None, Ok((&["a"], None)));
        check(
            &format!("topic={}", "x".repeat(5000)),
            None,
            Err("... (5000 bytes)"),
        );
    }

    #[test]
    fn publish_bodies_are_objects() {
        let parse = |json: &str| serde_json::from_str::<PublishBody>(json).map(|_| ());
        assert!(parse(r#"{"topic":"t","data":"d"}"#).is_ok());
        for bad in [
            r#"["t","d"]"#,
            r#"{"topic":"t","data":"d","x":1}"#,
            r#"{"data":"d"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
