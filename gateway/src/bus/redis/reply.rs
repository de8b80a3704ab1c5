//! Reading Redis's answers: errors told apart (the library's refusals are answers, not
//! outages) and `ssegw_read` pages, resume ranges and the newest events turned into framed
//! events. No I/O.

use std::sync::Arc;

use redis::Value;
use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::{StreamId, Traceparent};

use crate::bus::{Beat, BusError, Page};
use crate::fanout::event::Event;

pub(super) fn malformed() -> BusError {
    BusError::Unavailable("malformed ssegw_read reply".into())
}

pub(super) fn unavailable(e: redis::RedisError) -> BusError {
    BusError::Unavailable(explain(&e))
}

/// Redis's error, led by its cause in words an operator acts on: a wrong password, a missing
/// permission (Redis's message names it), an untrusted certificate, an unreachable address.
/// Neither the URL nor the password is part of any of them.
pub(super) fn explain(e: &redis::RedisError) -> String {
    let text = e.to_string();
    let cause = match e.code() {
        Some("WRONGPASS") => "authentication failed, wrong username or password",
        Some("NOAUTH") => {
            "Redis requires authentication: give a user and password (--redis-username, \
             --redis-password-file, or in the URL)"
        }
        Some("NOPERM") => "permission denied: the Redis user lacks a permission",
        _ if e.kind() == redis::ErrorKind::AuthenticationFailed => {
            "authentication failed, wrong username or password"
        }
        _ if text.contains("certificate") || text.contains("UnknownIssuer") => {
            "TLS: the Redis server's certificate is not trusted (check --redis-ca-file)"
        }
        _ if e.is_connection_refusal() => "Redis is unreachable",
        _ => return text,
    };
    format!("{cause}: {text}")
}

/// Errors raised by the Lua library (`ERR ssegw: ...`) and missing functions are answers, not
/// outages.
pub(super) fn classify(e: redis::RedisError) -> BusError {
    let detail = e.detail().unwrap_or_default();
    if let Some(reason) = detail.strip_prefix("ssegw: ") {
        if reason.starts_with("data is larger than") {
            BusError::TooLarge(reason.to_string())
        } else if reason.starts_with("idempotency key already used") {
            BusError::KeyReused(reason.to_string())
        } else {
            BusError::Rejected(reason.to_string())
        }
    } else if detail.contains("Function not found") {
        BusError::Rejected(detail.to_string())
    } else {
        unavailable(e)
    }
}

/// A reply that should be text (a publish's id, a library's answers), as text.
pub(super) fn text_reply(value: Value) -> Result<String, BusError> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| malformed()),
        Value::SimpleString(text) => Ok(text),
        other => Err(BusError::Unavailable(format!("unexpected reply {other:?}"))),
    }
}

/// An array of strings (a registry call's answer).
pub(super) fn text_list(value: Value) -> Result<Vec<String>, BusError> {
    match value {
        Value::Array(items) => items.into_iter().map(text_reply).collect(),
        other => Err(BusError::Unavailable(format!("unexpected reply {other:?}"))),
    }
}

/// `ssegw_m_beat`'s answer: `rejoined`, the dead replica (or empty), then its fields and
/// documents.
pub(super) fn parse_beat(reply: Vec<String>) -> Result<Beat, BusError> {
    let mut reply = reply.into_iter();
    let (Some(rejoined), Some(dead)) = (reply.next(), reply.next()) else {
        return Err(malformed());
    };
    let mut subscriptions = Vec::new();
    while let Some(field) = reply.next() {
        subscriptions.push((field, reply.next().ok_or_else(malformed)?));
    }
    Ok(Beat {
        rejoined: rejoined == "1",
        dead: (!dead.is_empty()).then_some((dead, subscriptions)),
    })
}

fn as_text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// `{status, head, entries}` as returned by `ssegw_read`.
pub(super) fn parse_page(reply: Value) -> Option<Page> {
    let Value::Array(mut items) = reply else {
        return None;
    };
    if items.len() != 3 {
        return None;
    }
    let Value::Array(raw_entries) = items.pop()? else {
        return None;
    };
    let gap = match as_text(&items[0])? {
        "ok" => None,
        "trimmed" => Some(GapReason::Trimmed),
        "lost" => Some(GapReason::Lost),
        _ => return None,
    };
    let head = StreamId::parse(as_text(&items[1])?).ok()?;
    let entries = raw_entries
        .iter()
        .map(parse_entry)
        .collect::<Option<Vec<_>>>()?;
    Some(Page { gap, head, entries })
}

/// A resume page from a plain `XRANGE <stream> <after> + COUNT <count + 1>` (see
/// `commands::range_cmd`): when its first entry is `after` itself, the position is an event this
/// stream holds, so nothing after it was trimmed and it belongs to this history (the Lua `read`
/// decides the same first), and the rest is the page. `Ok(None)` when the first entry is not
/// `after`: only `ssegw_read` can tell what the position is then. `Err` for a malformed reply.
pub(super) fn parse_range(reply: Value, after: StreamId) -> Result<Option<Page>, BusError> {
    let Value::Array(raw_entries) = reply else {
        return Err(malformed());
    };
    let first = match raw_entries.first() {
        None => return Ok(None),
        Some(Value::Array(parts)) => parts
            .first()
            .and_then(as_text)
            .and_then(|id| StreamId::parse(id).ok())
            .ok_or_else(malformed)?,
        Some(_) => return Err(malformed()),
    };
    if first != after {
        return Ok(None);
    }
    let entries = raw_entries[1..]
        .iter()
        .map(parse_entry)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(malformed)?;
    // Only a page read without a position needs the stream's true head (`catch_up`); here the
    // newest id the page knows stands for it.
    let head = entries.last().map_or(after, |e| e.id);
    Ok(Some(Page {
        gap: None,
        head,
        entries,
    }))
}

/// The reply of `commands::newest_cmd` (`XREVRANGE`, newest first) as events in stream order.
pub(super) fn parse_newest(reply: Value) -> Result<Vec<Arc<Event>>, BusError> {
    let Value::Array(raw_entries) = reply else {
        return Err(malformed());
    };
    let mut entries = raw_entries
        .iter()
        .map(parse_entry)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(malformed)?;
    entries.reverse();
    Ok(entries)
}

/// `[id, [field, value, ...]]` with fields `d` (data) and optionally `e` (event type) and `t`
/// (traceparent); with `m` (an update id), `d` is a Mercure update.
fn parse_entry(entry: &Value) -> Option<Arc<Event>> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let id = StreamId::parse(as_text(parts.first()?)?).ok()?;
    let Value::Array(fields) = parts.get(1)? else {
        return None;
    };
    let (mut data, mut event, mut traceparent, mut mercure) = (None, None, None, false);
    for pair in fields.chunks(2) {
        match (pair.first(), pair.get(1)) {
            (Some(key), Some(Value::BulkString(value))) => match as_text(key)? {
                "d" => data = Some(value.as_slice()),
                // Checked as the publish function would: an entry written around it must not
                // forge SSE fields. An invalid type is dropped and the data delivered.
                "e" => {
                    event = std::str::from_utf8(value)
                        .ok()
                        .and_then(|e| EventType::new(e).ok());
                    if event.is_none() {
                        tracing::warn!(%id, "ignoring an invalid event type in a stream entry");
                    }
                }
                "t" => {
                    traceparent = std::str::from_utf8(value)
                        .ok()
                        .and_then(|t| Traceparent::new(t).ok());
                }
                // The update's id, in entries of the Mercure hub's log.
                "m" => mercure = true,
                _ => {}
            },
            _ => return None,
        }
    }
    if mercure {
        return Some(Arc::new(Event::mercure(id, data?).traced(traceparent)));
    }
    Some(Arc::new(
        Event::new(id, event.as_ref(), data?).traced(traceparent),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, data: &str) -> Value {
        Value::Array(vec![
            Value::BulkString(id.into()),
            Value::Array(vec![
                Value::BulkString(b"d".to_vec()),
                Value::BulkString(data.into()),
            ]),
        ])
    }

    fn ids(page: &Page) -> Vec<String> {
        page.entries.iter().map(|e| e.id.to_string()).collect()
    }

    #[test]
    fn a_range_from_a_held_position_is_a_page_and_anything_else_asks_the_library() {
        let after = StreamId::new(5, 0);
        let page = parse_range(
            Value::Array(vec![
                entry("5-0", "a"),
                entry("6-0", "b"),
                entry("6-1", "c"),
            ]),
            after,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (page.gap, ids(&page), page.head),
            (None, vec!["6-0".into(), "6-1".into()], StreamId::new(6, 1))
        );
        let caught_up = parse_range(Value::Array(vec![entry("5-0", "a")]), after)
            .unwrap()
            .unwrap();
        assert_eq!((ids(&caught_up).len(), caught_up.head), (0, after));
        // Trimmed past, never held, or an empty stream: only ssegw_read can say which.
        assert!(parse_range(Value::Array(vec![entry("7-0", "x")]), after)
            .unwrap()
            .is_none());
        assert!(parse_range(Value::Array(vec![]), after).unwrap().is_none());
        assert!(parse_range(Value::Nil, after).is_err());
        assert!(parse_range(Value::Array(vec![entry("5-0", "a"), Value::Int(1)]), after).is_err());
    }

    #[test]
    fn the_newest_come_back_in_stream_order() {
        let newest =
            parse_newest(Value::Array(vec![entry("7-0", "c"), entry("6-1", "b")])).unwrap();
        let ids: Vec<String> = newest.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, ["6-1", "7-0"]);
        assert!(parse_newest(Value::Array(vec![])).unwrap().is_empty());
        assert!(parse_newest(Value::Nil).is_err());
    }
}
