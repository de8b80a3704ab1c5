//! Reading Redis's answers: errors told apart (the library's refusals are answers, not
//! outages) and `ssegw_read` pages turned into framed events. No I/O.

use std::sync::Arc;

use redis::Value;
use ssegw_protocol::frame::{EventType, GapReason};
use ssegw_protocol::{StreamId, Traceparent};

use crate::bus::{BusError, Page};
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

/// `[id, [field, value, ...]]` with fields `d` (data) and optionally `e` (event type) and `t`
/// (traceparent).
fn parse_entry(entry: &Value) -> Option<Arc<Event>> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let id = StreamId::parse(as_text(parts.first()?)?).ok()?;
    let Value::Array(fields) = parts.get(1)? else {
        return None;
    };
    let (mut data, mut event, mut traceparent) = (None, None, None);
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
                _ => {}
            },
            _ => return None,
        }
    }
    Some(Arc::new(
        Event::new(id, event.as_ref(), data?).traced(traceparent),
    ))
}
