//! `StreamId`: the position of an event in its topic's Redis stream (`<ms>-<seq>`), which is
//! also the SSE event id a single-topic subscriber sees and the id a publisher gets back.

use std::fmt;

/// A Redis stream entry id. Ordered as Redis orders them; `StreamId::ZERO` (`0-0`) is the
/// position before the first event of a topic.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a stream id (expected <milliseconds>-<sequence>)")]
pub struct StreamIdError;

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub fn new(ms: u64, seq: u64) -> StreamId {
        StreamId { ms, seq }
    }

    /// Parses the exact `<ms>-<seq>` form Redis returns (decimal, no sign, no spaces).
    pub fn parse(text: &str) -> Result<StreamId, StreamIdError> {
        let (ms, seq) = text.split_once('-').ok_or(StreamIdError)?;
        Ok(StreamId {
            ms: parse_decimal(ms)?,
            seq: parse_decimal(seq)?,
        })
    }
}

/// Strict decimal: `u64::from_str` alone would also accept a leading `+`.
fn parse_decimal(text: &str) -> Result<u64, StreamIdError> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StreamIdError);
    }
    text.parse().map_err(|_| StreamIdError)
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({self})")
    }
}

impl std::str::FromStr for StreamId {
    type Err = StreamIdError;
    fn from_str(s: &str) -> Result<StreamId, StreamIdError> {
        StreamId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<(u64, u64)>) {
        let got = StreamId::parse(input).ok().map(|id| (id.ms, id.seq));
        assert_eq!(got, expected, "input {input:?}");
    }

    #[test]
    fn parses_only_the_redis_form() {
        check("1732492800123-0", Some((1732492800123, 0)));
        check("0-0", Some((0, 0)));
        check("5-18446744073709551615", Some((5, u64::MAX)));
        check("5-18446744073709551616", None);
        check("1732492800123", None);
        check("+1-0", None);
        check("1--0", None);
        check("-", None);
        check("1-0 ", None);
        check("", None);
    }

    #[test]
    fn orders_like_redis() {
        let a = StreamId::new(5, 9);
        let b = StreamId::new(6, 0);
        assert!(StreamId::ZERO < a && a < b);
        assert_eq!(StreamId::parse(&b.to_string()), Ok(b));
    }

    proptest::proptest! {
        #[test]
        fn round_trips(ms: u64, seq: u64) {
            let id = StreamId::new(ms, seq);
            proptest::prop_assert_eq!(StreamId::parse(&id.to_string()), Ok(id));
        }

        #[test]
        fn never_panics(s in "\\PC{0,48}") {
            let _ = StreamId::parse(&s);
        }
    }
}
