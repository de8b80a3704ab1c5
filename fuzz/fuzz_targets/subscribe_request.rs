//! `GET /events`: the input is the query string, then, after the first newline if there is one,
//! the `Last-Event-ID` header. A rejection is a 400 about topics; an acceptance is exactly the
//! sorted, distinct valid topics of the query, with the header's id or else the query's.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use sse_gateway::http::SubscribeRequest;
use ssegw_fuzz::{check_cursor, is_topic};
use ssegw_protocol::Topic;

/// Small, so that "too many topics" is within the fuzzer's reach.
const MAX_TOPICS: usize = 4;

fuzz_target!(|input: &[u8]| {
    let (query, header) = match input.iter().position(|&b| b == b'\n') {
        Some(at) => (&input[..at], Some(&input[at + 1..])),
        None => (input, None),
    };
    let query = String::from_utf8_lossy(query);
    match SubscribeRequest::parse(&query, header, MAX_TOPICS) {
        Ok(request) => {
            let names: Vec<&str> = request.topics.iter().map(Topic::as_str).collect();
            let mut expected = BTreeSet::new();
            let mut query_id = None;
            for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                match &*key {
                    "topic" => {
                        assert!(is_topic(&value), "accepted topic {value:?}");
                        expected.insert(value.into_owned());
                    }
                    "lastEventId" if !value.is_empty() => query_id = Some(value.into_owned()),
                    _ => {}
                }
            }
            assert!((1..=MAX_TOPICS).contains(&names.len()), "{names:?}");
            assert!(names
                .iter()
                .copied()
                .eq(expected.iter().map(String::as_str)));
            let header_id = header
                .filter(|h| !h.is_empty())
                .map(|h| String::from_utf8_lossy(h).into_owned());
            assert_eq!(request.last_event_id, header_id.or(query_id));
            if let Some(id) = &request.last_event_id {
                check_cursor(&request.topics, id);
            }
        }
        Err(e) => {
            assert_eq!(e.status().as_u16(), 400, "{}", e.message());
            assert!(e.message().contains("topic"), "{}", e.message());
        }
    }
});
