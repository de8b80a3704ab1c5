//! The event data the harness publishes and expects back: topic index, per-topic sequence
//! number and publish time, as a small JSON object with an optional padding field. Pure
//! formatting and parsing; the parser reads only this exact shape, without allocating.

use std::time::{SystemTime, UNIX_EPOCH};

/// What every published event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// Index of the topic in the run's layout (`layout::Layout::topic_name`).
    pub topic: u32,
    /// Per-topic sequence number, from 0, in publish order.
    pub seq: u64,
    /// Publish time in microseconds since the Unix epoch.
    pub sent_us: u64,
}

/// Microseconds since the Unix epoch; every process of a run reads the same clock.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `{"t":3,"seq":12,"ts":1732492800123456}`, with `,"pad":"xxx"` before the brace when
/// `padding` is not zero.
pub fn format(payload: &Payload, padding: usize) -> String {
    let mut out = format!(
        r#"{{"t":{},"seq":{},"ts":{}"#,
        payload.topic, payload.seq, payload.sent_us
    );
    if padding > 0 {
        out.push_str(r#","pad":""#);
        out.extend(std::iter::repeat_n('x', padding));
        out.push('"');
    }
    out.push('}');
    out
}

/// Reads what `format` wrote; `None` for anything else.
pub fn parse(data: &[u8]) -> Option<Payload> {
    let rest = data.strip_prefix(br#"{"t":"#)?;
    let (topic, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","seq":"#)?;
    let (seq, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","ts":"#)?;
    let (sent_us, rest) = number(rest)?;
    if rest != b"}" && !(rest.starts_with(br#","pad":""#) && rest.ends_with(b"\"}")) {
        return None;
    }
    Some(Payload {
        topic: u32::try_from(topic).ok()?,
        seq,
        sent_us,
    })
}

/// Reads what `../shared/bench/floor` sends, `{"t":<unix ns>,"seq":k}` with k from 1, as an
/// event of the run's first topic with sequence number k - 1; `None` for anything else.
pub fn parse_reference(data: &[u8]) -> Option<Payload> {
    let rest = data.strip_prefix(br#"{"t":"#)?;
    let (sent_ns, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","seq":"#)?;
    let (seq, rest) = number(rest)?;
    if rest != b"}" {
        return None;
    }
    Some(Payload {
        topic: 0,
        seq: seq.checked_sub(1)?,
        sent_us: sent_ns / 1000,
    })
}

fn number(text: &[u8]) -> Option<(u64, &[u8])> {
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let value = text[..digits]
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some((value, &text[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<(u32, u64, u64)>) {
        let got = parse(input.as_bytes()).map(|p| (p.topic, p.seq, p.sent_us));
        assert_eq!(got, expected, "input {input:?}");
    }

    #[test]
    fn parses_only_its_own_shape() {
        check(
            r#"{"t":3,"seq":12,"ts":1732492800123456}"#,
            Some((3, 12, 1732492800123456)),
        );
        check(r#"{"t":0,"seq":0,"ts":1,"pad":"xx"}"#, Some((0, 0, 1)));
        check(r#"{"t":3,"seq":12}"#, None);
        check(r#"{"t":3,"seq":-1,"ts":1}"#, None);
        check(r#"{"t":3,"seq":1,"ts":1,"x":1}"#, None);
        check(r#"{"t":4294967296,"seq":1,"ts":1}"#, None);
        check("hello", None);
    }

    #[test]
    fn reads_the_references_frames() {
        let got =
            |input: &str| parse_reference(input.as_bytes()).map(|p| (p.topic, p.seq, p.sent_us));
        assert_eq!(
            got(r#"{"t":1764820800123456789,"seq":1}"#),
            Some((0, 0, 1764820800123456))
        );
        assert_eq!(got(r#"{"t":5000,"seq":300}"#), Some((0, 299, 5)));
        assert_eq!(got(r#"{"t":5000,"seq":0}"#), None);
        assert_eq!(got(r#"{"t":3,"seq":12,"ts":1}"#), None);
        assert_eq!(got("hello"), None);
    }

    #[test]
    fn format_round_trips() {
        let payload = Payload {
            topic: 7,
            seq: 99,
            sent_us: 123,
        };
        for padding in [0, 1, 100] {
            let text = format(&payload, padding);
            assert_eq!(parse(text.as_bytes()), Some(payload), "{text}");
        }
        assert_eq!(format(&payload, 3).len(), format(&payload, 0).len() + 3 + 9);
    }
}
