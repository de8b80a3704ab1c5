//! Resume cursors: the SSE event id of a connection, encoding its position in every topic it
//! subscribes to, so one `Last-Event-ID` resumes all of them. Pure encoding, no I/O.
//!
//! Format (documented in docs/subscribing.md, "Event ids"):
//! - one topic: the Redis stream id itself, `<ms>-<seq>`;
//! - several topics: `<fp>.<base>.<p1>.<p2>...` where `fp` is four base-36 digits fingerprinting
//!   the sorted topic set, `base` is the largest millisecond part in base 36, and each `p` is
//!   `_` for "before the first event" or `<base - ms>` in base 36, followed by `-<seq>` in base
//!   36 when the sequence is not zero. Positions follow the sorted topic order.

use crate::event_id::StreamId;
use crate::topic::TopicSet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("event id is not a valid cursor")]
    Malformed,
    #[error("event id belongs to a different set of topics")]
    TopicMismatch,
}

/// Writes the cursor for `positions` (one per topic of `topics`, same order) into `out`.
pub fn encode_into(out: &mut String, topics: &TopicSet, positions: &[StreamId]) {
    use std::fmt::Write;
    debug_assert_eq!(topics.len(), positions.len());
    if let [only] = positions {
        let _ = write!(out, "{only}");
        return;
    }
    let base = positions.iter().map(|p| p.ms).max().unwrap_or(0);
    push_base36(out, fingerprint(topics), 4);
    out.push('.');
    push_base36(out, base, 1);
    for p in positions {
        out.push('.');
        if *p == StreamId::ZERO {
            out.push('_');
            continue;
        }
        push_base36(out, base - p.ms, 1);
        if p.seq != 0 {
            out.push('-');
            push_base36(out, p.seq, 1);
        }
    }
}

pub fn encode(topics: &TopicSet, positions: &[StreamId]) -> String {
    let mut out = String::with_capacity(16 + 8 * positions.len());
    encode_into(&mut out, topics, positions);
    out
}

/// Decodes a cursor produced by [`encode`] for the same topic set.
pub fn decode(topics: &TopicSet, text: &str) -> Result<Vec<StreamId>, CursorError> {
    if topics.len() == 1 {
        return StreamId::parse(text)
            .map(|id| vec![id])
            .map_err(|_| CursorError::Malformed);
    }
    let mut parts = text.split('.');
    let fp = parts.next().ok_or(CursorError::Malformed)?;
    let base = parse_base36(parts.next().ok_or(CursorError::Malformed)?)?;
    let positions = parts
        .map(|p| parse_position(base, p))
        .collect::<Result<Vec<_>, _>>()?;
    if fp.len() != 4 || parse_base36(fp)? != fingerprint(topics) || positions.len() != topics.len()
    {
        return Err(CursorError::TopicMismatch);
    }
    Ok(positions)
}

/// Whether `text` has the form of a cursor of several topics (whatever their set): an event id
/// the gateway issued that is not a single topic's stream id.
pub fn is_cursor(text: &str) -> bool {
    let mut parts = text.split('.');
    let (Some(fp), Some(base)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(base) = parse_base36(base) else {
        return false;
    };
    let positions: Result<Vec<_>, _> = parts.map(|p| parse_position(base, p)).collect();
    fp.len() == 4 && parse_base36(fp).is_ok() && positions.is_ok_and(|p| p.len() >= 2)
}

fn parse_position(base: u64, text: &str) -> Result<StreamId, CursorError> {
    if text == "_" {
        return Ok(StreamId::ZERO);
    }
    let (delta, seq) = match text.split_once('-') {
        Some((delta, seq)) => (parse_base36(delta)?, parse_base36(seq)?),
        None => (parse_base36(text)?, 0),
    };
    let ms = base.checked_sub(delta).ok_or(CursorError::Malformed)?;
    Ok(StreamId::new(ms, seq))
}

/// FNV-1a over the topic names (each followed by a newline, which no topic contains), reduced
/// to four base-36 digits: enough to catch a cursor replayed against another topic set.
fn fingerprint(topics: &TopicSet) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in topics
        .iter()
        .flat_map(|t| t.as_str().bytes().chain([b'\n']))
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash % 36u64.pow(4)
}

const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

fn push_base36(out: &mut String, mut value: u64, min_width: usize) {
    let mut buf = [0u8; 13];
    let mut start = buf.len();
    while value > 0 || buf.len() - start < min_width {
        start -= 1;
        buf[start] = DIGITS[(value % 36) as usize];
        value /= 36;
    }
    out.extend(buf[start..].iter().map(|&b| b as char));
}

fn parse_base36(text: &str) -> Result<u64, CursorError> {
    if text.is_empty() || text.len() > 13 {
        return Err(CursorError::Malformed);
    }
    text.bytes().try_fold(0u64, |acc, b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'z' => b - b'a' + 10,
            _ => return Err(CursorError::Malformed),
        };
        acc.checked_mul(36)
            .and_then(|v| v.checked_add(u64::from(digit)))
            .ok_or(CursorError::Malformed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Topic;

    fn set(names: &[&str]) -> TopicSet {
        TopicSet::new(names.iter().map(|n| Topic::new(n).unwrap()).collect()).unwrap()
    }

    fn check(topics: &[&str], positions: &[StreamId], expected: &str) {
        let topics = set(topics);
        let text = encode(&topics, positions);
        assert_eq!(text, expected);
        assert_eq!(decode(&topics, &text), Ok(positions.to_vec()));
    }

    #[test]
    fn single_topic_is_the_stream_id() {
        check(
            &["a"],
            &[StreamId::new(1732492800123, 0)],
            "1732492800123-0",
        );
        check(&["a"], &[StreamId::ZERO], "0-0");
    }

    #[test]
    fn several_topics_are_compact() {
        let positions = [
            StreamId::new(1732492800123, 0),
            StreamId::new(1732492800100, 2),
            StreamId::ZERO,
        ];
        let text = encode(&set(&["a", "b", "c"]), &positions);
        // 1732492800123 is m3w9hc3f in base 36; 23 ms earlier is the delta n.
        assert!(text.ends_with(".m3w9hc3f.0.n-2._"), "{text}");
        assert_eq!(text.len(), 4 + ".m3w9hc3f.0.n-2._".len(), "{text}");
        assert_eq!(
            decode(&set(&["a", "b", "c"]), &text),
            Ok(positions.to_vec())
        );
    }

    #[test]
    fn rejects_foreign_and_broken_cursors() {
        let positions = [StreamId::new(10, 0), StreamId::new(9, 1)];
        let text = encode(&set(&["a", "b"]), &positions);
        assert_eq!(
            decode(&set(&["a", "c"]), &text),
            Err(CursorError::TopicMismatch)
        );
        assert_eq!(
            decode(&set(&["a", "b", "c"]), &text),
            Err(CursorError::TopicMismatch)
        );
        assert_eq!(decode(&set(&["a"]), &text), Err(CursorError::Malformed));
        assert_eq!(
            decode(&set(&["a", "b"]), "10-0"),
            Err(CursorError::Malformed)
        );
        assert_eq!(
            decode(&set(&["a", "b"]), "zzzz.a.b"),
            Err(CursorError::Malformed)
        );
        assert_eq!(decode(&set(&["a", "b"]), ""), Err(CursorError::Malformed));
    }

    #[test]
    fn tells_cursors_from_other_ids() {
        let cursor = encode(
            &set(&["a", "b"]),
            &[StreamId::new(10, 0), StreamId::new(9, 1)],
        );
        for (text, expected) in [
            (cursor.as_str(), true),
            ("k3f9.m3w9hc3f.0.n-2._", true),
            ("k3f9.m3w9hc3f._._", true),
            // One position is no cursor: a single topic's id is its stream id.
            ("k3f9.m3w9hc3f.0", false),
            ("1732492800123-0", false),
            ("zzzz.a.b", false),
            ("k3f.m3w9hc3f.0.0", false),
            ("K3F9.m3w9hc3f.0.0", false),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(is_cursor(text), expected, "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn round_trips(raw in proptest::collection::vec((0u64..1u64 << 45, 0u64..1000), 2..6)) {
            let names: Vec<String> = (0..raw.len()).map(|i| format!("t{i}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let topics = set(&names);
            let positions: Vec<StreamId> = raw.iter().map(|&(ms, seq)| StreamId::new(ms, seq)).collect();
            let text = encode(&topics, &positions);
            proptest::prop_assert_eq!(decode(&topics, &text), Ok(positions));
        }

        #[test]
        fn never_panics(s in "\\PC{0,64}") {
            let _ = is_cursor(&s);
            let _ = decode(&set(&["a", "b"]), &s);
            let _ = decode(&set(&["a"]), &s);
        }
    }
}
