//! Properties of every parser that takes outside input: topics, event types, stream ids, cursors,
//! channel messages, the `GET /events` query with `Last-Event-ID`, the `POST /publish` body,
//! the queries of `GET /presence` and `GET /history`, and the Mercure hub's update blob,
//! publish form and subscribe query.
//! For arbitrary and near-valid input alike: no panic, every rejection is a 400 or 413 naming
//! what was wrong, every accepted value fits the documented grammar or round-trips. No I/O.
//! `fuzz/` runs the same invariants unbounded under cargo-fuzz.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write;

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::Value;
use sse_gateway::http::history::{HistoryRequest, Position, MAX_LIMIT};
use sse_gateway::http::presence::{PresenceRequest, MAX_TOPICS as MAX_PRESENCE_TOPICS};
use sse_gateway::http::{ApiError, PublishBody, SubscribeRequest};
use ssegw_protocol::cursor::{self, CursorError};
use ssegw_protocol::frame::{EventType, EventTypeError};
use ssegw_protocol::script::ChannelMessage;
use ssegw_protocol::topic::TopicError;
use ssegw_protocol::{StreamId, Topic, TopicSet};

// The grammar of docs/publishing.md and docs/subscribing.md, restated independently of the
// parsers under test.

/// docs/publishing.md: 1 to 128 bytes of ASCII letters, digits and `- _ . : / @`.
fn is_topic(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b))
}

/// docs/publishing.md: 1 to 64 bytes of ASCII letters, digits and `- _ . :`, not starting with
/// `ssegw`.
fn is_event_type(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        && !s.starts_with("ssegw")
}

/// A string of decimal digits: `None` when it is not one, `Some(None)` when it overflows u64.
fn decimal_value(text: &str) -> Option<Option<u64>> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = text.trim_start_matches('0');
    Some(if significant.is_empty() {
        Some(0)
    } else {
        significant.parse().ok()
    })
}

fn set_of(names: &[String]) -> TopicSet {
    TopicSet::new(names.iter().map(|n| Topic::new(n).unwrap()).collect()).unwrap()
}

fn names_of(set: &TopicSet) -> Vec<&str> {
    set.iter().map(Topic::as_str).collect()
}

fn base36(mut value: u64) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(value % 36) as usize]);
        value /= 36;
        if value == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).unwrap()
}

// Strategies.

fn topic_name() -> impl Strategy<Value = String> {
    prop_oneof![
        // Short names collide often, so deduplication is exercised.
        "[a-d]{1,2}",
        "[-A-Za-z0-9_.:/@]{1,128}",
    ]
}

fn event_name() -> impl Strategy<Value = String> {
    "[-A-Za-z0-9_.:]{1,64}".prop_filter("reserved", |s| !s.starts_with("ssegw"))
}

/// A character outside the topic charset, biased to the ones that matter on the wire.
fn bad_topic_char() -> impl Strategy<Value = char> {
    prop_oneof![
        select(
            "\0\n\r\t {}*?[%&=+#\"\\,\u{7f}\u{e9}\u{fffd}\u{2028}\u{1f600}"
                .chars()
                .collect::<Vec<_>>()
        ),
        any::<char>().prop_filter("in the charset", |c| !is_topic(&c.to_string())),
    ]
}

/// Outside the event type charset: everything outside the topic charset, and `/` and `@`.
fn bad_event_char() -> impl Strategy<Value = char> {
    prop_oneof![bad_topic_char(), select(&['/', '@'][..])]
}

/// A valid name with one bad character inserted somewhere.
fn with_bad_char(
    name: impl Strategy<Value = String>,
    bad: impl Strategy<Value = char>,
) -> impl Strategy<Value = (String, char)> {
    (name, bad, any::<Index>()).prop_map(|(mut name, bad, at)| {
        name.insert(at.index(name.len() + 1), bad);
        (name, bad)
    })
}

fn id_part() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(u64::MAX),
        0u64..1000,
        1_700_000_000_000u64..1_800_000_000_000,
        any::<u64>(),
    ]
}

fn position() -> impl Strategy<Value = StreamId> {
    (id_part(), id_part()).prop_map(|(ms, seq)| StreamId::new(ms, seq))
}

fn topic_set(sizes: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = TopicSet> {
    btree_set(topic_name(), sizes).prop_map(|names| set_of(&names.into_iter().collect::<Vec<_>>()))
}

fn set_and_positions(
    sizes: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = (TopicSet, Vec<StreamId>)> {
    topic_set(sizes).prop_flat_map(|set| {
        let n = set.len();
        (Just(set), vec(position(), n))
    })
}

// Topics and event types.

proptest! {
    #[test]
    fn topic_accepts_exactly_the_grammar(
        s in prop_oneof![
            any::<String>(),
            "[-A-Za-z0-9_.:/@]{0,130}",
            "[-A-Za-z0-9_.:/@ {}*\u{e9}]{0,140}",
            "[a-z]{120,136}",
        ]
    ) {
        match Topic::new(&s) {
            Ok(topic) => {
                prop_assert!(is_topic(&s), "accepted {s:?}");
                prop_assert_eq!(topic.as_str(), s.as_str());
            }
            Err(e) => {
                prop_assert!(!is_topic(&s), "rejected {s:?}: {e}");
                prop_assert!(e.to_string().contains("topic"), "{e}");
            }
        }
    }

    #[test]
    fn topic_with_one_bad_char_names_it((s, bad) in with_bad_char(topic_name(), bad_topic_char())) {
        let expected = if s.len() > 128 { TopicError::TooLong } else { TopicError::BadChar(bad) };
        prop_assert_eq!(Topic::new(&s), Err(expected));
    }

    #[test]
    fn topic_set_is_sorted_distinct_and_complete(names in vec(topic_name(), 0..20)) {
        let topics: Vec<Topic> = names.iter().map(|n| Topic::new(n).unwrap()).collect();
        match TopicSet::new(topics) {
            None => prop_assert!(names.is_empty()),
            Some(set) => {
                prop_assert!(set.as_slice().windows(2).all(|w| w[0] < w[1]), "{set:?}");
                let expected: BTreeSet<&str> = names.iter().map(String::as_str).collect();
                prop_assert_eq!(names_of(&set), expected.into_iter().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn event_type_accepts_exactly_the_grammar(
        s in prop_oneof![
            any::<String>(),
            "(ssegw|SSEGW|sseg)?[-A-Za-z0-9_.:]{0,62}",
            "(ssegw|SSEGW|sseg)?[-A-Za-z0-9_.:/ ]{0,66}",
        ]
    ) {
        match EventType::new(&s) {
            Ok(event) => {
                prop_assert!(is_event_type(&s), "accepted {s:?}");
                prop_assert_eq!(event.as_str(), s.as_str());
            }
            Err(e) => {
                prop_assert!(!is_event_type(&s), "rejected {s:?}: {e}");
                prop_assert!(e.to_string().contains("event type"), "{e}");
            }
        }
    }

    #[test]
    fn event_type_near_misses_name_the_problem(
        (s, bad) in with_bad_char(event_name(), bad_event_char()),
        name in event_name(),
    ) {
        let expected =
            if s.len() > 64 { EventTypeError::Length } else { EventTypeError::BadChar(bad) };
        prop_assert_eq!(EventType::new(&s), Err(expected));
        let reserved = format!("ssegw{}", &name[..name.len().min(59)]);
        prop_assert_eq!(EventType::new(&reserved), Err(EventTypeError::Reserved));
    }
}

// Stream ids and cursors.

fn decimal_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        (u128::from(u64::MAX) + 1..=u128::MAX).prop_map(|n| n.to_string()),
        "0{1,24}[0-9]{0,3}",
        "[-+ 0-9a-fA-F_.]{0,4}",
        Just(String::new()),
    ]
}

proptest! {
    /// Complements shared's round trip: near misses (overflow, signs, leading zeros, other
    /// separators) are rejected, and whatever is accepted is the number the text says.
    #[test]
    fn stream_id_accepts_only_two_u64_decimals(
        ms in decimal_text(),
        separator in select(&["-", "--", "_", " - ", ".", ""][..]),
        seq in decimal_text(),
    ) {
        let text = format!("{ms}{separator}{seq}");
        let expected = text
            .split_once('-')
            .and_then(|(ms, seq)| Some((decimal_value(ms)?, decimal_value(seq)?)));
        match (StreamId::parse(&text), expected) {
            (Ok(id), Some((Some(ms), Some(seq)))) => prop_assert_eq!(id, StreamId::new(ms, seq)),
            (Ok(id), _) => prop_assert!(false, "accepted {text:?} as {id}"),
            (Err(_), Some((Some(ms), Some(seq)))) => {
                // Only a non-canonical spelling (leading zeros) may be refused.
                prop_assert_ne!(text, StreamId::new(ms, seq).to_string());
            }
            (Err(e), _) => prop_assert!(e.to_string().contains("stream id"), "{e}"),
        }
    }

    /// Any topic set (1 to 16 real names), any u64 positions; the text follows the format of
    /// docs/subscribing.md ("Event ids"), read back here by an independent decoder.
    #[test]
    fn cursor_round_trips_in_the_documented_format((set, positions) in set_and_positions(1..=16)) {
        let text = cursor::encode(&set, &positions);
        prop_assert_eq!(cursor::decode(&set, &text), Ok(positions.clone()));
        if let [only] = positions[..] {
            prop_assert_eq!(text, only.to_string());
            return Ok(());
        }
        let alphabet = |b: u8| b.is_ascii_digit() || b.is_ascii_lowercase() || b"._-".contains(&b);
        prop_assert!(text.bytes().all(alphabet), "{text}");
        let parts: Vec<&str> = text.split('.').collect();
        prop_assert_eq!(parts.len(), 2 + set.len(), "{}", text);
        prop_assert_eq!(parts[0].len(), 4, "{}", text);
        let base = u64::from_str_radix(parts[1], 36).unwrap();
        prop_assert_eq!(base, positions.iter().map(|p| p.ms).max().unwrap());
        for (part, expected) in parts[2..].iter().zip(&positions) {
            let read = match part.split_once('-') {
                _ if *part == "_" => StreamId::ZERO,
                Some((delta, seq)) => StreamId::new(
                    base - u64::from_str_radix(delta, 36).unwrap(),
                    u64::from_str_radix(seq, 36).unwrap(),
                ),
                None => StreamId::new(base - u64::from_str_radix(part, 36).unwrap(), 0),
            };
            prop_assert_eq!(read, *expected, "part {} of {}", part, text);
        }
    }

    #[test]
    fn cursor_for_another_topic_set_is_refused(
        (a, positions) in set_and_positions(1..=5),
        b in topic_set(1..=5),
    ) {
        prop_assume!(a != b);
        let text = cursor::encode(&a, &positions);
        let decoded = cursor::decode(&b, &text);
        if a.len() == 1 && b.len() == 1 {
            // A single topic's id is the bare stream id; it carries no fingerprint by design.
            prop_assert_eq!(decoded, Ok(positions));
        } else if a.len() == b.len() && cursor::encode(&b, &positions)[..4] == text[..4] {
            // A fingerprint collision (1 in 36^4) cannot be told apart; it must still decode.
            prop_assert_eq!(decoded, Ok(positions));
        } else {
            prop_assert!(decoded.is_err(), "{text} decoded for {b:?}");
        }
    }

    #[test]
    fn damaged_cursors_are_refused(
        (set, positions) in set_and_positions(2..=6),
        damage in 0..6u8,
        number in any::<u64>(),
        at in any::<Index>(),
        extra in select(&["0", "_", "a-1", "", "zz"][..]),
    ) {
        let text = cursor::encode(&set, &positions);
        let mut parts: Vec<String> = text.split('.').map(str::to_owned).collect();
        let base = u64::from_str_radix(&parts[1], 36).unwrap();
        let (damaged, expected) = match damage {
            0 => {
                parts.pop();
                (parts.join("."), CursorError::TopicMismatch)
            }
            1 => {
                // Positions are read before the count is checked: one that cannot be read is
                // malformed, one that can makes the count wrong.
                let delta = match extra {
                    "" => None,
                    "_" => Some(0),
                    other => u64::from_str_radix(other.split('-').next().unwrap(), 36).ok(),
                };
                let expected = match delta {
                    Some(delta) if delta <= base => CursorError::TopicMismatch,
                    _ => CursorError::Malformed,
                };
                (format!("{text}.{extra}"), expected)
            }
            2 => {
                let fp = format!("{:0>4}", base36(number % 36u64.pow(4)));
                prop_assume!(fp != parts[0]);
                parts[0] = fp;
                (parts.join("."), CursorError::TopicMismatch)
            }
            3 => {
                // A delta reaching below millisecond zero.
                let i = 2 + at.index(set.len());
                parts[i] =
                    base.checked_add(1 + number % 1000).map_or("3w5e11264sgsg".into(), base36);
                (parts.join("."), CursorError::Malformed)
            }
            4 => {
                // u64::MAX + 1, and fourteen digits.
                parts[1] = ["3w5e11264sgsg", "10000000000000"][(number % 2) as usize].into();
                (parts.join("."), CursorError::Malformed)
            }
            _ => {
                let i = 2 + at.index(set.len());
                parts[i] = if number % 2 == 0 { "-1".into() } else { "A".into() };
                (parts.join("."), CursorError::Malformed)
            }
        };
        prop_assert_eq!(cursor::decode(&set, &damaged), Err(expected), "{} from {}", damaged, text);
    }

    /// Any text after the set's real fingerprint (so decoding gets past it) is refused, or is
    /// one position per topic that re-encodes to itself.
    #[test]
    fn decoded_cursors_are_positions_of_the_set(
        set in topic_set(2..=4),
        rest in prop_oneof![
            any::<String>(),
            "[0-9a-z_.-]{0,40}",
            "[0-9a-z]{3,13}(\\.(_|[0-9a-c]{1,2}(-[0-9a-z]{1,3})?)){2,4}",
        ],
    ) {
        let fp = &cursor::encode(&set, &vec![StreamId::ZERO; set.len()])[..4];
        let text = format!("{fp}.{rest}");
        if let Ok(positions) = cursor::decode(&set, &text) {
            prop_assert_eq!(positions.len(), set.len());
            prop_assert_eq!(cursor::decode(&set, &cursor::encode(&set, &positions)), Ok(positions));
        }
    }
}

// Channel messages: what the publish logic announces on a topic's Redis channel.

fn channel_payload(
    id: StreamId,
    event: Option<&str>,
    unknown: &[(u8, Vec<u8>)],
    id_at: usize,
    data: &[u8],
) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = unknown
        .iter()
        .map(|(tag, value)| [&[*tag][..], value].concat())
        .collect();
    if let Some(event) = event {
        lines.push(format!("e{event}").into_bytes());
    }
    lines.insert(id_at.min(lines.len()), format!("i{id}").into_bytes());
    let mut payload = Vec::new();
    for line in lines {
        payload.extend_from_slice(&line);
        payload.push(b'\n');
    }
    payload.push(b'\n');
    payload.extend_from_slice(data);
    payload
}

fn unknown_header() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (
        any::<u8>().prop_filter("known tag", |b| !b"ietm\n".contains(b)),
        vec(
            any::<u8>().prop_filter("line break", |&b| b != b'\n'),
            0..12,
        ),
    )
}

proptest! {
    #[test]
    fn channel_messages_round_trip(
        id in position(),
        event in proptest::option::of(event_name()),
        unknown in vec(unknown_header(), 0..3),
        id_at in 0..4usize,
        data in vec(any::<u8>(), 0..200),
    ) {
        let payload = channel_payload(id, event.as_deref(), &unknown, id_at, &data);
        let message = ChannelMessage::parse(&payload);
        prop_assert_eq!(message, Ok(ChannelMessage { id, event: event.as_deref(), traceparent: None, mercure: false, data: &data }));
    }

    /// The event is written verbatim into the SSE `event:` line, so an accepted one must be a
    /// valid event type: a CR in it would start a forged field.
    #[test]
    fn accepted_channel_messages_are_safe_to_frame(
        payload in prop_oneof![
            vec(any::<u8>(), 0..128),
            (position(), event_name(), vec(any::<u8>(), 0..20), any::<Index>(),
             select(&[b'\r', b'\n', 0, b' ', 0xff, b'e', b'i', b'-', b'9', b'{', b'@'][..]))
                .prop_map(|(id, event, data, at, byte)| {
                    let mut payload = channel_payload(id, Some(&event), &[], 0, &data);
                    payload.insert(at.index(payload.len() + 1), byte);
                    payload
                }),
        ]
    ) {
        if let Ok(message) = ChannelMessage::parse(&payload) {
            prop_assert!(message.event.is_none_or(is_event_type), "{message:?}");
            prop_assert!(payload.ends_with(message.data));
            // The canonical form of what was accepted reads back the same. A byte inserted
            // at a line start may make a Mercure header (`m`), which the canonical form leaves
            // out: it is compared apart.
            let mut canonical = channel_payload(message.id, message.event, &[], 0, message.data);
            if message.mercure {
                canonical.splice(0..0, b"mx\n".iter().copied());
            }
            prop_assert_eq!(ChannelMessage::parse(&canonical), Ok(message));
        }
    }
}

// `GET /events`: the query string and the `Last-Event-ID` header.

/// Percent-encodes `s` for a query: bytes outside the topic charset always, others when `mask`
/// says so, in upper or lower case hex; a space may become `+`.
fn query_encode(s: &str, mask: u64) -> String {
    let mut out = String::new();
    for (i, b) in s.bytes().enumerate() {
        let encode = (mask >> (i % 63)) & 1 == 1;
        if b == b' ' && encode {
            out.push('+');
        } else if !encode && (b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b)) {
            out.push(char::from(b));
        } else if mask >> 63 == 1 {
            write!(out, "%{b:02x}").unwrap();
        } else {
            write!(out, "%{b:02X}").unwrap();
        }
    }
    out
}

/// One `key=value` pair of a query, with the value the gateway should see after decoding.
#[derive(Debug, Clone)]
enum Param {
    Topic { value: String, raw: String },
    LastEventId { value: String, raw: String },
    Ignored(&'static str),
}

impl Param {
    fn raw(&self) -> &str {
        match self {
            Param::Topic { raw, .. } | Param::LastEventId { raw, .. } => raw,
            Param::Ignored(raw) => raw,
        }
    }
}

fn topic_param() -> impl Strategy<Value = Param> {
    let key = select(&["topic", "%74opic", "t%6Fpic"][..]);
    let value = prop_oneof![
        8 => topic_name(),
        2 => with_bad_char(topic_name(), bad_topic_char()).prop_map(|(s, _)| s),
        1 => Just(String::new()),
        1 => (129usize..3000).prop_map(|n| "a".repeat(n)),
    ];
    prop_oneof![
        12 => (key, value, any::<u64>()).prop_map(|(key, value, mask)| {
            let raw = format!("{key}={}", query_encode(&value, mask));
            Param::Topic { value, raw }
        }),
        1 => Just(Param::Topic { value: String::new(), raw: "topic".into() }),
        // Broken or non-UTF-8 escapes: decoded lossily by the query parser.
        2 => (topic_name(), any::<Index>(), select(&["%FF", "%C3", "%", "%G1", "%2", "%E2%80"][..]))
            .prop_map(|(mut value, at, escape)| {
                value.insert_str(at.index(value.len() + 1), escape);
                let raw = format!("topic={value}");
                let value = form_urlencoded::parse(raw.as_bytes()).next().unwrap().1.into_owned();
                Param::Topic { value, raw }
            }),
    ]
}

fn last_event_id_param() -> impl Strategy<Value = Param> {
    let value = prop_oneof![
        Just(String::new()),
        position().prop_map(|p| p.to_string()),
        "[0-9a-z._-]{1,30}",
        "\\PC{0,20}",
        "[\0\n\r a-z]{1,8}",
    ];
    (value, any::<u64>()).prop_map(|(value, mask)| {
        let raw = format!("lastEventId={}", query_encode(&value, mask));
        Param::LastEventId { value, raw }
    })
}

fn query_params() -> impl Strategy<Value = Vec<Param>> {
    let ignored = select(
        &[
            "",
            "&",
            "=",
            "x=1",
            "topics=a",
            "Topic=b",
            "lastEventID=1-0",
            "topic%3Da",
            "%20topic=c",
        ][..],
    )
    .prop_map(Param::Ignored);
    vec(
        prop_oneof![5 => topic_param(), 2 => last_event_id_param(), 1 => ignored],
        0..12,
    )
}

fn header() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        Just(Some(Vec::new())),
        position().prop_map(|p| Some(p.to_string().into_bytes())),
        vec(any::<u8>(), 1..40).prop_map(Some),
    ]
}

/// What every answer to a query must satisfy, whatever the input.
fn check_subscribe(
    got: &Result<SubscribeRequest, ApiError>,
    header: Option<&[u8]>,
    max_topics: usize,
) -> Result<(), TestCaseError> {
    match got {
        Ok(request) => {
            let names = names_of(&request.topics);
            prop_assert!((1..=max_topics).contains(&names.len()), "{names:?}");
            prop_assert!(names.iter().all(|n| is_topic(n)), "{names:?}");
            prop_assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
            if let Some(header) = header.filter(|h| !h.is_empty()) {
                let header = String::from_utf8_lossy(header);
                prop_assert_eq!(request.last_event_id.as_deref(), Some(&*header));
            }
            prop_assert_ne!(request.last_event_id.as_deref(), Some(""));
            // Whatever id came in, reading it for these topics must not panic.
            if let Some(id) = &request.last_event_id {
                if let Ok(positions) = cursor::decode(&request.topics, id) {
                    prop_assert_eq!(positions.len(), request.topics.len());
                }
            }
        }
        Err(e) => {
            prop_assert_eq!(e.status().as_u16(), 400, "{}", e.message());
            prop_assert!(e.message().contains("topic"), "{}", e.message());
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn subscribe_survives_any_query(
        query in prop_oneof![
            any::<String>(),
            "((topic|lastEventId|%74opic)(=[-a-z0-9%&=+._:/@ {]{0,12})?&?){0,10}",
        ],
        header in header(),
        max_topics in 1..=256usize,
    ) {
        let got = SubscribeRequest::parse(&query, header.as_deref(), max_topics);
        check_subscribe(&got, header.as_deref(), max_topics)?;
    }

    /// Near-valid queries with a known decoding: the answer follows from the decoded values.
    #[test]
    fn subscribe_answers_follow_the_decoded_query(
        params in query_params(),
        header in header(),
        max_topics in 1..=20usize,
    ) {
        let query = params.iter().map(Param::raw).collect::<Vec<_>>().join("&");
        let got = SubscribeRequest::parse(&query, header.as_deref(), max_topics);
        check_subscribe(&got, header.as_deref(), max_topics)?;

        let mut topics = Vec::new();
        let mut bad = Vec::new();
        let mut query_id = None;
        for param in &params {
            match param {
                Param::Topic { value, .. } if is_topic(value) => topics.push(value.as_str()),
                Param::Topic { value, .. } => bad.push(value.as_str()),
                Param::LastEventId { value, .. } if !value.is_empty() => {
                    query_id = Some(value.as_str());
                }
                _ => {}
            }
        }
        let distinct: BTreeSet<&str> = topics.iter().copied().collect();
        let count = topics.len() + bad.len();
        match got {
            Err(e) if !bad.is_empty() => {
                let names_a_bad_topic = e.message().starts_with("invalid topic")
                    && bad.iter().any(|b| e.message().contains(&quoted(b)));
                let too_many = count > max_topics && e.message().contains("too many topics");
                prop_assert!(names_a_bad_topic || too_many, "{query:?}: {}", e.message());
            }
            Ok(request) => {
                prop_assert!(bad.is_empty(), "{query:?} accepted despite {bad:?}");
                let expected: Vec<&str> = distinct.iter().copied().collect();
                prop_assert_eq!(names_of(&request.topics), expected, "{}", query);
                if header.as_deref().is_none_or(<[u8]>::is_empty) {
                    prop_assert_eq!(request.last_event_id.as_deref(), query_id, "{}", query);
                }
            }
            Err(e) if distinct.is_empty() => {
                prop_assert!(e.message().contains("missing topic"), "{query:?}: {}", e.message());
            }
            Err(e) => {
                // Repeating one topic may count against the limit, or may not; more distinct
                // topics than the limit always do.
                prop_assert!(count > max_topics, "{query:?} refused: {}", e.message());
                prop_assert!(e.message().contains("too many topics"), "{}", e.message());
            }
        }
    }

    #[test]
    fn subscribe_with_many_repeated_topics(
        repeats in 0..600usize,
        others in btree_set("[e-z]{1,3}", 0..40),
        max_topics in 1..=256usize,
    ) {
        let mut query = "topic=a&".repeat(repeats);
        for other in &others {
            write!(query, "topic={other}&").unwrap();
        }
        let got = SubscribeRequest::parse(&query, None, max_topics);
        check_subscribe(&got, None, max_topics)?;
        let distinct = others.len() + usize::from(repeats > 0);
        let count = repeats + others.len();
        match got {
            Ok(request) => prop_assert_eq!(request.topics.len(), distinct),
            Err(e) if distinct == 0 => {
                prop_assert!(e.message().contains("missing topic"), "{}", e.message());
            }
            Err(e) => {
                prop_assert!(count > max_topics, "refused: {}", e.message());
                prop_assert!(e.message().contains("too many topics"), "{}", e.message());
            }
        }
    }

    /// A client's query for any valid set, in any order with repeats, and the cursor it was
    /// given: the gateway reads back the same sorted set and the same positions.
    #[test]
    fn subscribe_round_trips_a_set_and_its_cursor(
        (set, positions) in set_and_positions(1..=16),
        order in any::<u64>(),
        repeats in vec(any::<Index>(), 0..4),
        in_header in any::<bool>(),
    ) {
        let mut names: Vec<&str> = names_of(&set);
        let n = names.len();
        names.rotate_left(order as usize % n);
        if order % 2 == 1 {
            names.reverse();
        }
        for repeat in &repeats {
            names.push(names[repeat.index(names.len())]);
        }
        let id = cursor::encode(&set, &positions);
        let mut query = form_urlencoded::Serializer::new(String::new());
        for name in &names {
            query.append_pair("topic", name);
        }
        if !in_header {
            query.append_pair("lastEventId", &id);
        }
        let query = query.finish();
        let header = in_header.then_some(id.as_bytes());

        let request = SubscribeRequest::parse(&query, header, names.len()).unwrap();
        prop_assert_eq!(&request.topics, &set);
        prop_assert_eq!(request.last_event_id.as_deref(), Some(id.as_str()));
        prop_assert_eq!(cursor::decode(&request.topics, &id), Ok(positions));
    }
}

// `GET /presence` and `GET /history`: their query strings.

proptest! {
    #[test]
    fn presence_survives_any_query(
        query in prop_oneof![
            any::<String>(),
            "((topic|access_token|%74opic)(=[-a-z0-9%&=+._:/@ {]{0,12})?&?){0,10}",
        ],
    ) {
        match PresenceRequest::parse(&query) {
            Ok(request) => {
                let names: Vec<&str> = request.topics.iter().map(Topic::as_str).collect();
                prop_assert!((1..=MAX_PRESENCE_TOPICS).contains(&names.len()), "{names:?}");
                prop_assert!(names.iter().all(|n| is_topic(n)), "{names:?}");
                prop_assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
            }
            Err(e) => {
                prop_assert_eq!(e.status().as_u16(), 400, "{}", e.message());
                prop_assert!(e.message().contains("topic"), "{}", e.message());
            }
        }
    }

    #[test]
    fn history_survives_any_query(
        query in prop_oneof![
            any::<String>(),
            "((topic|after|limit|access_token)(=[-a-z0-9%&=+._:/@ {]{0,12})?&?){0,8}",
        ],
    ) {
        match HistoryRequest::parse(&query) {
            Ok(request) => {
                prop_assert!(is_topic(request.topic.as_str()));
                prop_assert!((1..=MAX_LIMIT).contains(&request.limit), "{}", request.limit);
            }
            Err(e) => {
                prop_assert_eq!(e.status().as_u16(), 400, "{}", e.message());
                let names_one = ["topic", "after", "limit"].iter().any(|p| e.message().contains(p));
                prop_assert!(names_one, "{}", e.message());
            }
        }
    }

    /// One valid topic, and an `after` and a `limit` of known kinds, in any order: a bad
    /// `after` is named first, then a bad `limit`; otherwise the position and limit are read
    /// as documented (an id: after it; a cursor of several topics: invalid; nothing or empty:
    /// the newest; no limit: 100).
    #[test]
    fn history_answers_follow_the_query(
        topic in topic_name(),
        after in prop_oneof![
            Just(None),
            Just(Some(String::new())),
            position().prop_map(|p| Some(p.to_string())),
            set_and_positions(2..=4).prop_map(|(set, p)| Some(cursor::encode(&set, &p))),
            "[a-z]{1,8}".prop_map(Some),
        ],
        limit in prop_oneof![Just(None), (0..=1200usize).prop_map(|n| Some(n.to_string())), "[a-z]{1,4}".prop_map(Some)],
        order in any::<u64>(),
    ) {
        let mut params = vec![format!("topic={}", query_encode(&topic, order))];
        if let Some(after) = &after {
            params.push(format!("after={}", query_encode(after, order.rotate_left(7))));
        }
        if let Some(limit) = &limit {
            params.push(format!("limit={limit}"));
        }
        let n = params.len();
        params.rotate_left(order as usize % n);
        let query = params.join("&");
        let got = HistoryRequest::parse(&query);
        let position = match after.as_deref() {
            None | Some("") => Some(Position::Newest),
            Some(id) => match StreamId::parse(id) {
                Ok(id) => Some(Position::After(id)),
                Err(_) if id.contains('.') => Some(Position::Invalid),
                Err(_) => None,
            },
        };
        let wanted_limit = match limit.as_deref() {
            None => Some(100),
            Some(text) => text.parse::<usize>().ok().filter(|n| (1..=MAX_LIMIT).contains(n)),
        };
        match (got, position, wanted_limit) {
            (Ok(request), Some(position), Some(limit)) => {
                prop_assert_eq!(request.topic.as_str(), topic.as_str());
                prop_assert_eq!(request.position, position, "{}", query);
                prop_assert_eq!(request.limit, limit, "{}", query);
            }
            (Err(e), None, _) => prop_assert!(e.message().starts_with("invalid after"), "{}", e.message()),
            (Err(e), Some(_), None) => prop_assert!(e.message().starts_with("invalid limit"), "{}", e.message()),
            (got, _, _) => prop_assert!(false, "{query:?}: unexpected {got:?}"),
        }
    }

    /// Only a cursor of several topics is a cursor: never a stream id, never a single topic's.
    #[test]
    fn cursors_are_told_from_other_ids(
        (set, positions) in set_and_positions(1..=16),
        other in "\\PC{0,40}",
    ) {
        let id = cursor::encode(&set, &positions);
        prop_assert_eq!(cursor::is_cursor(&id), set.len() > 1, "{}", id);
        if cursor::is_cursor(&other) {
            prop_assert!(StreamId::parse(&other).is_err());
            prop_assert!(other.split('.').count() >= 4, "{}", other);
        }
    }
}

// `POST /publish`: the JSON body, then `PublishBody::validate`.

/// One member of the body object, as JSON text (duplicates and any order are possible).
#[derive(Debug, Clone)]
struct Member {
    key: String,
    json: String,
}

fn member(key: &str, value: impl Strategy<Value = String>) -> impl Strategy<Value = Member> {
    let key = key.to_owned();
    value.prop_map(move |json| Member {
        key: key.clone(),
        json,
    })
}

fn json_string(s: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    s.prop_map(|s| serde_json::to_string(&s).unwrap())
}

fn not_a_string() -> impl Strategy<Value = String> {
    select(
        &[
            "null",
            "5",
            "-1.5",
            "true",
            "[]",
            "{}",
            "[\"orders\"]",
            "{\"topic\":\"a\"}",
        ][..],
    )
    .prop_map(str::to_owned)
}

fn topic_member() -> impl Strategy<Value = Member> {
    member(
        "topic",
        prop_oneof![
            8 => json_string(topic_name()),
            2 => json_string(with_bad_char(topic_name(), bad_topic_char()).prop_map(|(s, _)| s)),
            1 => json_string((129usize..5000).prop_map(|n| "t".repeat(n))),
            1 => Just("\"\"".to_owned()),
            1 => not_a_string(),
        ],
    )
}

fn event_member() -> impl Strategy<Value = Option<Member>> {
    proptest::option::weighted(
        0.7,
        member(
            "event",
            prop_oneof![
                3 => json_string(event_name()),
                2 => json_string(
                    with_bad_char(event_name(), bad_event_char()).prop_map(|(s, _)| s)
                ),
                1 => json_string(event_name().prop_map(|s| format!("ssegw{s}"))),
                1 => json_string((65usize..200).prop_map(|n| "e".repeat(n))),
                1 => Just("\"\"".to_owned()),
                1 => Just("null".to_owned()),
                1 => select(&["1", "true", "[]", "{}", "[\"order\"]"][..]).prop_map(str::to_owned),
            ],
        ),
    )
}

/// Data of every JSON type; strings of one to four byte characters around `max` bytes; arrays
/// nested far below and far beyond serde_json's depth limit (128).
fn data_member(max: usize) -> impl Strategy<Value = Option<Member>> {
    let near_max = (
        select(&['x', '\u{e9}', '\u{20ac}', '\u{1f600}', '\n'][..]),
        0..=8usize,
    )
        .prop_map(move |(c, slack)| {
            let n = (max + 4).saturating_sub(slack) / c.len_utf8();
            serde_json::to_string(&c.to_string().repeat(n)).unwrap()
        });
    let nested = prop_oneof![0..=100usize, 200..=20_000usize]
        .prop_map(|depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth)));
    proptest::option::weighted(
        0.9,
        member(
            "data",
            prop_oneof![
                4 => json_string("\\PC{1,40}|[a\r\n]{1,6}"),
                1 => Just("\"\"".to_owned()),
                2 => near_max,
                1 => select(
                    &[
                        "null", "true", "0", "-0", "1e15", "18446744073709551616", "1e400",
                        "\"\\ud800\"", "\"\\u0000\"", "{\"b\":1,\"a\":[null]}", "[]", "{}",
                    ][..]
                )
                .prop_map(str::to_owned),
                1 => nested,
            ],
        ),
    )
}

fn unknown_member() -> impl Strategy<Value = Member> {
    (
        select(&["Topic", "id", "extra", "", "data ", "\u{0}"][..]),
        select(&["1", "null", "\"orders\""][..]),
    )
        .prop_map(|(key, json)| Member {
            key: key.to_owned(),
            json: json.to_owned(),
        })
}

fn publish_case() -> impl Strategy<Value = (usize, Vec<Member>)> {
    select(&[1usize, 8, 64, 1024, 65536][..]).prop_flat_map(|max| {
        let members = (
            proptest::option::weighted(0.95, topic_member()),
            data_member(max),
            event_member(),
            proptest::option::weighted(0.2, unknown_member()),
            proptest::option::weighted(0.2, any::<Index>()),
        )
            .prop_map(|(topic, data, event, unknown, duplicate)| {
                let mut members: Vec<Member> = [topic, data, event]
                    .into_iter()
                    .flatten()
                    .chain(unknown)
                    .collect();
                if let Some(d) = duplicate.filter(|_| !members.is_empty()) {
                    members.push(members[d.index(members.len())].clone());
                }
                members
            })
            .prop_shuffle();
        (Just(max), members)
    })
}

fn body_text(members: &[Member]) -> String {
    let members: Vec<String> = members
        .iter()
        .map(|m| format!("{}:{}", serde_json::to_string(&m.key).unwrap(), m.json))
        .collect();
    format!("{{{}}}", members.join(","))
}

/// What every answer to a body that reached `validate` must satisfy, whatever the input.
fn check_publish(
    body: PublishBody,
    max_event_bytes: usize,
) -> Result<Result<(), ApiError>, TestCaseError> {
    let topic = body.topic.clone();
    let event = body.event.clone();
    let data = match &body.data {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    let retention = ssegw_protocol::retention::Retention::new(
        ssegw_protocol::retention::Limits {
            max_data_bytes: max_event_bytes,
            ..Default::default()
        },
        0,
    );
    match body.validate(&retention) {
        Ok(request) => {
            prop_assert!(is_topic(request.topic.as_str()));
            prop_assert_eq!(request.topic.as_str(), topic);
            prop_assert_eq!(
                request.event.as_ref().map(EventType::as_str),
                event.as_deref().filter(|e| !e.is_empty())
            );
            prop_assert!(request
                .event
                .as_ref()
                .is_none_or(|e| is_event_type(e.as_str())));
            prop_assert!(!request.data.is_empty() && request.data.len() <= max_event_bytes);
            prop_assert_eq!(Some(request.data), data);
            Ok(Ok(()))
        }
        Err(e) => {
            let status = e.status().as_u16();
            prop_assert!(status == 400 || status == 413, "{status} {}", e.message());
            let named = if status == 413 {
                e.message().contains("data")
            } else {
                ["topic", "event", "data"]
                    .iter()
                    .any(|what| e.message().contains(what))
            };
            prop_assert!(named, "{}", e.message());
            Ok(Err(e))
        }
    }
}

proptest! {
    #[test]
    fn publish_survives_any_body(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..200),
            concat!(
                "\\{((\"(topic|data|event|x)\"):",
                "(\"[a-z\\\\ ]{0,5}\"|[0-9.e-]{1,4}|null|true|\\[\\]|\\{\\}),?){0,4}\\}",
            )
            .prop_map(String::into_bytes),
            (publish_case(), any::<Index>(), any::<u8>()).prop_map(|((_, members), at, byte)| {
                let mut bytes = body_text(&members).into_bytes();
                bytes.insert(at.index(bytes.len() + 1), byte);
                bytes
            }),
        ],
        max_event_bytes in select(&[1usize, 64, 65536][..]),
    ) {
        match serde_json::from_slice::<PublishBody>(&bytes) {
            // Accepting and refusing are both fine here; `check_publish` checks either answer.
            // Only an object is a body (a derived deserializer would also take an array).
            Ok(body) => {
                prop_assert!(bytes.trim_ascii_start().starts_with(b"{"), "{body:?}");
                drop(check_publish(body, max_event_bytes)?)
            }
            Err(e) => prop_assert!(e.to_string().contains("line "), "{e}"),
        }
    }

    /// Structured bodies: every member right or wrong in a known way, in any order, with
    /// duplicates and unknown members. The answer must name one of the faults, or accept.
    #[test]
    fn publish_answers_name_a_fault((max_event_bytes, members) in publish_case()) {
        let text = body_text(&members);
        // The faults serde reports, member by member, then the ones `validate` reports.
        let mut decode_faults: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        let mut values = std::collections::HashMap::new();
        for m in &members {
            if !["topic", "data", "event"].contains(&m.key.as_str()) {
                decode_faults.push(format!("unknown field `{}`", m.key));
            } else if !seen.insert(m.key.as_str()) {
                decode_faults.push(format!("duplicate field `{}`", m.key));
            } else {
                match serde_json::from_str::<Value>(&m.json) {
                    Err(e) => {
                        let message = e.to_string();
                        decode_faults.push(message.split(" at line").next().unwrap().to_owned());
                    }
                    Ok(v) if m.key == "topic" && !v.is_string() => {
                        decode_faults.push("invalid type".into());
                    }
                    Ok(v) if m.key == "event" && !(v.is_string() || v.is_null()) => {
                        decode_faults.push("invalid type".into());
                    }
                    Ok(v) => { values.insert(m.key.as_str(), v); }
                }
            }
        }
        for required in ["topic", "data"] {
            if !seen.contains(required) {
                decode_faults.push(format!("missing field `{required}`"));
            }
        }
        let body = match serde_json::from_str::<PublishBody>(&text) {
            Err(e) => {
                prop_assert!(!decode_faults.is_empty(), "{text}: refused: {e}");
                let message = e.to_string();
                prop_assert!(
                    decode_faults.iter().any(|f| message.contains(f.as_str())),
                    "{text}: {message} is none of {decode_faults:?}"
                );
                return Ok(());
            }
            Ok(body) => body,
        };
        prop_assert!(decode_faults.is_empty(), "{text}: accepted despite {decode_faults:?}");

        let topic = values["topic"].as_str().unwrap();
        let event = values.get("event").and_then(Value::as_str).filter(|e| !e.is_empty());
        let data = match &values["data"] {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        };
        let mut faults: Vec<(u16, &str)> = Vec::new();
        if !is_topic(topic) {
            faults.push((400, "invalid topic"));
        }
        if event.is_some_and(|e| !is_event_type(e)) {
            faults.push((400, "invalid event"));
        }
        match &data {
            None => faults.push((400, "data must not be null")),
            Some(d) if d.is_empty() => faults.push((400, "data must not be empty")),
            Some(d) if d.len() > max_event_bytes => faults.push((413, "data is larger than")),
            Some(_) => {}
        }
        match check_publish(body, max_event_bytes)? {
            Ok(()) => prop_assert!(faults.is_empty(), "{text}: accepted despite {faults:?}"),
            Err(e) => prop_assert!(
                faults.iter().any(|&(status, what)| {
                    e.status().as_u16() == status && e.message().contains(what)
                }),
                "{text}: {} {} is none of {faults:?}", e.status(), e.message()
            ),
        }
    }
}

// Named near misses, as tables: one documented example of each kind of fault.

fn check_subscribe_query(query: &str, expected: Result<&[&str], &str>) {
    match (SubscribeRequest::parse(query, None, 16), expected) {
        (Ok(request), Ok(topics)) => assert_eq!(names_of(&request.topics), topics, "{query}"),
        (Err(e), Err(part)) => {
            assert_eq!(e.status().as_u16(), 400, "{query}");
            assert!(e.message().contains(part), "{query}: {}", e.message());
        }
        (got, _) => panic!("{query}: unexpected {got:?}"),
    }
}

#[test]
fn query_near_misses() {
    check_subscribe_query("topic=a%2Fb", Ok(&["a/b"]));
    check_subscribe_query("topic=a%3Ab%40c", Ok(&["a:b@c"]));
    check_subscribe_query("%74opic=a", Ok(&["a"]));
    check_subscribe_query("topic=a%00", Err("invalid topic \"a\\0\""));
    check_subscribe_query("topic=a%0Ab", Err("invalid topic \"a\\nb\""));
    check_subscribe_query("topic=a%0D", Err("invalid topic \"a\\r\""));
    check_subscribe_query("topic=a+b", Err("invalid topic \"a b\""));
    check_subscribe_query("topic=a%26topic%3Db", Err("invalid topic \"a&topic=b\""));
    check_subscribe_query("topic=%FF", Err("invalid topic \"\u{fffd}\""));
    check_subscribe_query("topic=%7Ba%7D", Err("contains '{'"));
    check_subscribe_query(
        &format!("topic={}", "a".repeat(129)),
        Err("longer than 128"),
    );
    check_subscribe_query("topic=a&topic", Err("must not be empty"));
    check_subscribe_query("topics=a&Topic=b", Err("missing topic"));
}

/// How an error message shows a client's value: quoted, its first 64 characters when longer.
fn quoted(value: &str) -> String {
    match value.char_indices().nth(64) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}...", &value[..end]),
    }
}

#[test]
fn id_and_body_near_misses() {
    assert!(StreamId::parse("18446744073709551616-0").is_err());
    assert!(StreamId::parse("0-18446744073709551616").is_err());
    assert_eq!(
        StreamId::parse("18446744073709551615-18446744073709551615"),
        Ok(StreamId::new(u64::MAX, u64::MAX))
    );
    let check_body = |text: &str, part: &str| {
        let message = match serde_json::from_str::<PublishBody>(text) {
            Ok(body) => body
                .validate(&ssegw_protocol::retention::Retention::new(
                    ssegw_protocol::retention::Limits {
                        max_data_bytes: 64,
                        ..Default::default()
                    },
                    0,
                ))
                .unwrap_err()
                .message()
                .to_owned(),
            Err(e) => e.to_string(),
        };
        assert!(message.contains(part), "{text}: {message}");
    };
    check_body(
        r#"{"topic": "a", "data": "x", "extra": 1}"#,
        "unknown field `extra`",
    );
    check_body(
        r#"{"topic": "a", "data": "x", "topic": "b"}"#,
        "duplicate field `topic`",
    );
    check_body(r#"{"data": "x"}"#, "missing field `topic`");
    check_body(r#"{"topic": null, "data": "x"}"#, "invalid type: null");
    check_body(r#"{"topic": "a", "data": null}"#, "data must not be null");
    check_body(r#"{"topic": "a", "data": 1e400}"#, "number out of range");
    check_body(r#"{"topic": "a", "data": "\ud800"}"#, "hex escape");
    check_body(
        r#"{"topic": "a", "data": "x", "event": "ssegw-gap"}"#,
        "reserved",
    );
    check_body(r#"{"topic": "a{b}", "data": "x"}"#, "invalid topic");
    let deep = format!(
        r#"{{"topic": "a", "data": {}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    check_body(&deep, "recursion limit exceeded");
}

// The Mercure hub's parsers (docs/mercure.md): the update blob read back from Redis, the
// publish form and the subscribe query.

/// Every line of a Mercure frame is one of its fields, and it ends with the blank line.
fn mercure_frame_is_clean(frame: &str) -> Result<(), TestCaseError> {
    prop_assert!(frame.ends_with("\n\n"), "{frame:?}");
    let lines: Vec<&str> = frame[..frame.len() - 2].split('\n').collect();
    for line in &lines {
        prop_assert!(
            ["event: ", "retry: ", "id: ", "data: "]
                .iter()
                .any(|field| line.starts_with(field)),
            "forged line {line:?} in {frame:?}"
        );
        prop_assert!(!line.contains('\r'), "{frame:?}");
    }
    prop_assert_eq!(lines.iter().filter(|l| l.starts_with("id: ")).count(), 1);
    Ok(())
}

proptest! {
    /// Any bytes decode into an update or are refused, never a panic; every update round-trips
    /// through its blob, and its frame holds its fields and nothing forged.
    #[test]
    fn mercure_blobs_round_trip_or_are_refused(
        bytes in vec(any::<u8>(), 0..300),
        id in "[^\r\n\x00#][^\r\n\x00]{0,40}",
        topics in vec(".{0,30}", 1..4),
        private in any::<bool>(),
        kind in proptest::option::of("[^\r\n\x00]{1,20}"),
        retry in proptest::option::of(any::<u64>()),
        data in ".{0,200}",
    ) {
        use ssegw_protocol::mercure::update::{decode, encode, Update};
        if let Ok(update) = decode(&bytes) {
            mercure_frame_is_clean(std::str::from_utf8(&update.frame()).unwrap())?;
        }
        prop_assume!(id != "earliest");
        let update = Update { id, topics, private, kind, retry, data };
        prop_assert_eq!(decode(&encode(&update)), Ok(update.clone()));
        mercure_frame_is_clean(std::str::from_utf8(&update.frame()).unwrap())?;
    }

    /// Any publish form gives an update or a 400 or 403, never a panic; an update has its
    /// topics and an id the frame can carry.
    #[test]
    fn mercure_publish_forms_give_an_update_or_a_refusal(body in vec(any::<u8>(), 0..300)) {
        use sse_gateway::mercure::publish::PublishForm;
        match PublishForm::parse(&body).into_update() {
            Ok(update) => {
                prop_assert!(!update.topics.is_empty());
                prop_assert!(ssegw_protocol::mercure::update::check_id(&update.id).is_ok());
                mercure_frame_is_clean(std::str::from_utf8(&update.frame()).unwrap())?;
            }
            Err(e) => prop_assert!(matches!(e.status().as_u16(), 400 | 403), "{}", e.message()),
        }
    }

    /// Any subscribe query and `Last-Event-ID` give selectors or a 400.
    #[test]
    fn mercure_subscribe_queries_give_selectors_or_a_400(
        query in ".{0,200}",
        header in proptest::option::of(vec(any::<u8>(), 0..40)),
    ) {
        use sse_gateway::mercure::subscribe::SubscribeQuery;
        use ssegw_protocol::mercure::selector::Selector;
        match SubscribeQuery::parse(&query, header.as_deref(), Selector::new) {
            Ok(parsed) => prop_assert!(!parsed.selectors.is_empty()),
            Err(e) => prop_assert_eq!(e.status().as_u16(), 400, "{}", e.message()),
        }
    }
}
