//! `GET /history?topic=T[&after=ID][&limit=N]`: a topic's stored events as JSON, the newest or
//! those after a position, with the id to continue from, authorized as subscribing to the topic
//! is. A position is read the way a resume reads it (`Bus::read`), so the answer has the same
//! gap outcome (`trimmed`, `lost`, `invalid-id`) as a resume from there would.

use std::sync::Arc;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use ssegw_protocol::frame::{self, GapReason};
use ssegw_protocol::{cursor, StreamId, Topic};

use super::api::{quote, subscriber_grant, topic_param};
use super::error::ApiError;
use super::state::AppState;
use crate::config::Redacted;
use crate::fanout::event::Event;

/// Events in an answer when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit`.
pub const MAX_LIMIT: usize = 1000;
/// An answer stops before the event that would take its events' data past this many bytes
/// (it always holds one): `limit` events of the largest size would make an answer of many
/// megabytes, more after JSON escaping.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Where the answer starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Position {
    /// No `after`: the newest events.
    Newest,
    /// After this event.
    After(StreamId),
    /// An event id of the gateway that is no position in one topic: a cursor of a connection
    /// on several topics. As a resume would, the answer says `invalid-id` and starts at the
    /// oldest retained event.
    Invalid,
}

/// The parsed query of `GET /history`.
#[derive(Debug)]
pub struct HistoryRequest {
    pub topic: Topic,
    pub position: Position,
    pub limit: usize,
    /// The `access_token` query parameter, if sent.
    pub access_token: Option<Redacted>,
}

impl HistoryRequest {
    /// `topic=` (one topic), `after=` (optional; empty is the same as absent, as
    /// `lastEventId=` is for `/events`), `limit=` (1 to `MAX_LIMIT`) and `access_token=`; other
    /// parameters are ignored. The message of a 400 names the parameter.
    pub fn parse(query: &str) -> Result<HistoryRequest, ApiError> {
        let mut topic: Option<Topic> = None;
        let mut after: Option<String> = None;
        let mut limit: Option<String> = None;
        let mut access_token = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "topic" => {
                    let named = topic_param(&value)?;
                    if topic.as_ref().is_some_and(|t| *t != named) {
                        return Err(ApiError::bad_request(
                            "more than one topic: history is read one topic at a time",
                        ));
                    }
                    topic = Some(named);
                }
                "after" | "limit" => {
                    let slot = if key == "after" {
                        &mut after
                    } else {
                        &mut limit
                    };
                    if slot.is_some() {
                        return Err(ApiError::bad_request(format!("{key} is given twice")));
                    }
                    *slot = Some(value.into_owned());
                }
                "access_token" if !value.is_empty() => {
                    access_token = Some(Redacted(value.into_owned()))
                }
                _ => {}
            }
        }
        let topic =
            topic.ok_or_else(|| ApiError::bad_request("missing topic: add ?topic=<name>"))?;
        let position = match after.as_deref() {
            None | Some("") => Position::Newest,
            Some(id) => match StreamId::parse(id) {
                Ok(id) => Position::After(id),
                Err(_) if cursor::is_cursor(id) => Position::Invalid,
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "invalid after {}: not an event id (<milliseconds>-<sequence>, the id: \
                         of an event)",
                        quote(id)
                    )))
                }
            },
        };
        let limit = match limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "invalid limit {}: a number from 1 to {MAX_LIMIT}",
                        quote(text)
                    ))
                })?,
        };
        Ok(HistoryRequest {
            topic,
            position,
            limit,
            access_token,
        })
    }
}

/// `GET /history`: parse (400), authorize as a subscription to the topic (401/403), read
/// (503 when Redis cannot answer).
pub(super) async fn history(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let request = HistoryRequest::parse(req.query_string())?;
    subscriber_grant(
        &req,
        request.access_token.as_ref(),
        [&request.topic],
        &state,
    )?;
    let topic = &request.topic;
    let answer = match request.position {
        Position::Newest => {
            let events = state.bus.newest(topic, request.limit).await?;
            let kept = events.len() - fitting(events.iter().rev());
            let next = events.last().map_or(StreamId::ZERO, |e| e.id);
            answer(topic, &events[kept..], next, None)
        }
        Position::After(after) => {
            let page = state
                .bus
                .read(topic, after, request.limit, Instant::now())
                .await?;
            // Nothing after the position: continue from it, or, past a gap, from the head.
            let empty = if page.gap.is_some() { page.head } else { after };
            answer_from(topic, &page.entries, empty, page.gap)
        }
        Position::Invalid => {
            let page = state
                .bus
                .read(topic, StreamId::ZERO, request.limit, Instant::now())
                .await?;
            answer_from(topic, &page.entries, page.head, Some(GapReason::InvalidId))
        }
    };
    Ok(HttpResponse::Ok().json(answer))
}

/// How many of `events`, in the order given, fit in `MAX_ANSWER_BYTES` (one at least).
fn fitting<'a>(events: impl Iterator<Item = &'a Arc<Event>>) -> usize {
    let mut bytes = 0;
    let mut count = 0;
    for event in events {
        bytes += event.body.len();
        if count > 0 && bytes > MAX_ANSWER_BYTES {
            break;
        }
        count += 1;
    }
    count
}

/// An answer of the oldest of `events` that fit, continuing after the last of them, or from
/// `empty` when there is none.
fn answer_from(
    topic: &Topic,
    events: &[Arc<Event>],
    empty: StreamId,
    gap: Option<GapReason>,
) -> serde_json::Value {
    let events = &events[..fitting(events.iter())];
    let next = events.last().map_or(empty, |e| e.id);
    answer(topic, events, next, gap)
}

/// The JSON answer: the events in stream order (their type and data as an `EventSource`
/// receives them), the id to continue from, and the gap, if any, before the first event.
fn answer(
    topic: &Topic,
    events: &[Arc<Event>],
    next: StreamId,
    gap: Option<GapReason>,
) -> serde_json::Value {
    let events: Vec<serde_json::Value> = events
        .iter()
        .filter_map(|event| {
            let Some((kind, data)) = frame::body_fields(&event.body) else {
                tracing::warn!(id = %event.id, "an event's frame does not read back");
                return None;
            };
            Some(serde_json::json!({
                "id": event.id.to_string(),
                "event": kind,
                "data": data,
            }))
        })
        .collect();
    serde_json::json!({
        "topic": topic.as_str(),
        "events": events,
        "next": next.to_string(),
        "gap": gap.map(GapReason::as_str),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(query: &str, expected: Result<(&str, Position, usize), &str>) {
        match (HistoryRequest::parse(query), expected) {
            (Ok(request), Ok((topic, position, limit))) => {
                assert_eq!(request.topic.as_str(), topic, "{query}");
                assert_eq!(request.position, position, "{query}");
                assert_eq!(request.limit, limit, "{query}");
            }
            (Err(e), Err(part)) => {
                assert_eq!(e.status(), 400, "{query}");
                assert!(e.message().contains(part), "{query}: {}", e.message());
            }
            (got, _) => panic!("{query}: unexpected {got:?}"),
        }
    }

    #[test]
    fn parses_history_queries() {
        use Position::*;
        let at = |ms| After(StreamId::new(ms, 0));
        check("topic=a", Ok(("a", Newest, DEFAULT_LIMIT)));
        check("topic=a&after=&limit=5", Ok(("a", Newest, 5)));
        check("topic=a&after=7-0&limit=1000", Ok(("a", at(7), 1000)));
        check(
            "topic=a&topic=a&after=0-0",
            Ok(("a", After(StreamId::ZERO), 100)),
        );
        check(
            "topic=a&after=k3f9.m3w9hc3f.0.n-2._",
            Ok(("a", Invalid, 100)),
        );
        check("topic=a&access_token=t&x=1", Ok(("a", Newest, 100)));
        check("", Err("missing topic"));
        check("after=1-0", Err("missing topic"));
        check("topic=a%7D", Err("invalid topic"));
        check("topic=a&topic=b", Err("more than one topic"));
        check("topic=a&after=garbage", Err("invalid after \"garbage\""));
        check("topic=a&after=1732492800123", Err("invalid after"));
        check("topic=a&after=1-0&after=2-0", Err("after is given twice"));
        check(
            "topic=a&limit=0",
            Err("invalid limit \"0\": a number from 1 to 1000"),
        );
        check("topic=a&limit=1001", Err("invalid limit"));
        check("topic=a&limit=ten", Err("invalid limit \"ten\""));
        check("topic=a&limit=-1", Err("invalid limit"));
        check("topic=a&limit=", Err("invalid limit \"\""));
        check("topic=a&limit=5&limit=5", Err("limit is given twice"));
    }

    fn event(ms: u64, data: &str) -> Arc<Event> {
        Arc::new(Event::new(StreamId::new(ms, 0), None, data.as_bytes()))
    }

    #[test]
    fn an_answer_holds_what_fits_and_at_least_one_event() {
        let big = "x".repeat(MAX_ANSWER_BYTES / 2);
        let events = [event(1, &big), event(2, &big), event(3, &big)];
        assert_eq!(fitting(events.iter()), 1);
        let small = [event(1, "a"), event(2, "b")];
        assert_eq!(fitting(small.iter()), 2);
        let huge = [event(1, &"x".repeat(MAX_ANSWER_BYTES * 2))];
        assert_eq!(fitting(huge.iter()), 1);
        assert_eq!(fitting([].iter()), 0);
    }

    #[test]
    fn answers_events_as_an_event_source_reads_them() {
        let topic = Topic::new("orders").unwrap();
        let kind = ssegw_protocol::frame::EventType::new("order.created").unwrap();
        let events = [
            Arc::new(Event::new(StreamId::new(5, 0), Some(&kind), b"a\r\nb")),
            event(6, "{\"id\":42}"),
        ];
        assert_eq!(
            answer(
                &topic,
                &events,
                StreamId::new(6, 0),
                Some(GapReason::Trimmed)
            ),
            serde_json::json!({
                "topic": "orders",
                "events": [
                    {"id": "5-0", "event": "order.created", "data": "a\nb"},
                    {"id": "6-0", "event": null, "data": "{\"id\":42}"},
                ],
                "next": "6-0",
                "gap": "trimmed",
            })
        );
        let empty = answer_from(&topic, &[], StreamId::new(9, 0), None);
        assert_eq!(
            (&empty["events"], &empty["next"], &empty["gap"]),
            (
                &serde_json::json!([]),
                &serde_json::json!("9-0"),
                &serde_json::Value::Null
            )
        );
    }
}
