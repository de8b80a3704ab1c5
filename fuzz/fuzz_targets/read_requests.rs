//! `GET /presence` and `GET /history`: the input is one query string, read by both. A rejection
//! is a 400 naming a parameter (`topic`; for history also `after` or `limit`); an acceptance
//! holds only valid topics (presence: sorted and distinct, at most its limit), and for history
//! a limit in range and the position the query's `after` names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sse_gateway::http::history::{HistoryRequest, Position, MAX_LIMIT};
use sse_gateway::http::presence::{PresenceRequest, MAX_TOPICS};
use ssegw_fuzz::is_topic;
use ssegw_protocol::{cursor, StreamId, Topic};

fuzz_target!(|input: &[u8]| {
    let query = String::from_utf8_lossy(input);
    match PresenceRequest::parse(&query) {
        Ok(request) => {
            let names: Vec<&str> = request.topics.iter().map(Topic::as_str).collect();
            assert!((1..=MAX_TOPICS).contains(&names.len()), "{names:?}");
            assert!(names.iter().all(|n| is_topic(n)), "{names:?}");
            assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        }
        Err(e) => {
            assert_eq!(e.status().as_u16(), 400, "{}", e.message());
            assert!(e.message().contains("topic"), "{}", e.message());
        }
    }
    match HistoryRequest::parse(&query) {
        Ok(request) => {
            assert!(is_topic(request.topic.as_str()));
            assert!((1..=MAX_LIMIT).contains(&request.limit));
            let after = form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "after")
                .map(|(_, value)| value.into_owned());
            let expected = match after.as_deref() {
                None | Some("") => Position::Newest,
                Some(id) => match StreamId::parse(id) {
                    Ok(id) => Position::After(id),
                    Err(_) => {
                        assert!(cursor::is_cursor(id), "accepted after {id:?}");
                        Position::Invalid
                    }
                },
            };
            assert_eq!(request.position, expected);
        }
        Err(e) => {
            assert_eq!(e.status().as_u16(), 400, "{}", e.message());
            let named = ["topic", "after", "limit"]
                .iter()
                .any(|p| e.message().contains(p));
            assert!(named, "{}", e.message());
        }
    }
});
