//! SSE framing as the WHATWG HTML "server-sent events" section parses it: every line break of
//! a payload (CRLF, LF or CR) starts a new `data:` line, a blank line ends the event. Frames are
//! built once per event and shared as `Bytes`; nothing here allocates per subscriber.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest event type accepted, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 64;

/// Event types starting with this prefix are the gateway's own (see [`GAP_EVENT`]).
pub const RESERVED_PREFIX: &str = "ssegw";

/// The control event sent before a stream continues after a gap in a topic's history.
pub const GAP_EVENT: &str = "ssegw-gap";

/// The control event sent just before the gateway ends a stream because the subscriber's
/// token expired: `data: {"reason":"token-expired"}`, no `id:`. The browser reconnects with
/// its credentials as they are then; a page that keeps its token fresh resumes, one that does
/// not gets 401 and stops.
pub const EXPIRED_EVENT: &str = "ssegw-expired";

/// A comment line: keeps idle connections and the proxies on their way open.
pub const KEEPALIVE: &[u8] = b":\n\n";

/// A publisher-chosen SSE event type (`event:` field): 1 to 64 bytes of ASCII letters, digits and
/// `- _ . :`, not starting with the reserved `ssegw` prefix.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EventType(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventTypeError {
    #[error("event type must be 1 to {MAX_EVENT_TYPE_LEN} bytes")]
    Length,
    #[error("event type contains {0:?}; allowed are ASCII letters, digits and - _ . :")]
    BadChar(char),
    #[error("event types starting with \"{RESERVED_PREFIX}\" are reserved for the gateway")]
    Reserved,
}

impl EventType {
    pub fn new(name: &str) -> Result<EventType, EventTypeError> {
        if name.is_empty() || name.len() > MAX_EVENT_TYPE_LEN {
            return Err(EventTypeError::Length);
        }
        if let Some(bad) = name
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(EventTypeError::BadChar(bad));
        }
        if name.starts_with(RESERVED_PREFIX) {
            return Err(EventTypeError::Reserved);
        }
        Ok(EventType(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The part of an event frame that is the same for every subscriber: the optional `event:`
/// line, one `data:` line per payload line, and the blank line that dispatches the event. The
/// event type is checked ([`EventType`]), so no line break can forge another field.
pub fn event_body(event: Option<&EventType>, data: &str) -> Bytes {
    body(event.map(EventType::as_str), data)
}

fn body(event: Option<&str>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 16 + event.map_or(0, str::len));
    if let Some(event) = event {
        out.put_slice(b"event: ");
        out.put_slice(event.as_bytes());
        out.put_u8(b'\n');
    }
    for line in lines(data) {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// The event type and data of a body made by [`event_body`], as an `EventSource` reads them:
/// the data's lines joined with LF, so each line break of the published data (CRLF, LF or CR)
/// is an LF here. `None` for anything `event_body` does not make.
pub fn body_fields(body: &[u8]) -> Option<(Option<&str>, String)> {
    let text = std::str::from_utf8(body).ok()?.strip_suffix("\n\n")?;
    let mut lines = text.split('\n').peekable();
    let event = match lines.peek() {
        Some(line) if line.starts_with("event: ") => lines.next().map(|l| &l["event: ".len()..]),
        _ => None,
    };
    let data = lines
        .map(|line| line.strip_prefix("data: "))
        .collect::<Option<Vec<&str>>>()?;
    if data.is_empty() {
        return None;
    }
    Some((event, data.join("\n")))
}

/// `id: <id>\n` followed by `body`: a complete event frame.
pub fn with_id(id: &str, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(id.len() + 5 + body.len());
    put_id(&mut out, id);
    out.put_slice(body);
    out.freeze()
}

/// Appends an `id:` line; ids never contain line breaks (they are stream ids or cursors).
pub fn put_id(out: &mut BytesMut, id: &str) {
    out.put_slice(b"id: ");
    out.put_slice(id.as_bytes());
    out.put_u8(b'\n');
}

/// The first frame of every stream: the reconnection delay and, when given, the event id the
/// client resumes from if it loses the connection before its first event. A block without
/// `data:` dispatches no event, but browsers still record its id as `lastEventId`.
pub fn preamble(retry_ms: u64, id: Option<&str>) -> Bytes {
    let mut out = BytesMut::with_capacity(48);
    out.put_slice(format!("retry: {retry_ms}\n").as_bytes());
    if let Some(id) = id {
        put_id(&mut out, id);
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// Why a topic's history has a gap, as named in the control event.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GapReason {
    /// The `Last-Event-ID` could not be parsed for this connection's topics.
    InvalidId,
    /// Events after the client's position were trimmed by the retention limit.
    Trimmed,
    /// The history the client's position belongs to is gone (stream deleted, expired, or Redis
    /// restarted without it).
    Lost,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::InvalidId => "invalid-id",
            GapReason::Trimmed => "trimmed",
            GapReason::Lost => "lost",
        }
    }
}

/// The `ssegw-expired` control event.
pub fn expired_event() -> Bytes {
    body(Some(EXPIRED_EVENT), r#"{"reason":"token-expired"}"#)
}

/// The `ssegw-gap` control event: `data: {"topic":"<t>","reason":"<r>"}`. It carries no `id:`,
/// so the client's resume position stays where it was until the next real event.
pub fn gap_event(topic: &str, reason: GapReason) -> Bytes {
    // Topics and reasons are drawn from charsets that need no JSON escaping.
    let data = format!(r#"{{"topic":"{topic}","reason":"{}"}}"#, reason.as_str());
    body(Some(GAP_EVENT), &data)
}

/// Splits at CRLF, LF or CR, the three line breaks SSE parsers accept. An empty payload is one
/// empty line, and a trailing break yields a final empty line, so the payload round-trips.
fn lines(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(text)
            }
            Some(at) => {
                let skip = if text[at..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&text[at + skip..]);
                Some(&text[..at])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(event: Option<&str>, data: &str, expected: &str) {
        let event = event.map(|e| EventType::new(e).unwrap());
        assert_eq!(
            event_body(event.as_ref(), data),
            expected.as_bytes(),
            "data {data:?}"
        );
    }

    #[test]
    fn frames_every_line_break() {
        check(None, "hello", "data: hello\n\n");
        check(Some("order"), "x", "event: order\ndata: x\n\n");
        check(None, "a\nb", "data: a\ndata: b\n\n");
        check(None, "a\r\nb", "data: a\ndata: b\n\n");
        check(None, "a\rb", "data: a\ndata: b\n\n");
        check(None, "a\n\nb", "data: a\ndata: \ndata: b\n\n");
        check(None, "a\n", "data: a\ndata: \n\n");
        check(None, " lead", "data:  lead\n\n");
        check(None, "", "data: \n\n");
        check(
            None,
            "\u{e9}t\u{e9} \u{1f600}",
            "data: \u{e9}t\u{e9} \u{1f600}\n\n",
        );
    }

    #[test]
    fn preamble_and_ids() {
        assert_eq!(preamble(2000, None), &b"retry: 2000\n\n"[..]);
        assert_eq!(preamble(5, Some("1-0")), &b"retry: 5\nid: 1-0\n\n"[..]);
        assert_eq!(with_id("7-1", b"data: x\n\n"), &b"id: 7-1\ndata: x\n\n"[..]);
        assert_eq!(
            gap_event("orders", GapReason::Trimmed),
            &b"event: ssegw-gap\ndata: {\"topic\":\"orders\",\"reason\":\"trimmed\"}\n\n"[..]
        );
    }

    #[test]
    fn bodies_read_back_as_an_event_source_reads_them() {
        let order = EventType::new("order").unwrap();
        for (event, data, expected) in [
            (None, "hello", Some((None, "hello"))),
            (Some(&order), "a\r\nb\rc", Some((Some("order"), "a\nb\nc"))),
            (None, "", Some((None, ""))),
            (None, "a\n", Some((None, "a\n"))),
        ] {
            let body = event_body(event, data);
            let got = body_fields(&body);
            let got = got.as_ref().map(|(e, d)| (*e, d.as_str()));
            assert_eq!(got, expected, "{data:?}");
        }
        for junk in [
            &b"data: x\n"[..],
            b"event: x\n\n",
            b"id: 1-0\ndata: x\n\n",
            b"\xff\n\n",
        ] {
            assert_eq!(body_fields(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn event_types() {
        assert!(EventType::new("order.created:v1").is_ok());
        assert_eq!(EventType::new(""), Err(EventTypeError::Length));
        assert_eq!(EventType::new("a\nb"), Err(EventTypeError::BadChar('\n')));
        assert_eq!(EventType::new("ssegw-gap"), Err(EventTypeError::Reserved));
        assert_eq!(EventType::new(&"e".repeat(65)), Err(EventTypeError::Length));
    }

    proptest::proptest! {
        #[test]
        fn every_line_is_a_data_line(data in "\\PC*|[a\r\n]{0,12}") {
            let body = event_body(None, &data);
            let text = std::str::from_utf8(&body).unwrap();
            let block = text.strip_suffix("\n\n").unwrap();
            let rebuilt: Vec<&str> = block.split('\n').map(|l| l.strip_prefix("data: ").unwrap()).collect();
            let expected = data.replace("\r\n", "\n").replace('\r', "\n");
            proptest::prop_assert_eq!(rebuilt.join("\n"), expected.clone());
            proptest::prop_assert_eq!(body_fields(&body), Some((None, expected)));
        }
    }
}
