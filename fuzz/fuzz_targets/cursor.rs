//! `Last-Event-ID` read as a cursor. The input is comma-separated topic names (invalid ones
//! skipped; `a,b` when none is left), a newline, then the cursor text; a leading `~` in the text
//! stands for the set's real fingerprint, so the fuzzer gets past it. The text's bytes, read as
//! little-endian `(ms, seq)` pairs, are also encoded and must decode to the same positions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssegw_fuzz::check_cursor;
use ssegw_protocol::{cursor, StreamId, Topic, TopicSet};

fuzz_target!(|input: &[u8]| {
    let (names, text) = match input.iter().position(|&b| b == b'\n') {
        Some(at) => (&input[..at], &input[at + 1..]),
        None => (&b""[..], input),
    };
    let names = String::from_utf8_lossy(names);
    let mut topics: Vec<Topic> = names
        .split(',')
        .filter_map(|n| Topic::new(n).ok())
        .collect();
    if topics.is_empty() {
        topics = vec![Topic::new("a").unwrap(), Topic::new("b").unwrap()];
    }
    let topics = TopicSet::new(topics).unwrap();

    let raw = String::from_utf8_lossy(text);
    let text = match raw.strip_prefix('~') {
        Some(rest) if topics.len() > 1 => {
            let zeros = vec![StreamId::ZERO; topics.len()];
            format!("{}{rest}", &cursor::encode(&topics, &zeros)[..4])
        }
        _ => raw.into_owned(),
    };
    check_cursor(&topics, &text);
    if let Ok(id) = StreamId::parse(&text) {
        assert_eq!(StreamId::parse(&id.to_string()), Ok(id));
    }

    let positions: Vec<StreamId> = input
        .chunks_exact(16)
        .map(|c| {
            let ms = u64::from_le_bytes(c[..8].try_into().unwrap());
            StreamId::new(ms, u64::from_le_bytes(c[8..].try_into().unwrap()))
        })
        .take(topics.len())
        .collect();
    if positions.len() == topics.len() {
        let encoded = cursor::encode(&topics, &positions);
        assert_eq!(cursor::decode(&topics, &encoded), Ok(positions));
    }
});
