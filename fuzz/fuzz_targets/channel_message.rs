//! A message on a topic's Redis channel, as the publish logic (or anyone with access to Redis)
//! sends it. An accepted event is framed verbatim, so it must be a valid event type; the data
//! is the payload's tail; the message written canonically reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssegw_fuzz::is_event_type;
use ssegw_protocol::script::ChannelMessage;

fuzz_target!(|payload: &[u8]| {
    let Ok(message) = ChannelMessage::parse(payload) else {
        return;
    };
    assert!(message.event.is_none_or(is_event_type), "{message:?}");
    assert!(payload.ends_with(message.data));
    let mut canonical = format!("i{}\n", message.id).into_bytes();
    if let Some(event) = message.event {
        canonical.extend_from_slice(format!("e{event}\n").as_bytes());
    }
    canonical.push(b'\n');
    canonical.extend_from_slice(message.data);
    assert_eq!(ChannelMessage::parse(&canonical), Ok(message));
});
