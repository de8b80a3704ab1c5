//! `POST /publish`: the input is the body. What serde_json refuses the handler answers with a
//! 400; what it reads goes through `PublishBody::validate`, which must answer a 400 or 413
//! naming the fault, or a request that fits the grammar and carries the data as sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sse_gateway::http::PublishBody;
use ssegw_fuzz::{is_event_type, is_topic};
use ssegw_protocol::frame::EventType;

/// Small, so that "data is larger" is within the fuzzer's reach.
const MAX_EVENT_BYTES: usize = 64;

fuzz_target!(|input: &[u8]| {
    let Ok(body) = serde_json::from_slice::<PublishBody>(input) else {
        return;
    };
    // Only an object is a body (a derived deserializer would also take an array).
    assert!(input.trim_ascii_start().starts_with(b"{"));
    let topic = body.topic.clone();
    let event = body.event.clone().filter(|e| !e.is_empty());
    let data = match &body.data {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    match body.validate(MAX_EVENT_BYTES) {
        Ok(request) => {
            assert!(is_topic(request.topic.as_str()));
            assert_eq!(request.topic.as_str(), topic);
            assert_eq!(
                request.event.as_ref().map(EventType::as_str),
                event.as_deref()
            );
            assert!(event.as_deref().is_none_or(is_event_type));
            assert!(!request.data.is_empty() && request.data.len() <= MAX_EVENT_BYTES);
            assert_eq!(Some(request.data), data);
        }
        Err(e) => {
            let message = e.message();
            match e.status().as_u16() {
                413 => assert!(message.contains("data"), "{message}"),
                400 => assert!(
                    ["topic", "event", "data"]
                        .iter()
                        .any(|w| message.contains(w)),
                    "{message}"
                ),
                other => panic!("status {other}: {message}"),
            }
            // A fault must really be there.
            let fault = !is_topic(&topic)
                || event.as_deref().is_some_and(|e| !is_event_type(e))
                || data
                    .as_ref()
                    .is_none_or(|d| d.is_empty() || d.len() > MAX_EVENT_BYTES);
            assert!(fault, "refused a valid body: {message}");
        }
    }
});
