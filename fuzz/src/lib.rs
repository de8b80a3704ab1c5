//! What the fuzz targets check against: the grammar of docs/publishing.md and
//! docs/subscribing.md, restated independently of the parsers under test (as
//! `gateway/tests/parsers.rs` does).

use ssegw_protocol::{cursor, TopicSet};

/// docs/publishing.md: 1 to 128 bytes of ASCII letters, digits and `- _ . : / @`.
pub fn is_topic(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b))
}

/// docs/publishing.md: 1 to 64 bytes of ASCII letters, digits and `- _ . :`, not starting with
/// `ssegw`.
pub fn is_event_type(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        && !s.starts_with("ssegw")
}

/// Reads `text` as a cursor for `topics`; whatever is accepted must be one position per topic
/// that survives encoding and decoding again.
pub fn check_cursor(topics: &TopicSet, text: &str) {
    if let Ok(positions) = cursor::decode(topics, text) {
        assert_eq!(positions.len(), topics.len(), "{text:?}");
        let again = cursor::encode(topics, &positions);
        assert_eq!(cursor::decode(topics, &again), Ok(positions), "{text:?}");
    }
}
