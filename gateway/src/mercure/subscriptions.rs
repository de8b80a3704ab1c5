//! Active subscriptions (`--mercure-subscriptions true`): the Mercure spec's subscription
//! updates and subscriptions API across the fleet, each replica's subscriptions in its own
//! Redis hash, changed with their update in one call (docs/mercure.md, "Active subscriptions",
//! says how replicas beat, reap the dead and rejoin).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use ssegw_protocol::mercure::selector::Selector;
use ssegw_protocol::mercure::update::{self, Update};
use ssegw_protocol::Topic;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::auth::Role;
use crate::auth::AuthError;
use crate::bus::presence::EXPIRY_INTERVALS;
use crate::bus::{Bus, BusError, TrackOp, Tracked};
use crate::http::{ApiError, AppState};

/// The collection of subscriptions; a selector's are under `/{selector}`, one subscription at
/// `/{selector}/{subscriber}`, both segments escaped as `query_escape` escapes them.
pub const API_PATH: &str = "/.well-known/mercure/subscriptions";
/// The JSON-LD context of every document.
const CONTEXT: &str = "https://mercure.rocks/";
/// Subscriptions per registry call.
const BATCH: usize = 256;
/// Subscriptions of a dead replica ended per call.
const REAP_BATCH: usize = 500;
/// Reaping calls per beat, at most: a dead replica's 10,000 subscriptions end within a beat.
const REAP_CALLS_PER_BEAT: usize = 20;
/// Largest `mercure.payload` claim, serialized: it is copied into every subscription's
/// document and update.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024;

/// What Go's `url.QueryEscape` leaves alone: letters, digits and `-_.~` (space becomes `+`).
const QUERY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `s` escaped as the Mercure hub escapes selectors and subscriber ids in subscription ids
/// (Go's `url.QueryEscape`).
pub fn query_escape(s: &str) -> String {
    utf8_percent_encode(s, QUERY_ESCAPE)
        .to_string()
        .replace("%20", "+")
}

/// The reverse of `query_escape` (Go's `url.QueryUnescape`): `+` is a space; `None` for a
/// malformed escape or bytes that are not UTF-8.
pub fn query_unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return None;
        }
    }
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// A subscription's JSON-LD document, with the Mercure hub's fields in its order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    #[serde(rename = "@context", default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subscriber: String,
    pub topic: String,
    pub active: bool,
    #[serde(
        rename = "lastEventID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub last_event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

impl Document {
    fn new(selector: &str, subscriber: &str, payload: Option<&serde_json::Value>) -> Document {
        Document {
            context: None,
            id: format!(
                "{API_PATH}/{}/{}",
                query_escape(selector),
                query_escape(subscriber)
            ),
            kind: "Subscription".into(),
            subscriber: subscriber.into(),
            topic: selector.into(),
            active: true,
            last_event_id: None,
            payload: payload.cloned(),
        }
    }

    /// The private update announcing that the subscription started (`active`) or ended: its
    /// topic is the subscription's id, its data the document, as the Mercure hub sends it.
    fn update(&self, active: bool) -> Update {
        let document = Document {
            context: Some(CONTEXT.into()),
            active,
            ..self.clone()
        };
        Update {
            id: format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            topics: vec![self.id.clone()],
            private: true,
            kind: None,
            retry: None,
            data: serde_json::to_string_pretty(&document).expect("a document serializes"),
        }
    }
}

/// One subscription of this replica: its id, and its document as stored in Redis (the rest
/// is read from it when an update is made: an entry lives as long as its stream, so it holds
/// each byte once).
#[derive(Debug)]
struct Entry {
    id: Arc<str>,
    stored: Box<str>,
}

impl Entry {
    fn new(document: &Document) -> Entry {
        Entry {
            id: document.id.as_str().into(),
            stored: serde_json::to_string(document)
                .expect("a document serializes")
                .into(),
        }
    }

    /// Its document; one that does not parse (not stored by a gateway) still has its id.
    fn document(&self) -> Document {
        let mut document = serde_json::from_str(&self.stored).unwrap_or_else(|_| Document {
            context: None,
            id: String::new(),
            kind: "Subscription".into(),
            subscriber: String::new(),
            topic: String::new(),
            active: true,
            last_event_id: None,
            payload: None,
        });
        document.id = self.id.to_string();
        document
    }
}

/// A change of this replica's subscriptions, queued for the registry task.
enum Change {
    Started(Vec<Arc<Entry>>),
    Ended(Vec<Arc<Entry>>),
    /// The replica stops: end what is left and leave the registry, then answer.
    Leave(oneshot::Sender<()>),
}

/// This replica's part of the fleet's registry of active subscriptions.
pub struct Registry {
    replica: String,
    log: Topic,
    bus: Arc<Bus>,
    /// How long a beat keeps this replica listed: `EXPIRY_INTERVALS` intervals.
    ttl: Duration,
    /// This replica's active subscriptions, by id.
    local: Mutex<HashMap<Arc<str>, Arc<Entry>>>,
    /// Sent by `track` and `Tracking`'s drop (under `local`'s lock, so in the order `local`
    /// changed) and by `leave`; received by the registry task alone. Unbounded: a change is a
    /// connection's start or end, queued while a call is in flight, so it holds at most what
    /// connections do.
    changes: mpsc::UnboundedSender<Change>,
    /// One listing at a time from this replica: a listing holds Redis for about 1.6 µs per
    /// subscription (BENCHMARKS.md).
    listing: tokio::sync::Semaphore,
}

/// A connection's subscriptions in the registry: they end when it is dropped (the stream
/// ended, however it ended).
pub struct Tracking {
    registry: Arc<Registry>,
    entries: Vec<Arc<Entry>>,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        let mut local = self
            .registry
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let ended: Vec<Arc<Entry>> = self
            .entries
            .iter()
            .filter(|e| local.remove(&e.id).is_some())
            .cloned()
            .collect();
        if !ended.is_empty() {
            // Closed once the replica left the registry: then nothing is left to end.
            let _ = self.registry.changes.send(Change::Ended(ended));
        }
    }
}

impl Registry {
    /// Starts the registry task of `replica`, beating every `interval`, until `stop`.
    pub fn start(
        replica: uuid::Uuid,
        log: Topic,
        bus: Arc<Bus>,
        interval: Duration,
        stop: CancellationToken,
    ) -> Arc<Registry> {
        let (changes, receiver) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry {
            replica: replica.to_string(),
            log,
            bus,
            ttl: interval * EXPIRY_INTERVALS,
            local: Mutex::new(HashMap::new()),
            changes,
            listing: tokio::sync::Semaphore::new(1),
        });
        tokio::spawn(registry.clone().run(receiver, interval, stop));
        registry
    }

    /// Registers a connection's subscriptions, one per selector, under a new subscriber id.
    pub fn track(
        self: &Arc<Self>,
        selectors: &[Selector],
        payload: Option<&serde_json::Value>,
    ) -> Tracking {
        let subscriber = format!("urn:uuid:{}", uuid::Uuid::new_v4());
        let entries: Vec<Arc<Entry>> = selectors
            .iter()
            .map(|selector| {
                Arc::new(Entry::new(&Document::new(
                    selector.as_str(),
                    &subscriber,
                    payload,
                )))
            })
            .collect();
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        for entry in &entries {
            local.insert(entry.id.clone(), entry.clone());
        }
        let _ = self.changes.send(Change::Started(entries.clone()));
        drop(local);
        Tracking {
            registry: self.clone(),
            entries,
        }
    }

    /// Ends this replica's subscriptions that are still open and leaves the registry: the
    /// last step of a graceful stop. Waits at most `timeout` (Redis may be down).
    pub async fn leave(&self, timeout: Duration) {
        let (done, left) = oneshot::channel();
        if self.changes.send(Change::Leave(done)).is_ok() {
            let _ = tokio::time::timeout(timeout, left).await;
        }
    }

    async fn run(
        self: Arc<Self>,
        mut receiver: mpsc::UnboundedReceiver<Change>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut beat = tokio::time::interval(interval);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The registry may lack some of this replica's subscriptions (a failed call, or the
        // replica was taken for dead): all are stored again at the next beat.
        let mut stale = false;
        // Ended subscriptions whose removal failed, removed again at the next beat.
        let mut unremoved: Vec<Arc<Entry>> = Vec::new();
        loop {
            // The beat first: a queue of changes that never empties (a mass reconnect) must
            // not keep the replica from beating, and so from being taken for dead.
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = beat.tick() => {
                    stale |= self.beat().await;
                    if stale {
                        let all: Vec<Arc<Entry>> = self
                            .local
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .values()
                            .cloned()
                            .collect();
                        stale = false;
                        self.flush(TrackOp::Add, all, &mut stale, &mut unremoved).await;
                    }
                    if !unremoved.is_empty() {
                        let retry = std::mem::take(&mut unremoved);
                        self.flush(TrackOp::Del, retry, &mut stale, &mut unremoved).await;
                    }
                }
                change = receiver.recv() => {
                    let Some(change) = change else { return };
                    let mut changes = vec![change];
                    while changes.len() < BATCH {
                        match receiver.try_recv() {
                            Ok(change) => changes.push(change),
                            Err(_) => break,
                        }
                    }
                    // Runs of starts, or of ends, go out together, in order.
                    let mut run: Option<(TrackOp, Vec<Arc<Entry>>)> = None;
                    let mut changes = changes.into_iter();
                    while let Some(change) = changes.next() {
                        let (op, entries) = match change {
                            Change::Started(entries) => (TrackOp::Add, entries),
                            Change::Ended(entries) => (TrackOp::Del, entries),
                            Change::Leave(done) => {
                                if let Some((op, entries)) = run.take() {
                                    self.flush(op, entries, &mut stale, &mut unremoved).await;
                                }
                                // The changes taken with `Leave` and queued behind it.
                                self.leave_now(changes, &mut receiver, unremoved).await;
                                let _ = done.send(());
                                return;
                            }
                        };
                        match &mut run {
                            Some((kind, pending)) if *kind == op => pending.extend(entries),
                            _ => {
                                if let Some((op, entries)) = run.replace((op, entries)) {
                                    self.flush(op, entries, &mut stale, &mut unremoved).await;
                                }
                            }
                        }
                    }
                    if let Some((op, entries)) = run {
                        self.flush(op, entries, &mut stale, &mut unremoved).await;
                    }
                }
            }
        }
    }

    /// Keeps this replica listed, and ends dead replicas' subscriptions, up to
    /// `REAP_CALLS_PER_BEAT` batches. True when this replica must store its subscriptions
    /// again (it was not listed).
    async fn beat(&self) -> bool {
        let mut rejoined = false;
        for _ in 0..REAP_CALLS_PER_BEAT {
            match self
                .bus
                .mercure_beat(&self.log, &self.replica, self.ttl, REAP_BATCH)
                .await
            {
                Ok(beat) => {
                    rejoined |= beat.rejoined;
                    let Some((dead, subscriptions)) = beat.dead else {
                        break;
                    };
                    if !self.reap(&dead, subscriptions).await {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Mercure subscriptions heartbeat failed");
                    break;
                }
            }
        }
        rejoined
    }

    /// Ends the subscriptions of the dead replica `dead` (documents as stored), each once.
    /// False when that failed.
    async fn reap(&self, dead: &str, subscriptions: Vec<(String, String)>) -> bool {
        let entries: Vec<Arc<Entry>> = subscriptions
            .into_iter()
            .map(|(id, stored)| {
                Arc::new(Entry {
                    id: id.into(),
                    stored: stored.into(),
                })
            })
            .collect();
        match self.send(TrackOp::Reap, dead, &entries).await {
            Ok(ended) => {
                if ended > 0 {
                    tracing::info!(
                        replica = dead,
                        ended,
                        "ended the Mercure subscriptions of a replica that stopped beating"
                    );
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, replica = dead, "could not end a dead replica's Mercure subscriptions");
                false
            }
        }
    }

    /// Ends the subscriptions still open here, those that ended since `Leave` was queued
    /// (`after`, the changes taken from the queue with it, then the queue), and those whose end
    /// failed to go out, then leaves the registry.
    async fn leave_now(
        &self,
        after: impl Iterator<Item = Change>,
        receiver: &mut mpsc::UnboundedReceiver<Change>,
        mut unremoved: Vec<Arc<Entry>>,
    ) {
        let mut left: Vec<Arc<Entry>> = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, entry)| entry)
            .collect();
        left.append(&mut unremoved);
        // A stream that ended before `local` was emptied queued its end under `local`'s lock,
        // so it is in the queue now or was taken with `Leave`, maybe behind it; none can end
        // after. (Ends taken with `Leave` were once lost here: never announced.)
        let queued = std::iter::from_fn(|| receiver.try_recv().ok());
        for change in after.chain(queued) {
            match change {
                Change::Ended(mut ended) => left.append(&mut ended),
                // Its subscriptions were in `local`.
                Change::Started(_) => {}
                Change::Leave(done) => {
                    let _ = done.send(());
                }
            }
        }
        let result = match self.send(TrackOp::Del, &self.replica, &left).await {
            Ok(_) => self.send(TrackOp::Leave, &self.replica, &[]).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not end this replica's Mercure subscriptions; other replicas will once it counts as dead");
        }
    }

    /// Stores (`Add`) or removes (`Del`) this replica's `entries`; what Redis could not be
    /// reached for is done again at the next beat, what it refused is dropped and logged.
    async fn flush(
        &self,
        op: TrackOp,
        entries: Vec<Arc<Entry>>,
        stale: &mut bool,
        unremoved: &mut Vec<Arc<Entry>>,
    ) {
        match self.send(op, &self.replica, &entries).await {
            Ok(_) => {}
            Err(BusError::Unavailable(_)) => match op {
                TrackOp::Add => *stale = true,
                _ => unremoved.extend(entries),
            },
            Err(e) => {
                tracing::error!(error = %e, ?op, subscriptions = entries.len(), "the Mercure subscriptions registry refused a change; dropped")
            }
        }
    }

    /// One registry call per `BATCH` entries, each with the update of its change; a `Leave`
    /// with no entries is one call. An entry whose update the log would refuse as too large
    /// (a large `mercure.payload`, a low `--max-event-bytes` for `ssegw.mercure`) is left out,
    /// with a warning, rather than failing its batch for ever.
    async fn send(
        &self,
        op: TrackOp,
        replica: &str,
        entries: &[Arc<Entry>],
    ) -> Result<u64, BusError> {
        let active = op == TrackOp::Add;
        let max = self
            .bus
            .retention()
            .map(|r| r.limits_for(self.log.as_str()).1.max_data_bytes);
        let updates: Vec<(&Arc<Entry>, String, Vec<u8>)> = entries
            .iter()
            .filter_map(|entry| {
                let update = entry.document().update(active);
                let blob = update::encode(&update);
                if max.is_some_and(|max| blob.len() > max) {
                    tracing::warn!(subscription = %entry.id, bytes = blob.len(), "a Mercure subscription's update is larger than the log accepts: not announced");
                    return None;
                }
                Some((entry, update.id, blob))
            })
            .collect();
        let mut published = 0;
        if updates.is_empty() && op == TrackOp::Leave {
            return self
                .bus
                .mercure_track(&self.log, replica, op, self.ttl, &[])
                .await;
        }
        for batch in updates.chunks(BATCH) {
            let items: Vec<Tracked<'_>> = batch
                .iter()
                .map(|(entry, update_id, blob)| Tracked {
                    field: &entry.id,
                    doc: &entry.stored,
                    update_id,
                    blob,
                })
                .collect();
            published += self
                .bus
                .mercure_track(&self.log, replica, op, self.ttl, &items)
                .await?;
        }
        Ok(published)
    }
}

/// `If-None-Match` names `etag` (a list of tags, weak or strong, or `*`).
fn etag_matches(if_none_match: Option<&header::HeaderValue>, etag: &str) -> bool {
    let Some(Ok(tags)) = if_none_match.map(|v| v.to_str()) else {
        return false;
    };
    tags.split(',')
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

/// What the API was asked for, from the request's path.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    All,
    Selector(String),
    One {
        selector: String,
        subscriber: String,
    },
}

/// The request's path after `API_PATH`, segments unescaped; `None` for any other shape.
fn wanted(path: &str) -> Option<Wanted> {
    let rest = path.strip_prefix(API_PATH)?;
    if rest.is_empty() {
        return Some(Wanted::All);
    }
    let segments: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
    match segments[..] {
        [selector] if !selector.is_empty() => Some(Wanted::Selector(query_unescape(selector)?)),
        [selector, subscriber] if !selector.is_empty() && !subscriber.is_empty() => {
            Some(Wanted::One {
                selector: query_unescape(selector)?,
                subscriber: query_unescape(subscriber)?,
            })
        }
        _ => None,
    }
}

/// `GET /.well-known/mercure/subscriptions[/{selector}[/{subscriber}]]`: the fleet's active
/// subscriptions, as JSON-LD, with the log's last update id as `lastEventID` and `ETag`. The
/// token's `mercure.subscribe` selectors must match the request's URI.
pub(crate) async fn api(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let not_found = |message: &str| ApiError::new(StatusCode::NOT_FOUND, message);
    let Some(mercure) = &state.mercure else {
        return Err(not_found("the Mercure hub is off"));
    };
    let Some(registry) = &mercure.subscriptions else {
        return Err(not_found(
            "the subscriptions API is off (--mercure-subscriptions true turns it on)",
        ));
    };
    let Some(wanted) = wanted(req.uri().path()) else {
        return Err(not_found(
            "no such resource: /.well-known/mercure/subscriptions[/{selector}[/{subscriber}]], \
             each segment escaped",
        ));
    };
    let query_token = form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(key, value)| key == "authorization" && !value.is_empty())
        .map(|(_, value)| value.into_owned());
    let auth = |e| ApiError::auth(e, &state.stats);
    let Some(token) = mercure
        .auth
        .token(&req, query_token.as_deref(), Role::Subscriber)
        .map_err(auth)?
    else {
        return Err(auth(AuthError::Missing(
            "the subscriptions API needs a subscriber's token whose mercure.subscribe selectors \
             match its URL"
                .into(),
        )));
    };
    let claims = mercure
        .auth
        .verify(&token, Role::Subscriber, |text| mercure.selector(text))
        .map_err(auth)?;
    let uri = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path(), |p| p.as_str());
    if !claims
        .subscribe
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|s| s.matches(uri))
    {
        return Err(auth(AuthError::Forbidden(
            "the token's mercure.subscribe selectors do not match this URL".into(),
        )));
    }
    let listing = {
        let _one_at_a_time = registry
            .listing
            .acquire()
            .await
            .expect("the semaphore is never closed");
        // One subscription is looked up by its id, the canonical form of the path asked for.
        let only = match &wanted {
            Wanted::One {
                selector,
                subscriber,
            } => Some(Document::new(selector, subscriber, None).id),
            _ => None,
        };
        state
            .bus
            .mercure_subscriptions(&mercure.log, only.as_deref())
            .await?
    };
    let last_event_id = listing.last_event_id;
    // The log's position, not the update's id: publishers choose ids, and may reuse them.
    let etag = format!("\"{}\"", listing.position);
    let mut response = HttpResponse::Ok();
    response
        .insert_header((header::ETAG, etag.as_str()))
        .insert_header((header::CACHE_CONTROL, "private, no-cache"));
    if etag_matches(req.headers().get(header::IF_NONE_MATCH), &etag) {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, etag.as_str()))
            .finish());
    }
    let mut documents: Vec<Document> = listing
        .documents
        .iter()
        .filter_map(|text| serde_json::from_str(text).ok())
        .collect();
    documents.sort_by(|a, b| a.id.cmp(&b.id));
    let body = match wanted {
        Wanted::One {
            selector,
            subscriber,
        } => {
            let Some(document) = documents
                .into_iter()
                .find(|d| d.topic == selector && d.subscriber == subscriber)
            else {
                return Err(not_found("no such active subscription"));
            };
            serde_json::to_string_pretty(&Document {
                context: Some(CONTEXT.into()),
                last_event_id: Some(last_event_id),
                ..document
            })
        }
        wanted => {
            let subscriptions: Vec<Document> = match wanted {
                Wanted::Selector(selector) => documents
                    .into_iter()
                    .filter(|d| d.topic == selector)
                    .collect(),
                _ => documents,
            };
            serde_json::to_string_pretty(&serde_json::json!({
                "@context": CONTEXT,
                "id": uri,
                "type": "Subscriptions",
                "lastEventID": last_event_id,
                "subscriptions": subscriptions,
            }))
        }
    }
    .expect("documents serialize");
    Ok(response.content_type("application/ld+json").body(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_go_query_escape() {
        // Checked against Go 1.22's url.QueryEscape.
        assert_eq!(
            query_escape("https://example.com/{selector}"),
            "https%3A%2F%2Fexample.com%2F%7Bselector%7D"
        );
        assert_eq!(query_escape("*"), "%2A");
        assert_eq!(query_escape("a b~c-d_e.f"), "a+b~c-d_e.f");
        assert_eq!(query_escape("é"), "%C3%A9");
        assert_eq!(
            query_escape("urn:uuid:bb3de268-05b0-4c65-b44e-8f9acefc29d6"),
            "urn%3Auuid%3Abb3de268-05b0-4c65-b44e-8f9acefc29d6"
        );
        for s in ["https://ex.com/{id}?x=1&y=2", "*", "a b+c", "é/ü", "%41"] {
            assert_eq!(query_unescape(&query_escape(s)).as_deref(), Some(s));
        }
        assert_eq!(query_unescape("a+b%2A").as_deref(), Some("a b*"));
        assert_eq!(query_unescape("%zz"), None);
        assert_eq!(query_unescape("%4"), None);
        assert_eq!(query_unescape("%FF"), None, "not UTF-8");
    }

    /// A subscription that ends in the instant its replica leaves, its end queued right behind
    /// `Leave` and taken from the queue with it, is still announced as ended (it was lost).
    #[tokio::test]
    async fn an_end_queued_behind_leave_is_announced() {
        let config = crate::config::Config::from_flags(["--anonymous-subscribe=*"]).unwrap();
        let (interest_tx, interest_rx) = mpsc::unbounded_channel();
        let hub = Arc::new(crate::fanout::hub::Hub::new(
            16,
            interest_tx,
            Duration::ZERO,
        ));
        let bus = Bus::start(
            &config.bus,
            uuid::Uuid::new_v4(),
            hub,
            interest_rx,
            Default::default(),
        )
        .unwrap();
        let bus = Arc::new(bus);
        let log = crate::mercure::log_topic();
        let registry = Registry::start(
            uuid::Uuid::new_v4(),
            log.clone(),
            bus.clone(),
            Duration::from_secs(60),
            CancellationToken::new(),
        );
        // The log's updates as (starts, ends).
        let updates = || async {
            let events = bus.newest(&log, 10).await.unwrap();
            let started = events
                .iter()
                .filter(|e| {
                    std::str::from_utf8(&e.body)
                        .unwrap()
                        .contains("\"active\": true")
                })
                .count();
            (started, events.len() - started)
        };
        let tracking = registry.track(&[Selector::new("urn:a")], None);
        for _ in 0..100 {
            if updates().await != (0, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(updates().await, (1, 0), "the start was announced");
        // Both queued before the registry's task runs again: it takes them in one batch.
        let (done, left) = oneshot::channel();
        registry.changes.send(Change::Leave(done)).unwrap();
        drop(tracking);
        tokio::time::timeout(Duration::from_secs(5), left)
            .await
            .expect("the registry left")
            .unwrap();
        assert_eq!(updates().await, (1, 1), "the end was announced, once");
    }

    #[test]
    fn if_none_match_is_read_as_a_list_of_tags() {
        let etag = "\"1-0\"";
        let check =
            |value: &str| etag_matches(Some(&header::HeaderValue::from_str(value).unwrap()), etag);
        assert!(check("\"1-0\""));
        assert!(check("W/\"1-0\""));
        assert!(check("\"0-1\", \"1-0\""));
        assert!(check("*"));
        assert!(!check("\"1-1\""));
        assert!(!check("1-0"));
        assert!(!etag_matches(None, etag));
    }

    #[test]
    fn reads_the_api_paths() {
        assert_eq!(wanted(API_PATH), Some(Wanted::All));
        assert_eq!(
            wanted(&format!("{API_PATH}/https%3A%2F%2Fex.com%2F%7Bid%7D")),
            Some(Wanted::Selector("https://ex.com/{id}".into()))
        );
        assert_eq!(
            wanted(&format!("{API_PATH}/%2A/urn%3Auuid%3Ax")),
            Some(Wanted::One {
                selector: "*".into(),
                subscriber: "urn:uuid:x".into()
            })
        );
        for bad in [
            format!("{API_PATH}/"),
            format!("{API_PATH}/a/"),
            format!("{API_PATH}//b"),
            format!("{API_PATH}/a/b/c"),
            format!("{API_PATH}/%zz"),
            format!("{API_PATH}x"),
        ] {
            assert_eq!(wanted(&bad), None, "{bad}");
        }
    }

    #[test]
    fn an_entry_holds_its_document_once_and_reads_it_back() {
        let document = Document::new("urn:a", "urn:uuid:x", Some(&serde_json::json!([1])));
        let entry = Entry::new(&document);
        assert_eq!(&*entry.id, document.id);
        assert_eq!(entry.document(), document);
        // A value not stored by a gateway still ends under its id.
        let foreign = Entry {
            id: "/.well-known/mercure/subscriptions/a/b".into(),
            stored: "not json".into(),
        };
        let ended = foreign.document().update(false);
        assert_eq!(ended.topics, ["/.well-known/mercure/subscriptions/a/b"]);
        assert!(ended.private);
    }

    #[test]
    fn documents_and_updates_are_the_hubs() {
        let payload = serde_json::json!({"foo": "bar"});
        let document = Document::new(
            "https://example.com/{selector}",
            "urn:uuid:bb3de268-05b0-4c65-b44e-8f9acefc29d6",
            Some(&payload),
        );
        // The spec's example.
        assert_eq!(
            document.id,
            "/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2F%7Bselector%7D/urn%3Auuid%3Abb3de268-05b0-4c65-b44e-8f9acefc29d6"
        );
        let stored = serde_json::to_string(&document).unwrap();
        assert!(!stored.contains("@context") && !stored.contains("lastEventID"));
        let back: Document = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, document);
        let ended = document.update(false);
        assert!(ended.private);
        assert_eq!(ended.topics, std::slice::from_ref(&document.id));
        assert!(ended.id.starts_with("urn:uuid:"));
        let data: serde_json::Value = serde_json::from_str(&ended.data).unwrap();
        assert_eq!(data["@context"], CONTEXT);
        assert_eq!(data["type"], "Subscription");
        assert_eq!(data["topic"], "https://example.com/{selector}");
        assert_eq!(data["active"], false);
        assert_eq!(data["payload"], payload);
        // Fields in the hub's order.
        let keys: Vec<&str> = ["@context", "id", "type", "subscriber", "topic", "active"]
            .into_iter()
            .collect();
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| ended.data.find(&format!("\"{k}\"")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{}", ended.data);
        assert!(document.update(true).data.contains("\"active\": true"));
    }
}
