//! `GET /.well-known/mercure`: a Mercure subscription. Every subscriber is a member of the
//! hub's log topic on its replica's hub (the native machinery: one Redis subscription per
//! replica, backfills after reconnects, readiness), and its stream filters the log's updates:
//! those with a topic one of its selectors matches, and, for private updates, a topic one of
//! its token's `mercure.subscribe` selectors matches. Resuming finds the update id's position
//! in the log (`Bus::mercure_find`) on any replica and replays from there; the `Last-Event-ID`
//! response header says where the replay started, `earliest` when it could not start after the
//! id asked for.

use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use ssegw_protocol::frame::{self, GapReason};
use ssegw_protocol::mercure::selector::Selector;
use ssegw_protocol::mercure::update::{Update, EARLIEST};
use ssegw_protocol::{StreamId, Topic};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::auth::Role;
use super::router::{self, Subscription};
use super::{MAX_SELECTOR_BYTES, MAX_TOPICS};
use crate::auth::AuthError;
use crate::bus::{Bus, Page};
use crate::config::StreamConfig;
use crate::fanout::event::{Delivery, Event};
use crate::fanout::sse::End;
use crate::http::handoff::Handoff;
use crate::http::{ApiError, AppState};
use crate::telemetry::stats::Slot;

/// Log entries read per history request while replaying.
const REPLAY_PAGE: usize = 500;
/// Live frames gathered into one chunk, at most.
const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// How often a stream may fall behind its buffer and catch up from the log before it is closed
/// as too slow.
const MAX_CATCH_UPS: u32 = 3;
/// Pause between attempts to read the log while the bus is unavailable.
const REPLAY_RETRY: Duration = Duration::from_secs(1);

/// The query of a subscription.
#[derive(Debug)]
pub struct SubscribeQuery {
    pub selectors: Vec<Selector>,
    /// The non-empty `Last-Event-ID` header, else the non-empty `lastEventID` parameter.
    pub last_event_id: Option<String>,
    /// The `authorization` query parameter.
    pub authorization: Option<String>,
}

impl SubscribeQuery {
    /// Reads the query; `selector` compiles (or finds) a selector.
    pub fn parse(
        query: &str,
        header_id: Option<&[u8]>,
        selector: impl Fn(&str) -> Selector,
    ) -> Result<SubscribeQuery, ApiError> {
        let mut selectors: Vec<Selector> = Vec::new();
        let mut selector_bytes = 0;
        let (mut query_id, mut authorization) = (None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "topic" => {
                    if selectors.len() == MAX_TOPICS {
                        return Err(ApiError::bad_request(format!(
                            "Too many \"topic\" parameters: at most {MAX_TOPICS}"
                        )));
                    }
                    selector_bytes += value.len();
                    if selector_bytes > MAX_SELECTOR_BYTES {
                        return Err(ApiError::bad_request(format!(
                            "the \"topic\" parameters are longer than {MAX_SELECTOR_BYTES} bytes together"
                        )));
                    }
                    if !selectors.iter().any(|s| s.as_str() == value) {
                        selectors.push(selector(&value));
                    }
                }
                "lastEventID" if !value.is_empty() => query_id = Some(value.into_owned()),
                "authorization" if !value.is_empty() => authorization = Some(value.into_owned()),
                _ => {}
            }
        }
        if selectors.is_empty() {
            return Err(ApiError::bad_request("Missing \"topic\" parameter"));
        }
        let header_id = header_id
            .filter(|h| !h.is_empty())
            .map(|h| String::from_utf8_lossy(h).into_owned());
        Ok(SubscribeQuery {
            selectors,
            last_event_id: header_id.or(query_id),
            authorization,
        })
    }
}

/// Which updates a subscriber receives.
#[derive(Debug)]
pub struct Filter {
    pub selectors: Vec<Selector>,
    /// The token's `mercure.subscribe` selectors; `None` for an anonymous subscriber, who
    /// receives no private update.
    pub claims: Option<Vec<Selector>>,
}

impl Filter {
    /// One of the update's topics matches one of the selectors; a private update also needs
    /// one of its topics (maybe another) to match one of the token's selectors.
    pub fn accepts(&self, update: &Update) -> bool {
        let matched = |selectors: &[Selector]| {
            update
                .topics
                .iter()
                .any(|topic| selectors.iter().any(|s| s.matches(topic)))
        };
        matched(&self.selectors) && self.allows_private(update)
    }

    /// A public update, or a private one that one of the token's selectors allows.
    pub fn allows_private(&self, update: &Update) -> bool {
        !update.private
            || self.claims.as_deref().is_some_and(|claims| {
                update
                    .topics
                    .iter()
                    .any(|topic| claims.iter().any(|s| s.matches(topic)))
            })
    }
}

/// The checks of a subscription, in order: the hub is on, the query parses, the token (or
/// anonymous access) is accepted. Returns the query and the token's claims.
fn admit(
    req: &HttpRequest,
    state: &AppState,
) -> Result<(SubscribeQuery, Option<super::auth::Claims>), ApiError> {
    let Some(mercure) = &state.mercure else {
        return Err(ApiError::new(
            actix_web::http::StatusCode::NOT_FOUND,
            "the Mercure hub is off",
        ));
    };
    let query = SubscribeQuery::parse(
        req.query_string(),
        req.headers().get("last-event-id").map(|h| h.as_bytes()),
        |text| mercure.selector(text),
    )?;
    let token = mercure
        .auth
        .token(req, query.authorization.as_deref(), Role::Subscriber)
        .map_err(|e| ApiError::auth(e, &state.stats))?;
    let claims = match token {
        Some(token) => Some(
            mercure
                .auth
                .verify(&token, Role::Subscriber, |text| mercure.selector(text))
                .map_err(|e| ApiError::auth(e, &state.stats))?,
        ),
        None if mercure.auth.anonymous() => None,
        None => {
            return Err(ApiError::auth(
                AuthError::Missing(
                    "subscribing needs a token: the Authorization header, the authorization \
                     query parameter or the cookie"
                        .into(),
                ),
                &state.stats,
            ))
        }
    };
    Ok((query, claims))
}

/// The head of a Mercure event stream.
fn stream_head() -> actix_web::HttpResponseBuilder {
    let mut response = HttpResponse::Ok();
    response
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((
            header::CACHE_CONTROL,
            "private, no-cache, no-store, must-revalidate, max-age=0",
        ))
        .insert_header(("x-accel-buffering", "no"));
    response
}

/// `HEAD /.well-known/mercure`: what a `GET` would answer, its checks included, without the
/// stream (the Mercure hub serves `HEAD` too).
pub(crate) async fn head(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admit(&req, &state)?;
    Ok(stream_head().finish())
}

pub(crate) async fn subscribe(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (query, claims) = admit(&req, &state)?;
    let mercure = state.mercure.as_ref().expect("admitted: the hub is on");
    let slot = crate::http::api::open_slot(&state)?;
    let closes_at = claims.as_ref().and_then(|c| mercure.auth.closes_at(c));
    let payload = claims.as_ref().and_then(|c| c.payload.clone());
    let filter = Rc::new(Filter {
        selectors: query.selectors,
        claims: claims.map(|c| c.subscribe.unwrap_or_default()),
    });
    // Registered before the log is read: what the log delivers from now on reaches it.
    let (subscription, log) = router::subscribe(
        &state.hub,
        &mercure.log,
        filter.clone(),
        state.stream.keepalive,
    );
    let joined = Instant::now();
    let Ok(baseline) = tokio::time::timeout(state.stream.subscribe_timeout, log.wait_ready()).await
    else {
        state.stats.record(&state.stats.refused_unavailable);
        return Err(ApiError::unavailable(
            "gateway is not subscribed to Redis, retry later",
        ));
    };
    let mut stream = MercureStream {
        subscription,
        _tracking: None,
        joined,
        bus: state.bus.clone(),
        log: mercure.log.clone(),
        config: state.stream.clone(),
        filter,
        position: baseline,
        replaying: false,
        catch_ups: 0,
        live: false,
        closes_at: closes_at.map(|at| {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            Box::pin(tokio::time::sleep(left))
        }),
        drain: state.drain.clone(),
        draining: None,
        slot,
        ended: false,
    };
    let retry_ms = state.stream.retry.as_millis() as u64;
    let (first, resumed_from) = match query.last_event_id {
        // A fresh subscription: live from the log's head. Its first block names that position
        // as the id, so that a client that drops before its first update resumes exactly.
        None => (
            frame::preamble(retry_ms, Some(&format!("#{baseline}"))),
            None,
        ),
        Some(id) => {
            state.stats.record(&state.stats.resumed);
            let (position, gap) = if id == EARLIEST {
                (StreamId::ZERO, None)
            } else if let Some(position) = id.strip_prefix('#') {
                match StreamId::parse(position) {
                    Ok(position) => (position, None),
                    Err(_) => (StreamId::ZERO, Some(GapReason::InvalidId)),
                }
            } else {
                match state.bus.mercure_find(&mercure.log, &id).await? {
                    Some(position) => (position, None),
                    None => (StreamId::ZERO, Some(GapReason::InvalidId)),
                }
            };
            stream.position = position;
            // The first page is read before the head goes out, so that `Last-Event-ID` says
            // whether the replay starts right after the id asked for.
            let page = stream.read().await?;
            let gap = gap.or(page.gap);
            let mut first = BytesMut::from(&frame::preamble(retry_ms, None)[..]);
            if let Some(reason) = gap {
                state.stats.record(&state.stats.gaps);
                first.extend_from_slice(&gap_frame(reason));
            }
            stream.replayed(&page, &mut first);
            let header = if gap.is_some() || id == EARLIEST {
                EARLIEST.to_string()
            } else {
                id
            };
            (first.freeze(), Some(header))
        }
    };
    // Admitted, its first page read: in the registry from here until the stream ends.
    stream._tracking = mercure
        .subscriptions
        .as_ref()
        .map(|registry| registry.track(&stream.filter.selectors, payload.as_ref()));
    stream.slot.start();
    let chunks =
        futures_util::stream::unfold((Some(first), stream), |(first, mut stream)| async move {
            let chunk = match first {
                Some(first) => first,
                None => stream.next_chunk().await?,
            };
            Some((chunk, (None, stream)))
        })
        .boxed_local();
    let mut response = stream_head();
    if let Some(id) = resumed_from {
        if let Ok(value) = header::HeaderValue::from_str(&id) {
            response.insert_header(("last-event-id", value));
        }
    }
    // As native streams: on the plain listener, HTTP/1 streams leave actix-http once the head
    // is out (`handoff`), holding only their own state; HTTP/2 and TLS streams stay actix
    // bodies.
    let chunked = match req.version() {
        actix_web::http::Version::HTTP_10 => Some(false),
        actix_web::http::Version::HTTP_11 => Some(true),
        _ => None,
    };
    match (req.conn_data::<Handoff>(), chunked) {
        (Some(handoff), Some(chunked)) => {
            handoff.park_chunks(chunks, chunked);
            if chunked {
                response.insert_header((header::TRANSFER_ENCODING, "chunked"));
            }
            let mut response = response
                .force_close()
                .streaming(futures_util::stream::empty::<Result<Bytes, Infallible>>());
            response.head_mut().no_chunking(true);
            Ok(response)
        }
        _ => Ok(response.streaming(chunks.map(Ok::<_, Infallible>))),
    }
}

/// A named `ssegw-gap` event: updates after the position asked for are gone (or the id was
/// never in the log); what follows starts at the oldest retained update. Mercure clients that
/// only listen to `message` events do not see it.
fn gap_frame(reason: GapReason) -> Bytes {
    let reason = match reason {
        GapReason::InvalidId => "unknown-id",
        other => other.as_str(),
    };
    Bytes::from(format!(
        "event: ssegw-gap\ndata: {{\"reason\":\"{reason}\"}}\n\n"
    ))
}

struct MercureStream {
    /// What this replica's router hands it from the log.
    subscription: Subscription,
    /// Its subscriptions in the fleet's registry (`--mercure-subscriptions`), ended on drop.
    _tracking: Option<super::subscriptions::Tracking>,
    /// When it was registered: a read of the log issued after, with what the router hands
    /// it, misses nothing.
    joined: Instant,
    bus: Arc<Bus>,
    log: Topic,
    config: Arc<StreamConfig>,
    filter: Rc<Filter>,
    /// The last log entry delivered or skipped: history is read after it, and live entries at
    /// or before it are duplicates.
    position: StreamId,
    replaying: bool,
    catch_ups: u32,
    /// Set once live entries went out; a lag after that closes the stream as too slow.
    live: bool,
    closes_at: Option<Pin<Box<Sleep>>>,
    drain: CancellationToken,
    /// When a draining replica closes this stream.
    draining: Option<Pin<Box<Sleep>>>,
    slot: Slot,
    ended: bool,
}

impl MercureStream {
    async fn read(&self) -> Result<Arc<Page>, ApiError> {
        Ok(self
            .bus
            .read(&self.log, self.position, REPLAY_PAGE, self.joined)
            .await?)
    }

    /// Appends a history page's accepted frames to `out`, and moves the position over every
    /// entry, accepted or not. After a gap the page starts at the oldest retained entry.
    fn replayed(&mut self, page: &Page, out: &mut BytesMut) {
        if page.gap.is_some() {
            self.position = StreamId::ZERO;
        }
        for event in &page.entries {
            self.take(event, out, true);
        }
        // A full page: more to read, after this one.
        self.replaying = page.entries.len() >= REPLAY_PAGE;
    }

    /// Appends `event`'s frame to `out` if it is new and accepted (`filter`: a history entry;
    /// the router checked what it hands over).
    fn take(&mut self, event: &Event, out: &mut BytesMut, filter: bool) {
        if event.id <= self.position {
            return;
        }
        self.position = event.id;
        if let Some(update) = &event.mercure {
            if !filter || self.filter.accepts(update) {
                out.extend_from_slice(&event.frame);
            }
        }
    }

    fn end(&mut self, reason: End) -> Option<Bytes> {
        self.ended = true;
        reason.record(&mut self.slot);
        Some(reason.last_chunk(self.config.retry))
    }

    /// The next chunk to write; `None` ends the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        loop {
            if self.replaying {
                match self.read().await {
                    Ok(page) => {
                        let mut out = BytesMut::new();
                        if let Some(reason) = page.gap {
                            out.extend_from_slice(&gap_frame(reason));
                        }
                        self.replayed(&page, &mut out);
                        if !out.is_empty() {
                            return Some(out.freeze());
                        }
                    }
                    Err(_) => {
                        tokio::select! {
                            _ = tokio::time::sleep(REPLAY_RETRY) => {}
                            _ = self.drain.cancelled() => return self.end(End::Drained),
                        }
                    }
                }
                continue;
            }
            if self.subscription.lagged.get() && self.subscription.receiver.is_empty() {
                // The router dropped deliveries for it: catch up from the log. When the router
                // itself fell behind, always; when this stream let its channel fill, unless it
                // is live already (then the client is too slow) or did so too often.
                if !self.subscription.router_lagged.replace(false) {
                    if self.live || self.catch_ups >= MAX_CATCH_UPS {
                        return self.end(End::Slow);
                    }
                    self.catch_ups += 1;
                }
                self.subscription.lagged.set(false);
                self.replaying = true;
                if self.drain.is_cancelled() {
                    self.start_drain();
                }
                continue;
            }
            let delivery = tokio::select! {
                biased;
                _ = async { self.closes_at.as_mut().expect("checked").await }, if self.closes_at.is_some() => {
                    return self.end(End::Expired);
                }
                _ = async { self.draining.as_mut().expect("checked").await }, if self.draining.is_some() => {
                    return self.end(End::Drained);
                }
                delivery = self.subscription.receiver.recv() => delivery,
            };
            let Some(delivery) = delivery else {
                // The router ended: the hub is going away.
                return self.end(End::Closed);
            };
            let mut out = BytesMut::new();
            let mut next = Some(delivery);
            while let Some(delivery) = next.take() {
                match delivery {
                    Delivery::Event(event) => self.take(&event, &mut out, false),
                    Delivery::Batch(batch) => {
                        for event in &batch.events {
                            self.take(event, &mut out, false);
                        }
                    }
                    Delivery::Gap { reason, .. } => {
                        // The log restarted (or lost entries) under this replica: what follows
                        // may have any ids.
                        self.position = StreamId::ZERO;
                        out.extend_from_slice(&gap_frame(reason));
                    }
                    Delivery::Keepalive => out.extend_from_slice(b":\n\n"),
                    Delivery::Drain => self.start_drain(),
                }
                if out.len() < MAX_CHUNK_BYTES {
                    next = self.subscription.receiver.try_recv().ok();
                }
            }
            if !out.is_empty() {
                self.live = true;
                return Some(out.freeze());
            }
        }
    }

    fn start_drain(&mut self) {
        if self.draining.is_none() {
            let delay = self.config.drain_spread().mul_f64(fastrand::f64());
            self.draining = Some(Box::pin(tokio::time::sleep(delay)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(topics: &[&str], private: bool) -> Update {
        Update {
            id: "u".into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            private,
            kind: None,
            retry: None,
            data: "d".into(),
        }
    }

    fn filter(selectors: &[&str], claims: Option<&[&str]>) -> Filter {
        Filter {
            selectors: selectors.iter().map(|s| Selector::new(s)).collect(),
            claims: claims.map(|c| c.iter().map(|s| Selector::new(s)).collect()),
        }
    }

    #[test]
    fn filters_as_the_spec_says() {
        let books = "https://ex.com/books/{id}";
        let anonymous = filter(&[books], None);
        assert!(anonymous.accepts(&update(&["https://ex.com/books/1"], false)));
        assert!(!anonymous.accepts(&update(&["https://ex.com/books/1/x"], false)));
        assert!(!anonymous.accepts(&update(&["https://ex.com/books/1"], true)));
        // An alternate topic matches too.
        assert!(anonymous.accepts(&update(&["other", "https://ex.com/books/2"], false)));
        // The spec's example: the private update's other topic matches the token's selector.
        let user = "https://ex.com/users/foo/{?topic}";
        let token = filter(&[books], Some(&[user]));
        let both = update(
            &[
                "https://ex.com/books/1",
                "https://ex.com/users/foo/?topic=https%3A%2F%2Fex.com%2Fbooks%2F1",
            ],
            true,
        );
        assert!(token.accepts(&both));
        assert!(!token.accepts(&update(&["https://ex.com/books/2"], true)));
        // Both matches are needed.
        let narrow = filter(&["other"], Some(&["t"]));
        assert!(!narrow.accepts(&update(&["t"], true)));
        assert!(filter(&["*"], Some(&["*"])).accepts(&update(&["t"], true)));
    }

    #[test]
    fn queries_are_read_as_the_hub_reads_them() {
        let q = SubscribeQuery::parse(
            "topic=a&topic=b&topic=a&lastEventID=x&authorization=t",
            None,
            Selector::new,
        )
        .unwrap();
        assert_eq!(q.selectors.len(), 2);
        assert_eq!(q.last_event_id.as_deref(), Some("x"));
        assert_eq!(q.authorization.as_deref(), Some("t"));
        let q = SubscribeQuery::parse("topic=a&lastEventID=x", Some(b"h"), Selector::new).unwrap();
        assert_eq!(q.last_event_id.as_deref(), Some("h"), "the header wins");
        let q = SubscribeQuery::parse("topic=a&lastEventID=x", Some(b""), Selector::new).unwrap();
        assert_eq!(q.last_event_id.as_deref(), Some("x"));
        assert_eq!(
            SubscribeQuery::parse("lastEventID=x", None, Selector::new)
                .unwrap_err()
                .status(),
            400
        );
        let many = (0..=MAX_TOPICS)
            .map(|i| format!("topic={i}"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(
            SubscribeQuery::parse(&many, None, Selector::new)
                .unwrap_err()
                .status(),
            400
        );
        let long = format!("topic={}", "x".repeat(MAX_SELECTOR_BYTES + 1));
        assert_eq!(
            SubscribeQuery::parse(&long, None, Selector::new)
                .unwrap_err()
                .status(),
            400
        );
    }
}
